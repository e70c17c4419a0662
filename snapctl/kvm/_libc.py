"""The one place snapctl calls ioctl/mmap-adjacent libc functions.

KVM ioctls go through ``ctypes`` rather than ``fcntl.ioctl``: from CPython 3.14
``fcntl.ioctl`` retries on EINTR, which would swallow the signal used to kick a
vCPU out of KVM_RUN. ctypes also releases the GIL for the call, so one Python
thread per vCPU runs in parallel, and passes big structs (xsave, cpuid2) by
pointer without the 1024-byte copy limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from .errors import KvmIoctlError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: object = None, *, name: str = "ioctl") -> int:
    """ioctl(fd, request, arg) -> non-negative result, or raise KvmIoctlError.

    ``arg`` is None, an int (passed by value) or a ctypes object (passed by pointer).
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmIoctlError(name, ctypes.get_errno())
    return ret


def ioctl_raw(fd: int, request: int, arg: object = None) -> tuple[int, int]:
    """Like :func:`ioctl` but returns (ret, errno) instead of raising (for KVM_RUN's EINTR)."""
    ptr = None if arg is None else (arg if isinstance(arg, int) else ctypes.addressof(arg))
    ret = _ioctl(fd, request, ptr)
    return ret, (ctypes.get_errno() if ret < 0 else 0)
