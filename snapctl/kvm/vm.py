"""The VM fd: memslots, dirty ring / dirty bitmap set-up, ring reset.

Kernel API sections: 4.35 KVM_SET_USER_MEMORY_REGION, 4.8 KVM_GET_DIRTY_LOG,
4.118 KVM_CLEAR_DIRTY_LOG, 7.18 KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
8.29 KVM_CAP_DIRTY_LOG_RING{,_ACQ_REL}, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import signal
import threading
from dataclasses import dataclass

import numpy as np

from . import ioctls as I
from . import structs as S
from ._libc import ioctl
from .constants import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_XSAVE2,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_PML_EXTRA,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
    PAGE_SIZE,
)
from .errors import DirtyRingConfigError, DirtyRingResetMismatch, KvmError, KvmIoctlError


@dataclass(frozen=True)
class Memslot:
    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    log_dirty: bool

    @property
    def first_page(self) -> int:
        return self.guest_phys_addr // PAGE_SIZE

    @property
    def npages(self) -> int:
        return self.memory_size // PAGE_SIZE


@dataclass(frozen=True)
class DirtyRingLimits:
    """What this kernel accepts for the dirty ring, in entries."""

    cap: int  # KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING
    min_entries: int
    max_entries: int
    reserved_entries: int
    with_bitmap: bool  # KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP

    @property
    def cap_name(self) -> str:
        return "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" if self.cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL else "KVM_CAP_DIRTY_LOG_RING"

    def validate(self, entries: int) -> None:
        """Raise DirtyRingConfigError naming the allowed range unless ``entries`` is acceptable."""
        allowed = (
            f"the dirty ring size must be a power of two from {self.min_entries} "
            f"to {self.max_entries} entries"
        )
        if not isinstance(entries, int) or isinstance(entries, bool):
            raise DirtyRingConfigError(f"{allowed}; got {entries!r}")
        if entries <= 0 or entries & (entries - 1):
            raise DirtyRingConfigError(f"{allowed}; {entries} is not a power of two")
        if entries < self.min_entries:
            raise DirtyRingConfigError(f"{allowed}; {entries} is below the kernel minimum")
        if entries > self.max_entries:
            raise DirtyRingConfigError(f"{allowed}; {entries} is above the kernel maximum")


def _cpu_logs_with_pml() -> bool:
    """PML makes KVM reserve 512 more ring entries (kvm_dirty_ring_get_rsvd_entries)."""
    try:
        with open("/sys/module/kvm_intel/parameters/pml") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


_BLOCKABLE_SIGNALS = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


class Vm:
    """A VM fd. Create through :meth:`System.create_vm`; close deterministically."""

    def __init__(self, system: "System"):  # noqa: F821
        self.system = system
        self.fd = ioctl(system.fd, I.KVM_CREATE_VM, 0, name="KVM_CREATE_VM")
        os.set_inheritable(self.fd, False)  # KVM_CREATE_VM already sets O_CLOEXEC; keep it explicit
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list = []
        self.dirty_ring_entries = 0  # 0: ring not enabled
        self.manual_protect = False
        self._ring_lock = threading.RLock()  # harvest (which counts) runs inside it
        self._harvested_since_reset = 0

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        for v in list(self.vcpus):
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (per-VM answers, e.g. the ring size limit)."""
        return ioctl(self.fd, I.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int, name: str = "KVM_ENABLE_CAP") -> None:
        ec = S.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, I.KVM_ENABLE_CAP, ec, name=name)

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        """KVM_SET_TSS_ADDR: VMX needs three pages below 4 GiB it may use; harmless elsewhere."""
        ioctl(self.fd, I.KVM_SET_TSS_ADDR, addr, name="KVM_SET_TSS_ADDR")

    @property
    def xsave_size(self) -> int:
        """Bytes of XSAVE state: KVM_CAP_XSAVE2's answer if larger than the legacy 4 KiB."""
        return max(C.sizeof(S.KvmXsave), self.check_extension(KVM_CAP_XSAVE2))

    # -- memslots --------------------------------------------------------------
    def set_memory_region(self, slot: int, guest_phys_addr: int, host_addr: int, size: int, *, log_dirty: bool) -> Memslot:
        """KVM_SET_USER_MEMORY_REGION. ``log_dirty`` sets KVM_MEM_LOG_DIRTY_PAGES (ring or bitmap)."""
        if guest_phys_addr % PAGE_SIZE or size % PAGE_SIZE or host_addr % PAGE_SIZE:
            raise ValueError("memslot address, size and host address must be page aligned")
        region = S.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_phys_addr,
            memory_size=size,
            userspace_addr=host_addr,
        )
        ioctl(self.fd, I.KVM_SET_USER_MEMORY_REGION, region, name="KVM_SET_USER_MEMORY_REGION")
        ms = Memslot(slot, guest_phys_addr, size, host_addr, log_dirty)
        self.memslots[slot] = ms
        return ms

    # -- dirty ring ------------------------------------------------------------
    def dirty_ring_limits(self) -> DirtyRingLimits | None:
        """What the kernel accepts, or None when it has no dirty ring at all.

        Prefers KVM_CAP_DIRTY_LOG_RING_ACQ_REL (explicit acquire/release ordering,
        required on weakly ordered CPUs); on x86 both caps behave the same.
        The answer to KVM_CHECK_EXTENSION is the largest ring in *bytes*.
        """
        for cap in (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING):
            max_bytes = self.check_extension(cap)
            if max_bytes > 0:
                break
        else:
            return None
        reserved = KVM_DIRTY_RING_RSVD_ENTRIES + (KVM_DIRTY_RING_PML_EXTRA if _cpu_logs_with_pml() else 0)
        # kvm_vm_ioctl_enable_dirty_log_ring(): size >= rsvd * sizeof(gfn) and size >= PAGE_SIZE.
        min_bytes = max(reserved * KVM_DIRTY_GFN_SIZE, PAGE_SIZE)
        min_entries = 1 << (min_bytes // KVM_DIRTY_GFN_SIZE - 1).bit_length()
        return DirtyRingLimits(
            cap=cap,
            min_entries=min_entries,
            max_entries=max_bytes // KVM_DIRTY_GFN_SIZE,
            reserved_entries=reserved,
            with_bitmap=self.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0,
        )

    def enable_dirty_ring(self, entries: int) -> DirtyRingLimits:
        """Turn on the per-vCPU dirty ring with ``entries`` entries (KVM_ENABLE_CAP).

        Must come before any vCPU exists (each vCPU maps its ring at creation) and
        before any memslot is registered with dirty logging. The size is checked
        here first so a bad value gets an error naming the allowed range, not EINVAL.

        KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (arm64 only today) would mean some pages
        are dirtied outside any vCPU context and land in a bitmap instead of a ring;
        a VMM must then also collect KVM_GET_DIRTY_LOG. x86 never reports it, and
        snapctl refuses to run where it is reported rather than silently lose pages.
        """
        if self.vcpus:
            raise DirtyRingConfigError("the dirty ring must be enabled before any vCPU is created")
        if self.dirty_ring_entries:
            raise DirtyRingConfigError("the dirty ring is already enabled on this VM")
        if self.manual_protect:
            raise DirtyRingConfigError("this VM already uses dirty-bitmap tracking; ring and bitmap are exclusive")
        if any(ms.log_dirty for ms in self.memslots.values()):
            raise DirtyRingConfigError("enable the dirty ring before registering dirty-logged memslots")
        limits = self.dirty_ring_limits()
        if limits is None:
            raise DirtyRingConfigError("this kernel has no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
        limits.validate(entries)
        if limits.with_bitmap:
            raise DirtyRingConfigError(
                "this kernel reports KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: pages dirtied outside a vCPU "
                "would go to a bitmap snapctl does not collect in ring mode; use bitmap tracking"
            )
        try:
            self.enable_cap(limits.cap, entries * KVM_DIRTY_GFN_SIZE, name=f"KVM_ENABLE_CAP({limits.cap_name})")
        except KvmIoctlError as e:
            raise DirtyRingConfigError(
                f"kernel refused a dirty ring of {entries} entries ({e.strerror}); allowed: power of two "
                f"from {limits.min_entries} to {limits.max_entries}"
            ) from None
        self.dirty_ring_entries = entries
        return limits

    def _note_harvested(self, n: int) -> None:
        with self._ring_lock:
            self._harvested_since_reset += n

    @property
    def ring_lock(self) -> threading.RLock:
        """Serialises harvest+reset across vCPU threads (ring-full exits) and the collector."""
        return self._ring_lock

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect every harvested page; returns entries reset.

        The count must equal what was harvested since the last reset: a smaller
        number means the kernel skipped entries (a lost page); a larger one means
        entries were marked RESET without going through :class:`DirtyRing`.
        Call with :attr:`ring_lock` held when vCPUs run.

        Every blockable signal is blocked in the calling thread for the ioctl.
        Measured on this machine's kernel: when a signal (our vCPU kick, or a
        Ctrl-C) is pending, the reset stops early and returns a partial count,
        and the entries it had already coalesced for re-protection are counted
        as reset but never write-protected. The guest's next writes to those
        pages are then never logged: lost pages, invisible to the count check
        (tests/test_dirty_log_selftest.py caught it in ~9 of 10 runs). With
        signals blocked the kernel never takes that path; a kick sent meanwhile
        stays pending and still works (immediate_exit is already set).
        """
        expected = self._harvested_since_reset
        total = 0
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKABLE_SIGNALS)
        try:
            while True:
                try:
                    n = ioctl(self.fd, I.KVM_RESET_DIRTY_RINGS, name="KVM_RESET_DIRTY_RINGS")
                except KvmIoctlError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                total += n
                if n == 0 or total >= expected:
                    break
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._harvested_since_reset = 0
        if total != expected:
            raise DirtyRingResetMismatch(
                f"KVM_RESET_DIRTY_RINGS reset {total} entries but {expected} were harvested since the last reset"
            )
        return total

    # -- dirty bitmap ----------------------------------------------------------
    def enable_manual_dirty_log_protect(self) -> bool:
        """Use KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) if the kernel has it.

        Without it KVM_GET_DIRTY_LOG clears and re-protects the whole slot in one
        call; with it, reading the bitmap is cheap and only the dirty pages are
        re-protected. Returns whether it was enabled. Exclusive with the ring.
        """
        if self.dirty_ring_entries:
            raise DirtyRingConfigError("this VM uses the dirty ring; ring and bitmap are exclusive")
        if not (self.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE):
            return False
        self.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                        name="KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        self.manual_protect = True
        return True

    def get_dirty_log(self, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG for one slot: a uint64 bitmap, bit i = page i of the slot.

        Without manual protect this also clears the log and re-protects the slot.
        """
        ms = self.memslots[slot]
        words = (ms.npages + 63) // 64
        if out is None:
            out = np.zeros(words, dtype=np.uint64)
        if out.dtype != np.uint64 or out.size < words or not out.flags.c_contiguous:
            raise ValueError("dirty bitmap buffer must be contiguous uint64 with one bit per page")
        log = S.KvmDirtyLog(slot=slot, dirty_bitmap=out.ctypes.data)
        try:
            ioctl(self.fd, I.KVM_GET_DIRTY_LOG, log, name="KVM_GET_DIRTY_LOG")
        except KvmIoctlError as e:
            if e.errno == errno.ENXIO and self.dirty_ring_entries:
                raise KvmError("KVM_GET_DIRTY_LOG is unavailable while the dirty ring is enabled") from None
            raise
        return out

    def clear_dirty_log(self, slot: int, bitmap: np.ndarray, first_page: int = 0, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set (manual protect only).

        ``first_page`` must be a multiple of 64 and ``num_pages`` a multiple of 64
        unless the range reaches the end of the slot (kernel rule).
        """
        ms = self.memslots[slot]
        if num_pages is None:
            num_pages = ms.npages - first_page
        clr = S.KvmClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, I.KVM_CLEAR_DIRTY_LOG, clr, name="KVM_CLEAR_DIRTY_LOG")

    # -- vCPUs -------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int):
        from .vcpu import Vcpu

        v = Vcpu(self, vcpu_id)
        self.vcpus.append(v)
        return v
