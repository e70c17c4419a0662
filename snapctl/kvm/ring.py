"""One vCPU's dirty ring: the shared array of struct kvm_dirty_gfn.

Ownership: the ring is mapped when its vCPU is created and unmapped when the
vCPU closes; only the vCPU's own thread (at a ring-full exit) or a collector
that holds :attr:`Vm.ring_lock` while the vCPU is out of KVM_RUN may harvest.

Protocol (Documentation/virt/kvm/api.rst, KVM_CAP_DIRTY_LOG_RING):

* The fetch index is free-running; entry i lives at ``i & (n - 1)``.
* An entry is ready iff ``flags == KVM_DIRTY_GFN_F_DIRTY`` exactly. We read the
  flags words first (one numpy copy) and only then the slot/offset of the
  ready entries. x86 is TSO, so program-order loads are load-acquire.
* We stop at the first entry that is not DIRTY: entries are produced in
  order, skipping one would lose it.
* Harvested entries get ``flags = KVM_DIRTY_GFN_F_RESET`` written to the flags
  word only (never slot/offset: the kernel owns those until reset).
* Then KVM_RESET_DIRTY_RINGS (on the VM) re-protects the pages and the kernel
  sets the flags back to 0.
"""

from __future__ import annotations

import mmap

import numpy as np

from .constants import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_GFN_SIZE, KVM_DIRTY_LOG_PAGE_OFFSET, PAGE_SIZE

DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert DIRTY_GFN_DTYPE.itemsize == KVM_DIRTY_GFN_SIZE


class DirtyRing:
    def __init__(self, vcpu_fd: int, entries: int, on_harvest=None):
        if entries <= 0 or entries & (entries - 1):
            raise ValueError(f"ring entries must be a power of two, got {entries}")
        self.entries = entries
        self._mask = entries - 1
        # MAP_SHARED + PROT_READ|PROT_WRITE: KVM refuses private or executable maps.
        self._mm = mmap.mmap(
            vcpu_fd,
            entries * KVM_DIRTY_GFN_SIZE,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE,
        )
        self._gfns = np.frombuffer(self._mm, dtype=DIRTY_GFN_DTYPE)
        self._flags = self._gfns["flags"]  # a strided view: writes touch only the flags words
        self.fetch_index = 0  # free-running
        self._on_harvest = on_harvest

    def close(self) -> None:
        if self._mm is not None:
            del self._flags, self._gfns
            self._mm.close()
            self._mm = None

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """Collect every ready entry: returns (slot, offset) arrays, in ring order.

        Vectorised: one pass over the flags from the fetch index (split in two
        contiguous runs where it wraps), then a gather of the ready prefix.
        """
        if self._mm is None:
            raise ValueError("dirty ring is closed")
        start = self.fetch_index & self._mask
        # Positions in fetch order: [start, n) then [0, start).
        flags = np.concatenate((self._flags[start:], self._flags[:start]))
        not_ready = np.flatnonzero(flags != KVM_DIRTY_GFN_F_DIRTY)
        count = int(not_ready[0]) if not_ready.size else self.entries
        if count == 0:
            return np.empty(0, np.uint32), np.empty(0, np.uint64)
        first = min(count, self.entries - start)  # entries before the wrap
        rest = count - first
        # Flags were read above, before these loads of slot/offset.
        slots = np.concatenate((self._gfns["slot"][start:start + first], self._gfns["slot"][:rest]))
        offsets = np.concatenate((self._gfns["offset"][start:start + first], self._gfns["offset"][:rest]))
        self._flags[start:start + first] = KVM_DIRTY_GFN_F_RESET
        if rest:
            self._flags[:rest] = KVM_DIRTY_GFN_F_RESET
        self.fetch_index += count
        if self._on_harvest is not None:
            self._on_harvest(count)
        return slots, offsets
