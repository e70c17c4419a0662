"""`snapctl bench --only program`: a user's program as the guest, against native and the C floor.

* ``ratio``: a compute-bound program (busybox awk) checkpointed every 100 ms,
  against the same binary run natively, in the same run (goal <= 1.2). The
  VM's figure is the program's own run, from its first instruction to its
  exit; building the VM, loading the program and checkpoint 0 are reported
  apart (``startup_ms``).
* ``syscall_ratio``: a system-call round trip (a static C program calling
  getpid in a loop) serviced by snapctl, against the floor of any VMM here: the
  same guest with its getpid exits serviced by a C loop around KVM_RUN
  (compiled with gcc for the run; goal <= 1.5).
* ``pause_ratio``: the median pause of those program checkpoints against a
  numpy gather of as many pages (report).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

from .kvm.constants import PAGE_SIZE

AWK_LOOP = 'BEGIN{s=0; for(i=0;i<%d;i++) s+=i%%7; print s}'
GETPID_C = r"""
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 0, s = 0;
    for (long i = 0; i < n; i++) s += syscall(SYS_getpid);
    return s == 1000 * n ? 0 : 1;
}
"""
FLOOR_C = r"""
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
/* Service getpid exits of a program guest in C (rax=1000, rip=rcx, rflags=r11), as any VMM's
   floor would; return on any other exit: 1000 for another system call, else the exit reason. */
long serve(int fd, struct kvm_run *run) {
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) return -errno;
        if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0xF0) return run->exit_reason;
        struct kvm_regs *r = &run->s.regs.regs;
        if (r->rax != 39) return 1000;
        r->rax = 1000; r->rip = r->rcx; r->rflags = r->r11;
        run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    }
}
"""


def _busybox() -> str | None:
    for p in ("/usr/bin/busybox", "/bin/busybox"):
        if os.path.exists(p):
            return p
    return shutil.which("busybox")


def _gcc(src: str, out: str, *flags: str) -> None:
    c = out + ".c"
    with open(c, "w") as f:
        f.write(src)
    subprocess.run(["gcc", *flags, "-o", out, c], check=True, capture_output=True)


def _native(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t


def _in_vm(spec, sched, store: str, mem: int = 256 << 20):
    from .checkpoint.program import run_program
    res = run_program(store, spec, sched, mem_size=mem, live_output=False)
    os.unlink(store)
    return res


def compute_bound(quick: bool, tmp: str) -> dict:
    from .checkpoint.program import ProgramSchedule
    from .program import ProgramSpec

    bb = _busybox()
    if bb is None:
        return {"error": "busybox not found (Debian's busybox-static)"}
    loop = AWK_LOOP % (2_000_000 if quick else 12_000_000)
    argv = [bb, "awk", loop]
    native, vm, runs = [], [], []
    for i in range(2 if quick else 3):   # alternate, best of each: the host is noisy
        native.append(_native(argv))
        spec = ProgramSpec(path=bb, exe=bb, argv=argv, root=tmp)
        t = time.perf_counter()
        res = _in_vm(spec, ProgramSchedule(interval_ms=100), os.path.join(tmp, f"awk{i}.db"))
        total = time.perf_counter() - t
        vm.append(res.run_seconds)
        runs.append((res, total))
    best = min(range(len(vm)), key=lambda i: vm[i])
    res, total = runs[best]
    s = res.summary
    pages = [int(x) for x in s.dirty_pages[1:]] or [0]
    floor = _gather_floor(int(statistics.median(pages)))
    pause = statistics.median(s.pauses_ms[1:]) if len(s.pauses_ms) > 1 else 0.0
    return {"native_s": round(min(native), 3), "vm_run_s": round(vm[best], 3),
            "startup_ms": round((total - vm[best]) * 1e3, 1), "checkpoints": len(s.checkpoints),
            "ratio": round(vm[best] / min(native), 3), "goal": "<= 1.2 (in VM with checkpoints every 100 ms / native)",
            "pause_ms_median": round(pause, 3), "dirty_pages_median": int(statistics.median(pages)),
            "gather_floor_ms": round(floor, 3), "pause_ratio": round(pause / floor, 2) if floor else None,
            "pause_goal": "report (program checkpoint pause / numpy gather of as many pages)"}


def _gather_floor(n: int, repeats: int = 5) -> float:
    mem = np.zeros((65536, PAGE_SIZE), np.uint8)
    mem[::7] = 1
    idx = np.sort(np.random.default_rng(1).choice(65536, size=max(n, 1), replace=False))
    out = np.empty((idx.size, PAGE_SIZE), np.uint8)
    out.fill(0)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.take(mem, idx, axis=0, out=out)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def syscall_round_trip(quick: bool, tmp: str) -> dict:
    from .checkpoint.program import ProgramSchedule
    from .machine import Machine, MachineConfig
    from .machine.driver import IoVerdict
    from .program import ProgramGuest, ProgramSpec

    prog, floor_so = os.path.join(tmp, "getpid"), os.path.join(tmp, "floor.so")
    _gcc(GETPID_C, prog, "-static", "-O2")
    _gcc(FLOOR_C, floor_so, "-shared", "-fPIC", "-O2")
    lib = ctypes.CDLL(floor_so)
    lib.serve.argtypes = (ctypes.c_int, ctypes.c_void_p)
    lib.serve.restype = ctypes.c_long
    n = 5_000 if quick else 20_000
    spec = lambda: ProgramSpec(path=prog, exe="/getpid", argv=["getpid", str(n)], root=tmp)  # noqa: E731
    data = open(prog, "rb").read()
    py, c = [], []
    for i in range(3):
        res = _in_vm(spec(), ProgramSchedule(every_syscalls=1 << 60), os.path.join(tmp, f"pid{i}.db"))
        if res.exit_status != 0:
            return {"error": f"getpid program exited {res.exit_status}"}
        py.append(res.run_seconds)
        g = ProgramGuest.new(spec(), data, live_output=False)
        cfg = MachineConfig(guest="program", mem_size=256 << 20, program=spec().to_dict())
        with Machine(cfg, driver=g) as m:
            v = m.vcpu(0)
            t = time.perf_counter()
            while True:
                r = lib.serve(v.fd, ctypes.addressof(v.run_struct))
                if r != 1000:
                    raise RuntimeError(f"floor loop stopped on exit {r}")
                if g.on_io(0, v.run_struct.exit.io) is IoVerdict.EXIT:
                    break
            c.append(time.perf_counter() - t)
    us_py, us_c = min(py) / n * 1e6, min(c) / n * 1e6
    return {"syscalls": n, "us_per_syscall": round(us_py, 1), "us_per_syscall_c_floor": round(us_c, 1),
            "syscall_ratio": round(us_py / us_c, 3), "syscall_goal": "<= 1.5 (snapctl / C handler floor)"}


def program(quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="snapctl-bench-program-") as tmp:
        out = compute_bound(quick, tmp)
        out.update(syscall_round_trip(quick, tmp))
    return out
