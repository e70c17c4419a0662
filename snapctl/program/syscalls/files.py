"""Files: the sandbox's read-only view of ``--root``, the program's stdin/stdout/stderr.

Every path goes through the one resolver, :class:`snapctl.program.fs.Sandbox`
(in-root resolution by the kernel's ``openat2(RESOLVE_IN_ROOT)``). Looking a
path up consults the host, so it is recorded (:meth:`Kernel.outside`); what
an open file then yields is a function of its snapshot, so reads, seeks,
mmaps and directory listings replay by themselves. Anything that would
change the file system fails with EROFS.
"""

from __future__ import annotations

import errno
import os
import struct

from .. import fs
from ..kernel import OpenFile, stat_dict, stat_from_dict
from . import s32, s64, syscall

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
O_ACCMODE, O_APPEND, O_NONBLOCK, O_CLOEXEC = 0o3, 0o2000, 0o4000, 0o2000000
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
TCGETS, TIOCGWINSZ, FIONCLEX, FIOCLEX, FIONREAD = 0x5401, 0x5413, 0x5450, 0x5451, 0x541B
PATH_MAX = 4096
#: one read() hands the program at most this much (Linux caps at ~2 GiB)
MAX_IO = 1 << 24
MAX_IOV = 1024
PIPE_KINDS = ("stdin", "stdout", "stderr")


def _path(k, ptr: int) -> bytes:
    try:
        return k.mm.read_cstr(ptr, PATH_MAX)
    except ValueError:
        raise OSError(errno.ENAMETOOLONG, "path too long") from None


def _dir_path(k, dirfd: int) -> bytes | None:
    dirfd = s32(dirfd)
    if dirfd == AT_FDCWD:
        return None
    of = k.fd(dirfd).file
    if of.kind not in ("dir", "path"):
        raise OSError(errno.ENOTDIR, "not a directory fd")
    return of.path.encode()


def _err(e: OSError) -> dict:
    return {"err": e.errno or errno.EIO}


def _result(res: dict) -> dict:
    if "err" in res:
        raise OSError(res["err"], "recorded error")
    return res


# -- opening --------------------------------------------------------------------------------

def _open_outside(k, path: bytes, dir_path: bytes | None, flags: int) -> dict:
    try:
        o = k.sandbox.open(path, cwd=k.cwd.encode(), dir_path=dir_path, flags=flags)
    except OSError as e:
        return _err(e)
    h = None
    if o.kind == "file":
        h = k.files.add(o.data)
    elif o.kind == "dir":
        h = k.files.add(fs.encode_listing(o.entries))
    return {"ofd": {"kind": o.kind, "path": o.guest_path.decode(errors="surrogateescape"), "hash": h, "pos": 0,
                    "flags": flags & (O_APPEND | O_NONBLOCK | 0o200000), "stat": stat_dict(o.stat)}}


def _open(k, nr: int, dirfd: int, pathp: int, flags: int) -> int:
    path = _path(k, pathp)
    dir_path = _dir_path(k, dirfd) if path[:1] != b"/" else None
    res = _result(k.outside(nr, lambda: _open_outside(k, path, dir_path, flags)))
    return k.install(k.open_file_from_desc(res["ofd"]), cloexec=bool(flags & O_CLOEXEC))


@syscall(2, "open", 3)
def open_(k, pathp, flags, mode):
    return _open(k, 2, AT_FDCWD, pathp, flags)


@syscall(257, "openat", 4)
def openat(k, dirfd, pathp, flags, mode):
    return _open(k, 257, dirfd, pathp, flags)


@syscall(85, "creat", 2)
def creat(k, pathp, mode):
    return -errno.EROFS


@syscall(3, "close", 1)
def close(k, fd):
    k.fd(s32(fd))
    del k.fds[s32(fd)]
    return 0


@syscall(436, "close_range", 3)
def close_range(k, first, last, flags):
    for fd in [f for f in k.fds if first <= f <= last]:
        if flags & 4:   # CLOSE_RANGE_CLOEXEC
            k.fds[fd].cloexec = True
        else:
            del k.fds[fd]
    return 0


# -- reading and writing ----------------------------------------------------------------------

def _read_into(k, nr: int, of: OpenFile, buf: int, n: int, pos: int | None) -> int:
    """Read up to ``n`` bytes of ``of`` into program memory at ``buf`` (at ``pos``, or its offset)."""
    n = min(n, MAX_IO)
    if n == 0:
        return 0
    k.mm.check_writable(buf, n)
    if of.kind == "file":
        at = of.pos if pos is None else pos
        data = of.data[at:at + n]
        if pos is None:
            of.pos += len(data)
    elif of.kind == "stdin":
        if pos is not None:
            return -errno.ESPIPE
        data = bytes.fromhex(k.outside(nr, lambda: {"data": _read_stdin(k, n).hex()})["data"])
        k.stdin_pos += len(data)
    elif of.kind == "random":
        data = bytes.fromhex(k.outside(nr, lambda: {"data": os.urandom(n).hex()})["data"])
    elif of.kind == "zero":
        data = bytes(n)
    elif of.kind == "null":
        data = b""
    elif of.kind == "dir":
        return -errno.EISDIR
    else:
        return -errno.EBADF
    k.mm.write(buf, data)
    return len(data)


def _read_stdin(k, n: int) -> bytes:
    if k.stdin is None:
        return b""
    return k.stdin.read(n) or b""


def _iovecs(k, iov: int, cnt: int) -> list[tuple[int, int]]:
    if cnt > MAX_IOV:
        raise OSError(errno.EINVAL, "too many iovecs")
    raw = k.mm.read(iov, 16 * cnt)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(cnt)]


@syscall(0, "read", 3)
def read(k, fd, buf, n):
    return _read_into(k, 0, k.fd(s32(fd)).file, buf, n, None)


@syscall(17, "pread64", 4)
def pread64(k, fd, buf, n, off):
    of = k.fd(s32(fd)).file
    if s64(off) < 0:
        return -errno.EINVAL
    if of.kind in PIPE_KINDS:
        return -errno.ESPIPE
    return _read_into(k, 17, of, buf, n, off)


@syscall(19, "readv", 3)
def readv(k, fd, iov, cnt):
    of = k.fd(s32(fd)).file
    total = 0
    for base, ln in _iovecs(k, iov, cnt):
        r = _read_into(k, 19, of, base, ln, None)
        if r < 0:
            return r if total == 0 else total
        total += r
        if r < ln:
            break
    return total


@syscall(295, "preadv", 4)
def preadv(k, fd, iov, cnt, off):
    of = k.fd(s32(fd)).file
    if of.kind in PIPE_KINDS:
        return -errno.ESPIPE
    total = 0
    for base, ln in _iovecs(k, iov, cnt):
        r = _read_into(k, 295, of, base, ln, off + total)
        if r < 0:
            return r if total == 0 else total
        total += r
        if r < ln:
            break
    return total


def _write(k, fd: int, data: bytes) -> int:
    of = k.fd(fd).file
    if of.kind == "stdout":
        k.out.write(1, data)
    elif of.kind == "stderr":
        k.out.write(2, data)
    elif of.kind not in ("null", "zero", "random"):   # devices swallow writes, as on Linux
        return -errno.EBADF
    return len(data)


@syscall(1, "write", 3)
def write(k, fd, buf, n):
    k.fd(s32(fd))
    return _write(k, s32(fd), k.mm.read(buf, min(n, MAX_IO)))


@syscall(20, "writev", 3)
def writev(k, fd, iov, cnt):
    k.fd(s32(fd))
    data = b"".join(k.mm.read(base, ln) for base, ln in _iovecs(k, iov, cnt))
    return _write(k, s32(fd), data)


@syscall(18, "pwrite64", 4)
def pwrite64(k, fd, buf, n, off):
    of = k.fd(s32(fd)).file
    return -errno.ESPIPE if of.kind in PIPE_KINDS else -errno.EBADF


@syscall(8, "lseek", 3)
def lseek(k, fd, off, whence):
    of = k.fd(s32(fd)).file
    if of.kind in PIPE_KINDS:
        return -errno.ESPIPE
    off = s64(off)
    size = len(of.entries) if of.kind == "dir" else len(of.data)
    if of.kind == "dir":
        if whence != 0 or off < 0:
            return -errno.EINVAL
        of.pos = off
        return off
    if whence == 0:
        new = off
    elif whence == 1:
        new = of.pos + off
    elif whence == 2:
        new = size + off
    elif whence == 3:   # SEEK_DATA
        if off >= size:
            return -errno.ENXIO
        new = off
    elif whence == 4:   # SEEK_HOLE
        if off >= size:
            return -errno.ENXIO
        new = size
    else:
        return -errno.EINVAL
    if new < 0:
        return -errno.EINVAL
    of.pos = new
    return new


@syscall(217, "getdents64", 3)
def getdents64(k, fd, buf, count):
    of = k.fd(s32(fd)).file
    if of.kind != "dir":
        return -errno.ENOTDIR
    data, nxt = fs.pack_dirents(of.entries, of.pos, min(count, MAX_IO))
    k.mm.write(buf, data)
    of.pos = nxt
    return len(data)


# -- metadata -----------------------------------------------------------------------------------

def _fd_stat(of: OpenFile):
    if of.kind in PIPE_KINDS:
        return fs.fake_stat_for("pipe")
    if not of.stat:
        return fs.fake_stat_for(of.kind)
    return stat_from_dict(of.stat)


def _stat_at(k, nr: int, dirfd: int, pathp: int, flags: int):
    """The stat of what (dirfd, path, flags) names, as an os.stat_result."""
    path = _path(k, pathp)
    if path == b"":
        if not flags & AT_EMPTY_PATH:
            raise OSError(errno.ENOENT, "empty path")
        if s32(dirfd) != AT_FDCWD:
            return _fd_stat(k.fd(s32(dirfd)).file)
        path = b"."
    dir_path = _dir_path(k, dirfd) if path[:1] != b"/" else None

    def look() -> dict:
        try:
            st = k.sandbox.stat(path, cwd=k.cwd.encode(), dir_path=dir_path,
                                follow=not flags & AT_SYMLINK_NOFOLLOW)
        except OSError as e:
            return _err(e)
        return {"stat": stat_dict(st)}
    return stat_from_dict(_result(k.outside(nr, look))["stat"])


@syscall(5, "fstat", 2)
def fstat(k, fd, st):
    k.mm.write(st, fs.pack_stat(_fd_stat(k.fd(s32(fd)).file)))
    return 0


@syscall(4, "stat", 2)
def stat(k, pathp, st):
    k.mm.write(st, fs.pack_stat(_stat_at(k, 4, AT_FDCWD, pathp, 0)))
    return 0


@syscall(6, "lstat", 2)
def lstat(k, pathp, st):
    k.mm.write(st, fs.pack_stat(_stat_at(k, 6, AT_FDCWD, pathp, AT_SYMLINK_NOFOLLOW)))
    return 0


@syscall(262, "newfstatat", 4)
def newfstatat(k, dirfd, pathp, st, flags):
    k.mm.write(st, fs.pack_stat(_stat_at(k, 262, dirfd, pathp, flags)))
    return 0


@syscall(332, "statx", 5)
def statx(k, dirfd, pathp, flags, mask, buf):
    k.mm.write(buf, fs.pack_statx(_stat_at(k, 332, dirfd, pathp, flags), mask))
    return 0


def _access(k, nr: int, dirfd: int, pathp: int, mode: int) -> int:
    path = _path(k, pathp)
    dir_path = _dir_path(k, dirfd) if path[:1] != b"/" else None

    def look() -> dict:
        try:
            k.sandbox.access(path, mode, cwd=k.cwd.encode(), dir_path=dir_path)
        except OSError as e:
            return _err(e)
        return {}
    _result(k.outside(nr, look))
    return 0


@syscall(21, "access", 2)
def access(k, pathp, mode):
    return _access(k, 21, AT_FDCWD, pathp, mode)


@syscall(269, "faccessat", 3)
def faccessat(k, dirfd, pathp, mode):
    return _access(k, 269, dirfd, pathp, mode)


@syscall(439, "faccessat2", 4)
def faccessat2(k, dirfd, pathp, mode, flags):
    return _access(k, 439, dirfd, pathp, mode)


def _readlink(k, nr: int, dirfd: int, pathp: int, buf: int, size: int) -> int:
    if s32(size) <= 0:
        return -errno.EINVAL
    path = _path(k, pathp)
    dir_path = _dir_path(k, dirfd) if path[:1] != b"/" else None

    def look() -> dict:
        try:
            return {"target": k.sandbox.readlink(path, cwd=k.cwd.encode(), dir_path=dir_path).hex()}
        except OSError as e:
            return _err(e)
    target = bytes.fromhex(_result(k.outside(nr, look))["target"])[:size]
    k.mm.write(buf, target)
    return len(target)


@syscall(89, "readlink", 3)
def readlink(k, pathp, buf, size):
    return _readlink(k, 89, AT_FDCWD, pathp, buf, size)


@syscall(267, "readlinkat", 4)
def readlinkat(k, dirfd, pathp, buf, size):
    return _readlink(k, 267, dirfd, pathp, buf, size)


@syscall(79, "getcwd", 2)
def getcwd(k, buf, size):
    cwd = k.cwd.encode() + b"\0"
    if size < len(cwd):
        return -errno.ERANGE
    k.mm.write(buf, cwd)
    return len(cwd)


@syscall(80, "chdir", 1)
def chdir(k, pathp):
    path = _path(k, pathp)

    def look() -> dict:
        try:
            st = k.sandbox.stat(path, cwd=k.cwd.encode(), follow=True)
            if not (st.st_mode & 0o170000) == 0o040000:
                return {"err": errno.ENOTDIR}
            return {"cwd": k.sandbox.realpath(path, cwd=k.cwd.encode()).decode(errors="surrogateescape")}
        except OSError as e:
            return _err(e)
    k.cwd = _result(k.outside(80, look))["cwd"]
    return 0


@syscall(81, "fchdir", 1)
def fchdir(k, fd):
    of = k.fd(s32(fd)).file
    if of.kind not in ("dir", "path"):
        return -errno.ENOTDIR
    k.cwd = of.path
    return 0


# -- fd table -----------------------------------------------------------------------------------

@syscall(32, "dup", 1)
def dup(k, fd):
    return k.install(k.fd(s32(fd)).file)


def _dup_to(k, old: int, new: int, cloexec: bool) -> int:
    f = k.fd(s32(old))
    new = s32(new)
    if not 0 <= new < 1024:
        return -errno.EBADF
    k.fds.pop(new, None)
    k.fds[new] = type(f)(f.file, cloexec)
    return new


@syscall(33, "dup2", 2)
def dup2(k, old, new):
    if s32(old) == s32(new):
        k.fd(s32(old))
        return s32(new)
    return _dup_to(k, old, new, False)


@syscall(292, "dup3", 3)
def dup3(k, old, new, flags):
    if s32(old) == s32(new) or flags & ~O_CLOEXEC:
        return -errno.EINVAL
    return _dup_to(k, old, new, bool(flags & O_CLOEXEC))


@syscall(72, "fcntl", 3)
def fcntl(k, fd, cmd, arg):
    f = k.fd(s32(fd))
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        return k.install(f.file, cloexec=cmd == F_DUPFD_CLOEXEC, lowest=s32(arg))
    if cmd == F_GETFD:
        return int(f.cloexec)
    if cmd == F_SETFD:
        f.cloexec = bool(arg & 1)
        return 0
    if cmd == F_GETFL:
        acc = 1 if f.file.kind in ("stdout", "stderr") else 2 if f.file.kind in ("null", "zero") else 0
        return f.file.flags | acc
    if cmd == F_SETFL:
        f.file.flags = (f.file.flags & ~(O_APPEND | O_NONBLOCK)) | (arg & (O_APPEND | O_NONBLOCK))
        return 0
    if cmd in (F_GETLK, F_SETLK, F_SETLKW):
        return 0
    return -errno.EINVAL


@syscall(16, "ioctl", 3)
def ioctl(k, fd, req, arg):
    f = k.fd(s32(fd))
    if req == FIOCLEX:
        f.cloexec = True
        return 0
    if req == FIONCLEX:
        f.cloexec = False
        return 0
    if req == FIONREAD and f.file.kind == "file":
        k.mm.write(arg, struct.pack("<i", max(0, len(f.file.data) - f.file.pos)))
        return 0
    return -errno.ENOTTY


@syscall(7, "poll", 3)
def poll(k, fds, nfds, timeout):
    return _poll(k, fds, nfds)


@syscall(271, "ppoll", 5)
def ppoll(k, fds, nfds, tsp, sigmask, size):
    return _poll(k, fds, nfds)


def _poll(k, fds: int, nfds: int) -> int:
    """Everything is always ready: files and stdin never block here (stdin reads are recorded)."""
    if nfds > 1024:
        return -errno.EINVAL
    ready = 0
    for i in range(nfds):
        fd, events, _ = struct.unpack("<ihh", k.mm.read(fds + 8 * i, 8))
        rev = 0x20 if fd >= 0 and fd not in k.fds else events & 0x5   # POLLNVAL, or POLLIN|POLLOUT
        if fd >= 0:
            k.mm.write(fds + 8 * i + 6, struct.pack("<h", rev))
            ready += bool(rev)
    return ready


@syscall(74, "fsync", 1)
def fsync(k, fd):
    k.fd(s32(fd))
    return 0


@syscall(75, "fdatasync", 1)
def fdatasync(k, fd):
    k.fd(s32(fd))
    return 0


@syscall(221, "fadvise64", 4)
def fadvise64(k, fd, off, ln, advice):
    k.fd(s32(fd))
    return 0


for _nr, _name in ((76, "truncate"), (77, "ftruncate"), (82, "rename"), (83, "mkdir"), (84, "rmdir"),
                   (86, "link"), (87, "unlink"), (88, "symlink"), (90, "chmod"), (91, "fchmod"), (92, "chown"),
                   (93, "fchown"), (94, "lchown"), (133, "mknod"), (258, "mkdirat"), (259, "mknodat"),
                   (260, "fchownat"), (263, "unlinkat"), (264, "renameat"), (265, "linkat"), (266, "symlinkat"),
                   (268, "fchmodat"), (280, "utimensat"), (285, "fallocate"), (316, "renameat2"),
                   (132, "utime"), (235, "utimes"), (261, "futimesat"), (188, "setxattr"), (197, "removexattr")):
    syscall(_nr, _name, 0)(lambda k: -errno.EROFS)
