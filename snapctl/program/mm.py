"""The program's address space: guest-physical frames, 4-level page tables, VMAs.

Everything here is built by the VMM in guest memory (the guest has no kernel):

* :class:`Frames` hands out guest-physical 4 KiB frames (frame 0 is never
  used) and takes freed ones back; reused frames are zeroed before reuse.
* :class:`AddressSpace` keeps the page tables (4 KiB leaves, A and D preset so
  the MMU never writes them back), a ``vpn -> PTE`` dict mirroring them for
  the VMM's own accesses, and the list of VMAs the way Linux keeps it
  (``/proc/PID/maps``). Pointers the program passes are checked against it
  (:class:`Fault` becomes EFAULT), never trusted.

The shadow MMU of ``kvm_pvm`` does not see PTE edits the VMM makes through the
host mapping (program-guests.md, quirk 3). Adding a mapping needs nothing (the
guest faults, KVM walks the tables afresh); removing or downgrading one does:
:meth:`AddressSpace._zap` toggles the host protection of the old frames, and
the host MMU notifier then drops KVM's stale translations.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from dataclasses import asdict, dataclass

import numpy as np

from ..kvm.constants import PAGE_SHIFT
from ..kvm.constants import PAGE_SIZE as PAGE
from ..machine.memory import GuestMemory

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D = 0x1, 0x2, 0x4, 0x20, 0x40
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
#: the canonical user half
USER_TOP = 0x0000_8000_0000_0000
_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Fault(Exception):
    """The program named memory it may not access this way (EFAULT)."""


class OutOfMemory(Exception):
    """Guest RAM (``--mem``) has no free frame left (ENOMEM)."""


def page_down(x: int) -> int:
    return x & ~(PAGE - 1)


def page_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


def pte_flags(prot: int, user: bool = True) -> int:
    """Leaf PTE bits for ``prot``; PROT_NONE gives a non-present entry (the frame is kept)."""
    f = PTE_A | PTE_D | (PTE_US if user else 0)
    if prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
        f |= PTE_P
    if prot & PROT_WRITE:
        f |= PTE_RW
    if not prot & PROT_EXEC:
        f |= PTE_NX
    return f


class Frames:
    """Guest-physical frame allocator: a bump pointer plus a LIFO free list (deterministic)."""

    def __init__(self, npages: int, next_free: int = 1, free: list[int] | None = None):
        self.npages = npages
        self.next = next_free
        self.free: list[int] = list(free or [])

    @property
    def available(self) -> int:
        return self.npages - self.next + len(self.free)

    def alloc(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` frames; returns (frames, the ones that were used before and need zeroing)."""
        if n > self.available:
            raise OutOfMemory(f"guest RAM is full: {n} more pages wanted, {self.available} free")
        reuse = min(n, len(self.free))
        old = np.array(self.free[len(self.free) - reuse:][::-1], dtype=np.int64)
        del self.free[len(self.free) - reuse:]
        fresh = np.arange(self.next, self.next + n - reuse, dtype=np.int64)
        self.next += n - reuse
        return np.concatenate([old, fresh]), old

    def release(self, frames) -> None:
        self.free.extend(int(f) for f in frames)

    def state(self) -> dict:
        """The allocator as JSON; the free list as runs [first, count, step] (step +-1), in order:
        a big munmap frees thousands of consecutive frames, and every checkpoint carries this."""
        runs: list[list[int]] = []
        for f in self.free:
            if runs:
                first, count, step = runs[-1]
                if count == 1 and abs(f - first) == 1:
                    runs[-1] = [first, 2, f - first]
                    continue
                if count > 1 and f == first + count * step:
                    runs[-1][1] += 1
                    continue
            runs.append([f, 1, 1])
        return {"next": self.next, "free_runs": runs}

    @classmethod
    def from_state(cls, npages: int, d: dict) -> "Frames":
        free = [first + i * step for first, count, step in d["free_runs"] for i in range(count)]
        if not 1 <= int(d["next"]) <= npages or any(not 1 <= f < npages for f in free):
            raise ValueError("frame allocator state does not fit guest RAM")
        return cls(npages, int(d["next"]), free)


@dataclass
class Vma:
    start: int
    end: int
    prot: int
    flags: int = 0
    name: str = ""          #: file path (guest), "[heap]", "[stack]", or "" for anonymous memory
    hash: str | None = None  #: content hash of the file it maps, if any
    offset: int = 0          #: file offset of ``start``

    def clip(self, start: int, end: int) -> "Vma":
        off = self.offset + (start - self.start) if self.hash else self.offset
        return Vma(start, end, self.prot, self.flags, self.name, self.hash, off)


class AddressSpace:
    """Page tables + VMAs of one program, in the guest memory of one machine."""

    def __init__(self, memory: GuestMemory, frames: Frames, pml4: int | None = None):
        self.memory = memory
        self.frames = frames
        self.q = memory.flat.view(np.uint64)   # guest RAM as 64-bit words
        self.pt: dict[int, int] = {}          # vpn -> leaf PTE (present or PROT_NONE)
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        if pml4 is None:
            pml4 = self._new_table()
        self.pml4 = pml4

    # -- page tables -------------------------------------------------------------------
    def _new_table(self) -> int:
        frames, old = self.frames.alloc(1)
        f = int(frames[0])
        if old.size:
            self.memory.pages[f] = 0
        self.memory.note_written(frames)
        return f

    def _leaf_table(self, va: int) -> int:
        """Frame of the page table holding ``va``'s leaf entry (made on demand)."""
        t = self.pml4
        for shift in (39, 30, 21):
            i = t * 512 + ((va >> shift) & 511)
            e = int(self.q[i])
            if not e & PTE_P:
                nt = self._new_table()
                self.q[i] = (nt << PAGE_SHIFT) | _TABLE
                self.memory.note_written(np.array([t]))
                t = nt
            else:
                t = (e & PTE_ADDR) >> PAGE_SHIFT
        return t

    def _set_leaves(self, va: int, ptes: np.ndarray) -> None:
        """Write leaf PTEs for consecutive pages from ``va`` (vectorised per table page)."""
        n, i = len(ptes), 0
        while i < n:
            a = va + i * PAGE
            t = self._leaf_table(a)
            first = (a >> PAGE_SHIFT) & 511
            k = min(512 - first, n - i)
            self.q[t * 512 + first:t * 512 + first + k] = ptes[i:i + k]
            self.memory.note_written(np.array([t]))
            i += k
        vpn0 = va >> PAGE_SHIFT
        for j, e in enumerate(ptes.tolist()):
            if e:
                self.pt[vpn0 + j] = e
            else:
                self.pt.pop(vpn0 + j, None)

    def rebuild(self) -> None:
        """Re-read ``pt`` from the page tables in guest memory (after a restore)."""
        self.pt = {}
        q = self.q

        def walk(table: int, level: int, base: int) -> None:
            ents = q[table * 512:(table + 1) * 512]
            for idx in np.flatnonzero(ents).tolist():
                e = int(ents[idx])
                va = base | (idx << (12 + 9 * level))
                if level == 0:
                    self.pt[va >> PAGE_SHIFT] = e   # leaves, PROT_NONE ones (frame kept) included
                elif e & PTE_P:
                    walk((e & PTE_ADDR) >> PAGE_SHIFT, level - 1, va)

        for idx in np.flatnonzero(q[self.pml4 * 512:(self.pml4 + 1) * 512]).tolist():
            e = int(q[self.pml4 * 512 + idx])
            base = idx << 39
            if base & (1 << 47):
                base |= 0xFFFF_0000_0000_0000
            walk((e & PTE_ADDR) >> PAGE_SHIFT, 2, base)

    def map_pages(self, va: int, npages: int, prot: int, *, user: bool = True, fill: bool = True) -> None:
        """Back ``npages`` from ``va`` with zeroed frames. Pages that already have a frame
        keep it (zeroed when ``fill``): MAP_FIXED over a mapping needs no PTE change."""
        if npages <= 0:
            return
        vpn0 = va >> PAGE_SHIFT
        have = np.array([self.pt.get(vpn0 + j, 0) for j in range(npages)], dtype=np.uint64)
        missing = np.flatnonzero(have == 0)
        frames = ((have & np.uint64(PTE_ADDR)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        if missing.size:
            new, old = self.frames.alloc(int(missing.size))
            if old.size:
                self.memory.pages[old] = 0
                self.memory.note_written(old)
            frames[missing] = new
        kept = np.flatnonzero(have != 0)
        if kept.size and fill:
            self.memory.pages[frames[kept]] = 0
            self.memory.note_written(frames[kept])
        downgraded = kept[(self._prot_rank(have[kept]) > self._prot_rank_of(prot, user))] if kept.size else kept
        ptes = (frames.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(pte_flags(prot, user))
        self._set_leaves(va, ptes)
        if downgraded.size:
            self._zap(frames[downgraded])

    @staticmethod
    def _prot_rank(ptes: np.ndarray) -> np.ndarray:
        p = (ptes & np.uint64(PTE_P)) != 0
        w = (ptes & np.uint64(PTE_RW)) != 0
        x = (ptes & np.uint64(PTE_NX)) == 0
        return p.astype(int) * 4 + w * 2 + x

    @staticmethod
    def _prot_rank_of(prot: int, user: bool) -> int:
        return int(AddressSpace._prot_rank(np.array([pte_flags(prot, user)], dtype=np.uint64))[0])

    def unmap_pages(self, va: int, npages: int) -> None:
        vpn0 = va >> PAGE_SHIFT
        idx = [j for j in range(npages) if vpn0 + j in self.pt]
        if not idx:
            return
        frames = np.array([(self.pt[vpn0 + j] & PTE_ADDR) >> PAGE_SHIFT for j in idx], dtype=np.int64)
        # Leaves in runs of present entries: clear each run with one vectorised write.
        runs = np.split(np.array(idx), np.flatnonzero(np.diff(idx) != 1) + 1)
        for run in runs:
            self._set_leaves(va + int(run[0]) * PAGE, np.zeros(len(run), dtype=np.uint64))
        self._zap(frames)
        self.frames.release(frames.tolist())

    def protect_pages(self, va: int, npages: int, prot: int) -> None:
        """Change the protection of pages that have frames; PROT_NONE pages become
        present (with zeroed frames) when they first get access."""
        vpn0 = va >> PAGE_SHIFT
        have = np.array([self.pt.get(vpn0 + j, 0) for j in range(npages)], dtype=np.uint64)
        if prot & (PROT_READ | PROT_WRITE | PROT_EXEC) and (have == 0).any():
            missing = np.flatnonzero(have == 0)
            new, old = self.frames.alloc(int(missing.size))
            if old.size:
                self.memory.pages[old] = 0
                self.memory.note_written(old)
            have[missing] = new.astype(np.uint64) << np.uint64(PAGE_SHIFT)
        frames = ((have & np.uint64(PTE_ADDR)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        present = have != 0
        ptes = np.where(present, (frames.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(pte_flags(prot)),
                        np.uint64(0))
        down = present & (self._prot_rank(have) > self._prot_rank_of(prot, True))
        self._set_leaves(va, ptes)
        if down.any():
            self._zap(frames[down])

    def _zap(self, frames: np.ndarray) -> None:
        """Make KVM drop its translations of these frames (see the module docstring): one
        mprotect pair per run of consecutive frames."""
        host = self.memory.host_addr
        f = np.unique(frames)
        if not f.size:
            return
        cuts = np.flatnonzero(np.diff(f) != 1) + 1
        for run in np.split(f, cuts):
            addr, size = host + int(run[0]) * PAGE, int(run.size) * PAGE
            if _libc.mprotect(addr, size, mmap.PROT_READ) or _libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE):
                raise OSError(ctypes.get_errno(), "mprotect of guest RAM failed")

    # -- VMAs --------------------------------------------------------------------------
    def find_vma(self, va: int) -> Vma | None:
        i = bisect.bisect_right(self._starts, va) - 1
        if i >= 0 and self.vmas[i].start <= va < self.vmas[i].end:
            return self.vmas[i]
        return None

    def _carve(self, start: int, end: int) -> list[Vma]:
        """Remove [start, end) from the VMA list (splitting at the edges); return what was there."""
        keep, gone = [], []
        for v in self.vmas:
            if v.end <= start or v.start >= end:
                keep.append(v)
                continue
            if v.start < start:
                keep.append(v.clip(v.start, start))
            if v.end > end:
                keep.append(v.clip(end, v.end))
            gone.append(v.clip(max(v.start, start), min(v.end, end)))
        keep.sort(key=lambda v: v.start)
        self.vmas = keep
        self._starts = [v.start for v in keep]
        return gone

    def add_vma(self, vma: Vma) -> None:
        self._carve(vma.start, vma.end)
        i = bisect.bisect_left(self._starts, vma.start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)
        self._merge_around(i)

    def _merge_around(self, i: int) -> None:
        def same(a: Vma, b: Vma) -> bool:
            return (a.end == b.start and a.prot == b.prot and a.flags == b.flags and a.name == b.name
                    and a.hash == b.hash and (a.hash is None or a.offset + (a.end - a.start) == b.offset))
        for j in (i, i - 1):
            if 0 <= j < len(self.vmas) - 1 and same(self.vmas[j], self.vmas[j + 1]):
                a, b = self.vmas[j], self.vmas[j + 1]
                self.vmas[j] = Vma(a.start, b.end, a.prot, a.flags, a.name, a.hash, a.offset)
                del self.vmas[j + 1]
                self._starts = [v.start for v in self.vmas]

    def map(self, vma: Vma) -> None:
        """A new mapping (MAP_FIXED semantics: replaces what was there). Frames are
        allocated now for accessible pages (eager: a first touch costs ~20 us here,
        a page fault through the guest's IDT far more); PROT_NONE reservations get none."""
        npages = (vma.end - vma.start) >> PAGE_SHIFT
        if vma.prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
            self.map_pages(vma.start, npages, vma.prot)
        else:
            self.unmap_pages(vma.start, npages)
        self.add_vma(vma)

    def unmap(self, start: int, end: int) -> None:
        self._carve(start, end)
        self.unmap_pages(start, (end - start) >> PAGE_SHIFT)

    def protect(self, start: int, end: int, prot: int) -> None:
        parts = self._carve(start, end)
        for v in parts:
            self.protect_pages(v.start, (v.end - v.start) >> PAGE_SHIFT, prot)
            v.prot = prot
            self.add_vma(v)

    def covered(self, start: int, end: int) -> bool:
        """Every page of [start, end) is in some VMA."""
        a = start
        while a < end:
            v = self.find_vma(a)
            if v is None:
                return False
            a = v.end
        return True

    def free_range(self, length: int, top: int, floor: int) -> int | None:
        """Highest start below ``top`` (and at or above ``floor``) of a gap of ``length`` bytes."""
        hi = top
        for v in reversed(self.vmas):
            if v.start >= hi:
                hi = min(hi, v.start)
                continue
            if v.end <= hi - length and hi - length >= floor:
                return hi - length
            hi = min(hi, v.start)
        return hi - length if hi - length >= floor else None

    # -- the VMM's accesses to program memory (EFAULT-checked) ---------------------------
    def _gpa(self, va: int, write: bool) -> int:
        e = self.pt.get(va >> PAGE_SHIFT) if 0 <= va < USER_TOP else None
        if e is None or not e & PTE_P or not e & PTE_US or (write and not e & PTE_RW):
            raise Fault(va)
        return (e & PTE_ADDR) | (va & (PAGE - 1))

    def read(self, va: int, n: int) -> bytes:
        if n <= 0:
            return b""
        flat = self.memory.flat
        if (va & (PAGE - 1)) + n <= PAGE:
            g = self._gpa(va, False)
            return flat[g:g + n].tobytes()
        out = bytearray()
        while n > 0:
            chunk = min(n, PAGE - (va & (PAGE - 1)))
            g = self._gpa(va, False)
            out += flat[g:g + chunk].tobytes()
            va += chunk
            n -= chunk
        return bytes(out)

    def check_writable(self, va: int, n: int) -> None:
        a = page_down(va)
        while a < va + n:
            self._gpa(a, True)
            a += PAGE

    def write(self, va: int, data) -> None:
        """Write into program memory (checked for the whole range first: all or nothing)."""
        buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
        n = buf.size
        if n == 0:
            return
        self.check_writable(va, n)
        flat = self.memory.flat
        i, pages = 0, []
        while i < n:
            chunk = min(n - i, PAGE - (va & (PAGE - 1)))
            g = self._gpa(va, True)
            flat[g:g + chunk] = buf[i:i + chunk]
            pages.append(g >> PAGE_SHIFT)
            va += chunk
            i += chunk
        self.memory.note_written(np.array(pages, dtype=np.int64))

    def write_phys_page_data(self, va: int, data: bytes) -> None:
        """Fill pages from ``va`` ignoring their protection (the loader filling a read-only segment)."""
        buf = np.frombuffer(data, np.uint8)
        i, pages = 0, []
        while i < buf.size:
            chunk = min(buf.size - i, PAGE - (va & (PAGE - 1)))
            e = self.pt.get(va >> PAGE_SHIFT)
            if e is None:
                raise Fault(va)
            g = (e & PTE_ADDR) | (va & (PAGE - 1))
            self.memory.flat[g:g + chunk] = buf[i:i + chunk]
            pages.append(g >> PAGE_SHIFT)
            va += chunk
            i += chunk
        if pages:
            self.memory.note_written(np.array(pages, dtype=np.int64))

    def read_cstr(self, va: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string; Fault if unmapped, ValueError if longer than ``limit``."""
        out = bytearray()
        while len(out) < limit:
            chunk = self.read(va, min(PAGE - (va & (PAGE - 1)), limit - len(out)))
            z = chunk.find(b"\0")
            if z >= 0:
                return bytes(out + chunk[:z])
            out += chunk
            va += len(chunk)
        raise ValueError("string too long")

    # -- state -------------------------------------------------------------------------
    def vma_state(self) -> list[dict]:
        return [asdict(v) for v in self.vmas]

    def load_vmas(self, items: list[dict]) -> None:
        self.vmas = [Vma(**d) for d in items]
        self.vmas.sort(key=lambda v: v.start)
        self._starts = [v.start for v in self.vmas]
