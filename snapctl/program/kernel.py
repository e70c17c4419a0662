"""The VMM's Linux personality for one program: its state and the system-call dispatch.

:class:`Kernel` holds everything about the program that is not in guest
memory or vCPU registers -- the address space bookkeeping, the fd table, brk,
the cwd, counters -- and services system calls through the table in
:mod:`snapctl.program.syscalls`. Everything it holds serialises to one JSON
document per checkpoint (:meth:`Kernel.state`), so a checkpoint restores to
exactly this point (:meth:`Kernel.from_state`).

Record and replay. A system call whose result depends on the world outside
the program (the clock, getrandom, stdin, the host file system) computes its
result through :meth:`Kernel.outside`: while recording, the function runs and
its JSON result goes into the interval's log; while replaying, the logged
result is returned instead and the function never runs. Every other call is
a pure function of the program's state and runs the same way in both modes.
Files the program opens are snapshotted whole, by content hash
(:class:`FileCache`), so reads, mmaps and directory listings of them are
deterministic too, and a checkpoint carries the files it needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from .mm import AddressSpace, Fault, OutOfMemory

MASK64 = (1 << 64) - 1
#: fds a program may hold
MAX_FDS = 1024
STATE_VERSION = 2   # 2: the frame free list as runs


class ReplayDivergence(Exception):
    """Replay reached a system call the recording does not have at this point."""


class ProgramExit(Exception):
    """exit / exit_group, or a fatal signal: the program is over."""

    def __init__(self, status: int, signal: int | None = None, report: str | None = None):
        super().__init__(status)
        self.status, self.signal, self.report = status, signal, report


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileCache:
    """File contents by sha256: every file the program opened (or its loader mapped).
    ``new`` lists the hashes not yet written to the store."""

    def __init__(self, loader: Callable[[str], bytes] | None = None):
        self.data: dict[str, bytes] = {}
        self.new: list[str] = []
        self._loader = loader

    def add(self, content: bytes) -> str:
        h = sha256(content)
        if h not in self.data:
            self.data[h] = content
            self.new.append(h)
        return h

    def get(self, h: str) -> bytes:
        if h not in self.data:
            if self._loader is None:
                raise KeyError(f"file content {h[:12]} is not available")
            content = self._loader(h)
            if sha256(content) != h:
                raise ValueError(f"stored file {h[:12]} does not match its hash")
            self.data[h] = content
        return self.data[h]

    def take_new(self) -> list[str]:
        new, self.new = self.new, []
        return new


@dataclass
class OpenFile:
    """An open file description (shared by dup'ed fds)."""

    kind: str                 #: file, dir, null, zero, random, path, stdin, stdout, stderr
    path: str = ""
    hash: str | None = None   #: content (file) or listing (dir) in the FileCache
    pos: int = 0
    flags: int = 0            #: O_* status flags (O_APPEND, O_NONBLOCK, ...)
    stat: dict = field(default_factory=dict)
    data: bytes = b""         #: file content / encoded listing (not serialised: from the cache)
    entries: list = field(default_factory=list)

    def desc(self) -> dict:
        return {"kind": self.kind, "path": self.path, "hash": self.hash, "pos": self.pos,
                "flags": self.flags, "stat": self.stat}


@dataclass
class Fd:
    file: OpenFile
    cloexec: bool = False


def stat_dict(st: os.stat_result) -> dict:
    return {"mode": st.st_mode, "ino": st.st_ino, "dev": st.st_dev, "nlink": st.st_nlink, "uid": st.st_uid,
            "gid": st.st_gid, "size": st.st_size, "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "blksize": st.st_blksize, "blocks": st.st_blocks, "rdev": st.st_rdev}


def stat_from_dict(d: dict) -> os.stat_result:
    return os.stat_result(
        (d["mode"], d["ino"], d["dev"], d["nlink"], d["uid"], d["gid"], d["size"],
         d["atime_ns"] // 10**9, d["mtime_ns"] // 10**9, d["ctime_ns"] // 10**9),
        {"st_atime_ns": d["atime_ns"], "st_mtime_ns": d["mtime_ns"], "st_ctime_ns": d["ctime_ns"],
         "st_blksize": d["blksize"], "st_blocks": d["blocks"], "st_rdev": d["rdev"]})


class Output:
    """Where the program's stdout/stderr go: through to snapctl's own fds as written
    (``live``), and into the interval's record either way."""

    def __init__(self, live: bool):
        self.live = live
        self.interval = {1: bytearray(), 2: bytearray()}
        self.totals = {1: 0, 2: 0}
        #: when set, live bytes go to ``sink(fd, data)`` instead of the fd (a replication
        #: output gate holds them until the checkpoint covering them is acknowledged)
        self.sink = None

    def write(self, fd: int, data: bytes) -> None:
        self.interval[fd] += data
        self.totals[fd] += len(data)
        if self.live and self.sink is not None:
            self.sink(fd, bytes(data))
        elif self.live:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BrokenPipeError:
                    self.live = False   # our reader went away; the record keeps everything
                    return
                view = view[n:]

    def take(self, fd: int) -> bytes:
        b = bytes(self.interval[fd])
        self.interval[fd].clear()
        return b


class Log:
    """The interval's outside-world results (record), or the recording being replayed."""

    def __init__(self) -> None:
        self.entries: list[list] = []
        self.replaying: list[list] | None = None
        self._next = 0

    def replay(self, entries: list[list]) -> None:
        self.replaying, self._next = entries, 0

    @property
    def replay_left(self) -> int:
        return 0 if self.replaying is None else len(self.replaying) - self._next

    def take(self) -> bytes:
        """The interval's entries as JSON lines (concatenable: a later merge appends)."""
        b = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in self.entries)
        self.entries = []
        return b

    @staticmethod
    def parse(blob: bytes) -> list[list]:
        return [json.loads(line) for line in blob.splitlines() if line.strip()]


def _table() -> dict:
    """The system-call table (imported on first use: the syscalls modules import this one)."""
    global _TABLE
    if _TABLE is None:
        from .syscalls import TABLE
        _TABLE = TABLE
    return _TABLE


_TABLE: dict | None = None


#: what a stored program state must hold, and of which type (a store may come from anyone)
_STATE_FIELDS = {"syscalls": int, "brk": list, "mmap_top": int, "cwd": str, "vmas": list, "frames": dict,
                 "pml4": int, "fds": dict, "ofds": list, "files": list, "auxv": list, "argv": list, "env": list,
                 "exe_path": str, "output": dict, "stdin_pos": int, "unimplemented": dict, "ids": dict,
                 "sigactions": dict, "robust_list": int, "tid_address": int}


def check_state(d) -> dict:
    """``d`` if it is a program state this snapctl reads; ValueError naming what is wrong otherwise."""
    if not isinstance(d, dict):
        raise ValueError("program state is not an object")
    if d.get("version") != STATE_VERSION:
        raise ValueError(f"program state version {d.get('version')!r} is not the {STATE_VERSION} this snapctl "
                         "reads (the store was written by another snapctl)")
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(d.get(name), kind) or isinstance(d.get(name), bool):
            raise ValueError(f"program state field {name!r} is missing or not a {kind.__name__}")
    if d["exited"] is not None and not isinstance(d["exited"], dict):
        raise ValueError("program state field 'exited' is not an object")
    return d


class Kernel:
    """One program's system-call personality (see the module docstring)."""

    def __init__(self, aspace: AddressSpace, files: FileCache, sandbox, output: Output, *,
                 exe_path: str, argv: list[str], env: list[str], stdin=None, ids: dict | None = None):
        self.mm = aspace
        self.files = files
        self.sandbox = sandbox
        self.out = output
        self.log = Log()
        self.exe_path = exe_path
        self.argv, self.env = argv, env
        self.stdin = stdin              #: a binary file object, or None for an empty stdin
        self.stdin_pos = 0
        self.ids = ids or {"pid": 1000, "uid": 0, "gid": 0}
        self.count = 0                  #: system calls made (the program's "step")
        self.fds: dict[int, Fd] = {}
        self.brk_start = self.brk_cur = 0
        self.mmap_top = 0
        self.cwd = "/"
        self.exited: dict | None = None
        self.unimplemented: dict[str, int] = {}
        self.images: dict = {}          #: exe/interp: path, hash, bias
        self.auxv: list[list[int]] = []
        self.sigactions: dict[int, bytes] = {}
        self.robust_list = 0
        self.tid_address = 0
        for fd, kind in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            self.fds[fd] = Fd(OpenFile(kind, path=f"pipe:[{fd}]", stat={}))

    # -- record / replay ----------------------------------------------------------------
    def outside(self, nr: int, fn: Callable[[], dict]) -> dict:
        """The result of ``fn`` (which may consult the host), recorded or replayed."""
        log = self.log
        if log.replaying is not None:
            if log._next >= len(log.replaying):
                raise ReplayDivergence(f"syscall #{self.count} ({nr}) goes beyond the recording")
            count, rnr, res = log.replaying[log._next]
            if count != self.count or rnr != nr:
                raise ReplayDivergence(f"syscall #{self.count} is {nr}; the recording has #{count} = {rnr}")
            log._next += 1
            return res
        res = fn()
        log.entries.append([self.count, nr, res])
        return res

    # -- fds ----------------------------------------------------------------------------
    def fd(self, fd: int) -> Fd:
        f = self.fds.get(fd)
        if f is None:
            raise OSError(errno.EBADF, "bad fd")
        return f

    def install(self, of: OpenFile, *, cloexec: bool = False, lowest: int = 0) -> int:
        fd = lowest
        while fd in self.fds:
            fd += 1
        if fd >= MAX_FDS:
            raise OSError(errno.EMFILE, "too many open files")
        self.fds[fd] = Fd(of, cloexec)
        return fd

    def open_file_from_desc(self, d: dict) -> OpenFile:
        of = OpenFile(d["kind"], d["path"], d["hash"], d["pos"], d["flags"], d["stat"])
        if of.hash is not None:
            of.data = self.files.get(of.hash)
            if of.kind == "dir":
                from .fs import decode_listing
                of.entries = decode_listing(of.data)
        return of

    # -- state --------------------------------------------------------------------------
    def state(self) -> dict:
        ofds: dict[int, OpenFile] = {}
        fds = {}
        for n, f in sorted(self.fds.items()):
            key = id(f.file)
            ofds.setdefault(key, f.file)
            fds[str(n)] = {"ofd": list(ofds).index(key), "cloexec": f.cloexec}
        return {
            "version": STATE_VERSION, "syscalls": self.count, "exited": self.exited,
            "brk": [self.brk_start, self.brk_cur], "mmap_top": self.mmap_top, "cwd": self.cwd,
            "vmas": self.mm.vma_state(), "frames": self.mm.frames.state(), "pml4": self.mm.pml4,
            "fds": fds, "ofds": [o.desc() for o in ofds.values()],
            "files": sorted(self.files.data), "exe": self.images.get("exe"), "interp": self.images.get("interp"),
            "auxv": self.auxv, "argv": self.argv, "env": self.env, "exe_path": self.exe_path,
            "output": {"stdout": self.out.totals[1], "stderr": self.out.totals[2]},
            "stdin_pos": self.stdin_pos, "unimplemented": self.unimplemented, "ids": self.ids,
            "sigactions": {str(k): v.hex() for k, v in self.sigactions.items()},
            "robust_list": self.robust_list, "tid_address": self.tid_address,
        }

    def load_state(self, d: dict) -> None:
        check_state(d)
        self.count = int(d["syscalls"])
        self.exited = d["exited"]
        self.brk_start, self.brk_cur = (int(x) for x in d["brk"])
        self.mmap_top = int(d["mmap_top"])
        self.cwd = str(d["cwd"])
        self.mm.load_vmas(d["vmas"])
        ofds = [self.open_file_from_desc(o) for o in d["ofds"]]
        self.fds = {int(n): Fd(ofds[int(f["ofd"])], bool(f["cloexec"])) for n, f in d["fds"].items()}
        self.images = {k: d[k] for k in ("exe", "interp") if d.get(k)}
        self.auxv = d["auxv"]
        self.out.totals = {1: int(d["output"]["stdout"]), 2: int(d["output"]["stderr"])}
        self.stdin_pos = int(d["stdin_pos"])
        self.unimplemented = dict(d["unimplemented"])
        self.ids = d["ids"]
        self.sigactions = {int(k): bytes.fromhex(v) for k, v in d["sigactions"].items()}
        self.robust_list, self.tid_address = int(d["robust_list"]), int(d["tid_address"])

    # -- dispatch -----------------------------------------------------------------------
    def syscall(self, nr: int, args: tuple[int, ...]) -> int:
        """Service one system call; returns the value for RAX (negative errno on failure)."""
        entry = _table().get(nr)
        try:
            if entry is None:
                name = f"syscall_{nr}"
                self.unimplemented[name] = self.unimplemented.get(name, 0) + 1
                return -errno.ENOSYS
            ret = entry.fn(self, *args[:entry.nargs])
        except Fault:
            ret = -errno.EFAULT
        except OutOfMemory:
            ret = -errno.ENOMEM
        except OSError as e:
            ret = -(e.errno or errno.EIO)
        except ValueError:
            ret = -errno.EINVAL
        if ret == -errno.ENOSYS and entry is not None and entry.unsupported:
            self.unimplemented[entry.name] = self.unimplemented.get(entry.name, 0) + 1
        return ret
