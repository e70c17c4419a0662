"""KVM ABI constants for x86-64 (include/uapi/linux/kvm.h).

Values are spelled out here once; ioctl request numbers are computed from the
struct sizes in :mod:`snapctl.kvm.structs` so a wrong struct size shows up as
an ``ENOTTY``/``EINVAL`` from the kernel rather than silent corruption.
"""

from __future__ import annotations

KVMIO = 0xAE
KVM_API_VERSION = 12

# _IOC direction bits (asm-generic/ioctl.h)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def IO(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def IOR(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def IOW(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def IOWR(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# Capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_DEBUGREGS = 50
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_MP_STATE = 14
KVM_CAP_XSAVE2 = 208
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_SYNC_REGS = 74
#: kvm_run->kvm_valid_regs / kvm_dirty_regs bits
KVM_SYNC_X86_REGS = 1
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# Exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_NAMES = {
    v: k for k, v in globals().items() if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# Memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# Dirty ring
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # in pages, on the vCPU fd
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_SIZE = 16  # struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}
# Entries KVM keeps free for exits that must still log (KVM_DIRTY_RING_RSVD_ENTRIES);
# with PML the kernel adds 512 more. The ring must hold at least 16x the reserve.
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_PML_EXTRA = 512

KVM_MP_STATE_RUNNABLE = 0

#: The x86-64 page: guest RAM, memslots, the dirty ring, the store's pages. snapctl's one definition
#: (storage keeps its own ``storage.PAGE_SIZE``; tests/test_kvm_api.py checks they agree).
PAGE_SIZE = 4096
PAGE_SHIFT = 12

#: The KVM device snapctl opens unless told otherwise ($SNAPCTL_KVM for the CLI).
DEFAULT_KVM_PATH = "/dev/kvm"
