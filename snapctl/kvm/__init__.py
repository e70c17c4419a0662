"""snapctl.kvm: the only code in snapctl that speaks ioctl to /dev/kvm.

One module per file-descriptor kind, as in rust-vmm's kvm-ioctls:
:mod:`.system` (/dev/kvm), :mod:`.vm` (the VM fd), :mod:`.vcpu` (a vCPU fd),
and :mod:`.ring` for the shared dirty-ring memory a vCPU fd exposes.

The constants and errors load with the package; the fd classes (ctypes,
numpy) on first use, so that the command line can name ``PAGE_SIZE`` and
``DEFAULT_KVM_PATH`` without paying for them.
"""

from __future__ import annotations

import importlib

from .constants import DEFAULT_KVM_PATH, PAGE_SIZE
from .errors import (
    DirtyRingConfigError,
    DirtyRingResetMismatch,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
)

_LAZY = {"DirtyRing": ".ring", "System": ".system", "Vcpu": ".vcpu", "DirtyRingLimits": ".vm", "Memslot": ".vm",
         "Vm": ".vm"}

__all__ = [
    "PAGE_SIZE", "DirtyRing", "DirtyRingConfigError", "DirtyRingLimits", "DirtyRingResetMismatch",
    "KvmError", "KvmIoctlError", "KvmUnavailableError", "Memslot", "System", "Vcpu", "Vm", "DEFAULT_KVM_PATH",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
