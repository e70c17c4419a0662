"""Memory: brk, mmap (anonymous and private file mappings), munmap, mprotect, mremap, madvise.

Mappings are backed eagerly (see mm.AddressSpace.map). A file mapping is a
private copy of the file's snapshot, zero-filled past its end; a shared
mapping of a read-only file is the same thing (nobody can change the file).
"""

from __future__ import annotations

import errno

import numpy as np

from ..mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, USER_TOP, Vma, page_up
from . import s32, syscall

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED, MADV_FREE = 4, 8
#: lowest address handed out for mappings without a usable hint
MMAP_FLOOR = 0x10000
PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC


def _place(k, addr: int, length: int, flags: int) -> int:
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & (PAGE - 1) or addr + length > USER_TOP or addr < MMAP_FLOOR:
            raise OSError(errno.EINVAL if addr & (PAGE - 1) else errno.ENOMEM, "bad fixed address")
        if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED:
            a = addr
            while a < addr + length:
                v = k.mm.find_vma(a)
                if v is not None:
                    raise OSError(errno.EEXIST, "mapping exists")
                a += PAGE
        return addr
    if addr and addr >= MMAP_FLOOR and page_up(addr) + length <= k.mmap_top:
        hint = page_up(addr)
        if not any(k.mm.find_vma(a) for a in range(hint, hint + length, PAGE)):
            return hint
    va = k.mm.free_range(length, k.mmap_top, MMAP_FLOOR)
    if va is None:
        raise OSError(errno.ENOMEM, "no address space left")
    return va


@syscall(9, "mmap", 6)
def mmap(k, addr, length, prot, flags, fd, off):
    if length == 0 or length > USER_TOP or prot & ~PROT_ALL or off & (PAGE - 1):
        return -errno.EINVAL
    if not flags & (MAP_SHARED | MAP_PRIVATE):
        return -errno.EINVAL
    length = page_up(length)
    of = None
    if not flags & MAP_ANONYMOUS:
        of = k.fd(s32(fd)).file
        if of.kind != "file":
            return -errno.ENODEV if of.kind not in ("stdin", "stdout", "stderr") else -errno.EACCES
        if flags & MAP_SHARED and prot & PROT_WRITE:
            return -errno.EACCES          # the file is open read-only
    va = _place(k, addr, length, flags)
    if of is None:
        k.mm.map(Vma(va, va + length, prot, flags))
    else:
        k.mm.map(Vma(va, va + length, prot, flags, name=of.path, hash=of.hash, offset=off))
        data = of.data[off:off + length]
        if prot & PROT_ALL:
            k.mm.write_phys_page_data(va, data)
    return va


@syscall(11, "munmap", 2)
def munmap(k, addr, length):
    if addr & (PAGE - 1) or length == 0 or addr + length > USER_TOP:
        return -errno.EINVAL
    k.mm.unmap(addr, addr + page_up(length))
    return 0


@syscall(10, "mprotect", 3)
def mprotect(k, addr, length, prot):
    if addr & (PAGE - 1) or prot & ~PROT_ALL & ~0x3000000:   # PROT_GROWSDOWN/UP accepted, ignored
        return -errno.EINVAL
    end = addr + page_up(length)
    if end > USER_TOP:
        return -errno.ENOMEM
    if length == 0:
        return 0
    if not k.mm.covered(addr, end):
        return -errno.ENOMEM
    k.mm.protect(addr, end, prot & PROT_ALL)
    return 0


@syscall(25, "mremap", 5)
def mremap(k, old, old_size, new_size, flags, new_addr):
    if old & (PAGE - 1) or new_size == 0 or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED):
        return -errno.EINVAL
    old_size, new_size = page_up(old_size), page_up(new_size)
    v = k.mm.find_vma(old)
    if v is None or not k.mm.covered(old, old + old_size):
        return -errno.EFAULT
    if new_size <= old_size and not flags & MREMAP_FIXED:
        if new_size < old_size:
            k.mm.unmap(old + new_size, old + old_size)
        return old
    grow_free = old + new_size <= USER_TOP and not any(
        k.mm.find_vma(a) for a in range(old + old_size, old + new_size, PAGE))
    if grow_free and not flags & MREMAP_FIXED:
        k.mm.map(Vma(old + old_size, old + new_size, v.prot, v.flags, v.name, v.hash,
                     v.offset + old_size if v.hash else 0))
        return old
    if not flags & MREMAP_MAYMOVE:
        return -errno.ENOMEM
    dest = new_addr if flags & MREMAP_FIXED else _place(k, 0, new_size, 0)
    content = k.mm.read(old, min(old_size, new_size)) if v.prot & PROT_READ else b""
    k.mm.map(Vma(dest, dest + new_size, v.prot, v.flags, v.name, v.hash, v.offset))
    if content:
        k.mm.write_phys_page_data(dest, content)
    k.mm.unmap(old, old + old_size)
    return dest


@syscall(28, "madvise", 3)
def madvise(k, addr, length, advice):
    if addr & (PAGE - 1):
        return -errno.EINVAL
    if advice in (MADV_DONTNEED, MADV_FREE):
        # private anonymous memory reads back as zeros afterwards (file mappings: the file's bytes)
        end = addr + page_up(length)
        if not k.mm.covered(addr, end):
            return -errno.ENOMEM
        for v in list(k.mm.vmas):
            a, b = max(v.start, addr), min(v.end, end)
            if a >= b or not v.prot & PROT_WRITE:
                continue
            data = np.zeros(b - a, np.uint8)
            if v.hash:
                src = k.files.get(v.hash)[v.offset + (a - v.start):v.offset + (b - v.start)]
                data[:len(src)] = np.frombuffer(src, np.uint8)
            k.mm.write_phys_page_data(a, data.tobytes())
    return 0


@syscall(12, "brk", 1)
def brk(k, addr):
    cur = k.brk_cur
    if addr < k.brk_start:
        return cur
    old_end, new_end = page_up(cur), page_up(addr)
    if new_end > old_end:
        if any(k.mm.find_vma(a) for a in range(old_end, new_end, PAGE)) or new_end >= k.mmap_top:
            return cur
        try:
            k.mm.map(Vma(old_end, new_end, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, name="[heap]"))
        except Exception:
            return cur
    elif new_end < old_end:
        k.mm.unmap(new_end, old_end)
    k.brk_cur = addr
    return addr


@syscall(26, "msync", 3)
def msync(k, addr, length, flags):
    return -errno.EINVAL if addr & (PAGE - 1) else 0


@syscall(27, "mincore", 3)
def mincore(k, addr, length, vec):
    if addr & (PAGE - 1):
        return -errno.EINVAL
    n = page_up(length) // PAGE
    if not k.mm.covered(addr, addr + n * PAGE):
        return -errno.ENOMEM
    k.mm.write(vec, bytes([1]) * n)
    return 0

