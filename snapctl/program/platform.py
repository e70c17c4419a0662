"""The guest "kernel" the VMM builds for a program: no ring-0 code runs on any normal path.

Virtual layout (one address space, 4 KiB pages)::

    user half          the program, its libraries, heap, mmaps, stack (see loader.py)
    0x7FFFFFFFF000     the syscall trampoline: one read-only, user-executable page
    0xFFFFFFFF80000000 supervisor-only: GDT, TSS (+ I/O bitmap), IDT, exception stubs, a stack

How a system call reaches the VMM here (program-guests.md): ``syscall`` under
``kvm_pvm`` jumps to LSTAR but stays at CPL 3, and clears IOPL. So LSTAR is
the trampoline, whose ``out %al, $0xF0`` exits to the VMM through the TSS I/O
permission bitmap (ports 0xF0-0xF7 open to CPL 3, IOPL 0). The VMM services
the call and sets RAX = result, RIP = RCX, RFLAGS = R11 -- what ``sysret``
would have done. Exceptions (#PF, #GP, #UD, ...) go through the IDT to a
ring-0 stub that reports the vector on port 0xF1 (emulated, slow, but only
on the way to the program's death). On a host whose ``syscall`` does enter
ring 0 (hardware VMX/SVM) the first system call is seen arriving at CPL 0
and refused with a clear message (:func:`check_syscall_entry`).
"""

from __future__ import annotations

import struct

import numpy as np

from ..kvm import structs as S
from ..kvm.constants import PAGE_SIZE
from .mm import PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, Vma

KBASE = 0xFFFF_FFFF_8000_0000
K_GDT = KBASE
K_TSS = KBASE + PAGE_SIZE
K_IDT = KBASE + 0x2000
K_CODE = KBASE + 0x3000          # 256 exception stubs, 16 bytes each
K_STACK_TOP = KBASE + 0x8000     # 3 pages of exception stack below
K_PAGES = 8
TRAMPOLINE = 0x7FFF_FFFF_F000
PORT_SYSCALL = 0xF0
PORT_EXCEPTION = 0xF1

SEL_KCODE, SEL_KDATA, SEL_UDATA, SEL_UCODE, SEL_TSS = 0x08, 0x10, 0x1B, 0x23, 0x28
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
CR0 = 0x8005_0033                 # PG WP NE ET MP PE
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_FSGSBASE, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 16, 1 << 18
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
RFLAGS_START = 0x202              # IF (no interrupts ever come) + the reserved bit
#: vectors that push an error code
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
#: XCR0 features offered: x87, SSE, AVX, AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), as far as the host has them
XCR0_WANTED = 0xE7
CPUID_RDRAND = (1, 0, "ecx", 1 << 30)
CPUID_RDSEED = (7, 0, "ebx", 1 << 18)


def _exception_stubs() -> bytes:
    code = bytearray(256 * 16)
    for v in range(256):
        # mov $v,%eax ; out %eax,$0xF1 ; hlt ; jmp .
        code[16 * v:16 * v + 10] = b"\xB8" + struct.pack("<I", v) + b"\xE7" + bytes([PORT_EXCEPTION]) + b"\xF4\xEB\xFE"
    return bytes(code)


def build_kernel_area(aspace: AddressSpace) -> None:
    """Map and fill the supervisor area and the trampoline page."""
    aspace.map_pages(KBASE, K_PAGES, PROT_READ | PROT_WRITE, user=False)   # NX: data and stack
    aspace.map_pages(K_CODE, 1, PROT_READ | PROT_EXEC, user=False)          # the stubs: RX
    gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF]
    tss_limit = 0x68 + 32
    gdt += [(tss_limit & 0xFFFF) | ((K_TSS & 0xFFFFFF) << 16) | (0x8B << 40) | (((K_TSS >> 24) & 0xFF) << 56),
            K_TSS >> 32]
    aspace.write_phys_page_data(K_GDT, np.array(gdt, dtype=np.uint64).tobytes())
    # I/O permission bitmap: every port closed to CPL 3 but the VMM's 0xF0-0xF7 (one byte of it).
    tss = bytearray(0x68) + b"\xFF" * 32 + b"\xFF"
    struct.pack_into("<Q", tss, 4, K_STACK_TOP)       # RSP0
    struct.pack_into("<H", tss, 0x66, 0x68)           # I/O bitmap offset
    tss[0x68 + PORT_SYSCALL // 8] = 0
    aspace.write_phys_page_data(K_TSS, bytes(tss))
    idt = bytearray(256 * 16)
    for v in range(256):
        h = K_CODE + 16 * v
        struct.pack_into("<HHBBHII", idt, 16 * v, h & 0xFFFF, SEL_KCODE, 0, 0x8E, (h >> 16) & 0xFFFF, h >> 32, 0)
    aspace.write_phys_page_data(K_IDT, bytes(idt))
    aspace.write_phys_page_data(K_CODE, _exception_stubs())
    aspace.map(Vma(TRAMPOLINE, TRAMPOLINE + PAGE_SIZE, PROT_READ | PROT_EXEC, name="[trampoline]"))
    aspace.write_phys_page_data(TRAMPOLINE, bytes([0xE6, PORT_SYSCALL, 0x0F, 0x0B]))   # out %al,$0xF0 ; ud2


def guest_cpuid(supported):
    """The host's supported CPUID with RDRAND and RDSEED hidden: their results could not
    be recorded (they do not trap here), so a replay could not reproduce them."""
    for i in range(supported.nent):
        e = supported.entries[i]
        for leaf, sub, reg, bit in (CPUID_RDRAND, CPUID_RDSEED):
            if e.function == leaf and e.index == sub:
                setattr(e, reg, getattr(e, reg) & ~bit)
    return supported


def hwcap(cpuid) -> int:
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            return int(e.edx)
    return 0


def setup_vcpu(vcpu, cpuid, pml4: int, entry: int, rsp: int) -> None:
    """64-bit CPL 3 at ``entry`` with the page tables at ``pml4`` (frame number)."""
    vcpu.set_cpuid2(cpuid)
    sr = vcpu.get_sregs()

    def seg(sel: int, typ: int, dpl: int, long: bool) -> S.KvmSegment:
        return S.KvmSegment(base=0, limit=0xFFFFFFFF, selector=sel, type=typ, present=1, dpl=dpl,
                            db=0 if long else 1, s=1, l=1 if long else 0, g=1)

    sr.cs = seg(SEL_UCODE, 0xB, 3, True)
    sr.ds = sr.es = sr.ss = seg(SEL_UDATA, 0x3, 3, False)
    sr.fs = seg(0, 0x3, 3, False)
    sr.gs = seg(0, 0x3, 3, False)
    sr.tr = S.KvmSegment(base=K_TSS, limit=0x68 + 32, selector=SEL_TSS, type=0xB, present=1, dpl=0, s=0)
    sr.gdt.base, sr.gdt.limit = K_GDT, 7 * 8 - 1
    sr.idt.base, sr.idt.limit = K_IDT, 256 * 16 - 1
    sr.cr3 = pml4 << 12
    sr.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE | CR4_FSGSBASE
    sr.cr0 = CR0
    sr.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
    vcpu.set_sregs(sr)
    xcr0 = 0
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 0xD and e.index == 0:
            xcr0 = e.eax | (e.edx << 32)
    xcrs = S.KvmXcrs()
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr = 0
    xcrs.xcrs[0].value = (xcr0 & XCR0_WANTED) | 1
    vcpu.set_xcrs(xcrs)
    vcpu.set_msrs({MSR_STAR: (0x10 << 48) | (SEL_KCODE << 32), MSR_LSTAR: TRAMPOLINE,
                   MSR_CSTAR: TRAMPOLINE, MSR_FMASK: 0x47700})
    regs = S.KvmRegs()
    regs.rip, regs.rsp, regs.rflags = entry, rsp, RFLAGS_START
    vcpu.set_regs(regs)


def check_syscall_entry(vcpu) -> None:
    """Refuse a host whose ``syscall`` enters ring 0 (this design needs kvm_pvm's behaviour)."""
    if vcpu.get_sregs().cs.dpl != 3:
        raise RuntimeError("this host's KVM runs `syscall` in ring 0 (hardware VMX/SVM); snapctl's program "
                           "guests need kvm_pvm, where it stays at CPL 3 (docs/programs.md)")


def exception_frame(read, rsp: int, vector: int) -> tuple[int | None, int, int]:
    """(error code, user rip, user rsp) from the frame the CPU pushed on the exception stack."""
    if vector in ERROR_CODE_VECTORS:
        err, rip, _cs, _fl, ursp, _ss = struct.unpack("<6Q", read(rsp, 48))
        return err, rip, ursp
    rip, _cs, _fl, ursp, _ss = struct.unpack("<5Q", read(rsp, 40))
    return None, rip, ursp
