"""snapctl.program.inspect: page-table walks against tables built by hand,
ELF symbols against nm, core files against gdb and readelf."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from cli_helpers import ok
from kvm_helpers import kvm
from snapctl.program.inspect import (PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US, Symbols, Unmapped,
                                     read_virtual, reverse_map, translate, user_mappings, write_core)

PAGE = 4096
UP = PTE_P | PTE_RW | PTE_US                  # a user read/write entry
SUPERVISOR_VA = 0xFFFF_FFFF_8000_0000
PROT_R, PROT_W, PROT_X = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


def _seed() -> int:
    seed = int(os.environ.get("SNAPCTL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (set SNAPCTL_TEST_SEED to repeat)")
    return seed


class Phys:
    """Guest-physical memory in numpy, x86-64 page tables built in it by
    hand, and a count of every ``read`` (gpa, length)."""

    def __init__(self, pages: int):
        self.mem = np.zeros(pages * PAGE, np.uint8)
        self.free = 0
        self.tables: set[int] = set()
        self.cr3 = self.table()
        self.reads: Counter[tuple[int, int]] = Counter()

    def alloc(self) -> int:
        gpa = self.free * PAGE
        self.free += 1
        assert gpa < len(self.mem), "test memory too small"
        return gpa

    def table(self) -> int:
        gpa = self.alloc()
        self.tables.add(gpa)
        return gpa

    def read(self, gpa: int, n: int) -> bytes:
        assert 0 <= gpa and gpa + n <= len(self.mem), f"read of {n} at {gpa:#x} past the end"
        self.reads[gpa, n] += 1
        return self.mem[gpa:gpa + n].tobytes()

    def entry(self, table: int, index: int) -> int:
        return int(self.mem[table + index * 8:table + index * 8 + 8].view("<u8")[0])

    def set_entry(self, table: int, index: int, value: int) -> None:
        self.mem[table + index * 8:table + index * 8 + 8] = np.frombuffer(value.to_bytes(8, "little"), np.uint8)

    def map(self, va: int, gpa: int, flags: int, *, level: int = 3, upper: int = UP) -> None:
        """Map ``va`` with a leaf at ``level`` (3: 4 KiB PTE, 2: 2 MiB PDE, 1: 1 GiB
        PDPTE, PS added); missing tables are created with ``upper`` flags."""
        table = self.cr3
        for depth in range(level):
            i = (va >> (39 - 9 * depth)) & 511
            e = self.entry(table, i)
            if not e & PTE_P:
                e = self.table() | upper
                self.set_entry(table, i, e)
            table = e & 0x000F_FFFF_FFFF_F000
        self.set_entry(table, (va >> (39 - 9 * level)) & 511, gpa | flags | (PTE_PS if level < 3 else 0))

    def pte_table(self, va: int) -> int:
        """The gpa of the PT page holding ``va``'s PTE."""
        table = self.cr3
        for depth in range(3):
            table = self.entry(table, (va >> (39 - 9 * depth)) & 511) & 0x000F_FFFF_FFFF_F000
        return table

    def write_virtual(self, va: int, data: bytes) -> None:
        while data:
            n = min(len(data), PAGE - va % PAGE)
            gpa = translate(self.read, self.cr3, va)
            self.mem[gpa:gpa + n] = np.frombuffer(data[:n], np.uint8)
            va, data = va + n, data[n:]


# ---------------------------------------------------------------- page tables

def _hand_built() -> tuple[Phys, dict[str, int], list[tuple[int, int, int]]]:
    """Several 4 KiB pages, an alias, a 2 MiB page, a not-present PTE, a PTE
    with bit 7 (PAT, not PS), user leaves under supervisor / read-only / NX
    upper entries, and the VMM's supervisor page; with the expected list of
    user pages (the model)."""
    ph = Phys(2048)                           # 8 MiB: the 2 MiB page's frame lies at 4 MiB
    g = {name: ph.alloc() for name in ("code", "data", "stack", "kernel", "ro", "nx", "hidden", "pat")}
    big, big2 = 0x400000, 0x600000
    ph.map(0x400000, g["code"], PTE_P | PTE_US | PTE_A)
    ph.map(0x401000, g["data"], UP | PTE_A | PTE_D | PTE_NX)
    ph.map(0x402000, g["code"], PTE_RW | PTE_US)              # P clear: not present
    ph.map(0x403000, g["data"], UP)                           # an alias of 0x401000's frame
    ph.map(0x404000, g["pat"], PTE_P | PTE_US | 0x80)         # bit 7 of a PTE is PAT
    ph.map(0x600000, big, UP | PTE_NX, level=2)
    ph.map(0x200000, big2, UP | PTE_A | PTE_D, level=2)       # a large leaf before a subtable in one PD
    ph.map(0x7FFF_FFFF_F000, g["stack"], UP | PTE_NX)
    ph.map(0x4000_0000, g["hidden"], UP, upper=PTE_P | PTE_RW)            # PDPT entry without US
    ph.map(0x8000_0000, g["ro"], UP, upper=PTE_P | PTE_US)                # PDPT entry without RW
    ph.map(0xC000_0000, g["nx"], UP, upper=UP | PTE_NX)                   # PDPT entry with NX
    ph.map(SUPERVISOR_VA, g["kernel"], PTE_P | PTE_RW)
    expected = [(0x400000, g["code"], PTE_P | PTE_US | PTE_A),
                (0x401000, g["data"], UP | PTE_A | PTE_D | PTE_NX),
                (0x403000, g["data"], UP),
                (0x404000, g["pat"], PTE_P | PTE_US),
                *[(0x600000 + k * PAGE, big + k * PAGE, UP | PTE_NX) for k in range(512)],
                *[(0x200000 + k * PAGE, big2 + k * PAGE, UP | PTE_A | PTE_D) for k in range(512)],
                (0x8000_0000, g["ro"], PTE_P | PTE_US),
                (0xC000_0000, g["nx"], UP | PTE_NX),
                (0x7FFF_FFFF_F000, g["stack"], UP | PTE_NX)]
    return ph, g, sorted(expected)


def test_translate_follows_4k_2m_leaves_and_ignores_permissions():
    ph, g, _ = _hand_built()

    def t(va: int) -> int:
        return translate(ph.read, ph.cr3 | 0x18, va)         # PWT/PCD bits in cr3 are not address bits

    assert t(0x400123) == g["code"] + 0x123
    assert t(0x401FFF) == g["data"] + 0xFFF
    assert t(0x403000) == g["data"]
    assert t(0x404010) == g["pat"] + 0x10
    assert t(0x600000) == 0x400000
    assert t(0x612345) == 0x412345
    assert t(0x3FFFFF) == 0x7FFFFF
    assert t(0x7FFF_FFFF_FFF8) == g["stack"] + 0xFF8
    assert t(SUPERVISOR_VA + 8) == g["kernel"] + 8
    assert t(0x4000_0010) == g["hidden"] + 0x10


@pytest.mark.parametrize("va, level", [(0x402000, "PT"), (0x402FFF, "PT"), (0x800000, "PD"),
                                       (0x7FFF_0000_0000, "PDPT"), (0x5000_0000_0000, "PML4"),
                                       (0x8000_0000_0000, None), (0xFFFF_7FFF_FFFF_FFFF, None)])
def test_translate_raises_unmapped_naming_the_address_and_level(va, level):
    ph, _, _ = _hand_built()
    with pytest.raises(Unmapped) as e:
        translate(ph.read, ph.cr3, va)
    assert (e.value.va, e.value.level) == (va, level)
    assert f"{va:#x}" in str(e.value) and (level or "not canonical") in str(e.value)


def test_read_virtual_crosses_pages_and_stops_at_the_first_unmapped_page():
    ph, g, _ = _hand_built()
    rng = np.random.default_rng(_seed())
    m = ph.mem
    for gpa in (g["code"], g["data"]):
        m[gpa:gpa + PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    m[0x400000:0x600000] = rng.integers(0, 256, 0x200000, dtype=np.uint8)

    def r(va: int, n: int) -> bytes:
        return read_virtual(ph.read, ph.cr3, va, n)

    code, data = g["code"], g["data"]
    assert r(0x400FF0, 0x20) == m[code + 0xFF0:code + PAGE].tobytes() + m[data:data + 0x10].tobytes()
    assert r(0x600000, 3 * PAGE + 5) == m[0x400000:0x403005].tobytes()
    assert r(0x401000, 0) == b""
    def reads_of(va: int, n: int) -> dict[tuple[int, int], int]:
        """The data reads of one read_virtual, after checking it read each table page once, whole."""
        ph.reads.clear()
        r(va, n)
        assert all(k[1] == PAGE and c == 1 for k, c in ph.reads.items() if k[0] in ph.tables), ph.reads
        return {k: c for k, c in ph.reads.items() if k[0] not in ph.tables}

    assert reads_of(0x600000, 512 * PAGE) == {(0x400000, 512 * PAGE): 1}           # one read per run
    assert data == code + PAGE and reads_of(0x400000, 2 * PAGE) == {(code, 2 * PAGE): 1}
    for va, n, bad in ((0x401800, 0x1000, 0x402000), (0x404FFF, 2, 0x405000), (0x402000, 1, 0x402000)):
        with pytest.raises(Unmapped) as e:
            r(va, n)
        assert e.value.va == bad and f"page {bad:#x}" in str(e.value)
    with pytest.raises(ValueError):
        r(0x400000, -1)


def test_user_mappings_lists_user_pages_reading_each_table_page_once():
    ph, _, expected = _hand_built()
    ph.reads.clear()
    assert user_mappings(ph.read, ph.cr3) == expected
    table_reads = {gpa: count for (gpa, n), count in ph.reads.items() if n == PAGE}
    assert set(ph.reads.values()) == {1} and set(table_reads) <= ph.tables
    assert all(n == PAGE for (_, n) in ph.reads)


def test_reverse_map_names_the_lowest_user_va_of_each_frame():
    ph, g, expected = _hand_built()
    rmap = reverse_map(ph.read, ph.cr3)
    want: dict[int, int] = {}
    for va, gpa, _ in expected:
        want.setdefault(gpa >> 12, va)
    assert rmap == want
    assert rmap[g["data"] >> 12] == 0x401000
    assert g["kernel"] >> 12 not in rmap and g["hidden"] >> 12 not in rmap


def test_a_1g_leaf_translates_and_lists_page_by_page():
    ph = Phys(16)
    ph.map(0x4000_0000, 0x8000_0000, UP | PTE_A | PTE_D, level=1)         # the frame lies outside RAM: never read
    assert translate(ph.read, ph.cr3, 0x4000_0000 + 0x1234_5678) == 0x8000_0000 + 0x1234_5678
    maps = user_mappings(ph.read, ph.cr3)
    assert len(maps) == 1 << 18
    assert maps[0] == (0x4000_0000, 0x8000_0000, UP | PTE_A | PTE_D)
    assert maps[-1] == (0x7FFF_F000, 0xBFFF_F000, UP | PTE_A | PTE_D)


def test_random_address_spaces_against_the_model():
    rng = np.random.default_rng(_seed())
    for _ in range(5):
        ph = Phys(512)
        model: dict[int, tuple[int, int]] = {}
        for _ in range(150):
            va = int(rng.integers(0, 1 << 35)) << 12                          # anywhere in the user half
            flags = PTE_P | PTE_US | int(rng.choice([0, PTE_RW])) | int(rng.choice([0, PTE_A | PTE_D])) \
                | int(rng.choice([0, PTE_NX]))
            gpa = int(rng.integers(0, 1 << 20)) << 12
            ph.map(va, gpa, flags)
            model[va] = (gpa, flags)
        for _ in range(5):
            ph.map(SUPERVISOR_VA + (int(rng.integers(0, 1 << 18)) << 12), ph.alloc(), PTE_P | PTE_RW)
        assert user_mappings(ph.read, ph.cr3) == sorted((va, g, f) for va, (g, f) in model.items())
        for va, (gpa, _) in model.items():
            off = int(rng.integers(0, PAGE))
            assert translate(ph.read, ph.cr3, va + off) == gpa + off
        want: dict[int, int] = {}
        for va in sorted(model):
            want.setdefault(model[va][0] >> 12, va)
        assert reverse_map(ph.read, ph.cr3) == want


def test_an_empty_address_space_has_no_user_pages():
    ph = Phys(4)
    assert user_mappings(ph.read, ph.cr3) == [] and reverse_map(ph.read, ph.cr3) == {}


# ---------------------------------------------------------------- programs

SOURCE = r"""
#include <stdio.h>
#include <unistd.h>

long counter = 42;
char msg[] = "hello";
#ifdef SHADOW_OPTIND
int optind = 5;                 /* libc defines it too: the program's copy is found first */
#endif

__attribute__((noinline)) void step(void)
{
    char line[32];
    counter++;
    int n = snprintf(line, sizeof line, "counter=%ld\n", counter);
    write(1, line, n);
}

__attribute__((noinline)) void work(void) { step(); }

int main(void)
{
    for (int i = 0; i < 40; i++)
        work();
    printf("%s done\n", msg);
    return 0;
}
"""


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"these tests need {', '.join(missing)} on PATH"


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    _need("gcc", "nm", "ldd", "gdb", "readelf")
    d = tmp_path_factory.mktemp("programs")
    src = d / "prog.c"
    src.write_text(SOURCE)
    builds = {"static": ["-static"], "static-pie": ["-static-pie"], "dynamic": ["-DSHADOW_OPTIND"]}
    out = {}
    for name, flags in builds.items():
        out[name] = d / name
        subprocess.run(["gcc", "-g", "-O0", *flags, "-o", str(out[name]), str(src)], check=True)
    return out


def _nm(path: Path, *flags: str) -> dict[str, tuple[int, int, str]]:
    """name -> (value, size, type letter) of defined symbols, from nm -S."""
    syms = {}
    for line in subprocess.run(["nm", "-S", *flags, str(path)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            value, size, kind, name = parts
            syms.setdefault(name.split("@")[0], (int(value, 16), int(size, 16), kind))
    return syms


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _libraries(prog: Path) -> dict[str, str]:
    """soname -> path of prog's libraries, from ldd."""
    libs = {}
    for line in subprocess.run(["ldd", str(prog)], check=True, capture_output=True, text=True).stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs[os.path.basename(m[1])] = m[m.lastindex]
    return libs


def _exe_state(prog: Path, bias: int, files: dict[str, bytes]) -> dict:
    data = prog.read_bytes()
    files[_sha(data)] = data
    return {"exe": {"path": str(prog), "hash": _sha(data), "bias": bias}, "interp": None, "vmas": []}


@pytest.mark.parametrize("build, bias", [("static", 0), ("static-pie", 0x7F12_3456_0000)])
def test_symbols_of_a_static_program_agree_with_nm(programs, build, bias):
    prog = programs[build]
    nm = _nm(prog)
    files: dict[str, bytes] = {}
    syms = Symbols.from_state(_exe_state(prog, bias, files), files.__getitem__)
    counter, main = bias + nm["counter"][0], bias + nm["main"][0]
    assert syms.lookup("counter") == (counter, nm["counter"][1]) == (counter, 8)
    assert syms.lookup("msg") == (bias + nm["msg"][0], 6)                     # the global, not libc's local msg.0
    assert syms.lookup("main") == (main, nm["main"][1])
    assert syms.lookup("counter+8") == (counter + 8, 8)
    assert syms.lookup(" counter - 0x10 ") == (counter - 16, 8)
    assert syms.lookup(f"{counter:#x}") == (counter, 0)
    assert syms.lookup(f"{counter:#x}+4") == (counter + 4, 0)
    assert syms.lookup(f"{prog.name}:main") == (main, nm["main"][1])
    assert syms.symbolize(main + 5) == "main+0x5"
    assert syms.symbolize(main) == "main"
    assert syms.symbolize(counter + 3) == "counter+0x3"
    assert syms.symbolize(0x10) is None
    with pytest.raises(ValueError, match="unknown symbol 'countr'.*did you mean counter"):
        syms.lookup("countr")
    with pytest.raises(ValueError, match="cannot parse"):
        syms.lookup("counter+")
    with pytest.raises(ValueError, match="no loaded object 'libc.so.6'"):
        syms.lookup("libc.so.6:printf")


def test_symbols_of_a_dynamic_program_include_its_libraries(programs):
    prog = programs["dynamic"]
    libs = _libraries(prog)
    libc_path = libs["libc.so.6"]
    ld_path = next(p for name, p in libs.items() if name.startswith("ld-linux"))
    libc_guest_path = "/opt/lib/libc-2.99.so"                  # its soname, not its file name, labels it
    files: dict[str, bytes] = {}
    exe_bias, libc_base, ld_bias = 0x5555_5555_4000, 0x7F00_0000_0000, 0x7F00_1000_0000
    state = _exe_state(prog, exe_bias, files)
    libc, ld, blob = Path(libc_path).read_bytes(), Path(ld_path).read_bytes(), b"not an ELF file"
    files.update({_sha(libc): libc, _sha(ld): ld, _sha(blob): blob})
    state["interp"] = {"path": ld_path, "hash": _sha(ld), "bias": ld_bias}
    state["vmas"] = [
        {"start": exe_bias, "end": exe_bias + PAGE, "prot": PROT_R, "flags": MAP_PRIVATE, "name": str(prog),
         "hash": state["exe"]["hash"], "offset": 0},
        {"start": 0x7E00_0000_0000, "end": 0x7E00_0000_1000, "prot": PROT_R, "flags": MAP_PRIVATE,
         "name": "/tmp/data.bin", "hash": _sha(blob), "offset": 0},
        {"start": libc_base, "end": libc_base + 0x28000, "prot": PROT_R, "flags": MAP_PRIVATE,
         "name": libc_guest_path, "hash": _sha(libc), "offset": 0},
        {"start": 0x7FFF_FFFD_E000, "end": 0x7FFF_FFFF_F000, "prot": PROT_R | PROT_W,
         "flags": MAP_PRIVATE | MAP_ANONYMOUS, "name": "[stack]", "hash": None, "offset": 0},
    ]
    syms = Symbols.from_state(state, files.__getitem__)
    assert [(o.label, o.bias) for o in syms.objects] == [("", exe_bias), ("libc.so.6", libc_base),
                                                         (os.path.basename(ld_path), ld_bias)]
    nm_exe, nm_libc, nm_ld = _nm(prog), _nm(Path(libc_path), "-D"), _nm(Path(ld_path), "-D")
    printf = libc_base + nm_libc["printf"][0]
    assert syms.lookup("printf") == (printf, nm_libc["printf"][1])
    assert syms.symbolize(printf + 4) == "libc.so.6:printf+0x4"
    assert syms.lookup("main") == (exe_bias + nm_exe["main"][0], nm_exe["main"][1])
    assert syms.symbolize(exe_bias + nm_exe["main"][0] + 5) == "main+0x5"
    assert syms.lookup("optind") == (exe_bias + nm_exe["optind"][0], 4)
    libc_optind = (libc_base + nm_libc["optind"][0], 4)
    assert syms.lookup("libc.so.6:optind") == syms.lookup("libc-2.99.so:optind") == libc_optind
    assert syms.objects[1].path == libc_guest_path
    name, (value, _, _) = next((n, s) for n, s in sorted(nm_ld.items()) if s[2] == "T" and s[1])
    assert syms.lookup(f"{os.path.basename(ld_path)}:{name}")[0] == ld_bias + value


def test_a_library_bias_comes_from_the_segment_its_vma_maps(programs):
    """A VMA at a non-zero offset (libc's text) implies the same bias as the
    one at offset 0: bias = start - (p_vaddr & ~4095) of the segment at that offset."""
    libc_path = _libraries(programs["dynamic"])["libc.so.6"]
    libc = Path(libc_path).read_bytes()
    text = next(s for s in ELFFile(io.BytesIO(libc)).iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1)
    base = 0x7F00_0000_0000
    start = base + (text["p_vaddr"] & ~(PAGE - 1))
    files: dict[str, bytes] = {_sha(libc): libc}
    state = _exe_state(programs["dynamic"], 0x5555_5555_4000, files)
    state["vmas"] = [{"start": start, "end": start + PAGE, "prot": PROT_R | PROT_X, "flags": MAP_PRIVATE,
                      "name": libc_path, "hash": _sha(libc), "offset": text["p_offset"] & ~(PAGE - 1)}]
    syms = Symbols.from_state(state, files.__getitem__)
    assert syms.lookup("printf")[0] == base + _nm(Path(libc_path), "-D")["printf"][0]


# ---------------------------------------------------------------- core files

def _gdb(prog: Path, core: Path, *commands: str) -> str:
    argv = ["gdb", "-batch", "-nx"]
    for c in commands:
        argv += ["-ex", c]
    p = subprocess.run([*argv, str(prog), str(core)], capture_output=True, text=True, timeout=300)
    return p.stdout + p.stderr


def _synthetic_process(prog: Path, bias: int) -> dict:
    """The program's PT_LOAD segments loaded at ``bias`` as the kernel maps
    them (a file-backed VMA per segment, the bss beyond the file as an
    anonymous VMA), a stack under a PROT_NONE guard, a heap whose pages are
    not present, one page of the text left not present, a present user page
    outside every VMA, and the VMM's supervisor page."""
    data = prog.read_bytes()
    elf = ELFFile(io.BytesIO(data))
    ph = Phys(1024)
    vmas = []
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    for seg in loads:
        start = bias + (seg["p_vaddr"] & ~(PAGE - 1))
        file_end = -(-(bias + seg["p_vaddr"] + seg["p_filesz"]) // PAGE) * PAGE
        end = -(-(bias + seg["p_vaddr"] + seg["p_memsz"]) // PAGE) * PAGE
        prot = (PROT_R if seg["p_flags"] & 4 else 0) | (PROT_W if seg["p_flags"] & 2 else 0) \
            | (PROT_X if seg["p_flags"] & 1 else 0)
        flags = PTE_P | PTE_US | PTE_A | (PTE_RW if prot & PROT_W else 0) | (0 if prot & PROT_X else PTE_NX)
        for va in range(start, end, PAGE):
            ph.map(va, ph.alloc(), flags)
        off = seg["p_offset"]
        ph.write_virtual(bias + seg["p_vaddr"], data[off:off + seg["p_filesz"]])
        vmas.append({"start": start, "end": file_end, "prot": prot, "flags": MAP_PRIVATE, "name": str(prog),
                     "hash": _sha(data), "offset": off & ~(PAGE - 1)})
        if end > file_end:
            vmas.append({"start": file_end, "end": end, "prot": prot, "flags": MAP_PRIVATE | MAP_ANONYMOUS,
                         "name": "", "hash": None, "offset": 0})
    text = next(v for v in vmas if v["prot"] & PROT_X)
    hole = text["start"] + PAGE                                  # not present: read from the file
    ph.set_entry(ph.pte_table(hole), (hole >> 12) & 511, 0)
    heap = -(-vmas[-1]["end"] // 0x100000) * 0x100000
    vmas.append({"start": heap, "end": heap + 4 * PAGE, "prot": PROT_R | PROT_W,
                 "flags": MAP_PRIVATE | MAP_ANONYMOUS, "name": "[heap]", "hash": None, "offset": 0})
    stack_top = 0x7FFF_FFFF_F000
    for va in range(stack_top - 4 * PAGE, stack_top, PAGE):
        ph.map(va, ph.alloc(), UP | PTE_A | PTE_D | PTE_NX)
    vmas.append({"start": stack_top - 5 * PAGE, "end": stack_top - 4 * PAGE, "prot": 0,
                 "flags": MAP_PRIVATE | MAP_ANONYMOUS, "name": "", "hash": None, "offset": 0})
    vmas.append({"start": stack_top - 4 * PAGE, "end": stack_top, "prot": PROT_R | PROT_W,
                 "flags": MAP_PRIVATE | MAP_ANONYMOUS, "name": "[stack]", "hash": None, "offset": 0})
    orphan = 0x7FFF_F7FF_D000
    ph.map(orphan, ph.alloc(), PTE_P | PTE_US | PTE_A)
    ph.write_virtual(orphan, b"orphan page")
    ph.map(SUPERVISOR_VA, ph.alloc(), PTE_P | PTE_RW)
    ph.write_virtual(SUPERVISOR_VA, b"the VMM's own page")
    rsp = stack_top - 0x100
    ph.write_virtual(rsp, bytes(8))                               # main's return address: 0 ends the backtrace
    return {"phys": ph, "vmas": vmas, "rsp": rsp, "hole": hole, "orphan": orphan, "heap": heap,
            "entry": bias + elf["e_entry"],
            "phdr": bias + next(s["p_vaddr"] for s in loads if s["p_offset"] == 0) + elf["e_phoff"],
            "phnum": elf["e_phnum"], "data": data}


def _expected_segment(proc: dict, vma: dict) -> bytes:
    """What a VMA's PT_LOAD must hold, page by page, from the model."""
    ph, out = proc["phys"], []
    for va in range(vma["start"], vma["end"], PAGE):
        try:
            out.append(read_virtual(ph.read, ph.cr3, va, PAGE))
        except Unmapped:
            if vma["hash"]:
                at = vma["offset"] + va - vma["start"]
                out.append(proc["data"][at:at + PAGE].ljust(PAGE, b"\0"))
            else:
                out.append(bytes(PAGE))
    return b"".join(out)


@pytest.mark.parametrize("build, bias, signal", [("static", 0, 11), ("static-pie", 0x7F12_3456_0000, None)])
def test_write_core_gives_gdb_the_memory_and_registers(programs, tmp_path, build, bias, signal):
    prog = programs[build]
    nm = _nm(prog)
    proc = _synthetic_process(prog, bias)
    ph = proc["phys"]
    ph.write_virtual(bias + nm["msg"][0], b"jello")               # memory differs from the file: gdb reads the core
    main = bias + nm["main"][0]
    regs = {name: 0x1000 + i for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}
    regs.update(rip=main, rsp=proc["rsp"], rflags=0x202)
    sregs = {"cr3": ph.cr3, "fs_base": 0x4C_0000, "gs_base": 0, "cs": 0x23, "ss": 0x1B, "ds": 0x1B, "es": 0x1B,
             "fs": 0, "gs": 0}
    state = {"syscalls": 7, "exited": None if signal is None else {"status": 139, "signal": signal, "report": ""},
             "vmas": proc["vmas"], "exe": {"path": str(prog), "hash": _sha(proc["data"]), "bias": bias},
             "interp": None, "argv": [str(prog), "one", "two"], "env": ["HOME=/"], "cwd": "/",
             "auxv": [[3, proc["phdr"]], [4, 56], [5, proc["phnum"]], [6, PAGE], [9, proc["entry"]]]}
    core = tmp_path / "core"
    files = {_sha(proc["data"]): proc["data"]}
    with open(core, "wb") as f:
        written = write_core(f, read_phys=ph.read, cr3=ph.cr3, state=state, regs=regs, sregs=sregs,
                             get_file=files.__getitem__)
    assert written == core.stat().st_size

    out = _gdb(prog, core, "p counter", "p msg", "info registers rip rsp rax r15 eflags fs_base", "bt")
    assert re.search(r"^\$1 = 42$", out, re.M), out
    assert re.search(r'^\$2 = "jello"$', out, re.M), out
    assert re.search(rf"^rip\s+{main:#x}\s+{main:#x} <main>", out, re.M), out
    assert re.search(rf"^rsp\s+{proc['rsp']:#x}\s", out, re.M), out
    assert re.search(r"^rax\s+0x1000\s", out, re.M) and re.search(r"^r15\s+0x100e\s", out, re.M), out
    assert re.search(r"^fs_base\s+0x4c0000\s", out, re.M), out
    assert re.search(r"^#0\s+main \(\) at .*prog\.c", out, re.M), out
    if signal:
        assert "Program terminated with signal SIGSEGV" in out, out

    notes = subprocess.run(["readelf", "-n", "-W", str(core)], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^\s+CORE\s+0x[0-9a-f]+\s+(NT_\w+)", notes, re.M) == ["NT_PRSTATUS", "NT_PRPSINFO", "NT_AUXV",
                                                                         "NT_FILE"], notes
    backed = [v for v in proc["vmas"] if v["name"] and not v["name"].startswith("[")]
    mapped = re.findall(r"^\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(/\S+)$",
                        _gdb(prog, core, "info proc mappings"), re.M)           # gdb's reading of NT_FILE
    assert [tuple(int(x, 16) for x in m[:3]) + (m[3],) for m in mapped] == \
        [(v["start"], v["end"], v["offset"], v["name"]) for v in backed]

    elf = ELFFile(io.BytesIO(core.read_bytes()))
    assert (elf["e_type"], elf["e_machine"]) == ("ET_CORE", "EM_X86_64")
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    by_start = {s["p_vaddr"]: s for s in loads}
    for vma in proc["vmas"]:
        seg = by_start.pop(vma["start"])
        assert seg["p_memsz"] == vma["end"] - vma["start"]
        assert seg["p_flags"] == (4 if vma["prot"] & PROT_R else 0) | (2 if vma["prot"] & PROT_W else 0) \
            | (1 if vma["prot"] & PROT_X else 0)
        if vma["prot"] == 0:
            assert seg["p_filesz"] == 0
        else:
            assert seg.data() == _expected_segment(proc, vma), f"VMA {vma['start']:#x}-{vma['end']:#x}"
    (orphan,) = by_start.values()                                 # the only other one: the page outside the VMAs
    assert (orphan["p_vaddr"], orphan["p_memsz"], orphan["p_flags"]) == (proc["orphan"], PAGE, 4 | 1)
    assert orphan.data().startswith(b"orphan page")
    assert b"the VMM's own page" not in core.read_bytes()
    text = next(s for s in loads if s["p_vaddr"] <= proc["hole"] < s["p_vaddr"] + s["p_memsz"])
    at = proc["hole"] - text["p_vaddr"]
    in_file = next(v for v in proc["vmas"] if v["start"] == text["p_vaddr"])["offset"] + at
    assert text.data()[at:at + PAGE] == proc["data"][in_file:in_file + PAGE] != bytes(PAGE)

    parsed = {n["n_type"]: n for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()}
    assert parsed["NT_PRPSINFO"]["n_desc"]["pr_fname"].rstrip(b"\0") == prog.name.encode()
    assert parsed["NT_PRPSINFO"]["n_desc"]["pr_psargs"].rstrip(b"\0") == f"{prog} one two".encode()
    nt_file = parsed["NT_FILE"]["n_desc"]
    assert [(e["vm_start"], e["vm_end"], e["page_offset"]) for e in nt_file["Elf_Nt_File_Entry"]] == \
        [(v["start"], v["end"], v["offset"] // PAGE) for v in backed]
    assert [n.decode() for n in nt_file["filename"]] == [v["name"] for v in backed]


@kvm
def test_core_of_a_real_program_checkpoint_opens_in_gdb(programs, tmp_path):
    """End to end through the CLI: run the static program with a checkpoint
    at every system call, dump one from the middle (inside a write() called
    by step()), and let gdb read it; then the one after the exit."""
    prog, store = programs["static"], tmp_path / "s.db"
    ok("run", "--program", prog, "--every-syscalls", 1, store=store)
    listing = ok("list", "--json", store=store).json()
    ckpt = listing[len(listing) // 2]["id"]
    printed = re.findall(r"counter=(\d+)", ok("output", ckpt, store=store).out)
    assert printed, "the checkpoint in the middle comes after some output"
    core = tmp_path / "core"
    ok("core", ckpt, core, store=store)
    out = _gdb(prog, core, "bt", "p counter")
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", out, re.M)
    assert frames[-3:] == ["step", "work", "main"], out
    assert re.search(rf"^\$1 = {printed[-1]}$", out, re.M), out
    # the last checkpoint comes after the exit: memory is still there to dump
    last = listing[-1]["id"]
    assert ok("output", last, store=store).out.endswith("counter=82\nhello done\n")
    ok("core", last, tmp_path / "core.last", store=store)
    assert re.search(r"^\$1 = 82$", _gdb(prog, tmp_path / "core.last", "p counter"), re.M)
