"""The program sandbox's file view: one path resolver and host-file snapshots.

A guest program sees the host directory ``--root`` as its ``/``, read-only,
plus a few virtual nodes. Every path the program names goes through
:class:`Sandbox`, which answers with what the program may see; nothing else in
snapctl turns a guest path into a host path.

Guest path -> host object
=========================

``/proc``, ``/proc/self``
    Virtual directories (``/proc`` lists ``self``; ``/proc/self`` lists ``exe``).
``/proc/self/exe``
    A virtual symlink: ``readlink`` gives ``exe_guest_path``; following it
    (open, stat) reaches the program binary ``exe_host_path``, even when that
    lives outside the root (it was opened once, at construction).
any other ``/proc/...``
    ENOENT (``/proc/self/fd/N`` included). The host's /proc is never consulted.
``/dev/null``, ``/dev/zero``, ``/dev/random``, ``/dev/urandom``
    Virtual devices (kinds ``null``, ``zero``, ``random``), present whether or
    not the root has them; opening them for writing is allowed (writes are
    discarded by the caller). A character device 1:3, 1:5, 1:8 or 1:9 found on
    disk under the root (say, a symlink to the host's /dev/null when the root
    is ``/``) maps to the same kinds.
everything else
    ``<root>/<path>``, resolved by the kernel with ``openat2(2)`` and
    ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`` relative to an ``O_PATH`` fd of
    the root: ``..`` stops at the root, absolute symlinks restart at the root,
    magic links (``/proc/<pid>/root``, ``.../fd/N``) fail with ELOOP.

The virtual ``/proc`` and ``/dev`` names are matched on the guest path's text
(a relative path is first joined to the guest cwd or dir fd path, which are
canonical): leading ``/``, ``.`` and ``..`` components at the root, then the
``/proc`` subtree (whose ``..`` is exact: it is virtual), or exactly
``dev/<name>``. A path that reaches /proc or /dev some other way (through a
symlink, or ``/usr/../proc``) is resolved by the kernel inside the root like
any other: it finds whatever the root holds there.

Threat model: what is guaranteed
================================

* No path resolves outside the root. Resolution is the kernel's own
  (``RESOLVE_IN_ROOT``); snapctl never resolves ``..`` or symlinks itself
  outside the virtual /proc tree. The only host object outside the root a
  guest can read is the program binary, through ``/proc/self/exe``.
* Host kernel state is not a file: an object on procfs, sysfs, debugfs,
  tracefs, securityfs, cgroupfs, bpffs, configfs, pstore, efivarfs,
  binfmt_misc, fusectl or selinuxfs (reached, say, with ``--root /``) is
  ENOENT, so the host's /proc is never read.
* No write ever reaches the host. Host objects are only ever opened
  ``O_PATH`` (resolution, stat) and then re-opened ``O_RDONLY`` through
  snapctl's own ``/proc/self/fd/N`` (regular files and directories only). Write-ish opens
  (``O_WRONLY``, ``O_RDWR``, ``O_CREAT``, ``O_TRUNC``, ``O_APPEND``,
  ``O_TMPFILE``) fail with EROFS (EISDIR on a directory, EEXIST for
  ``O_CREAT | O_EXCL`` on an existing entry, as on a read-only mount), except on
  the virtual devices, whose writes the caller discards.
* No blocking on FIFOs and no device side effects: a FIFO or socket opens as
  ENXIO, any other device as EACCES, and neither is ever opened for real (the
  ``O_PATH`` fd does not open it, and the type of an inode cannot change before
  the re-open).
* Sizes are bounded: a regular file is read whole at open and a directory
  listed whole, both capped at ``max_file_bytes`` (EFBIG beyond). Paths are
  capped at PATH_MAX (4096 bytes with the NUL) and names at NAME_MAX (255).

Not covered: a root on a network or FUSE file system whose reads block; the
host changing the tree while the guest runs (each open snapshots what it finds,
which the caller records, so replay does not depend on the host any more).

Known differences from Linux
----------------------------

* The guest cwd and dir fds are guest *paths*: the joined path must fit in
  PATH_MAX, and a directory renamed on the host is not followed.
* ``O_APPEND`` and ``O_CREAT`` are refused with EROFS even on a read-only open
  of an existing file (Linux allows both on a read-only mount).
* ``/dev/stdin``, ``/dev/fd/N`` and the like are not the guest's own fds: they
  are whatever the root holds (with ``--root /``, symlinks to magic links:
  ELOOP).

Failures raise ``OSError(errno, strerror, guest_path)`` with a Linux errno;
``ValueError`` means a caller bug (a relative cwd, a NUL byte in a path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat as S
import struct
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Opened", "Sandbox", "decode_listing", "encode_listing", "fake_stat_for", "pack_dirents",
           "pack_stat", "pack_statx"]

# Linux x86-64 open(2) flags, as the guest passes them.
O_ACCMODE = 0o3
O_RDONLY = 0o0
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_DIRECTORY = 0o200000
O_NOFOLLOW = 0o400000
O_PATH = 0o10000000
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE; O_TMPFILE is this | O_DIRECTORY

# access(2) modes
R_OK, W_OK, X_OK = 4, 2, 1

# linux_dirent64 d_type values
DT_DIR, DT_LNK = 4, 10

# statx(2) mask bits
STATX_BASIC_STATS = 0x7FF
STATX__RESERVED = 0x80000000

PATH_MAX = 4096  # including the terminating NUL
NAME_MAX = 255

_SYS_GETDENTS64 = 217
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_EAGAIN_RETRIES = 64  # openat2 asks for a retry when a rename races with ".."

# statfs f_type of the kernel pseudo file systems a guest must not read.
_PSEUDO_FS = frozenset({
    0x9FA0,  # procfs
    0x62656572,  # sysfs
    0x64626720,  # debugfs
    0x74726163,  # tracefs
    0x73636673,  # securityfs
    0x27E0EB,  # cgroup
    0x63677270,  # cgroup2
    0xCAFE4A11,  # bpf
    0x62656570,  # configfs
    0x6165676C,  # pstore
    0xDE5E81E4,  # efivarfs
    0x42494E4D,  # binfmt_misc
    0x65735543,  # fusectl
    0xF97CFF8C,  # selinuxfs
})

# Virtual devices: guest name -> (kind, minor of char device 1:minor).
_DEV_NAMES: dict[bytes, tuple[str, int]] = {
    b"null": ("null", 3), b"zero": ("zero", 5), b"random": ("random", 8), b"urandom": ("random", 9),
}
_DEV_KIND_BY_MINOR = {minor: kind for kind, minor in _DEV_NAMES.values()}
_DEV_NAME_BY_MINOR = {minor: b"/dev/" + name for name, (_, minor) in _DEV_NAMES.items()}

# Fake identities of the virtual nodes (fixed, so they replay identically).
_PROC_DEV = os.makedev(0, 4)
_PROC_INO, _SELF_INO, _EXE_LINK_INO = 1, 2, 3
_DEVTMPFS_DEV = os.makedev(0, 5)
_PIPEFS_DEV = os.makedev(0, 13)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _error(code: int, path: bytes) -> OSError:
    return OSError(code, os.strerror(code), path)


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86-64
    if _fstatfs(fd, buf) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return struct.unpack_from("<Q", buf.raw)[0] & 0xFFFFFFFF


def _make_stat(mode: int, ino: int, dev: int, *, nlink: int = 1, size: int = 0, rdev: int = 0) -> os.stat_result:
    values = (mode, ino, dev, nlink, 0, 0, size, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0, 4096, 0, rdev)
    return os.stat_result(values + (0,) * (os.stat_result.n_fields - len(values)))


def _device_stat(minor: int) -> os.stat_result:
    return _make_stat(S.S_IFCHR | 0o666, 0x100 + minor, _DEVTMPFS_DEV, rdev=os.makedev(1, minor))


def fake_stat_for(kind: str) -> os.stat_result:
    """Plausible, fixed stats for a virtual device ("null", "zero", "random") or a "pipe"."""
    if kind == "pipe":
        return _make_stat(S.S_IFIFO | 0o600, 1, _PIPEFS_DEV)
    minors = {"null": 3, "zero": 5, "random": 9}
    if kind not in minors:
        raise ValueError(f"no fake stat for kind {kind!r}")
    return _device_stat(minors[kind])


@dataclass
class Opened:
    """What opening a guest path found, snapshotted at open time."""

    kind: str  # "file" | "dir" | "null" | "zero" | "random" | "path"
    guest_path: bytes  # canonical guest path
    data: bytes  # whole content (kind "file"), b"" otherwise
    entries: list[tuple[int, int, bytes]]  # kind "dir": (ino, d_type, name) sorted by name, with . and ..
    stat: os.stat_result  # fstat of the opened object (fake for virtual nodes)


@dataclass
class _Node:
    """A resolved guest path: a host object (``fd``, an O_PATH fd this node owns) or a virtual one."""

    kind: str  # "host" | "vdir" | "exe-link" | "null" | "zero" | "random"
    stat: os.stat_result
    guest_path: bytes | None = None  # None for host objects inside the root: read from the fd
    fd: int = -1
    entries: list[tuple[int, int, bytes]] = field(default_factory=list)  # kind "vdir"

    def __enter__(self) -> _Node:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Sandbox:
    """The guest's read-only view of ``root`` (see the module docstring).

    Holds an O_PATH fd of the root and one of the program binary; keeps no other
    state, so calls from several threads are safe (until :meth:`close`).
    """

    def __init__(self, root: str, exe_host_path: str, exe_guest_path: str, *,
                 max_file_bytes: int = 1 << 30):
        self.max_file_bytes = max_file_bytes
        self.exe_guest_path = os.fsencode(exe_guest_path)
        if not self.exe_guest_path.startswith(b"/"):
            raise ValueError(f"exe_guest_path must be absolute: {exe_guest_path!r}")
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._exe_fd = os.open(exe_host_path, os.O_PATH | os.O_CLOEXEC)
            if not S.S_ISREG(os.fstat(self._exe_fd).st_mode):
                raise OSError(errno.EACCES, "the program binary is not a regular file", exe_host_path)
            self._root_stat = os.fstat(self._root_fd)
            self._check_kernel(root)
        except BaseException:
            self.close()
            raise

    def _check_kernel(self, root: str) -> None:
        """Fail early, and clearly, without openat2 confinement or /proc/self/fd on the host."""
        try:
            fd = self._openat2(b"..", os.O_PATH | os.O_CLOEXEC, b"..")
        except OSError as e:
            raise OSError(e.errno, f"openat2(2) with RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS does not work here "
                                   f"({e.strerror}); snapctl needs Linux >= 5.6 and no seccomp filter "
                                   f"denying syscall {_SYS_OPENAT2}") from e
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self._root_stat.st_dev, self._root_stat.st_ino):
                raise OSError(errno.EPERM, f"openat2(2) RESOLVE_IN_ROOT let '..' leave the root {root!r}")
            try:
                os.readlink(_fd_path(fd))
            except OSError as e:
                raise OSError(e.errno, f"snapctl needs the host's /proc (it reads {_fd_path(fd)}): "
                                       f"{e.strerror}") from e
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the root and program fds (idempotent)."""
        for name in ("_root_fd", "_exe_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- public operations -------------------------------------------------------------------------------

    def open(self, path: bytes, *, cwd: bytes, dir_path: bytes | None = None, flags: int = 0) -> Opened:
        """Open ``path`` as the guest's open/openat(dir fd at ``dir_path``, path, flags) would."""
        if flags & O_TMPFILE_BIT:
            raise _error(errno.EROFS, path)
        o_path = bool(flags & O_PATH)
        if o_path:  # Linux ignores every other flag with O_PATH
            flags &= O_PATH | O_DIRECTORY | O_NOFOLLOW
        creat = bool(flags & O_CREAT)
        exclusive = creat and bool(flags & O_EXCL)
        writes = (flags & O_ACCMODE) != O_RDONLY or bool(flags & O_TRUNC)
        directory = bool(flags & O_DIRECTORY)
        try:
            node = self._lookup(path, cwd, dir_path, follow=not (flags & O_NOFOLLOW or exclusive),
                                directory=directory)
        except OSError as e:
            if e.errno == errno.ENOENT and creat:
                self._check_parent_dir(path, cwd, dir_path)
                raise _error(errno.EROFS, path) from None
            raise
        with node:
            if exclusive:
                raise _error(errno.EEXIST, path)
            guest_path = self._guest_path(node)
            if o_path:
                return Opened("path", guest_path, b"", [], node.stat)
            mode = node.stat.st_mode
            if node.kind in ("null", "zero", "random"):
                return Opened(node.kind, guest_path, b"", [], node.stat)
            if S.S_ISLNK(mode):
                raise _error(errno.ELOOP, path)
            if S.S_ISDIR(mode):
                if writes or creat:
                    raise _error(errno.EISDIR, path)
                if flags & O_APPEND:
                    raise _error(errno.EROFS, path)
                if node.kind == "vdir":
                    return Opened("dir", guest_path, b"", list(node.entries), node.stat)
                return self._list_dir(node.fd, guest_path, path)
            if S.S_ISCHR(mode) or S.S_ISBLK(mode):
                raise _error(errno.EACCES, path)
            if not S.S_ISREG(mode):  # FIFO, socket
                raise _error(errno.ENXIO, path)
            if writes or creat or flags & O_APPEND:
                raise _error(errno.EROFS, path)
            return self._read_file(node.fd, guest_path, path)

    def stat(self, path: bytes, *, cwd: bytes, dir_path: bytes | None = None, follow: bool = True) -> os.stat_result:
        """stat (``follow``) or lstat of a guest path."""
        with self._lookup(path, cwd, dir_path, follow=follow) as node:
            return node.stat

    def readlink(self, path: bytes, *, cwd: bytes, dir_path: bytes | None = None) -> bytes:
        """The target of a symlink (EINVAL for anything else)."""
        with self._lookup(path, cwd, dir_path, follow=False) as node:
            if node.kind == "exe-link":
                return self.exe_guest_path
            if node.kind != "host" or not S.S_ISLNK(node.stat.st_mode):
                raise _error(errno.EINVAL, path)
            return os.readlink(b"", dir_fd=node.fd)

    def access(self, path: bytes, mode: int, *, cwd: bytes, dir_path: bytes | None = None) -> None:
        """access(2)/faccessat(2): W_OK is EROFS on anything that exists, bar the virtual devices."""
        if mode & ~(R_OK | W_OK | X_OK):
            raise _error(errno.EINVAL, path)
        with self._lookup(path, cwd, dir_path, follow=True) as node:
            st_mode = node.stat.st_mode
            if node.kind in ("null", "zero", "random"):
                if mode & X_OK:
                    raise _error(errno.EACCES, path)
                return
            if not (S.S_ISREG(st_mode) or S.S_ISDIR(st_mode)):
                if mode:  # refused by open() too
                    raise _error(errno.EACCES, path)
                return
            if mode & W_OK:
                raise _error(errno.EROFS, path)
            if node.kind == "host" and mode and not os.access(_fd_path(node.fd), mode):
                raise _error(errno.EACCES, path)

    def realpath(self, path: bytes, *, cwd: bytes, dir_path: bytes | None = None) -> bytes:
        """The canonical guest path (absolute, no symlinks, no . or ..) of an existing entry."""
        with self._lookup(path, cwd, dir_path, follow=True) as node:
            return self._guest_path(node)

    # ---- resolution --------------------------------------------------------------------------------------

    def _lookup(self, path: bytes, cwd: bytes, dir_path: bytes | None, *, follow: bool,
                directory: bool = False) -> _Node:
        """Resolve a guest path to a node (the caller closes it)."""
        base = cwd if dir_path is None else dir_path
        if b"\0" in path or not base.startswith(b"/"):
            raise ValueError(f"bad guest path {path!r} or base directory {base!r}")
        if not path:
            raise _error(errno.ENOENT, path)
        if len(path) >= PATH_MAX:
            raise _error(errno.ENAMETOOLONG, path)
        full = path if path.startswith(b"/") else base.rstrip(b"/") + b"/" + path
        tokens = full.split(b"/")[1:]
        must_dir = directory or tokens[-1] in (b"", b".", b"..")
        # The virtual prefix: "", "." and ".." at the root, and the /proc subtree.
        loc: list[bytes] = []
        for i, tok in enumerate(tokens):
            if tok in (b"", b"."):
                continue
            if tok == b"..":
                if loc:
                    loc.pop()
                continue
            if len(tok) > NAME_MAX:
                raise _error(errno.ENAMETOOLONG, path)
            if not loc and tok != b"proc":
                return self._lookup_host(tokens[i:], path, follow=follow, directory=directory)
            loc.append(tok)
            if loc[1:] not in ([], [b"self"], [b"self", b"exe"]):
                raise _error(errno.ENOENT, path)
            if loc[1:] == [b"self", b"exe"] and i != len(tokens) - 1:
                raise _error(errno.ENOTDIR, path)  # exe is followed, to a regular file
        if not loc:
            return self._lookup_host([b"."], path, follow=follow, directory=directory)
        return self._virtual_proc(loc, path, follow=follow, must_dir=must_dir)

    def _virtual_proc(self, loc: list[bytes], path: bytes, *, follow: bool, must_dir: bool) -> _Node:
        """The node of /proc, /proc/self or /proc/self/exe (``loc``: its components)."""
        root_ino = self._root_stat.st_ino
        if loc == [b"proc"]:
            entries = [(_PROC_INO, DT_DIR, b"."), (root_ino, DT_DIR, b".."), (_SELF_INO, DT_DIR, b"self")]
            return _Node("vdir", _make_stat(S.S_IFDIR | 0o555, _PROC_INO, _PROC_DEV, nlink=3), b"/proc",
                         entries=entries)
        if loc == [b"proc", b"self"]:
            entries = [(_SELF_INO, DT_DIR, b"."), (_PROC_INO, DT_DIR, b".."), (_EXE_LINK_INO, DT_LNK, b"exe")]
            return _Node("vdir", _make_stat(S.S_IFDIR | 0o555, _SELF_INO, _PROC_DEV, nlink=2), b"/proc/self",
                         entries=entries)
        if must_dir:
            raise _error(errno.ENOTDIR, path)
        if not follow:
            return _Node("exe-link", _make_stat(S.S_IFLNK | 0o777, _EXE_LINK_INO, _PROC_DEV), b"/proc/self/exe")
        fd = os.dup(self._exe_fd)
        return _Node("host", os.fstat(fd), self.exe_guest_path, fd)

    def _lookup_host(self, tokens: list[bytes], path: bytes, *, follow: bool, directory: bool) -> _Node:
        """Resolve ``tokens`` (components below the root, raw) with the kernel, or as a virtual device."""
        names = [t for t in tokens if t not in (b"", b".")]
        if len(names) == 2 and names[0] == b"dev" and names[1] in _DEV_NAMES:
            if directory or tokens[-1] in (b"", b"."):
                raise _error(errno.ENOTDIR, path)
            kind, minor = _DEV_NAMES[names[1]]
            return _Node(kind, _device_stat(minor), b"/dev/" + names[1])
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW) | (os.O_DIRECTORY if directory else 0)
        fd = self._openat2(b"/".join(tokens), flags, path)
        try:
            if _fs_magic(fd) in _PSEUDO_FS:
                raise _error(errno.ENOENT, path)
            st = os.fstat(fd)
            minor = os.minor(st.st_rdev)
            if not (S.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and minor in _DEV_KIND_BY_MINOR):
                return _Node("host", st, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a host null/zero/random device: the virtual one stands in for it
        return _Node(_DEV_KIND_BY_MINOR[minor], _device_stat(minor), _DEV_NAME_BY_MINOR[minor])

    def _openat2(self, rel: bytes, flags: int, path: bytes) -> int:
        """openat2(root_fd, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) -> fd."""
        if self._root_fd < 0:
            raise _error(errno.EBADF, path)
        how = _OpenHow(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        code = errno.EAGAIN
        for _ in range(_EAGAIN_RETRIES):
            fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(self._root_fd), ctypes.c_char_p(rel),
                          ctypes.byref(how), ctypes.c_long(ctypes.sizeof(how)))
            if fd >= 0:
                return fd
            code = ctypes.get_errno()
            if code not in (errno.EAGAIN, errno.EINTR):
                break
        raise _error(code, path)

    def _check_parent_dir(self, path: bytes, cwd: bytes, dir_path: bytes | None) -> None:
        """Raise the lookup error of ``path``'s parent unless it is an existing directory."""
        head, _, tail = path.rstrip(b"/").rpartition(b"/")
        if not tail:
            return  # "/" or only slashes: the root exists
        parent = head or (b"/" if path.startswith(b"/") else b".")
        with self._lookup(parent, cwd, dir_path, follow=True, directory=True):
            pass

    def _guest_path(self, node: _Node) -> bytes:
        if node.guest_path is not None:
            return node.guest_path
        host = os.fsencode(os.readlink(_fd_path(node.fd)))
        root = os.fsencode(os.readlink(_fd_path(self._root_fd)))
        if node.stat.st_nlink == 0:  # deleted while we looked
            raise _error(errno.ENOENT, host)
        if root == b"/":
            return host
        if host == root:
            return b"/"
        if host.startswith(root + b"/"):
            return host[len(root):]
        raise _error(errno.ENOENT, host)

    # ---- snapshots ---------------------------------------------------------------------------------------

    def _reopen(self, fd: int, flags: int) -> int:
        return os.open(_fd_path(fd), flags | os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)

    def _read_file(self, path_fd: int, guest_path: bytes, path: bytes) -> Opened:
        fd = self._reopen(path_fd, 0)
        try:
            st = os.fstat(fd)
            cap = self.max_file_bytes
            if st.st_size > cap:
                raise _error(errno.EFBIG, path)
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, min(max(st.st_size - total, 1 << 16), cap + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                if total > cap:
                    raise _error(errno.EFBIG, path)
                chunks.append(chunk)
        finally:
            os.close(fd)
        return Opened("file", guest_path, b"".join(chunks), [], st)

    def _list_dir(self, path_fd: int, guest_path: bytes, path: bytes) -> Opened:
        fd = self._reopen(path_fd, os.O_DIRECTORY)
        try:
            st = os.fstat(fd)
            entries = _getdents(fd, self.max_file_bytes, path)
        finally:
            os.close(fd)
        if (st.st_dev, st.st_ino) == (self._root_stat.st_dev, self._root_stat.st_ino):
            entries = [(st.st_ino, t, n) if n == b".." else (i, t, n) for i, t, n in entries]
        return Opened("dir", guest_path, b"", entries, st)


def _getdents(fd: int, cap: int, path: bytes) -> list[tuple[int, int, bytes]]:
    """All entries of the directory ``fd`` (getdents64), sorted by name; EFBIG past ``cap`` bytes."""
    buf = ctypes.create_string_buffer(1 << 16)
    entries: list[tuple[int, int, bytes]] = []
    total = 0
    while True:
        n = _syscall(ctypes.c_long(_SYS_GETDENTS64), ctypes.c_long(fd), buf, ctypes.c_long(len(buf)))
        if n < 0:
            code = ctypes.get_errno()
            raise _error(code, path)
        if n == 0:
            break
        total += n
        if total > cap:
            raise _error(errno.EFBIG, path)
        raw = buf.raw[:n]
        off = 0
        while off < n:
            ino, _, reclen, d_type = _DIRENT_HEAD.unpack_from(raw, off)
            name = raw[off + _DIRENT_HEAD.size:off + reclen].split(b"\0", 1)[0]
            entries.append((ino, d_type, name))
            off += reclen
    entries.sort(key=lambda e: e[2])
    return entries


# ---- guest ABI encodings -------------------------------------------------------------------------------------

_STAT = struct.Struct("<QQQIIIiQqqq" + "qq" * 3 + "qqq")  # x86-64 struct stat, 144 bytes
_STATX_HEAD = struct.Struct("<IIQIIIHHQQQQ")  # stx_mask .. stx_attributes_mask
_STATX_TS = struct.Struct("<qIi")  # struct statx_timestamp
_STATX_DEVS = struct.Struct("<IIII")  # stx_rdev_major, stx_rdev_minor, stx_dev_major, stx_dev_minor
_STATX_SIZE = 256
_DIRENT_HEAD = struct.Struct("<QqHB")  # d_ino, d_off, d_reclen, d_type; d_name follows
_LISTING_MAGIC = b"SNAPDIR1"
_LISTING_COUNT = struct.Struct("<I")
_LISTING_ENTRY = struct.Struct("<QBH")


def _timespec(ns: int) -> tuple[int, int]:
    return divmod(ns, 1_000_000_000)


def pack_stat(st: os.stat_result) -> bytes:
    """``st`` as the 144-byte x86-64 ``struct stat`` that stat/fstat/newfstatat write."""
    return _STAT.pack(st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev,
                      st.st_size, st.st_blksize, st.st_blocks, *_timespec(st.st_atime_ns),
                      *_timespec(st.st_mtime_ns), *_timespec(st.st_ctime_ns), 0, 0, 0)


def pack_statx(st: os.stat_result, mask: int) -> bytes:
    """``st`` as a 256-byte ``struct statx``: the STATX_BASIC_STATS fields, whatever ``mask`` asks.

    ``stx_mask`` is STATX_BASIC_STATS (statx may return more than asked; the birth
    time and mount id are not known here). A mask with STATX__RESERVED is EINVAL.
    """
    if mask & STATX__RESERVED:
        raise OSError(errno.EINVAL, "statx mask has STATX__RESERVED set")
    out = bytearray(_STATX_SIZE)
    _STATX_HEAD.pack_into(out, 0, STATX_BASIC_STATS, st.st_blksize, 0, st.st_nlink, st.st_uid, st.st_gid,
                          st.st_mode, 0, st.st_ino, st.st_size, st.st_blocks, 0)
    for offset, ns in ((64, st.st_atime_ns), (96, st.st_ctime_ns), (112, st.st_mtime_ns)):  # btime at 80: 0
        _STATX_TS.pack_into(out, offset, *_timespec(ns), 0)
    _STATX_DEVS.pack_into(out, 128, os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev),
                          os.minor(st.st_dev))
    return bytes(out)


def pack_dirents(entries: list[tuple[int, int, bytes]], start: int, bufsize: int) -> tuple[bytes, int]:
    """``linux_dirent64`` records for ``entries[start:]`` that fit in ``bufsize`` bytes.

    Returns (records, next index). Each record's ``d_off`` is the index of the entry
    after it, so a directory offset is an entry index. EINVAL when not even the
    first remaining record fits (getdents64's answer to a too-small buffer).
    """
    out = bytearray()
    index = start
    while index < len(entries):
        ino, d_type, name = entries[index]
        reclen = (_DIRENT_HEAD.size + len(name) + 1 + 7) & ~7
        if len(out) + reclen > bufsize:
            break
        out += _DIRENT_HEAD.pack(ino, index + 1, reclen, d_type) + name
        out += bytes(reclen - _DIRENT_HEAD.size - len(name))
        index += 1
    if index == start and start < len(entries):
        raise OSError(errno.EINVAL, "getdents64 buffer too small for the next entry")
    return bytes(out), index


def encode_listing(entries: list[tuple[int, int, bytes]]) -> bytes:
    """A stable byte form of a directory listing (to store it by content hash)."""
    parts = [_LISTING_MAGIC, _LISTING_COUNT.pack(len(entries))]
    for ino, d_type, name in entries:
        parts += [_LISTING_ENTRY.pack(ino, d_type, len(name)), name]
    return b"".join(parts)


def decode_listing(data: bytes) -> list[tuple[int, int, bytes]]:
    """Inverse of :func:`encode_listing`; ValueError on malformed data."""
    if not data.startswith(_LISTING_MAGIC) or len(data) < len(_LISTING_MAGIC) + _LISTING_COUNT.size:
        raise ValueError("not an encoded directory listing")
    (count,) = _LISTING_COUNT.unpack_from(data, len(_LISTING_MAGIC))
    off = len(_LISTING_MAGIC) + _LISTING_COUNT.size
    entries: list[tuple[int, int, bytes]] = []
    for _ in range(count):
        if off + _LISTING_ENTRY.size > len(data):
            raise ValueError("truncated directory listing")
        ino, d_type, size = _LISTING_ENTRY.unpack_from(data, off)
        off += _LISTING_ENTRY.size
        if off + size > len(data):
            raise ValueError("truncated directory listing")
        entries.append((ino, d_type, data[off:off + size]))
        off += size
    if off != len(data):
        raise ValueError("trailing bytes after directory listing")
    return entries
