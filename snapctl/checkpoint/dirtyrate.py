"""`snapctl dirty-rate`: how fast a guest dirties memory (QEMU's calc-dirty-rate).

The guest runs with dirty tracking for a while; every ``sample_ms`` it is
paused, the pages written since the previous sample are collected (and
re-protected), and it is resumed. Nothing is stored. The figure is the
distinct pages written per sample, summed, per second: the pages a
checkpoint every ``sample_ms`` would have to copy, so COLO-style users can
size their interval from it.
"""

from __future__ import annotations

import math
import time

from ..kvm.constants import PAGE_SIZE
from ..machine import Machine
from .schedule import ScheduleError

#: The longest measurement (s) and the sampling period's range (ms).
MAX_SECONDS = 3600
SAMPLE_MS_RANGE = (1, 60_000)


def _rate(pages: float, seconds: float) -> dict:
    per_s = pages / seconds if seconds > 0 else 0.0
    return {"pages_per_s": round(per_s, 1), "mib_per_s": round(per_s * PAGE_SIZE / 2**20, 2)}


def check_args(seconds: float, sample_ms: float) -> None:
    """A :class:`ScheduleError` naming the option unless both are in range."""
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise ScheduleError("--seconds", f"must be from > 0 to {MAX_SECONDS}, got {seconds}")
    lo, hi = SAMPLE_MS_RANGE
    if not (math.isfinite(sample_ms) and lo <= sample_ms <= hi):
        raise ScheduleError("--sample-ms", f"must be from {lo} to {hi}, got {sample_ms}")


def measure(machine: Machine, seconds: float, sample_ms: float = 100.0) -> dict:
    """Run ``machine`` (not started) for ``seconds``; return the dirty rate overall
    and per vCPU (ring tracking only: from each vCPU's own ring; a page two
    vCPUs wrote counts for both, so the vCPUs can add up to more than the total)."""
    check_args(seconds, sample_ms)
    m = machine
    m.count_dirty_per_vcpu(m.config.tracking == "ring")
    m.collect_dirty()  # start clean: the boot's (or the restore's) own writes do not count
    m.take_early_copies()
    per_before = m.dirty_pages_per_vcpu()
    total = samples = 0
    m.start()
    t0 = time.perf_counter()
    try:
        while (left := seconds - (time.perf_counter() - t0)) > 0:
            time.sleep(min(sample_ms / 1e3, left))
            m.pause()
            total += int(m.collect_dirty().size)
            m.resume()
            samples += 1
    finally:
        elapsed = time.perf_counter() - t0
        m.pause()
    ring = m.config.tracking == "ring"
    per_after = m.dirty_pages_per_vcpu()
    vcpus = []
    for i in range(m.config.vcpus):
        n = per_after.get(i, 0) - per_before.get(i, 0)
        vcpus.append({"vcpu": i, **(_rate(n, elapsed) if ring else {"pages_per_s": None, "mib_per_s": None})})
    return {"seconds": round(elapsed, 3), "sample_ms": sample_ms, "samples": samples, "tracking": m.config.tracking,
            "pages": total, **_rate(total, elapsed), "vcpus": vcpus}
