"""A writer process killed with SIGKILL at random points never leaves a
partial checkpoint, and the store verifies afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from storage_helpers import PAGE, _ROOT, seed_for
from storage import Store

N = 64

# Checkpoint k's content and parent depend only on k, so the test can replay
# what any committed checkpoint must contain.
WRITER = r"""
import sys
sys.path.insert(0, {root!r})
import numpy as np
from storage import Store
N, PAGE = {n}, 4096

def plan(k):
    rng = np.random.default_rng(k)
    parent = None if k == 0 else (k - 2 if k % 5 == 0 and k >= 2 else k - 1)
    calls = []
    for _ in range(6):
        pages = rng.integers(0, N, 12)
        data = rng.integers(0, 4, size=(12, PAGE), dtype=np.uint8)
        data[rng.random(12) < 0.2] = 0
        data[:, 1000:] = 0 if k % 2 else 9
        calls.append((pages, data))
    return parent, calls

st = Store.open(sys.argv[1])
k = len(st.checkpoints()) and max(c.id for c in st.checkpoints()) + 1
print("start", k, flush=True)
while True:
    parent, calls = plan(k)
    with st.checkpoint(parent, {{"step": k}}) as w:
        assert w.id == k, (w.id, k)
        for pages, data in calls:
            w.add_pages(pages, data)
        w.add_state("vcpu0", b"state-%d" % k)
    k += 1
"""


def expected_images(upto: int) -> dict[int, np.ndarray]:
    ns: dict = {}
    exec(WRITER.format(root=_ROOT, n=N).split("st = Store.open")[0], ns)
    images: dict[int, np.ndarray] = {}
    for k in range(upto + 1):
        parent, calls = ns["plan"](k)
        img = images[parent].copy() if parent is not None else np.zeros((N, PAGE), np.uint8)
        for pages, data in calls:
            img[pages] = data
        images[k] = img
    return images


@pytest.mark.parametrize("rounds", [pytest.param(6, id="reduced"),
                                    pytest.param(15, id="long", marks=pytest.mark.slow)])
def test_sigkill_never_leaves_partial_checkpoint(tmp_path, rounds):
    path = str(tmp_path / "crash.snap")
    Store.create(path, {"mem_size": N * PAGE}).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=_ROOT, n=N))
    rng = np.random.default_rng(seed_for("sigkill", time.time_ns() % 2**32))
    out = np.empty((N, PAGE), np.uint8)
    for r in range(rounds):
        proc = subprocess.Popen([sys.executable, str(script), path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().startswith(b"start")   # imports done, store open
        time.sleep(float(rng.uniform(0.0, 0.25)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, err.decode()

        with Store.open(path) as st_:
            rep = st_.verify()
            assert rep.ok, rep.problems
            ids = [c.id for c in st_.checkpoints()]
            assert ids == list(range(len(ids)))          # no gaps, no partial id
            images = expected_images(ids[-1]) if ids else {}
            for c in ids:
                st_.materialize(c, out)
                assert np.array_equal(out, images[c]), f"round {r}, checkpoint {c}"
                assert st_.state(c, "vcpu0") == b"state-%d" % c
    with Store.open(path) as st_:
        assert len(st_.checkpoints()) > 0, "the writer never committed anything"
