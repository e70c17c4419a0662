"""Exceptions raised by the KVM layer: each carries the ioctl and errno names."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Base class for everything the KVM layer raises."""


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, unopenable or speaks another API version."""


class KvmIoctlError(KvmError, OSError):
    """An ioctl failed; ``ioctl`` names it, ``errno`` is the kernel's answer."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        self.ioctl = ioctl
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, err, msg)
        self.errno = err

    def __str__(self) -> str:  # OSError's default adds "[Errno n]" noise
        return self.strerror


class DirtyRingConfigError(KvmError, ValueError):
    """A dirty-ring size or set-up order the kernel would refuse."""


class DirtyRingResetMismatch(KvmError):
    """KVM_RESET_DIRTY_RINGS reset a different number of entries than were harvested."""
