"""Fault 5: ring pressure. The smallest dirty ring the kernel accepts (256
entries: ring-full exits after ~192 pages), the `random` and `fill` guests on
2 vCPUs, many sync checkpoints: every checkpoint equals its model (per-vCPU
seeds), and sampled ones also replay exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import ok
from kvm_helpers import kvm
from rel_helpers import data_area, image, model_data, open_ro, scaled

MEM = 8 << 20
SEED = 17
RING = 256  # the kernel minimum here (docs/architecture.md)
# (guest, checkpoints in CI, steps per checkpoint): enough steps that each checkpoint dirties more
# pages per vCPU than the ring holds. `fill` is costly to model (512 xorshifts a step in Python), so
# CI takes 60 (random) and 40 (fill) checkpoints; a full run (SNAPCTL_REL_SCALE=10) takes 200 of both.
CASES = [("random", 60, 1000), ("fill", 40, 500)]


@kvm
@pytest.mark.slow
@pytest.mark.parametrize("guest, ci_count, every", CASES, ids=[c[0] for c in CASES])
def test_smallest_ring_two_vcpus_every_checkpoint_equals_its_model(tmp_path, guest, ci_count, every):
    count = min(200, scaled(ci_count))
    store = tmp_path / f"{guest}.db"
    ok("run", "--guest", guest, "--mem", "8M", "--vcpus", 2, "--seed", SEED, "--ring-entries", RING,
       "--checkpoints", count, "--every-steps", every, "--steps-per-yield", 500, store=store, timeout=600)
    models = [model_data(guest, SEED, i, MEM, 2) for i in range(2)]
    with open_ro(store) as st:
        cks = st.checkpoints()
        assert len(cks) == count + 1
        assert st.verify().ok
        over_ring = 0
        for c in cks:
            steps = c.meta["steps"]
            assert steps == [c.id * every] * 2, (c.id, steps)  # sync: exact
            img = image(st, c.id)
            for i, m in enumerate(models):
                m.run_to(steps[i])
                got = data_area(img, MEM, 2, i)
                if not np.array_equal(got, m.mem):
                    bad = np.flatnonzero((got != m.mem).any(axis=1))
                    pytest.fail(f"{guest}: checkpoint {c.id} vCPU {i}: {bad.size} pages differ from the model "
                                f"(first: data page {int(bad[0])})")
            over_ring += c.stats.get("dirty_pages", 0) > RING
    assert over_ring >= count // 2, "the ring was not under pressure"
    # replay: restore a sampled checkpoint and re-execute to the next one and a later one
    for a, b in ((1, 2), (count // 2, count // 2 + 1), (count - 3, count)):
        r = ok("replay", a, "--to", b, "--json", store=store, timeout=300).json()
        assert r["match"], (a, b, r)
