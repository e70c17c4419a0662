"""The program's address space against a model (no KVM: guest RAM is a plain mapping)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from snapctl.machine.memory import GuestMemory
from snapctl.program.inspect import Unmapped, translate, user_mappings
from snapctl.program.mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, Fault, Frames, OutOfMemory, Vma

SEED = int(os.environ.get("SNAPCTL_TEST_SEED", random.randrange(1 << 30)))


@pytest.fixture
def aspace():
    mem = GuestMemory(16 << 20)
    yield AddressSpace(mem, Frames(mem.npages))
    mem.close()


def _read_phys(a: AddressSpace):
    return lambda gpa, n: a.memory.flat[gpa:gpa + n].tobytes()


def test_mappings_translate_through_the_page_tables_the_guest_would_walk(aspace):
    aspace.map(Vma(0x400000, 0x403000, PROT_READ | PROT_EXEC, name="/prog"))
    aspace.map(Vma(0x7F0000000000, 0x7F0000002000, PROT_READ | PROT_WRITE))
    aspace.write(0x7F0000000FFC, b"abcdefgh")                        # across a page boundary
    assert aspace.read(0x7F0000000FFC, 8) == b"abcdefgh"
    cr3 = aspace.pml4 << 12
    gpa = translate(_read_phys(aspace), cr3, 0x7F0000001000)
    assert aspace.memory.flat[gpa:gpa + 4].tobytes() == b"efgh"
    vas = [va for va, _, _ in user_mappings(_read_phys(aspace), cr3)]
    assert vas == [0x400000, 0x401000, 0x402000, 0x7F0000000000, 0x7F0000001000]


def test_protection_is_enforced_for_the_vmm_and_in_the_ptes(aspace):
    aspace.map(Vma(0x10000, 0x12000, PROT_READ))
    with pytest.raises(Fault):
        aspace.write(0x10000, b"x")                                  # read-only
    with pytest.raises(Fault):
        aspace.read(0x20000, 1)                                      # unmapped
    aspace.protect(0x11000, 0x12000, PROT_READ | PROT_WRITE)
    aspace.write(0x11000, b"ok")
    assert [(v.start, v.end, v.prot) for v in aspace.vmas] == [(0x10000, 0x11000, PROT_READ),
                                                               (0x11000, 0x12000, PROT_READ | PROT_WRITE)]
    aspace.protect(0x11000, 0x12000, 0)                              # PROT_NONE keeps the frame and content
    with pytest.raises(Fault):
        aspace.read(0x11000, 1)
    with pytest.raises(Unmapped):
        translate(_read_phys(aspace), aspace.pml4 << 12, 0x11000)
    aspace.protect(0x11000, 0x12000, PROT_READ)
    assert aspace.read(0x11000, 2) == b"ok"


def test_unmapped_frames_are_reused_zeroed(aspace):
    aspace.map(Vma(0x10000, 0x11000, PROT_READ | PROT_WRITE))
    aspace.write(0x10000, b"secret")
    aspace.unmap(0x10000, 0x11000)
    assert aspace.vmas == []
    aspace.map(Vma(0x50000, 0x51000, PROT_READ | PROT_WRITE))        # gets the freed frame back
    assert aspace.read(0x50000, 6) == bytes(6)


def test_guest_ram_bounds_mappings(aspace):
    with pytest.raises(OutOfMemory):
        aspace.map(Vma(0x10000000, 0x10000000 + (32 << 20), PROT_READ))
    aspace.map(Vma(0x20000000, 0x20000000 + (1 << 30), 0))          # a PROT_NONE reservation costs no frame


def test_random_map_unmap_protect_against_a_model(aspace):
    """VMAs and byte contents after random operations equal a page-level model."""
    print(f"seed {SEED} (SNAPCTL_TEST_SEED)")
    rng = random.Random(SEED)
    base, npages = 0x100000, 64
    model: dict[int, tuple[int, bytes]] = {}                          # page -> (prot, content)
    for _ in range(300):
        a = rng.randrange(npages)
        b = min(npages, a + rng.randrange(1, 8))
        op = rng.choice(["map", "unmap", "protect", "write"])
        prot = rng.choice([0, PROT_READ, PROT_READ | PROT_WRITE])
        start, end = base + a * PAGE, base + b * PAGE
        if op == "map":
            aspace.map(Vma(start, end, prot))
            for p in range(a, b):
                model[p] = (prot, bytes(PAGE))
        elif op == "unmap":
            aspace.unmap(start, end)
            for p in range(a, b):
                model.pop(p, None)
        elif op == "protect" and all(p in model for p in range(a, b)):
            aspace.protect(start, end, prot)
            for p in range(a, b):
                model[p] = (prot, model[p][1])
        elif op == "write":
            p = a
            data = bytes([rng.randrange(256)]) * 16
            ok = p in model and model[p][0] & PROT_WRITE
            if ok:
                aspace.write(base + p * PAGE + 100, data)
                c = model[p][1]
                model[p] = (model[p][0], c[:100] + data + c[116:])
            else:
                with pytest.raises(Fault):
                    aspace.write(base + p * PAGE + 100, data)
    for p in range(npages):
        va = base + p * PAGE
        v = aspace.find_vma(va)
        if p not in model:
            assert v is None, f"page {p}: a VMA {v} where the model has none"
            continue
        prot, content = model[p]
        assert v is not None and v.prot == prot, f"page {p}: VMA {v}, model prot {prot}"
        if prot & PROT_READ:
            assert aspace.read(va, PAGE) == content, f"page {p}: content differs"
    # the VMM's mirror equals the page tables in guest memory
    mirror = dict(aspace.pt)
    aspace.rebuild()
    assert aspace.pt == mirror


def test_frames_state_round_trips():
    print(f"seed {SEED} (SNAPCTL_TEST_SEED)")
    rng = np.random.default_rng(SEED)
    f = Frames(1 << 16, 4000, [int(x) for x in rng.integers(1, 4000, 50)] + list(range(100, 900))
               + list(range(3000, 2000, -1)))
    g = Frames.from_state(1 << 16, f.state())
    assert (g.next, g.free) == (f.next, f.free)
    assert len(f.state()["free_runs"]) < 60
    with pytest.raises(ValueError):
        Frames.from_state(100, {"next": 5, "free_runs": [[99, 5, 1]]})
