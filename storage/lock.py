"""One writing process per store: an OS lock on the store file.

SQLite serialises write *transactions*, but a store has writers that must
not overlap at all: `snapctl run` creates a store and fills it for minutes,
and a second `run` on the same path used to find it still without a
checkpoint, take it for the leftover of a killed run and delete it.  So a
process that writes a store holds ``flock(LOCK_EX)`` on the store file from
its first write (from creation, for the creator) until its last ``Store``
of that file is closed; another process's first write fails at once with
``StoreBusyError``, and replacing a store first takes the same lock (only a
dead creator has released it).  Readers take no lock: they read while a
run writes, as before.

``flock`` locks are separate from the POSIX locks SQLite uses, but closing
*any* descriptor of a file drops every POSIX lock the process holds on it,
SQLite's included.  So each process keeps one descriptor per store file,
shared by all its ``Store`` objects (they also share the lock), and closes
it only when the last of them has closed its connections.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager

from .errors import StoreBusyError, StoreError


class _Held:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.locked = False


_mutex = threading.Lock()
_files: dict[tuple[int, int], _Held] = {}


def _busy(path: str) -> StoreBusyError:
    return StoreBusyError(f"{path}: in use: another process is writing this store (a run or "
                          "restore); try again when it has finished")


def attach(path: str, fd: int | None = None, *, locked: bool = False) -> tuple[int, int]:
    """Register one more user of the store file at ``path`` (or of the open
    ``fd``, which is then kept and, with ``locked``, already holds the lock)."""
    st = os.fstat(fd) if fd is not None else os.stat(path)
    key = (st.st_dev, st.st_ino)
    with _mutex:
        held = _files.get(key)
        if held is None:
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            held = _files[key] = _Held(fd)
            held.locked = locked
        elif fd is not None:
            raise StoreError(f"{path}: already open in this process")
        held.users += 1
    return key


def detach(key: tuple[int, int]) -> None:
    """One user fewer; the last one closes the descriptor (and so the lock).
    Call only after that user's SQLite connections are closed."""
    with _mutex:
        held = _files.get(key)
        if held is None:
            return
        held.users -= 1
        if held.users <= 0:
            del _files[key]
            os.close(held.fd)


def claim(key: tuple[int, int], path: str) -> None:
    """Take the writer's lock for this process, or raise StoreBusyError."""
    with _mutex:
        held = _files[key]
        if held.locked:
            return
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(path) from None
        held.locked = True


def lock_file(fd: int, path: str) -> None:
    """Take the writer's lock on a file this process alone has open (a new store)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path) from None


@contextmanager
def replacing(path: str):
    """Hold the writer's lock of the existing store at ``path`` while the
    caller decides to replace it: raises StoreBusyError while its writer
    (its creator, say) is alive.  Only for a file no Store of this process
    has open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        lock_file(fd, path)
        yield
    finally:
        os.close(fd)
