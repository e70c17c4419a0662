"""Loading a program the way Linux's ``execve`` does (binfmt_elf), into a fresh address space.

Static (ET_EXEC), static-pie and dynamically linked programs alike: a
position-independent main program is placed at Linux's no-ASLR base; a
PT_INTERP program gets its interpreter (``ld.so``, looked up inside the
sandbox's root as the kernel would inside a chroot) mapped below the mmap
top, and starts there with AT_BASE telling it where it is. The initial stack
is the kernel's: argc, argv, envp, auxv (no vDSO: libc then makes real
``clock_gettime`` calls, which is what lets them be recorded), strings and
AT_RANDOM above.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, Vma, page_down, page_up

#: Linux's ELF_ET_DYN_BASE without ASLR (where a PIE main program goes)
ET_DYN_BASE = 0x5555_5555_4000
STACK_TOP = 0x7FFF_FFFF_D000          # below a guard page and the trampoline page
STACK_SIZE = 8 << 20
MMAP_TOP = STACK_TOP - STACK_SIZE - (16 << 20)
MAP_PRIVATE, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x2, 0x20, 0x100
PF_X, PF_W, PF_R = 1, 2, 4
AT = dict(NULL=0, PHDR=3, PHENT=4, PHNUM=5, PAGESZ=6, BASE=7, FLAGS=8, ENTRY=9, UID=11, EUID=12, GID=13,
          EGID=14, PLATFORM=15, HWCAP=16, CLKTCK=17, SECURE=23, RANDOM=25, HWCAP2=26, EXECFN=31, MINSIGSTKSZ=51)


class LoadError(ValueError):
    """The file cannot be run as a program here (one line, names the file and the reason)."""


@dataclass
class ElfInfo:
    etype: str                 #: "ET_EXEC" or "ET_DYN"
    entry: int
    phoff: int
    phentsize: int
    phnum: int
    loads: list[tuple[int, int, int, int, int]]   #: (vaddr, offset, filesz, memsz, flags)
    interp: str | None
    phdr: int | None           #: PT_PHDR vaddr, if any

    @property
    def span(self) -> tuple[int, int]:
        lo = min(page_down(v) for v, *_ in self.loads)
        hi = max(page_up(v + m) for v, _, _, m, _ in self.loads)
        return lo, hi


def parse(data: bytes, name: str) -> ElfInfo:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise LoadError(f"{name}: not an x86-64 ELF program ({elf['e_machine']}, {elf.elfclass}-bit)")
        etype = elf["e_type"]
        if etype not in ("ET_EXEC", "ET_DYN"):
            raise LoadError(f"{name}: ELF type {etype} is not a program")
        loads, interp, phdr = [], None, None
        for seg in elf.iter_segments():
            t = seg["p_type"]
            if t == "PT_LOAD" and seg["p_memsz"]:
                if seg["p_filesz"] > seg["p_memsz"] or seg["p_offset"] + seg["p_filesz"] > len(data):
                    raise LoadError(f"{name}: a PT_LOAD segment lies outside the file")
                loads.append((seg["p_vaddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"], seg["p_flags"]))
            elif t == "PT_INTERP":
                interp = seg.get_interp_name()
            elif t == "PT_PHDR":
                phdr = seg["p_vaddr"]
        if not loads:
            raise LoadError(f"{name}: no loadable segment")
        return ElfInfo(etype, elf["e_entry"], elf["e_phoff"], elf["e_phentsize"], elf["e_phnum"], loads, interp, phdr)
    except (ELFError, struct.error, ValueError) as e:
        raise LoadError(f"{name}: not a valid ELF file ({e})") from None


def _prot(flags: int) -> int:
    return (PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0) | (PROT_EXEC if flags & PF_X else 0)


def map_image(mm: AddressSpace, info: ElfInfo, data: bytes, bias: int, name: str, h: str) -> int:
    """Map every PT_LOAD at ``bias``; returns the end of the highest segment (for brk)."""
    end = 0
    for vaddr, off, _filesz, memsz, flags in info.loads:
        start, stop = page_down(bias + vaddr), page_up(bias + vaddr + memsz)
        mm.map(Vma(start, stop, _prot(flags), MAP_PRIVATE, name, h, page_down(off)))
        end = max(end, bias + vaddr + memsz)
    for vaddr, off, filesz, _memsz, _flags in info.loads:
        # file bytes from the page start (as mmap would), then zeros past filesz (bss)
        lead = (bias + vaddr) - page_down(bias + vaddr)
        mm.write_phys_page_data(page_down(bias + vaddr), data[off - lead:off + filesz])
    return end


@dataclass
class Loaded:
    entry: int
    sp: int
    auxv: list[list[int]]
    brk: int
    images: dict


def load(mm: AddressSpace, exe: tuple[str, str, bytes], interp: tuple[str, str, bytes] | None, *,
         argv: list[str], env: list[str], random16: bytes, hwcap: int, ids: dict) -> Loaded:
    """Map the program (and its interpreter) and build the initial stack."""
    path, h, data = exe
    info = parse(data, path)
    bias = ET_DYN_BASE if info.etype == "ET_DYN" else 0
    if bias:
        bias -= info.span[0]
    end = map_image(mm, info, data, bias, path, h)
    images = {"exe": {"path": path, "hash": h, "bias": bias}}
    entry, base = bias + info.entry, 0
    if info.interp:
        if interp is None:
            raise LoadError(f"{path}: needs its interpreter {info.interp}")
        ipath, ih, idata = interp
        iinfo = parse(idata, ipath)
        if iinfo.etype != "ET_DYN" or iinfo.interp:
            raise LoadError(f"{ipath}: not a usable ELF interpreter")
        lo, hi = iinfo.span
        start = mm.free_range(hi - lo, MMAP_TOP, 0x10000)
        base = start - lo
        map_image(mm, iinfo, idata, base, ipath, ih)
        images["interp"] = {"path": ipath, "hash": ih, "bias": base}
        entry = base + iinfo.entry
    phdr = bias + (info.phdr if info.phdr is not None else _phdr_vaddr(info))
    mm.map(Vma(STACK_TOP - STACK_SIZE, STACK_TOP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN,
               name="[stack]"))
    strings = bytearray()
    top = STACK_TOP

    def put(b: bytes) -> int:
        strings[:0] = b
        return top - len(strings)
    execfn = put(path.encode() + b"\0")
    envp = [put(e.encode() + b"\0") for e in reversed(env)][::-1]
    argp = [put(a.encode() + b"\0") for a in reversed(argv)][::-1]
    platform = put(b"x86_64\0")
    rand = put(random16)
    auxv = [[AT["PHDR"], phdr], [AT["PHENT"], info.phentsize], [AT["PHNUM"], info.phnum], [AT["PAGESZ"], PAGE],
            [AT["BASE"], base], [AT["FLAGS"], 0], [AT["ENTRY"], bias + info.entry], [AT["UID"], ids["uid"]],
            [AT["EUID"], ids["uid"]], [AT["GID"], ids["gid"]], [AT["EGID"], ids["gid"]], [AT["HWCAP"], hwcap],
            [AT["CLKTCK"], 100], [AT["PLATFORM"], platform], [AT["SECURE"], 0], [AT["RANDOM"], rand],
            [AT["HWCAP2"], 0], [AT["EXECFN"], execfn], [AT["MINSIGSTKSZ"], 2048], [AT["NULL"], 0]]
    words = [len(argv), *argp, 0, *envp, 0, *[x for kv in auxv for x in kv]]
    sp = (top - len(strings)) & ~15
    if len(words) % 2:
        sp -= 8
    sp -= 8 * len(words)
    if STACK_TOP - sp > STACK_SIZE // 4:
        raise LoadError(f"{path}: arguments and environment too large ({STACK_TOP - sp} bytes)")
    mm.write(top - len(strings), bytes(strings))
    mm.write(sp, struct.pack(f"<{len(words)}Q", *words))
    return Loaded(entry, sp, auxv, page_up(end), images)


def _phdr_vaddr(info: ElfInfo) -> int:
    for vaddr, off, filesz, _m, _f in info.loads:
        if off <= info.phoff < off + filesz:
            return vaddr + (info.phoff - off)
    return 0
