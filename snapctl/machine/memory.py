"""Guest RAM: one anonymous mapping, a numpy (pages, 4096) view, two memslots.

Memslot 0 is the system area [0, 2 MiB); memslot 1 the data area [2 MiB, end).
Both are dirty-logged. KVM reports dirty pages as (slot, offset-in-slot);
:meth:`GuestMemory.slot_pages` turns those into guest page numbers (gpa >> 12).

Every write the VMM makes through its own mapping goes through :meth:`write`
(or :meth:`write_u64`), which records the page: KVM never logs host-side writes.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

import numpy as np

from .layout import MAX_MEM, PAGE, SYSTEM_SIZE


@dataclass(frozen=True)
class Region:
    slot: int
    first_page: int
    npages: int
    name: str

    @property
    def gpa(self) -> int:
        return self.first_page * PAGE

    @property
    def size(self) -> int:
        return self.npages * PAGE


def parse_size(text: str | int) -> int:
    """'64M', '0x1000', '4096', '1G' -> bytes. Raises ValueError naming the problem."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    mult = 1
    if s and s[-1].upper() in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[s[-1].upper()]
        s = s[:-1]
        if s.upper().endswith("I"):
            s = s[:-1]
    try:
        value = int(s, 0)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 0x1000, 64M, 1G)") from None
    return value * mult


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def validate_mem_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"memory size must be an integer number of bytes, got {size!r}")
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {size}")
    if size % PAGE:
        raise ValueError(f"memory size {size} is not a multiple of the 4096-byte page size")
    if size <= SYSTEM_SIZE:
        raise ValueError(f"memory size {size} leaves no data area: it must exceed the 2 MiB system area")
    if size > MAX_MEM:
        raise ValueError(f"memory size {size} is larger than the {MAX_MEM >> 30} GiB the guest page tables map")
    phys = physical_memory()
    if size > phys:
        raise ValueError(f"memory size {size >> 20} MiB is larger than this machine's {phys >> 20} MiB of RAM")


class GuestMemory:
    def __init__(self, size: int):
        validate_mem_size(size)
        self.size = size
        self.npages = size // PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            self._mm = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ValueError(f"cannot allocate {size >> 20} MiB of guest memory: {e.strerror}") from None
        self.flat = np.frombuffer(self._mm, dtype=np.uint8)
        self.pages = self.flat.reshape(self.npages, PAGE)
        self.host_addr = self.flat.ctypes.data
        self.regions = (
            Region(0, 0, SYSTEM_SIZE // PAGE, "system"),
            Region(1, SYSTEM_SIZE // PAGE, self.npages - SYSTEM_SIZE // PAGE, "data"),
        )
        # slot id -> first guest page, and slot -> npages, for vectorised translation
        self._slot_first = np.array([r.first_page for r in self.regions], dtype=np.int64)
        self._slot_npages = np.array([r.npages for r in self.regions], dtype=np.int64)
        self._vmm_lock = threading.Lock()
        self._vmm_dirty: list[np.ndarray] = []
        #: called (no arguments) just before the mapping goes away: whoever serves its pages
        #: (a lazy restore's userfaultfd handler) stops first
        self.close_hooks: list = []

    def close(self) -> None:
        """Unmap. If a caller still holds a view of ``pages``, the mapping is released
        when that view is garbage-collected instead (unmapping under it would crash)."""
        if self._mm is None:
            return
        hooks, self.close_hooks = self.close_hooks, []
        for hook in hooks:
            hook()
        del self.pages, self.flat
        try:
            self._mm.close()
        except BufferError:
            pass
        self._mm = None

    # -- translation -------------------------------------------------------------
    def slot_pages(self, slots: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Dirty-ring entries (slot, offset in slot) -> guest page numbers (int64)."""
        slots = np.asarray(slots, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if slots.size == 0:
            return np.empty(0, np.int64)
        # as_id (bits 16+) must be 0: snapctl has no SMM address space.
        if slots.min() < 0 or slots.max() >= len(self.regions):
            bad = slots[(slots < 0) | (slots >= len(self.regions))][0]
            raise ValueError(f"dirty entry names memslot {int(bad):#x}, which this VM does not have")
        if (offsets >= self._slot_npages[slots]).any() or offsets.min() < 0:
            i = int(np.flatnonzero((offsets >= self._slot_npages[slots]) | (offsets < 0))[0])
            raise ValueError(f"dirty entry offset {int(offsets[i])} is outside memslot {int(slots[i])}")
        return self._slot_first[slots] + offsets

    def page_slot(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Guest page numbers -> (slot, offset in slot); the inverse of :meth:`slot_pages`."""
        pages = np.asarray(pages, dtype=np.int64)
        if pages.size and (pages.min() < 0 or pages.max() >= self.npages):
            raise ValueError("page number outside guest RAM")
        slot = np.searchsorted(self._slot_first, pages, side="right") - 1
        return slot, pages - self._slot_first[slot]

    # -- VMM-side access -----------------------------------------------------------
    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise ValueError(f"guest range [{gpa:#x}, {gpa + length:#x}) is outside RAM of {self.size:#x} bytes")

    def write(self, gpa: int, data: bytes | np.ndarray) -> None:
        """Write through the host mapping and record the pages (KVM never logs these)."""
        buf = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
        self._check(gpa, buf.size)
        if buf.size == 0:
            return
        self.flat[gpa:gpa + buf.size] = buf
        self.note_written(np.arange(gpa // PAGE, (gpa + buf.size - 1) // PAGE + 1, dtype=np.int64))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, int(value).to_bytes(8, "little"))

    def read_u64(self, gpa: int) -> int:
        self._check(gpa, 8)
        return int.from_bytes(self.flat[gpa:gpa + 8].tobytes(), "little")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return self.flat[gpa:gpa + length].tobytes()

    def note_written(self, pages: np.ndarray) -> None:
        with self._vmm_lock:
            self._vmm_dirty.append(np.asarray(pages, dtype=np.int64))

    def take_vmm_written(self) -> np.ndarray:
        """Pages the VMM wrote since the last call (unsorted, may repeat)."""
        with self._vmm_lock:
            parts, self._vmm_dirty = self._vmm_dirty, []
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def load_image(self, image: np.ndarray) -> None:
        """Replace all of RAM (restore). Not recorded as VMM writes: the image is the new baseline."""
        src = np.asarray(image, dtype=np.uint8).reshape(-1)
        if src.size != self.size:
            raise ValueError(f"image is {src.size} bytes, guest RAM is {self.size}")
        self.flat[:] = src
        self.take_vmm_written()
