"""snapctl.kvm: the only code in snapctl that speaks ioctl to /dev/kvm.

One module per file-descriptor kind, as in rust-vmm's kvm-ioctls:
:mod:`.system` (/dev/kvm), :mod:`.vm` (the VM fd), :mod:`.vcpu` (a vCPU fd),
and :mod:`.ring` for the shared dirty-ring memory a vCPU fd exposes.
"""

from .constants import PAGE_SIZE
from .errors import (
    DirtyRingConfigError,
    DirtyRingResetMismatch,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
)
from .ring import DirtyRing
from .system import DEFAULT_KVM_PATH, System
from .vcpu import Vcpu
from .vm import DirtyRingLimits, Memslot, Vm

__all__ = [
    "PAGE_SIZE", "DirtyRing", "DirtyRingConfigError", "DirtyRingLimits", "DirtyRingResetMismatch",
    "KvmError", "KvmIoctlError", "KvmUnavailableError", "Memslot", "System", "Vcpu", "Vm", "DEFAULT_KVM_PATH",
]
