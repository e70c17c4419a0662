"""Dirty-page tracking strategies behind one interface.

``collect()`` runs while every vCPU is out of KVM_RUN and returns the sorted,
unique guest pages written since the previous ``collect()``: pages from the
rings (or bitmaps), pages harvested earlier at ring-full exits, and pages the
VMM wrote itself. After it returns the pages are re-protected, so reading
their contents now captures exactly the checkpoint's image.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..kvm import Vm
from .memory import GuestMemory


@dataclass
class TrackerStats:
    collects: int = 0
    ring_full_exits: int = 0
    entries_harvested: int = 0
    last_harvest_ms: float = 0.0
    last_reset_ms: float = 0.0
    last_pages: int = 0
    extra: dict = field(default_factory=dict)
    #: vCPU id -> distinct pages it wrote, summed over collects (ring mode with count_per_vcpu)
    per_vcpu_pages: dict = field(default_factory=dict)
    #: ring entries harvested per vCPU id (the pages each vCPU dirtied); ring mode only
    per_vcpu_entries: dict = field(default_factory=dict)


def _unique(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, np.int64)
    return np.unique(np.concatenate(parts))


class DirtyTracker:
    mode = "none"

    def __init__(self, vm: Vm, memory: GuestMemory):
        self.vm = vm
        self.memory = memory
        self.stats = TrackerStats()
        self._pending: list[np.ndarray] = []
        self._pending_lock = threading.Lock()
        # Pre-copy: contents of pages harvested at ring-full exits, copied right
        # after their reset (so any later write is logged again and re-copied).
        self.precopy = False
        self._early: list[tuple[np.ndarray, np.ndarray]] = []
        # Per-vCPU accounting (`snapctl dirty-rate`); off for checkpoints: it costs
        # a unique() per vCPU inside the pause.
        self.count_per_vcpu = False
        self._vcpu_parts: dict[int, list[np.ndarray]] = {}

    def on_ring_full(self, vcpu) -> None:  # pragma: no cover - ring only
        raise NotImplementedError

    def _collect_kernel(self) -> list[np.ndarray]:
        return []

    def collect(self) -> np.ndarray:
        parts = self._collect_kernel()
        with self._pending_lock:
            parts += self._pending
            self._pending = []
        parts.append(self.memory.take_vmm_written())
        if self.count_per_vcpu:
            with self._pending_lock:
                vparts, self._vcpu_parts = self._vcpu_parts, {}
            for i, ps in vparts.items():
                self.stats.per_vcpu_pages[i] = self.stats.per_vcpu_pages.get(i, 0) + int(_unique(ps).size)
        pages = _unique(parts)
        self.stats.collects += 1
        self.stats.last_pages = int(pages.size)
        return pages

    def take_early_copies(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pages, contents)] copied early (pre-copy) since the last call, oldest
        first. O(1): nothing is copied here, so it is cheap inside the pause. A page
        written after its early copy is in the same pause's :meth:`collect` result,
        and that fresh copy must win (write the early chunks first)."""
        with self._pending_lock:
            early, self._early = self._early, []
        return early

    def close(self) -> None:
        pass


class NoTracker(DirtyTracker):
    """No dirty logging: only for measuring the guest's untracked speed."""

    def collect(self) -> np.ndarray:
        raise RuntimeError("this machine runs without dirty tracking")


class RingTracker(DirtyTracker):
    mode = "ring"

    def _harvest_all(self, vcpus) -> list[np.ndarray]:
        parts = []
        for v in vcpus:
            slots, offsets = v.ring.harvest()
            if slots.size:
                parts.append(self.memory.slot_pages(slots, offsets))
                self.stats.entries_harvested += int(slots.size)
                if self.count_per_vcpu:
                    with self._pending_lock:
                        self._vcpu_parts.setdefault(v.id, []).append(parts[-1])
                per = self.stats.per_vcpu_entries
                per[v.id] = per.get(v.id, 0) + int(slots.size)
        return parts

    def on_ring_full(self, vcpu) -> None:
        """KVM_EXIT_DIRTY_RING_FULL on ``vcpu``'s thread: harvest its ring into the
        pending set and reset, so the vCPU can go on. Other vCPUs keep running;
        the VM-wide lock keeps harvest counts and the reset paired."""
        with self.vm.ring_lock:
            parts = self._harvest_all([vcpu])
            self.vm.reset_dirty_rings()
        if self.precopy and parts:
            # After the reset: a write from now on is logged again, so the pause
            # copies it again; until then this copy is the page's content.
            pages = np.unique(np.concatenate(parts))
            data = self.memory.pages[pages]
            with self._pending_lock:
                self._early.append((pages, data))
        else:
            with self._pending_lock:
                self._pending += parts
        self.stats.ring_full_exits += 1

    def _collect_kernel(self) -> list[np.ndarray]:
        with self.vm.ring_lock:
            t0 = time.perf_counter()
            parts = self._harvest_all(self.vm.vcpus)
            t1 = time.perf_counter()
            # Reset before anyone reads page contents: a write between harvest and
            # reset would otherwise be captured without being re-protected.
            self.vm.reset_dirty_rings()
            t2 = time.perf_counter()
        self.stats.last_harvest_ms = (t1 - t0) * 1e3
        self.stats.last_reset_ms = (t2 - t1) * 1e3
        return parts


class BitmapTracker(DirtyTracker):
    """KVM_GET_DIRTY_LOG per memslot (+ KVM_CLEAR_DIRTY_LOG with manual protect).

    Cost grows with RAM size (the whole bitmap is copied and scanned), unlike the
    ring, whose cost grows with the number of dirty pages.
    """

    mode = "bitmap"

    def __init__(self, vm: Vm, memory: GuestMemory):
        super().__init__(vm, memory)
        self._bitmaps = {r.slot: np.zeros((r.npages + 63) // 64, np.uint64) for r in memory.regions}

    def _collect_kernel(self) -> list[np.ndarray]:
        parts = []
        harvest = reset = 0.0
        for r in self.memory.regions:
            bm = self._bitmaps[r.slot]
            t0 = time.perf_counter()
            self.vm.get_dirty_log(r.slot, bm)
            words = np.flatnonzero(bm)
            t1 = time.perf_counter()
            if words.size and self.vm.manual_protect:
                self.vm.clear_dirty_log(r.slot, bm)
            t2 = time.perf_counter()
            if words.size:
                bits = np.unpackbits(bm[words].view(np.uint8), bitorder="little").reshape(-1, 64)
                row, col = np.nonzero(bits)
                parts.append(r.first_page + words[row].astype(np.int64) * 64 + col)
            harvest += t1 - t0
            reset += t2 - t1
        self.stats.last_harvest_ms = harvest * 1e3
        self.stats.last_reset_ms = reset * 1e3
        return parts


def make_tracker(mode: str, vm: Vm, memory: GuestMemory) -> DirtyTracker:
    return {"ring": RingTracker, "bitmap": BitmapTracker, "none": NoTracker}[mode](vm, memory)
