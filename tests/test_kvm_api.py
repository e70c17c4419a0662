"""The kvm layer's contracts: opening /dev/kvm, ring sizing, exclusivity, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvm_helpers import kvm
from snapctl.kvm import DirtyRingConfigError, KvmError, KvmUnavailableError, System
from snapctl.kvm.constants import KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_IMMEDIATE_EXIT


def test_missing_kvm_device_names_the_path(tmp_path):
    missing = tmp_path / "no-kvm"
    with pytest.raises(KvmUnavailableError, match="no-kvm does not exist"):
        System(str(missing))


def test_non_kvm_device_is_refused():
    with pytest.raises(KvmUnavailableError, match="not a KVM device"):
        System("/dev/null")


def test_unopenable_kvm_device(tmp_path):
    p = tmp_path / "kvm"
    p.write_text("")
    os.chmod(p, 0)
    if os.geteuid() == 0:  # root ignores file modes; a directory cannot be opened O_RDWR
        p = tmp_path
    with pytest.raises(KvmUnavailableError, match="cannot be opened"):
        System(str(p))


@kvm
def test_system_queries():
    with System() as s:
        assert s.api_version == 12
        assert s.check_extension(KVM_CAP_IMMEDIATE_EXIT) > 0
        assert s.vcpu_mmap_size >= 4096
        cpuid = s.supported_cpuid()
        assert cpuid.nent > 0 and any(cpuid.entries[i].function == 0 for i in range(cpuid.nent))
        msrs = s.msr_index_list()
        assert 0xC0000082 in msrs and 0x10 in msrs  # LSTAR and TSC: saved by every restore
        with s.create_vm() as vm:
            assert set(vm.create_vcpu(0).get_msrs(msrs)) == set(msrs)  # every listed MSR reads back
        fd = s.fd
        assert os.get_inheritable(fd) is False
    with pytest.raises(OSError):
        os.fstat(fd)  # closed deterministically by the context manager


@kvm
def test_ring_limits_prefer_acq_rel():
    with System() as s, s.create_vm() as vm:
        lim = vm.dirty_ring_limits()
        assert lim is not None
        assert lim.cap == (KVM_CAP_DIRTY_LOG_RING_ACQ_REL if vm.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
                           else KVM_CAP_DIRTY_LOG_RING)
        assert lim.min_entries & (lim.min_entries - 1) == 0
        assert lim.max_entries == vm.check_extension(lim.cap) // 16
        assert lim.with_bitmap is False  # x86: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is arm64-only


@kvm
@pytest.mark.parametrize("entries, problem", [(1000, "not a power of two"), (3, "not a power of two"),
                                              (0, "not a power of two"), (-4, "not a power of two"),
                                              (128, "below the kernel minimum"), (1 << 20, "above the kernel maximum")])
def test_bad_ring_sizes_name_the_allowed_range(entries, problem):
    with System() as s, s.create_vm() as vm:
        lim = vm.dirty_ring_limits()
        with pytest.raises(DirtyRingConfigError) as e:
            vm.enable_dirty_ring(entries)
        msg = str(e.value)
        assert problem in msg
        assert f"from {lim.min_entries} to {lim.max_entries} entries" in msg
        assert vm.dirty_ring_entries == 0


@kvm
def test_kernel_agrees_with_our_ring_minimum():
    """Our pre-check must match the kernel: min accepted, half of it refused by the kernel itself."""
    with System() as s, s.create_vm() as vm:
        lim = vm.dirty_ring_limits()
        vm.enable_dirty_ring(lim.min_entries)
    with System() as s, s.create_vm() as vm:
        with pytest.raises(OSError):  # bypass validation: the kernel refuses half the minimum
            vm.enable_cap(lim.cap, lim.min_entries // 2 * 16)


@kvm
def test_ring_refused_after_vcpu_and_twice():
    with System() as s, s.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(DirtyRingConfigError, match="before any vCPU"):
            vm.enable_dirty_ring(4096)
    with System() as s, s.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        with pytest.raises(DirtyRingConfigError, match="already enabled"):
            vm.enable_dirty_ring(4096)


@kvm
def test_ring_and_bitmap_are_exclusive():
    with System() as s, s.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        with pytest.raises(DirtyRingConfigError, match="exclusive"):
            vm.enable_manual_dirty_log_protect()
    with System() as s, s.create_vm() as vm:
        vm.enable_manual_dirty_log_protect()
        with pytest.raises(DirtyRingConfigError, match="exclusive"):
            vm.enable_dirty_ring(4096)


@kvm
def test_get_dirty_log_with_ring_is_a_clear_error():
    import mmap
    with System() as s, s.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        mm = mmap.mmap(-1, 1 << 20)
        addr = np.frombuffer(mm, np.uint8).ctypes.data
        vm.set_memory_region(0, 0, addr, 1 << 20, log_dirty=True)
        with pytest.raises(KvmError, match="unavailable while the dirty ring"):
            vm.get_dirty_log(0)


@kvm
def test_ring_is_mapped_with_the_vcpu_and_unmapped_with_it():
    with System() as s, s.create_vm() as vm:
        vm.enable_dirty_ring(512)
        v = vm.create_vcpu(0)
        assert v.ring is not None and v.ring.entries == 512
        assert v.ring.harvest()[0].size == 0
        assert vm.reset_dirty_rings() == 0
        ring = v.ring
        v.close()
        assert v.ring is None
        with pytest.raises(ValueError, match="closed"):
            ring.harvest()


@kvm
def test_reset_blocks_signals_only_for_the_ioctl():
    """reset_dirty_rings blocks signals (an interrupted reset loses pages on this
    kernel, see Vm.reset_dirty_rings) and must give the caller its mask back."""
    import signal
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with System() as s, s.create_vm() as vm:
        vm.enable_dirty_ring(512)
        vm.create_vcpu(0)
        assert vm.reset_dirty_rings() == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_one_page_size():
    """snapctl names the page once (kvm.constants); storage, which imports nothing of
    snapctl, keeps its own: they must agree."""
    import storage
    from snapctl import render
    from snapctl.kvm.constants import PAGE_SIZE
    from snapctl.machine import layout

    assert PAGE_SIZE == storage.PAGE_SIZE == 4096
    assert layout.PAGE is PAGE_SIZE and render.PAGE_SIZE is PAGE_SIZE


# The 4096s (0x1000s) in snapctl that are not the page size: (file, text on the line, why).
_OTHER_4096 = [
    ("kvm/constants.py", "PAGE_SIZE = 4096", "the one definition"),
    ("kvm/structs.py", "KvmXsave: 4096", "sizeof(struct kvm_xsave), fixed by the KVM ABI"),
    ("kvm/system.py", "max_entries >= 4096", "dirty ring entries"),
    ("kvm/vcpu.py", "max_entries < 4096", "dirty ring entries"),
    ("machine/vmm.py", "ring_entries: int = 4096", "dirty ring entries"),
    ("machine/layout.py", "PML4_GPA = 0x1000", "a guest physical address"),
    ("checkpoint/demo.py", "ring_entries=4096", "dirty ring entries"),
    ("checkpoint/export.py", "CHUNK_PAGES = 4096", "a count of pages per chunk"),
    ("bench.py", "harvest_reset_cost(", "a count of dirty pages"),
    ("bench.py", "counts = [", "counts of dirty pages"),
    ("bench.py", "dirty > 4096", "a count of dirty pages (the ring size)"),
    ("bench.py", "ring=4096", "dirty ring entries"),
    ("bench.py", "ring_entries=4096", "dirty ring entries"),
    ("bench.py", "block = rng.integers(0, 256, (4096, 56)", "rows per generated block"),
    ("bench.py", "range(0, len(pages), 4096)", "pages per block"),
    ("bench.py", "pages[lo:lo + 4096]", "pages per block"),
    ("bench_replication.py", "ring_entries=4096", "dirty ring entries"),
    ("program/fs.py", "PATH_MAX = 4096", "PATH_MAX"),
    ("program/fs.py", "values = (mode, ino", "st_blksize reported to the guest"),
    ("program/syscalls/files.py", "PATH_MAX = 4096", "PATH_MAX"),
    ("program/syscalls/files.py", "AT_EMPTY_PATH = 0x100, 0x1000", "a flag bit"),
    ("program/mm.py", "limit: int = 4096", "C-string length cap (PATH_MAX)"),
    ("program/inspect.py", "_MAX_READ = 4096 * PAGE", "a count of pages per read"),
    ("replication/primary.py", "sock.recv(4096)", "socket read size"),
    ("replication/protocol.py", "f.read(4096)", "token file read size"),
]


def test_no_page_size_literal():
    """Every snapctl module uses kvm.constants.PAGE_SIZE: an integer literal 4096 (0x1000)
    anywhere in snapctl/**/*.py is either on the allow-list above, with its reason, or an error."""
    import ast
    import pathlib

    import snapctl

    root = pathlib.Path(snapctl.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        src = path.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 4096:
                line = lines[node.lineno - 1]
                if not any(f == rel and text in line for f, text, _ in _OTHER_4096):
                    found.append(f"{rel}:{node.lineno}: {line.strip()}")
    assert not found, "use snapctl.kvm.constants.PAGE_SIZE (or allow-list with a reason):\n" + "\n".join(found)
