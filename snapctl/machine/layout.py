"""Guest-physical layout and the long-mode, CPL-3 set-up the VMM builds.

System area [0, 2 MiB), memslot 0::

    0x00000  unused (null page)
    0x01000  PML4           0x02000  PDPT
    0x03000  page directories, one per GiB of RAM (at most MAX_PDS)
    0x43000  GDT            0x44000  TSS
    0x50000  mailboxes, one page per vCPU (at most MAX_VCPUS)
    0x100000 guest code (at most 64 KiB)
    0x1C0000 stacks, one page per vCPU, growing down from 0x200000

Data area [2 MiB, end of RAM), memslot 1, split evenly between vCPUs.

Page tables identity-map all of RAM with 2 MiB pages marked present, writable,
user, accessed and dirty: with A/D preset the MMU never writes them back, so
page-table pages do not show up as dirty (they would otherwise, on every first
touch after a reset). The price: KVM's shadow MMU maps a page writable on first
*read* too, so a page that is only read or executed can be logged dirty (the
code page is, once per reset) — a documented superset, never a loss.
"""

from __future__ import annotations

import numpy as np

from ..kvm import structs as S
from ..kvm.constants import PAGE_SIZE as PAGE  # L.PAGE: the page, under its short name here

SYSTEM_SIZE = 2 << 20
PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000
MAX_PDS = 64  # 64 GiB of RAM
GDT_GPA = 0x43000
TSS_GPA = 0x44000
MAILBOX_GPA = 0x50000
MAX_VCPUS = 64
CODE_GPA = 0x100000
CODE_MAX = 0x10000
STACK_TOP = 0x200000
MAX_MEM = MAX_PDS << 30

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80

# GDT: null, kernel code, kernel data, user data (0x1b... per sysret layout), user code 64, TSS (2 slots)
SEL_USER_DATA = 0x18 | 3
SEL_USER_CODE = 0x20 | 3
SEL_TSS = 0x28

CR0_PE, CR0_MP, CR0_NE, CR0_WP, CR0_PG = 1, 2, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1, 1 << 8, 1 << 10
RFLAGS_RESERVED1, RFLAGS_IOPL3 = 0x2, 0x3000


def mailbox_gpa(vcpu: int) -> int:
    return MAILBOX_GPA + vcpu * PAGE


def stack_top(vcpu: int) -> int:
    return STACK_TOP - vcpu * PAGE


def write_page_tables(mem: np.ndarray, mem_size: int) -> list[int]:
    """Fill PML4/PDPT/PDs in ``mem`` (flat uint8); returns the guest pages written."""
    q = mem.view(np.uint64)
    npds = (mem_size + (1 << 30) - 1) >> 30
    table = PTE_P | PTE_RW | PTE_US | PTE_A
    q[PML4_GPA // 8] = PDPT_GPA | table
    q[PDPT_GPA // 8: PDPT_GPA // 8 + npds] = PD_GPA + PAGE * np.arange(npds, dtype=np.uint64) | table
    n2m = (mem_size + (2 << 20) - 1) >> 21
    big = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS
    q[PD_GPA // 8: PD_GPA // 8 + n2m] = (np.arange(n2m, dtype=np.uint64) << np.uint64(21)) | np.uint64(big)
    return [PML4_GPA // PAGE, PDPT_GPA // PAGE] + [PD_GPA // PAGE + i for i in range(npds)]


def write_gdt(mem: np.ndarray) -> list[int]:
    """A GDT matching the segments we load (the CPU never reads it unless the
    guest reloads a selector; it exists so the state is architecturally sane).
    Accessed bits are preset so the CPU would not write them."""
    q = mem.view(np.uint64)
    g = GDT_GPA // 8
    q[g + 0] = 0
    q[g + 1] = 0x00AF9B000000FFFF  # kernel code 64
    q[g + 2] = 0x00CF93000000FFFF  # kernel data
    q[g + 3] = 0x00CFF3000000FFFF  # user data, DPL 3
    q[g + 4] = 0x00AFFB000000FFFF  # user code 64, DPL 3
    base, limit = TSS_GPA, 0x67
    q[g + 5] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x8B << 40) | (((base >> 24) & 0xFF) << 56)
    q[g + 6] = base >> 32
    return [GDT_GPA // PAGE]


def _seg(selector: int, type_: int, dpl: int, *, long: bool, s: int = 1) -> S.KvmSegment:
    return S.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=dpl,
                        db=0 if long else 1, s=s, l=1 if long else 0, g=1)


def long_mode_sregs(sregs: S.KvmSregs) -> S.KvmSregs:
    """Turn the vCPU's reset sregs into 64-bit mode at CPL 3 (CS.DPL = SS.DPL = 3)."""
    sregs.cs = _seg(SEL_USER_CODE, 0xB, 3, long=True)
    data = _seg(SEL_USER_DATA, 0x3, 3, long=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = S.KvmSegment(base=TSS_GPA, limit=0x67, selector=SEL_TSS, type=0xB, present=1, dpl=0, s=0)
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 7 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA
    return sregs
