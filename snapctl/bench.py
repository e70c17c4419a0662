"""Benchmarks: measured side by side in one run, reported as ratios.

Speed targets live here, never in timed unit tests (these machines are noisy).
"""

from __future__ import annotations

import statistics
import time

from .machine import Machine, MachineConfig

MB = 1 << 20
GB = 1 << 30


def harvest_reset_cost(mem_size: int, dirty_pages: int, tracking: str, repeats: int = 5) -> dict:
    """Median harvest and reset time (ms) for ``dirty_pages`` dirty pages.

    The `sweep` guest dirties exactly one new page per step, so stopping it at
    step k*N gives N freshly dirtied pages per round (plus its mailbox page).
    """
    ring = 1 << max(8, (dirty_pages + 64 - 1).bit_length())
    cfg = MachineConfig(guest="sweep", mem_size=mem_size, steps_per_yield=1 << 62, tracking=tracking,
                        ring_entries=min(ring, 65536))
    harvest, reset, pages = [], [], []
    with Machine(cfg) as m:
        m.collect_dirty()
        m.start()
        for k in range(1, repeats + 2):
            m.set_stop_at(k * dirty_pages)
            m.resume()
            m.wait_parked()
            got = m.collect_dirty()
            if k > 1:  # the first round also pays first-touch costs
                harvest.append(m.tracker.stats.last_harvest_ms)
                reset.append(m.tracker.stats.last_reset_ms)
                pages.append(int(got.size))
        ring_full = m.stats()["ring_full_exits"]
    h, r = statistics.median(harvest), statistics.median(reset)
    return {"mem_mb": mem_size // MB, "dirty_pages": dirty_pages, "tracking": tracking, "harvest_ms": round(h, 3),
            "reset_ms": round(r, 3), "total_ms": round(h + r, 3), "pages_reported": statistics.median(pages),
            "ring_full_exits": ring_full}


def guest_speed(tracking: str, seconds: float = 1.0, collect_every_ms: float = 50.0, mem_size: int = 64 * MB) -> dict:
    """Guest steps per second of `stamp`, collecting the dirty set every ``collect_every_ms``
    (as a checkpointing run would: each collect re-protects the pages)."""
    cfg = MachineConfig(guest="stamp", mem_size=mem_size, steps_per_yield=1 << 62, tracking=tracking,
                        ring_entries=65536)
    with Machine(cfg) as m:
        if tracking != "none":
            m.collect_dirty()
        m.start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            time.sleep(collect_every_ms / 1e3)
            m.pause()
            if tracking != "none":
                m.collect_dirty()
            m.resume()
        m.pause()
        elapsed = time.perf_counter() - t0
        steps = m.step()
    return {"tracking": tracking, "steps_per_s": round(steps / elapsed), "seconds": round(elapsed, 2)}


def kvm_core(quick: bool = False) -> dict:
    sizes = [1000, 16000] if quick else [1000, 16000, 60000]
    big = 1 * GB if quick else 4 * GB
    out = {"harvest_reset": [], "ring_vs_bitmap": [], "guest_speed": []}
    for n in sizes:
        out["harvest_reset"].append(harvest_reset_cost(256 * MB, n, "ring"))
    for mem in (256 * MB, big):
        for mode in ("ring", "bitmap"):
            out["ring_vs_bitmap"].append(harvest_reset_cost(mem, 4096, mode))
    for mode in ("none", "ring", "bitmap"):
        out["guest_speed"].append(guest_speed(mode, seconds=0.5 if quick else 2.0))
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(kvm_core(quick="--quick" in sys.argv), indent=1))
