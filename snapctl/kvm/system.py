"""The system fd: /dev/kvm (kernel API: "4. API Description", system ioctls)."""

from __future__ import annotations

import ctypes as C
import errno
import os

from . import ioctls as I
from . import structs as S
from ._libc import ioctl
from .constants import DEFAULT_KVM_PATH, KVM_API_VERSION
from .errors import KvmIoctlError, KvmUnavailableError


class System:
    """An open /dev/kvm. Use as a context manager; every fd is close-on-exec."""

    def __init__(self, path: str = DEFAULT_KVM_PATH):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(f"{path} does not exist: this machine has no KVM") from None
        except PermissionError:
            raise KvmUnavailableError(f"{path} cannot be opened: permission denied (need rw access)") from None
        except OSError as e:
            raise KvmUnavailableError(f"{path} cannot be opened: {e.strerror}") from None
        try:
            version = ioctl(self.fd, I.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        except KvmIoctlError as e:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path} is not a KVM device ({e})") from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path} speaks KVM API version {version}, snapctl needs {KVM_API_VERSION}")
        self.api_version = version
        self.vcpu_mmap_size = ioctl(self.fd, I.KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if unsupported, else a cap-specific value."""
        return ioctl(self.fd, I.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def supported_cpuid(self, max_entries: int = 256) -> C.Structure:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can expose (kvm_cpuid2 with ``nent`` filled)."""
        while True:
            buf = S.cpuid2_struct(max_entries)()
            buf.nent = max_entries
            try:
                ioctl(self.fd, I.KVM_GET_SUPPORTED_CPUID, buf, name="KVM_GET_SUPPORTED_CPUID")
                return buf
            except KvmIoctlError as e:
                if e.errno != errno.E2BIG or max_entries >= 4096:
                    raise
                max_entries *= 2

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM can save/restore for a vCPU."""
        head = S.KvmMsrListHeader(0)
        try:
            ioctl(self.fd, I.KVM_GET_MSR_INDEX_LIST, head, name="KVM_GET_MSR_INDEX_LIST")
        except KvmIoctlError as e:
            if e.errno != errno.E2BIG:
                raise
        n = head.nmsrs
        buf = S.msr_list_struct(n)()
        buf.nmsrs = n
        ioctl(self.fd, I.KVM_GET_MSR_INDEX_LIST, buf, name="KVM_GET_MSR_INDEX_LIST")
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self, **kwargs: object) -> "Vm":
        from .vm import Vm

        return Vm(self, **kwargs)
