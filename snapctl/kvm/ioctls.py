"""ioctl request numbers, derived from struct sizes (one table, like kvm.h)."""

from __future__ import annotations

import ctypes as C

from . import structs as S
from .constants import IO, IOR, IOW, IOWR

# System (/dev/kvm)
KVM_GET_API_VERSION = IO(0x00)
KVM_CREATE_VM = IO(0x01)
KVM_GET_MSR_INDEX_LIST = IOWR(0x02, C.sizeof(S.KvmMsrListHeader))
KVM_CHECK_EXTENSION = IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(0x05, C.sizeof(S.KvmCpuid2Header))

# VM fd
KVM_CREATE_VCPU = IO(0x41)
KVM_GET_DIRTY_LOG = IOW(0x42, C.sizeof(S.KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = IOW(0x46, C.sizeof(S.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = IO(0x47)
KVM_ENABLE_CAP = IOW(0xA3, C.sizeof(S.KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = IOWR(0xC0, C.sizeof(S.KvmClearDirtyLog))
KVM_RESET_DIRTY_RINGS = IO(0xC7)

# vCPU fd
KVM_RUN = IO(0x80)
KVM_GET_REGS = IOR(0x81, C.sizeof(S.KvmRegs))
KVM_SET_REGS = IOW(0x82, C.sizeof(S.KvmRegs))
KVM_GET_SREGS = IOR(0x83, C.sizeof(S.KvmSregs))
KVM_SET_SREGS = IOW(0x84, C.sizeof(S.KvmSregs))
KVM_GET_MSRS = IOWR(0x88, C.sizeof(S.KvmMsrsHeader))
KVM_SET_MSRS = IOW(0x89, C.sizeof(S.KvmMsrsHeader))
KVM_SET_CPUID2 = IOW(0x90, C.sizeof(S.KvmCpuid2Header))
KVM_GET_CPUID2 = IOWR(0x91, C.sizeof(S.KvmCpuid2Header))
KVM_GET_MP_STATE = IOR(0x98, C.sizeof(S.KvmMpState))
KVM_SET_MP_STATE = IOW(0x99, C.sizeof(S.KvmMpState))
KVM_GET_VCPU_EVENTS = IOR(0x9F, C.sizeof(S.KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = IOW(0xA0, C.sizeof(S.KvmVcpuEvents))
KVM_GET_DEBUGREGS = IOR(0xA1, C.sizeof(S.KvmDebugregs))
KVM_SET_DEBUGREGS = IOW(0xA2, C.sizeof(S.KvmDebugregs))
KVM_GET_XSAVE = IOR(0xA4, C.sizeof(S.KvmXsave))
KVM_SET_XSAVE = IOW(0xA5, C.sizeof(S.KvmXsave))
KVM_GET_XCRS = IOR(0xA6, C.sizeof(S.KvmXcrs))
KVM_SET_XCRS = IOW(0xA7, C.sizeof(S.KvmXcrs))
KVM_GET_XSAVE2 = IOR(0xCF, C.sizeof(S.KvmXsave))
