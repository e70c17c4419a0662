"""ctypes mirrors of the KVM structs snapctl passes to ioctls (x86-64 layouts).

Each struct's size is asserted at import: the ioctl numbers are derived from
these sizes, and a mismatch would otherwise turn into a confusing ENOTTY.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmEnableCap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmRegs(C.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(C.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmXsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmDebugregs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class KvmVcpuEvents(C.Structure):
    # Kept opaque: snapctl saves and restores it as a whole.
    _fields_ = [("raw", u8 * 64)]


class KvmMpState(C.Structure):
    _fields_ = [("mp_state", u32)]


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(C.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class KvmMsrListHeader(C.Structure):
    _fields_ = [("nmsrs", u32)]


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(C.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def msrs_struct(n: int) -> type[C.Structure]:
    """struct kvm_msrs with room for n entries."""
    return type(
        f"KvmMsrs{n}", (C.Structure,), {"_fields_": [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]}
    )


def cpuid2_struct(n: int) -> type[C.Structure]:
    """struct kvm_cpuid2 with room for n entries."""
    return type(
        f"KvmCpuid2_{n}", (C.Structure,), {"_fields_": [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]}
    )


def msr_list_struct(n: int) -> type[C.Structure]:
    return type(f"KvmMsrList{n}", (C.Structure,), {"_fields_": [("nmsrs", u32), ("indices", u32 * n)]})


class KvmRunIo(C.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class KvmRunFailEntry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunInternal(C.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunExit(C.Union):
    _fields_ = [("io", KvmRunIo), ("fail_entry", KvmRunFailEntry), ("internal", KvmRunInternal), ("raw", u8 * 256)]


class KvmRun(C.Structure):
    """The head of struct kvm_run (the shared page mapped from the vCPU fd)."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
        # KVM_CAP_SYNC_REGS: registers exchanged through this page instead of
        # KVM_GET_REGS/KVM_SET_REGS (api.txt 5. "kvm_run->s").
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("sync_regs", KvmRegs),
    ]


_SIZES = {
    KvmUserspaceMemoryRegion: 32,
    KvmEnableCap: 104,
    KvmDirtyLog: 16,
    KvmClearDirtyLog: 24,
    KvmRegs: 144,
    KvmSegment: 24,
    KvmDtable: 16,
    KvmSregs: 312,
    KvmXsave: 4096,
    KvmXcrs: 392,
    KvmDebugregs: 128,
    KvmVcpuEvents: 64,
    KvmMpState: 4,
    KvmMsrEntry: 16,
    KvmCpuidEntry2: 40,
}
for _t, _n in _SIZES.items():
    assert C.sizeof(_t) == _n, (_t.__name__, C.sizeof(_t), _n)
assert KvmRun.exit.offset == 32 and KvmRun.exit_reason.offset == 8 and KvmRun.immediate_exit.offset == 1
assert KvmRun.kvm_valid_regs.offset == 288 and KvmRun.sync_regs.offset == 304
