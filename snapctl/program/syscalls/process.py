"""The process: exit, identity, limits, signals (recorded, never delivered), arch_prctl.

A program here is one thread with no children: fork/clone/execve and
friends are unsupported (ENOSYS, counted for the run summary). Signal
handlers are recorded and reported back (``rt_sigaction``) but no signal is
ever delivered; a signal the program sends itself (``abort()``) ends it the
way the default action would.
"""

from __future__ import annotations

import errno
import struct

from ...kvm.constants import PAGE_SIZE
from ..kernel import ProgramExit
from . import s32, syscall, unsupported

ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
RLIM_INFINITY = (1 << 64) - 1
RLIMITS = {3: (8 << 20, RLIM_INFINITY), 7: (1024, 1024)}   # STACK, NOFILE; the rest unlimited
#: signals whose default action ends the program (the rest are ignored by default)
FATAL = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26, 27, 29, 30, 31}
UNAME = (b"Linux", b"snapctl", b"6.1.0-snapctl", b"#1 SMP", b"x86_64", b"(none)")

for _nr, _name in ((56, "clone"), (57, "fork"), (58, "vfork"), (59, "execve"), (435, "clone3"),
                   (322, "execveat"), (41, "socket"), (53, "socketpair"), (22, "pipe"), (293, "pipe2"),
                   (101, "ptrace"), (165, "mount"), (161, "chroot"), (169, "reboot"), (246, "kexec_load"),
                   (37, "alarm"), (38, "setitimer"), (36, "getitimer"), (222, "timer_create"),
                   (283, "timerfd_create"), (213, "epoll_create"), (291, "epoll_create1"), (290, "eventfd2"),
                   (334, "rseq")):
    unsupported(_nr, _name)


@syscall(60, "exit", 1)
def exit_(k, code):
    raise ProgramExit(code & 0xFF)


@syscall(231, "exit_group", 1)
def exit_group(k, code):
    raise ProgramExit(code & 0xFF)


def _self_signal(k, sig: int) -> int:
    if sig == 0:
        return 0
    if not 1 <= sig <= 64:
        return -errno.EINVAL
    if sig in FATAL:
        raise ProgramExit(128 + sig, signal=sig, report=f"program raised signal {sig} itself")
    return 0


@syscall(62, "kill", 2)
def kill(k, pid, sig):
    if s32(pid) not in (k.ids["pid"], 0, -1):
        return -errno.ESRCH
    return _self_signal(k, s32(sig))


@syscall(200, "tkill", 2)
def tkill(k, tid, sig):
    return _self_signal(k, s32(sig)) if s32(tid) == k.ids["pid"] else -errno.ESRCH


@syscall(234, "tgkill", 3)
def tgkill(k, tgid, tid, sig):
    return _self_signal(k, s32(sig)) if s32(tid) == k.ids["pid"] else -errno.ESRCH


@syscall(61, "wait4", 4)
def wait4(k, pid, status, options, rusage):
    return -errno.ECHILD


@syscall(39, "getpid", 0)
def getpid(k):
    return k.ids["pid"]


@syscall(186, "gettid", 0)
def gettid(k):
    return k.ids["pid"]


@syscall(110, "getppid", 0)
def getppid(k):
    return 1


@syscall(111, "getpgrp", 0)
def getpgrp(k):
    return k.ids["pid"]


@syscall(121, "getpgid", 1)
def getpgid(k, pid):
    return k.ids["pid"]


@syscall(124, "getsid", 1)
def getsid(k, pid):
    return k.ids["pid"]


@syscall(109, "setpgid", 2)
def setpgid(k, pid, pgid):
    return 0


@syscall(112, "setsid", 0)
def setsid(k):
    return -errno.EPERM


@syscall(102, "getuid", 0)
def getuid(k):
    return k.ids["uid"]


@syscall(107, "geteuid", 0)
def geteuid(k):
    return k.ids["uid"]


@syscall(104, "getgid", 0)
def getgid(k):
    return k.ids["gid"]


@syscall(108, "getegid", 0)
def getegid(k):
    return k.ids["gid"]


@syscall(118, "getresuid", 3)
def getresuid(k, r, e, s):
    for p in (r, e, s):
        k.mm.write(p, struct.pack("<I", k.ids["uid"]))
    return 0


@syscall(120, "getresgid", 3)
def getresgid(k, r, e, s):
    for p in (r, e, s):
        k.mm.write(p, struct.pack("<I", k.ids["gid"]))
    return 0


@syscall(115, "getgroups", 2)
def getgroups(k, size, lst):
    return 0


for _nr, _name in ((105, "setuid"), (106, "setgid"), (113, "setreuid"), (114, "setregid"),
                   (116, "setgroups"), (117, "setresuid"), (119, "setresgid")):
    syscall(_nr, _name, 0)(lambda k: -errno.EPERM)


@syscall(63, "uname", 1)
def uname(k, buf):
    k.mm.write(buf, b"".join(f.ljust(65, b"\0") for f in UNAME))
    return 0


@syscall(99, "sysinfo", 1)
def sysinfo(k, buf):
    total = k.mm.memory.size
    free = k.mm.frames.available * PAGE_SIZE
    k.mm.write(buf, struct.pack("<q3Q6QHHxxxxQQI4x", 0, 0, 0, 0, total, free, 0, 0, 0, 0, 1, 0, 0, 0, 1))
    return 0


@syscall(204, "sched_getaffinity", 3)
def sched_getaffinity(k, pid, size, mask):
    if size < 8:
        return -errno.EINVAL
    k.mm.write(mask, struct.pack("<Q", 1))
    return 8


@syscall(203, "sched_setaffinity", 3)
def sched_setaffinity(k, pid, size, mask):
    return 0


@syscall(24, "sched_yield", 0)
def sched_yield(k):
    return 0


@syscall(98, "getrusage", 2)
def getrusage(k, who, usage):
    k.mm.write(usage, bytes(144))
    return 0


@syscall(302, "prlimit64", 4)
def prlimit64(k, pid, res, new, old):
    if res >= 16:
        return -errno.EINVAL
    if old:
        k.mm.write(old, struct.pack("<QQ", *RLIMITS.get(res, (RLIM_INFINITY, RLIM_INFINITY))))
    return 0


@syscall(97, "getrlimit", 2)
def getrlimit(k, res, old):
    return prlimit64(k, 0, res, 0, old)


@syscall(160, "setrlimit", 2)
def setrlimit(k, res, new):
    return 0 if res < 16 else -errno.EINVAL


@syscall(95, "umask", 1)
def umask(k, mask):
    return 0o022


@syscall(157, "prctl", 5)
def prctl(k, option, a2, a3, a4, a5):
    if option == 16:   # PR_GET_NAME
        k.mm.write(a2, k.exe_path.rsplit("/", 1)[-1].encode()[:15].ljust(16, b"\0"))
    return 0


@syscall(158, "arch_prctl", 2)
def arch_prctl(k, code, addr):
    if code == ARCH_SET_FS:
        k.cpu.set_segment_base("fs", addr)
        return 0
    if code == ARCH_SET_GS:
        k.cpu.set_segment_base("gs", addr)
        return 0
    if code in (ARCH_GET_FS, ARCH_GET_GS):
        k.mm.write(addr, struct.pack("<Q", k.cpu.segment_base("fs" if code == ARCH_GET_FS else "gs")))
        return 0
    return -errno.EINVAL


@syscall(218, "set_tid_address", 1)
def set_tid_address(k, ptr):
    k.tid_address = ptr
    return k.ids["pid"]


@syscall(273, "set_robust_list", 2)
def set_robust_list(k, head, length):
    k.robust_list = head
    return 0


@syscall(202, "futex", 6)
def futex(k, uaddr, op, val, timeout, uaddr2, val3):
    cmd = op & 0x7F
    if cmd in (0, 9):   # WAIT, WAIT_BITSET: nobody else could ever wake us
        cur = struct.unpack("<I", k.mm.read(uaddr, 4))[0]
        return -errno.EAGAIN if cur != (val & 0xFFFFFFFF) else -errno.ETIMEDOUT
    return 0


@syscall(324, "membarrier", 3)
def membarrier(k, cmd, flags, cpu):
    return 0


@syscall(13, "rt_sigaction", 4)
def rt_sigaction(k, sig, act, oact, size):
    if not 1 <= sig <= 64 or sig in (9, 19) and act:
        return -errno.EINVAL
    if oact:
        k.mm.write(oact, k.sigactions.get(sig, bytes(32)))
    if act:
        k.sigactions[sig] = k.mm.read(act, 32)
    return 0


@syscall(14, "rt_sigprocmask", 4)
def rt_sigprocmask(k, how, set_, oset, size):
    if oset:
        k.mm.write(oset, bytes(8))
    return 0


@syscall(131, "sigaltstack", 2)
def sigaltstack(k, ss, oss):
    if oss:
        k.mm.write(oss, struct.pack("<QiiQ", 0, 2, 0, 0))   # SS_DISABLE
    return 0


@syscall(127, "rt_sigpending", 2)
def rt_sigpending(k, set_, size):
    k.mm.write(set_, bytes(8))
    return 0
