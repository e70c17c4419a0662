"""A program checkpoint in the program's own terms.

Pure functions over what a program checkpoint holds -- guest-physical memory
(``read_phys(gpa, n) -> bytes``), the vCPU registers, the "program" state
(VMAs, the executable and its libraries by content hash, auxv, argv) and
file contents by hash (``get_file(hash) -> bytes``):

- ``translate`` / ``read_virtual`` walk the x86-64 4-level page tables the
  VMM built in guest memory (cr3 -> PML4 -> PDPT -> PD -> PT), honouring
  1 GiB and 2 MiB leaves (PS) although the VMM itself maps only 4 KiB pages.
- ``user_mappings`` / ``reverse_map`` list every present user page, reading
  each page-table page once and handling its 512 entries with numpy.
- ``Symbols`` resolves ELF symbols of the executable, the dynamic loader and
  the shared objects the program mapped, at their load addresses.
- ``write_core`` writes an ELF core file gdb can open with the program.

``translate`` reads the four entries it walks; the others call ``read_phys``
once per page-table page and once per run of physically contiguous pages.
When a call is costly (``Store.read`` merges the checkpoint's page maps each
time) and much is read, pass one over a materialized image::

    img = np.empty((store.page_count, PAGE_SIZE), np.uint8); store.materialize(ckpt, img)
    read_phys = lambda gpa, n: img.reshape(-1)[gpa:gpa + n].tobytes()
"""

from __future__ import annotations

import difflib
import io
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..kvm.constants import PAGE_SIZE as PAGE

ReadPhys = Callable[[int, int], bytes]
GetFile = Callable[[str], bytes]

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000          # physical address bits 12..51
USER_TOP = 0x0000_8000_0000_0000          # the user half ends here

_LEVELS = ("PML4", "PDPT", "PD", "PT")
_SHIFTS = (39, 30, 21, 12)
_CANONICAL_HIGH = 0xFFFF_0000_0000_0000

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4


class Unmapped(Exception):
    """A virtual address with no present mapping.

    ``va`` is the address, ``level`` the page-table level whose entry is not
    present ("PML4", "PDPT", "PD" or "PT"), or None for a non-canonical
    address (which no page table can map).
    """

    def __init__(self, va: int, level: str | None):
        self.va = va
        self.level = level
        page = va & ~(PAGE - 1)
        if level is None:
            why = "it is not canonical (bits 47..63 must all be equal)"
        else:
            why = f"its {level} entry is not present"
        super().__init__(f"virtual address {va:#x} (page {page:#x}) is unmapped: {why}")


def _canonical(va: int) -> bool:
    return 0 <= va < USER_TOP or _CANONICAL_HIGH | USER_TOP <= va < 1 << 64


def _walk(entry: Callable[[int, int], int], cr3: int, va: int) -> int:
    """The page walk of ``translate``; ``entry(table_gpa, index)`` reads one entry."""
    if not _canonical(va):
        raise Unmapped(va, None)
    table = cr3 & PTE_ADDR
    for depth, shift in enumerate(_SHIFTS):
        e = entry(table, (va >> shift) & 511)
        if not e & PTE_P:
            raise Unmapped(va, _LEVELS[depth])
        if depth == 3 or (depth in (1, 2) and e & PTE_PS):
            offset_mask = (1 << shift) - 1
            return (e & PTE_ADDR & ~offset_mask) | (va & offset_mask)
        table = e & PTE_ADDR
    raise AssertionError("unreachable: the PT level always returns")


def translate(read_phys: ReadPhys, cr3: int, va: int) -> int:
    """The guest-physical address ``va`` maps to through the page tables at
    ``cr3`` (its low 12 bits, PCID or PWT/PCD, are ignored).  No permission
    is checked: supervisor pages translate too.  Raises ``Unmapped``."""
    return _walk(lambda table, i: int.from_bytes(read_phys(table + i * 8, 8), "little"), cr3, va)


def read_virtual(read_phys: ReadPhys, cr3: int, va: int, n: int) -> bytes:
    """``n`` bytes at virtual address ``va``, across page boundaries.  Every
    page is translated before anything is read; the first one that is not
    mapped raises ``Unmapped`` naming it.  Each page-table page is read once
    and physically contiguous pages with one ``read_phys`` call."""
    if n < 0:
        raise ValueError(f"cannot read a negative length ({n})")
    tables: dict[int, np.ndarray] = {}

    def entry(table: int, index: int) -> int:
        if table not in tables:
            tables[table] = np.frombuffer(read_phys(table, PAGE), dtype="<u8")
        return int(tables[table][index])

    runs: list[list[int]] = []            # [gpa, length] of physically contiguous pieces
    end = va + n
    while va < end:
        length = min(end, (va | (PAGE - 1)) + 1) - va
        gpa = _walk(entry, cr3, va)
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1][1] += length
        else:
            runs.append([gpa, length])
        va += length
    return b"".join(read_phys(gpa, length) for gpa, length in runs)


@dataclass(frozen=True)
class _Pages:
    """Present user pages, sorted by va: numpy uint64 arrays of equal length."""
    va: np.ndarray
    gpa: np.ndarray
    flags: np.ndarray


def _user_pages(read_phys: ReadPhys, cr3: int) -> _Pages:
    """Walk the whole tree once (each table page read once, even when several
    entries point at it) and collect every present 4 KiB user page, large
    leaves expanded.  A page is user when US is set at every level; its RW is
    ANDed over the levels and its NX ORed, as the MMU grants them."""
    tables: dict[int, np.ndarray] = {}
    out_va: list[np.ndarray] = []
    out_gpa: list[np.ndarray] = []
    out_flags: list[np.ndarray] = []
    user = np.uint64(PTE_P | PTE_US)
    kept = np.uint64(PTE_P | PTE_US | PTE_A | PTE_D)

    def entries(gpa: int) -> np.ndarray:
        if gpa not in tables:
            tables[gpa] = np.frombuffer(read_phys(gpa, PAGE), dtype="<u8")
        return tables[gpa]

    def visit(table: int, depth: int, base: int, rw: int, nx: int) -> None:
        e = entries(table)
        shift = _SHIFTS[depth]
        idx = np.flatnonzero((e & user) == user)
        is_leaf = np.full(len(idx), depth == 3)
        if depth in (1, 2):               # PS is reserved in the PML4 and means PAT in a PTE
            is_leaf = (e[idx] & np.uint64(PTE_PS)) != 0
        for i in idx[~is_leaf].tolist():
            entry = int(e[i])
            va = base | i << shift
            if depth == 0 and i >= 256:
                va |= _CANONICAL_HIGH
            visit(entry & PTE_ADDR, depth + 1, va, rw & entry, nx | entry)
        leaf = idx[is_leaf]
        if not len(leaf):
            return
        le = e[leaf]
        flags = (le & kept) | (le & np.uint64(rw & PTE_RW)) | (le & np.uint64(PTE_NX)) | np.uint64(nx & PTE_NX)
        va = np.uint64(base) | (leaf.astype(np.uint64) << np.uint64(shift))
        gpa = le & np.uint64(PTE_ADDR & ~((1 << shift) - 1))
        if shift > 12:                    # a 2 MiB or 1 GiB leaf, page by page
            steps = np.arange(1 << (shift - 12), dtype=np.uint64) << np.uint64(12)
            va = (va[:, None] + steps).reshape(-1)
            gpa = (gpa[:, None] + steps).reshape(-1)
            flags = np.repeat(flags, len(steps))
        out_va.append(va)
        out_gpa.append(gpa)
        out_flags.append(flags)

    visit(cr3 & PTE_ADDR, 0, 0, PTE_RW, 0)
    if not out_va:
        empty = np.zeros(0, np.uint64)
        return _Pages(empty, empty, empty)
    va = np.concatenate(out_va)
    order = np.argsort(va, kind="stable")        # a table's large leaves were listed after its subtables
    return _Pages(va[order], np.concatenate(out_gpa)[order], np.concatenate(out_flags)[order])


def user_mappings(read_phys: ReadPhys, cr3: int) -> list[tuple[int, int, int]]:
    """``(va, gpa, flags)`` for every present user 4 KiB page, sorted by va.

    2 MiB and 1 GiB leaves are listed page by page.  ``flags`` holds the
    leaf's P, US, A, D bits, RW as the walk grants it (ANDed over the levels)
    and NX as it applies (ORed over the levels); PS/PAT and the other bits
    are dropped.  A page is listed only when US is set at every level, so the
    VMM's supervisor area never appears."""
    p = _user_pages(read_phys, cr3)
    return list(zip(p.va.tolist(), p.gpa.tolist(), p.flags.tolist()))


def reverse_map(read_phys: ReadPhys, cr3: int) -> dict[int, int]:
    """Guest page number -> the virtual address of the user page mapping it
    (the lowest one when several do).  Page-table pages and the VMM's own
    pages are absent."""
    p = _user_pages(read_phys, cr3)
    gpn, first = np.unique(p.gpa >> np.uint64(12), return_index=True)
    return dict(zip(gpn.tolist(), p.va[first].tolist()))


# ---------------------------------------------------------------- symbols

_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])
_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 1, 2, 10
_BIND_RANK = {0: 0, 2: 1, 1: 2}           # LOCAL < WEAK < GLOBAL (GNU_UNIQUE ranks as LOCAL)
_SHF_ALLOC = 0x2
_NUMBER = r"0[xX][0-9a-fA-F]+|\d+"
_EXPR = re.compile(rf"""\s*(?:(?P<obj>[^:\s]+):)?
                       (?P<base>{_NUMBER}|[A-Za-z_.$][\w.$]*)
                       \s*(?:(?P<sign>[+-])\s*(?P<off>{_NUMBER}))?\s*""", re.X)


def _elf(data: bytes) -> ELFFile | None:
    """The x86-64 ELF in ``data``, or None when it is something else."""
    if data[:4] != b"\x7fELF":
        return None
    try:
        elf = ELFFile(io.BytesIO(data))
    except ELFError:
        return None
    if elf.elfclass != 64 or not elf.little_endian or elf["e_machine"] != "EM_X86_64":
        return None
    return elf


def _elf_symbols(elf: ELFFile, bias: int) -> list[tuple[int, int, str, int]]:
    """``(address, size, name, bind rank)`` of the defined functions and data
    objects of ``.symtab`` and ``.dynsym``, relocated by ``bias``."""
    sections = list(elf.iter_sections())
    alloc = np.array([i for i, s in enumerate(sections) if s["sh_flags"] & _SHF_ALLOC], np.uint16)
    found: dict[tuple[int, str], tuple[int, int, str, int]] = {}
    for sec in sections:
        if sec["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM") or sec["sh_entsize"] != _SYM.itemsize:
            continue
        strtab = sections[sec["sh_link"]].data()
        syms = np.frombuffer(sec.data(), dtype=_SYM)
        kind = syms["info"] & 0xF
        keep = np.isin(kind, (_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC)) & np.isin(syms["shndx"], alloc) \
            & (syms["name"] != 0)
        kept = syms[keep]
        for at, value, size, info in zip(*(kept[f].tolist() for f in ("name", "value", "size", "info"))):
            name = strtab[at:strtab.index(b"\0", at)].decode(errors="replace")
            found.setdefault((bias + value, name), (bias + value, size, name, _BIND_RANK.get(info >> 4, 0)))
    return list(found.values())


def _soname(elf: ELFFile, path: str) -> str:
    """The shared object's DT_SONAME ("libexpat.so.1" for .../libexpat.so.1.8.10), else
    the basename of ``path``."""
    dynamic = next((s for s in elf.iter_sections() if s["sh_type"] == "SHT_DYNAMIC"), None)
    if dynamic is not None:
        for tag in dynamic.iter_tags("DT_SONAME"):
            return tag.soname
    return os.path.basename(path)


def _mapping_bias(elf: ELFFile, vmas: list[dict]) -> int | None:
    """The load bias of a shared object from the VMAs mapping it: the loader
    maps each PT_LOAD at ``bias + (p_vaddr & ~4095)`` from file offset
    ``p_offset & ~4095``; the VMA at the lowest offset that matches a segment
    gives the bias.  None when no VMA matches (not mapped by a loader)."""
    segments = {seg["p_offset"] & ~(PAGE - 1): seg["p_vaddr"] & ~(PAGE - 1)
                for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"}
    for vma in sorted(vmas, key=lambda v: v["offset"]):
        if vma["offset"] in segments:
            return vma["start"] - segments[vma["offset"]]
    return None


@dataclass(frozen=True)
class LoadedObject:
    """One ELF file of the program: ``label`` (its DT_SONAME, else its file
    name; "" for the main program) prefixes its symbols in ``symbolize`` and
    selects them in ``lookup`` ("libc.so.6:printf"; the file name works
    too); ``bias`` is its load bias."""
    label: str
    path: str
    bias: int


class Symbols:
    """ELF symbols (functions and data objects, from ``.symtab`` and
    ``.dynsym``) of a program's executable, its dynamic loader and the shared
    objects it mapped, at their load addresses."""

    def __init__(self, objects: list[tuple[LoadedObject, list[tuple[int, int, str, int]]]]):
        """``objects`` in lookup priority order (the main program first), each
        with its ``(address, size, name, bind rank)`` symbols."""
        self.objects = [obj for obj, _ in objects]
        self._names: dict[str, tuple[int, int]] = {}
        self._by_label: dict[str, dict[str, tuple[int, int]]] = {}
        rows: list[tuple[int, tuple, int, str, str]] = []
        for obj, syms in objects:
            table = self._by_label.setdefault(obj.label or os.path.basename(obj.path), {})
            self._by_label.setdefault(os.path.basename(obj.path), table)
            for va, size, name, rank in sorted(syms, key=lambda s: -s[3]):
                table.setdefault(name, (va, size))
                self._names.setdefault(name, (va, size))
                # at one address prefer names without a leading "_" (write over __libc_write, as
                # gdb shows them), then GLOBAL over WEAK over LOCAL, then the shorter name
                rows.append((va, (not name.startswith("_"), rank, -len(name), name), size, name, obj.label))
        rows.sort(key=lambda r: r[:2])
        self._start = np.array([r[0] for r in rows], np.uint64)
        self._end = self._start + np.array([max(r[2], 1) for r in rows], np.uint64)
        self._reach = np.maximum.accumulate(self._end)   # the furthest end up to each row
        self._label = [(r[4], r[3]) for r in rows]

    @classmethod
    def from_state(cls, state: dict, get_file: GetFile) -> Symbols:
        """Symbols of the program described by a checkpoint's "program"
        state: ``exe`` and ``interp`` at their recorded biases, then every
        other file-backed VMA whose file is an x86-64 ELF shared object, at
        the bias its mappings imply, in address order."""
        exe = state["exe"]
        exe_elf = _elf(get_file(exe["hash"]))
        if exe_elf is None:
            raise ValueError(f"{exe['path']} is not an x86-64 ELF file")
        objects = [(LoadedObject("", exe["path"], exe["bias"]), _elf_symbols(exe_elf, exe["bias"]))]
        seen = {exe["hash"]}
        by_hash: dict[str, list[dict]] = {}
        for vma in sorted(state.get("vmas", []), key=lambda v: v["start"]):
            if vma.get("hash") and vma["hash"] not in seen:
                by_hash.setdefault(vma["hash"], []).append(vma)
        interp = state.get("interp")
        if interp:
            seen.add(interp["hash"])
            by_hash.pop(interp["hash"], None)
        libraries = []
        for digest, vmas in by_hash.items():
            elf = _elf(get_file(digest))
            if elf is None or elf["e_type"] != "ET_DYN":
                continue
            bias = _mapping_bias(elf, vmas)
            if bias is not None:
                obj = LoadedObject(_soname(elf, vmas[0]["name"]), vmas[0]["name"], bias)
                libraries.append((obj, _elf_symbols(elf, bias)))
        if interp:
            elf = _elf(get_file(interp["hash"]))
            if elf is not None:
                obj = LoadedObject(_soname(elf, interp["path"]), interp["path"], interp["bias"])
                libraries.append((obj, _elf_symbols(elf, interp["bias"])))
        return cls(objects + libraries)

    def lookup(self, expr: str) -> tuple[int, int]:
        """``(address, size)`` of ``expr``: a symbol ("counter"), a symbol in
        one object ("libc.so.6:printf"), either with an offset ("counter+8",
        "main-0x4"), or an address ("0x401000", size 0).  The size is the
        symbol's (an offset moves the address only).  A name is looked up in
        the main program first, then the libraries, then the loader; within
        one object GLOBAL beats WEAK beats LOCAL.  Raises ValueError."""
        m = _EXPR.fullmatch(expr)
        if m is None:
            raise ValueError(f"cannot parse {expr!r}: expected NAME, OBJECT:NAME, ADDRESS, "
                             "each optionally followed by +OFFSET or -OFFSET")
        base, obj = m["base"], m["obj"]
        offset = int(m["off"], 0) * (-1 if m["sign"] == "-" else 1) if m["off"] else 0
        if re.fullmatch(_NUMBER, base):
            if obj:
                raise ValueError(f"{expr!r}: an address takes no object prefix")
            return int(base, 0) + offset, 0
        if obj is None:
            table, where = self._names, "the program or its libraries"
        elif obj in self._by_label:
            table, where = self._by_label[obj], obj
        else:
            raise ValueError(f"{expr!r}: no loaded object {obj!r} (loaded: {', '.join(self._by_label)})")
        if base not in table:
            close = difflib.get_close_matches(base, table, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown symbol {base!r} in {where}{hint}")
        va, size = table[base]
        return va + offset, size

    def symbolize(self, va: int) -> str | None:
        """"main+0x1c" (the main program), "libc.so.6:printf+0x4" (another
        object), "main" at the symbol itself; None when no function or data
        object covers ``va`` (a zero-size symbol covers its first byte)."""
        if not 0 <= va < 1 << 64:
            return None
        v = np.uint64(va)
        i = int(np.searchsorted(self._start, v, side="right")) - 1
        while i >= 0 and self._reach[i] > v:
            if self._end[i] > v:
                label, name = self._label[i]
                off = va - int(self._start[i])
                return f"{label + ':' if label else ''}{name}{f'+{off:#x}' if off else ''}"
            i -= 1
        return None


# ---------------------------------------------------------------- core files

_NT_PRSTATUS, _NT_PRPSINFO, _NT_AUXV, _NT_FILE = 1, 3, 6, 0x46494C45
_PF_X, _PF_W, _PF_R = 1, 2, 4
_PID = 1000
_USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
              "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
              "gs_base", "ds", "es", "fs", "gs")
_SREG_NAMES = ("cs", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
# struct elf_prstatus: elf_siginfo, pr_cursig, sigpend, sighold, pid, ppid, pgrp, sid,
# 4 timevals, pr_reg (user_regs_struct), pr_fpvalid; struct elf_prpsinfo: state, sname,
# zomb, nice, flag, uid, gid, pid, ppid, pgrp, sid, fname, psargs
_PRSTATUS = "<3ih2xQQ4i64x27Qi4x"
_PRPSINFO = "<bcbb4xQII4i16s80s"
_EHDR = "<16sHHIQQQIHHHHHH"
_PHDR = "<IIQQQQQQ"
assert (struct.calcsize(_PRSTATUS), struct.calcsize(_PRPSINFO)) == (336, 136)
assert (struct.calcsize(_EHDR), struct.calcsize(_PHDR)) == (64, 56)
_ZEROS = bytes(1 << 20)
_MAX_READ = 4096 * PAGE                   # at most 16 MiB per read_phys call


def _note(kind: int, desc: bytes) -> bytes:
    name = b"CORE\0\0\0\0"                # "CORE\0" padded to 4
    pad = -len(desc) % 4
    return struct.pack("<III", 5, len(desc), kind) + name + desc + bytes(pad)


def _prstatus(regs: dict, sregs: dict, signal: int) -> bytes:
    """struct elf_prstatus (x86-64, 336 bytes)."""
    values = {**{k: sregs[k] for k in _SREG_NAMES}, **regs, "eflags": regs["rflags"], "orig_rax": -1}
    pr_reg = (values[k] & (1 << 64) - 1 for k in _USER_REGS)
    return struct.pack(_PRSTATUS, signal, 0, 0, signal, 0, 0, _PID, 1, _PID, _PID, *pr_reg, 0)


def _prpsinfo(state: dict) -> bytes:
    """struct elf_prpsinfo (x86-64, 136 bytes)."""
    fname = os.path.basename(state["exe"]["path"]).encode()[:15]
    args = " ".join(state.get("argv", [])).encode()[:79]
    sname = b"Z" if state.get("exited") else b"R"
    return struct.pack(_PRPSINFO, 0, sname, 1 if state.get("exited") else 0, 0, 0, 0, 0,
                       _PID, 1, _PID, _PID, fname, args)


def _file_backed(vma: dict) -> bool:
    return bool(vma["name"]) and not vma["name"].startswith("[")


def _nt_file(vmas: list[dict]) -> bytes:
    files = [v for v in vmas if _file_backed(v)]
    head = struct.pack("<QQ", len(files), PAGE)
    table = b"".join(struct.pack("<QQQ", v["start"], v["end"], v["offset"] // PAGE) for v in files)
    return head + table + b"".join(v["name"].encode() + b"\0" for v in files)


def _auxv(state: dict) -> bytes:
    words = [(int(t), int(v)) for t, v in state.get("auxv", [])]
    if not words or words[-1][0] != 0:
        words.append((0, 0))
    return b"".join(struct.pack("<QQ", t, v & (1 << 64) - 1) for t, v in words)


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    p_flags: int
    dumped: bool                          # False: p_filesz 0 (PROT_NONE)
    vma: dict | None                      # None: present user pages outside every VMA


def _segments(vmas: list[dict], pages: _Pages) -> list[_Segment]:
    """One segment per VMA (sorted by start), plus one per run of present user pages (same
    flags, contiguous) that no VMA covers."""
    segs = []
    covered = np.zeros(len(pages.va), bool)
    prev_end = 0
    for v in vmas:
        if v["start"] % PAGE or v["end"] % PAGE or v["end"] <= v["start"] or v["start"] < prev_end:
            raise ValueError(f"VMA {v['start']:#x}-{v['end']:#x} is not a non-empty page-aligned range "
                             "clear of the VMA before it")
        prev_end = v["end"]
        prot = v["prot"]
        p_flags = (_PF_R if prot & PROT_READ else 0) | (_PF_W if prot & PROT_WRITE else 0) \
            | (_PF_X if prot & PROT_EXEC else 0)
        segs.append(_Segment(v["start"], v["end"], p_flags, prot != 0, v))
        lo, hi = np.searchsorted(pages.va, np.array([v["start"], v["end"]], np.uint64))
        covered[lo:hi] = True
    rest = np.flatnonzero(~covered)
    if len(rest):
        va, flags = pages.va[rest], pages.flags[rest]
        p_flags = _PF_R | np.where(flags & np.uint64(PTE_RW), _PF_W, 0) \
            | np.where(flags & np.uint64(PTE_NX), 0, _PF_X)
        cut = np.flatnonzero((np.diff(va) != PAGE) | (np.diff(p_flags) != 0)) + 1
        for run_va, run_flags in zip(np.split(va, cut), np.split(p_flags, cut)):
            segs.append(_Segment(int(run_va[0]), int(run_va[-1]) + PAGE, int(run_flags[0]), True, None))
    return sorted(segs, key=lambda s: s.start)


class _Writer:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.count += len(data)

    def zeros(self, n: int) -> None:
        while n:
            chunk = min(n, len(_ZEROS))
            self.write(_ZEROS[:chunk])
            n -= chunk


def _dump(w: _Writer, seg: _Segment, pages: _Pages, read_phys: ReadPhys, file_data: bytes | None) -> None:
    """The contents of ``seg``: present pages from memory (one read per run
    of pages contiguous in both address spaces), absent ones from the mapped
    file when there is one (what the program would read there), else zeros."""
    lo, hi = np.searchsorted(pages.va, np.array([seg.start, seg.end], np.uint64))
    va, gpa = pages.va[lo:hi], pages.gpa[lo:hi]
    cut = np.flatnonzero((np.diff(va) != PAGE) | (np.diff(gpa) != PAGE)) + 1
    pos = seg.start
    for run_va, run_gpa in zip(np.split(va, cut), np.split(gpa, cut)):
        if not len(run_va):
            continue
        first = int(run_va[0])
        _fill(w, seg, pos, first, file_data)
        size = len(run_va) * PAGE
        for off in range(0, size, _MAX_READ):
            w.write(read_phys(int(run_gpa[0]) + off, min(_MAX_READ, size - off)))
        pos = first + size
    _fill(w, seg, pos, seg.end, file_data)


def _fill(w: _Writer, seg: _Segment, start: int, end: int, file_data: bytes | None) -> None:
    if end <= start:
        return
    data = b""
    if file_data is not None:
        at = seg.vma["offset"] + start - seg.start
        data = file_data[at:at + end - start]
        w.write(data)
    w.zeros(end - start - len(data))


def write_core(out: BinaryIO, *, read_phys: ReadPhys, cr3: int, state: dict, regs: dict, sregs: dict,
               get_file: GetFile) -> int:
    """Write an ELF64 x86-64 core file of the program to ``out``; return the
    number of bytes written.

    Notes: NT_PRSTATUS (pid 1000; ``pr_reg`` from ``regs`` (KvmRegs names)
    and ``sregs`` (selectors, fs_base, gs_base); orig_rax -1; ``pr_cursig``
    the signal the program died of, if it did), NT_PRPSINFO (basename of the
    executable, argv joined), NT_AUXV, NT_FILE (every file-backed VMA).
    NT_FPREGSET, NT_X86_XSTATE and NT_SIGINFO are not written (gdb then
    shows no FPU/vector registers and no ``$_siginfo``).

    Segments: one PT_LOAD per VMA with p_flags from its prot, holding the
    memory the page tables map there; pages not present read as the file's
    bytes for file-backed VMAs (zeros past its end) and as zeros otherwise.
    PROT_NONE VMAs get p_filesz 0.  Present user pages outside every VMA get
    PT_LOADs of their own (flags from the PTEs); supervisor pages never
    appear.  A program that has exited is dumped as its memory holds it.
    """
    pages = _user_pages(read_phys, cr3)
    vmas = sorted(state.get("vmas", []), key=lambda v: v["start"])
    segs = _segments(vmas, pages)
    if len(segs) + 1 >= 0xFFFF:
        raise ValueError(f"{len(segs)} segments is more than an ELF header can count without PN_XNUM")
    exited = state.get("exited") or {}
    notes = b"".join((_note(_NT_PRSTATUS, _prstatus(regs, sregs, exited.get("signal") or 0)),
                      _note(_NT_PRPSINFO, _prpsinfo(state)),
                      _note(_NT_AUXV, _auxv(state)),
                      _note(_NT_FILE, _nt_file(vmas))))
    phnum = len(segs) + 1
    notes_at = 64 + 56 * phnum
    data_at = -(-(notes_at + len(notes)) // PAGE) * PAGE

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)     # ELFCLASS64, LSB, EV_CURRENT, SYSV
    header = struct.pack(_EHDR, ident, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)   # ET_CORE, EM_X86_64
    phdrs = [struct.pack(_PHDR, 4, 0, notes_at, 0, 0, len(notes), 0, 4)]     # PT_NOTE
    at = data_at
    for s in segs:
        filesz = s.end - s.start if s.dumped else 0
        phdrs.append(struct.pack(_PHDR, 1, s.p_flags, at, s.start, 0, filesz, s.end - s.start, PAGE))
        at += filesz

    w = _Writer(out)
    w.write(header + b"".join(phdrs) + notes)
    w.zeros(data_at - w.count)
    files: dict[str, bytes] = {}
    for s in segs:
        if not s.dumped:
            continue
        digest = s.vma.get("hash") if s.vma is not None and _file_backed(s.vma) else None
        if digest and digest not in files:
            files[digest] = get_file(digest)
        _dump(w, s, pages, read_phys, files.get(digest) if digest else None)
    return w.count
