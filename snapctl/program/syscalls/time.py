"""Time and randomness: every result comes from outside the program, so each is recorded."""

from __future__ import annotations

import errno
import os
import struct
import time

from . import s32, syscall

CLOCKS = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11}
MAX_RANDOM = 1 << 20


def _now(clk: int) -> int:
    if clk in (2, 3):   # process / thread CPU time: the vCPU thread runs the program
        clk = 3
    if clk in (8, 9):   # *_ALARM variants read as their base clocks
        clk -= 8 if clk == 8 else 2
    if clk == 11:       # CLOCK_TAI
        clk = 0
    return time.clock_gettime_ns(clk)


@syscall(228, "clock_gettime", 2)
def clock_gettime(k, clk, tp):
    clk = s32(clk)
    if clk not in CLOCKS:
        return -errno.EINVAL
    k.mm.check_writable(tp, 16)
    ns = k.outside(228, lambda: {"ns": _now(clk)})["ns"]
    k.mm.write(tp, struct.pack("<qq", ns // 10**9, ns % 10**9))
    return 0


@syscall(229, "clock_getres", 2)
def clock_getres(k, clk, tp):
    if s32(clk) not in CLOCKS:
        return -errno.EINVAL
    if tp:
        k.mm.write(tp, struct.pack("<qq", 0, 1))
    return 0


@syscall(96, "gettimeofday", 2)
def gettimeofday(k, tv, tz):
    if tv:
        k.mm.check_writable(tv, 16)
        ns = k.outside(96, lambda: {"ns": time.time_ns()})["ns"]
        k.mm.write(tv, struct.pack("<qq", ns // 10**9, (ns % 10**9) // 1000))
    if tz:
        k.mm.write(tz, bytes(8))
    return 0


@syscall(201, "time", 1)
def time_(k, t):
    sec = k.outside(201, lambda: {"s": time.time_ns() // 10**9})["s"]
    if t:
        k.mm.write(t, struct.pack("<q", sec))
    return sec


@syscall(100, "times", 1)
def times(k, buf):
    ticks = k.outside(100, lambda: {"t": time.monotonic_ns() // 10**7, "cpu": time.thread_time_ns() // 10**7})
    if buf:
        k.mm.write(buf, struct.pack("<4q", ticks["cpu"], 0, 0, 0))
    return ticks["t"]


@syscall(318, "getrandom", 3)
def getrandom(k, buf, n, flags):
    n = min(n, MAX_RANDOM)
    k.mm.check_writable(buf, n)
    data = bytes.fromhex(k.outside(318, lambda: {"data": os.urandom(n).hex()})["data"])
    k.mm.write(buf, data)
    return len(data)


def _sleep(k, nr: int, req: int) -> int:
    sec, nsec = struct.unpack("<qq", k.mm.read(req, 16))
    if sec < 0 or not 0 <= nsec < 10**9:
        return -errno.EINVAL
    k.outside(nr, lambda: (time.sleep(sec + nsec / 1e9), {})[1])
    return 0


@syscall(35, "nanosleep", 2)
def nanosleep(k, req, rem):
    return _sleep(k, 35, req)


@syscall(230, "clock_nanosleep", 4)
def clock_nanosleep(k, clk, flags, req, rem):
    if flags & 1:   # TIMER_ABSTIME: sleep until then
        sec, nsec = struct.unpack("<qq", k.mm.read(req, 16))
        k.outside(230, lambda: (time.sleep(max(0.0, sec + nsec / 1e9 - _now(s32(clk)) / 1e9)), {})[1])
        return 0
    return _sleep(k, 230, req)
