"""COLO/Remus-style periodic checkpointing with the Python API.

Runs a guest and checkpoints it every INTERVAL ms (async: the vCPUs are
kicked wherever they are), printing the pause and delta size of each, the
way a fault-tolerance loop would ship each delta to a standby host.

    python examples/colo_periodic.py [store.db] [seconds]

The store must be new (default: one in a fresh temporary directory).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from snapctl.checkpoint import Checkpointer, capture
from snapctl.machine import Machine, MachineConfig
from storage import Store

INTERVAL_MS = 20


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "colo.db")
    try:
        seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    except ValueError:
        sys.exit(f"error: seconds must be a number, got {sys.argv[2]!r}")
    if os.path.lexists(path):
        sys.exit(f"error: {path} already exists; give a new store path (this example starts a new store)")
    cfg = MachineConfig(guest="hotset", mem_size=64 << 20, params={"hot_pages": 512, "hot_percent": 95})
    with Machine(cfg) as vm, Store.create(path, cfg.to_dict()) as store:
        cp = Checkpointer(vm, store, parent=None)
        cp.base()
        vm.start()
        pauses = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(INTERVAL_MS / 1e3)
            cap = capture(vm, "async")  # pause, harvest, reset, gather, state, resume
            ckpt = cp.record(cap)       # one transaction; the standby would receive this delta
            pauses.append(cap.timings["downtime_ms"])
            print(f"checkpoint {ckpt}: step {cap.steps[0]:>12,}  dirty {cap.pages.size:>6} pages  "
                  f"pause {cap.timings['downtime_ms']:.2f} ms")
        vm.pause()
        print(f"{len(pauses)} checkpoints in {seconds:.1f} s; pause median {statistics.median(pauses):.2f} ms, "
              f"max {max(pauses):.2f} ms; store: {path}; verify: {'ok' if store.verify().ok else 'DAMAGED'}")


if __name__ == "__main__":
    main()
