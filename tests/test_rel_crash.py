"""Fault 1: `snapctl run` (and `restore`) killed with SIGKILL at random moments.

Afterwards the store verifies, lists no partial checkpoint, every listed
checkpoint equals the `stamp` model at its recorded step, and `restore` from
the last one works. Kills land in the base write, between checkpoints and
inside checkpoint writes (a write of ~1700 pages takes most of each interval).
"""

from __future__ import annotations

import random
from subprocess import DEVNULL

import numpy as np
import pytest

from cli_helpers import export_image, ok, one_line_error, snapctl, spawn
from kvm_helpers import kvm
from rel_helpers import (StampTimeline, data_area, image, open_ro, remove_store, scaled, sigkill, stamp_matches,
                         wait_for)
from guest_models import data_split

MEM = 16 << 20
EVERY = 2000
SEED = 5
KILLS = scaled(30)  # CI 30, full run (SNAPCTL_REL_SCALE=10) 300


def _check_store(store, tmp_path, *, cli: bool) -> list:
    """verify passes, the tree is well formed, every checkpoint equals the stamp model."""
    if cli:
        r = snapctl("verify", store=store)
        assert r.code == 0 and "Traceback" not in r.err, (r.out, r.err)
    with open_ro(store) as st:
        rep = st.verify()
        assert rep.ok, rep.problems
        cks = st.checkpoints()
        P = data_split(MEM, 1)[0][1]
        # one pass of the model over the steps, in step order
        by_step = sorted(cks, key=lambda c: c.step)
        model = StampTimeline(SEED, P)
        for c in by_step:
            assert c.meta.get("steps", [c.step]) == [c.step]
            data = data_area(image(st, c.id), MEM, 1, 0)
            assert stamp_matches(data, model.at(c.step)), f"checkpoint {c.id} (step {c.step}) differs from the model"
    return cks


@kvm
@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    seed = 20261121
    print(f"seed {seed}")
    rng = random.Random(seed)
    landed = {"before base": 0, "after base": 0, "restore killed": 0}
    for t in range(KILLS):
        store = tmp_path / f"k{t}.db"
        proc = spawn("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 1000, "--every-steps", EVERY,
                     store=store, stdout=DEVNULL)
        assert wait_for(lambda: store.exists() or proc.poll() is not None, 30), "run never created its store"
        assert proc.poll() is None, proc.stderr.read().decode()
        # mostly inside the first ~25 checkpoints, sometimes right at creation (base not committed yet)
        delay = 0.0 if t % 10 == 0 else rng.uniform(0.0, 0.45)
        wait_for(lambda: False, delay)
        sigkill(proc)
        assert proc.returncode == -9, "run ended before it was killed"

        try:
            with open_ro(store) as st:
                n = len(st.checkpoints())
        except Exception as e:  # killed before the schema was complete: see the xfail test below
            n = 0
            r = snapctl("list", store=store)
            one_line_error(r, 1)
        if n == 0:
            landed["before base"] += 1
            continue
        landed["after base"] += 1
        cks = _check_store(store, tmp_path, cli=t % 3 == 0)
        ids = [c.id for c in cks]
        assert ids == list(range(len(ids))), ids  # no partial checkpoint, no hole
        assert [c.parent for c in cks] == [None] + ids[:-1]
        assert [c.step for c in cks] == [EVERY * i for i in ids]
        last = ids[-1]
        if t % 3 == 1:  # the CLI export of the last checkpoint equals the model too
            img = export_image(store, last, tmp_path)
            P = data_split(MEM, 1)[0][1]
            assert stamp_matches(data_area(img, MEM, 1, 0), StampTimeline(SEED, P).at(EVERY * last))

        # the same store keeps working: restore from the last checkpoint
        r = ok("restore", last, "--steps", 777, "--json", store=store).json()
        assert r["checkpoints"] == [last + 1]
        if t % 3 == 0:  # and a restore killed mid-branch leaves the store just as sound
            proc = spawn("restore", last + 1, "--checkpoints", 1000, "--every-steps", 1500, store=store, stdout=DEVNULL)
            wait_for(lambda: False, rng.uniform(0.3, 0.9))
            sigkill(proc)
            landed["restore killed"] += 1
        cks = _check_store(store, tmp_path, cli=t % 3 == 2)
        branch = [c for c in cks if c.id > last]
        assert branch[0].parent == last and branch[0].step == EVERY * last + 777
        assert [c.parent for c in branch[1:]] == [c.id for c in branch[:-1]]
        assert [c.id for c in branch] == list(range(last + 1, last + 1 + len(branch)))
        remove_store(store)
    print(f"kills: {KILLS}, landed: {landed}")
    assert landed["after base"] >= KILLS // 2


@kvm
def test_kill_before_the_base_commits_then_a_fresh_run_works(tmp_path):
    for attempt in range(5):
        store = tmp_path / f"early{attempt}.db"
        # a big RAM makes the base write long; kill as soon as the file appears
        proc = spawn("run", "--mem", "256M", "--seed", SEED, "--checkpoints", 1000, "--every-steps", EVERY,
                     store=store, stdout=DEVNULL)
        assert wait_for(lambda: store.exists() or proc.poll() is not None, 30, interval=0.0001)
        sigkill(proc)
        try:
            with open_ro(store) as st:
                committed = len(st.checkpoints())
        except Exception:
            committed = 0
        if committed:
            continue  # the base made it: not the case under test, try again
        # nothing was committed: the path must be usable for a fresh run
        r = snapctl("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 2, "--every-steps", EVERY, store=store)
        assert r.code == 0, r.err
        cks = _check_store(store, tmp_path, cli=True)
        assert [c.step for c in cks] == [0, EVERY, 2 * EVERY]
        return
    # every attempt committed its base (e.g. the store only appears once the base is in): nothing to recover
