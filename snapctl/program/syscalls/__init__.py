"""The system-call table, grouped by area like the kernel's own sources.

Each handler is ``fn(kernel, *args) -> int`` registered with :func:`syscall`;
arguments arrive as unsigned 64-bit register values (use :func:`s32` /
:func:`s64` where Linux takes signed ones). A handler returns the value for
RAX or raises: ``OSError`` (its errno), ``Fault`` (EFAULT), ``OutOfMemory``
(ENOMEM), ``ValueError`` (EINVAL). Calls that cannot work for a
single-threaded sandboxed program (fork, clone, execve, sockets, ...) are
registered ``unsupported``: they return ENOSYS and are counted, so the run
summary lists them.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Entry:
    nr: int
    name: str
    fn: Callable[..., int]
    nargs: int
    unsupported: bool = False


TABLE: dict[int, Entry] = {}


def syscall(nr: int, name: str, nargs: int) -> Callable:
    def register(fn: Callable[..., int]) -> Callable[..., int]:
        if nr in TABLE:
            raise RuntimeError(f"syscall {nr} registered twice ({TABLE[nr].name}, {name})")
        TABLE[nr] = Entry(nr, name, fn, nargs)
        return fn
    return register


def unsupported(nr: int, name: str, err: int = errno.ENOSYS) -> None:
    TABLE[nr] = Entry(nr, name, lambda k, *a: -err, 0, unsupported=True)


def s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >> 31 else x


def s64(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def name_of(nr: int) -> str:
    e = TABLE.get(nr)
    return e.name if e else f"syscall_{nr}"


from . import files, memory, process, time  # noqa: E402,F401  (registration)
