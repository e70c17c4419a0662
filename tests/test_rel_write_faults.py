"""Fault 3: write failures during a checkpoint.

A real full disk (a small tmpfs) and injected I/O errors (the store's page
writer raises EIO). The run stops with one clear error line or retries; every
checkpoint committed before stays valid; the pages harvested for a failed
checkpoint are not lost: a later checkpoint still equals the model.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest

from cli_helpers import Result, one_line_error, snapctl
from guest_models import data_split
from kvm_helpers import kvm
from rel_helpers import StampTimeline, data_area, image, model_data, open_ro, stamp_matches

MEM = 16 << 20


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _disk_full_run(tmpfs):
    store = tmpfs / "full.db"
    r = snapctl("run", "--guest", "random", "--mem", "16M", "--seed", 11, "--checkpoints", 1000,
                "--every-steps", 3000, store=store, timeout=120)
    return store, r


def _check_random_store(path, seed: int = 11) -> list:
    """verify passes; every checkpoint equals the `random` model at its step."""
    with open_ro(path) as st:
        rep = st.verify()
        assert rep.ok, rep.problems
        cks = sorted(st.checkpoints(), key=lambda c: c.step)
        model = model_data("random", seed, 0, MEM, 1)
        for c in cks:
            model.run_to(c.step)
            assert np.array_equal(data_area(image(st, c.id), MEM, 1, 0), model.mem), f"checkpoint {c.id}"
    return cks


@kvm
def test_disk_full_stops_the_run_cleanly_and_keeps_committed_checkpoints(tmpfs, tmp_path):
    store, r = _disk_full_run(tmpfs)
    line = one_line_error(r, 1)
    assert "intact" in line or "full" in line.lower() or "space" in line.lower(), line
    # copy the store (with its WAL) off the full disk and check it there
    safe = tmp_path / "safe.db"
    for suffix in ("", "-wal"):
        if os.path.exists(f"{store}{suffix}"):
            shutil.copy(f"{store}{suffix}", f"{safe}{suffix}")
    cks = _check_random_store(safe)
    assert len(cks) >= 2, "the tmpfs should hold a few checkpoints before it fills"
    ids = sorted(c.id for c in cks)
    assert ids == list(range(len(ids)))
    # the same store still works once there is room: restore from the last checkpoint
    rr = snapctl("restore", ids[-1], "--steps", 500, "--json", store=safe)
    assert rr.code == 0, rr.err
    cks2 = _check_random_store(safe)
    assert len(cks2) == len(cks) + 1


@kvm
def test_disk_full_error_names_the_full_disk(tmpfs):
    """Regression guard: the error used to say 'cannot rollback - no transaction is active' (the
    writer's own ROLLBACK after SQLite had rolled back) instead of the full disk."""
    _, r = _disk_full_run(tmpfs)
    line = one_line_error(r, 1)
    assert "full" in line.lower() or "no space" in line.lower(), line


# -- injected I/O errors ---------------------------------------------------------------------------

INJECT = textwrap.dedent("""
    import errno, os, sys
    import storage.store as s
    fail_from, fail_count = int(os.environ["REL_FAIL_FROM"]), int(os.environ["REL_FAIL_COUNT"])
    calls = [0]
    real = s.CheckpointWriter.add_pages
    def add_pages(self, *a, **k):
        calls[0] += 1
        if fail_from <= calls[0] < fail_from + fail_count:
            with open(os.environ["REL_FAIL_LOG"], "a") as f:
                f.write(str(calls[0]) + chr(10))
            raise OSError(errno.EIO, "injected I/O error")
        return real(self, *a, **k)
    s.CheckpointWriter.add_pages = add_pages
    from snapctl.cli import main
    sys.argv[0] = "snapctl"
    main(sys.argv[1:])
""")


def _run_injected(args, store, fail_from: int, fail_count: int) -> Result:
    """The real CLI, with the store's page writer raising EIO on calls fail_from .. fail_from+count-1
    (call 1 is the base checkpoint)."""
    log = f"{store}.faults"
    r = snapctl(*args, store=store, code=INJECT, timeout=120,
                env={"REL_FAIL_FROM": str(fail_from), "REL_FAIL_COUNT": str(fail_count), "REL_FAIL_LOG": log})
    assert os.path.exists(log), "the injected fault never fired"
    return r


def _check_stamp_store(path, seed: int) -> list:
    P = data_split(MEM, 1)[0][1]
    with open_ro(path) as st:
        rep = st.verify()
        assert rep.ok, rep.problems
        cks = sorted(st.checkpoints(), key=lambda c: c.step)
        model = StampTimeline(seed, P)
        for c in cks:
            assert stamp_matches(data_area(image(st, c.id), MEM, 1, 0), model.at(c.step)), \
                f"checkpoint {c.id} (step {c.step}) lost pages: it differs from the model"
    return cks


@kvm
@pytest.mark.parametrize("fail_from", [2, 4, 7])
def test_a_transient_io_error_loses_no_harvested_pages(tmp_path, fail_from):
    """One write fails (EIO), later ones succeed: the run carries on (or stops cleanly),
    and every checkpoint after the failure still equals the model: the pages
    harvested for the failed checkpoint reached the store."""
    store = tmp_path / "eio.db"
    r = _run_injected(["run", "--mem", "16M", "--seed", 13, "--checkpoints", 8, "--every-steps", 2000, "--json"],
                      store, fail_from, 1)
    if r.code != 0:
        one_line_error(r, 1)
    cks = _check_stamp_store(store, 13)
    steps = [c.step for c in cks]
    assert all(s % 2000 == 0 for s in steps) and steps == sorted(set(steps))
    if r.code == 0:  # retried: the run reached its last target, with the failed one folded into a later one
        assert steps[-1] == 8 * 2000, steps
        assert len(cks) >= 8
    # the checkpoints before the failure are all there
    assert [c.step for c in cks[:fail_from - 1]] == [2000 * k for k in range(fail_from - 1)]
    if r.code == 0:
        assert len(cks) in (8, 9)  # the failed one folded into the next (8) or written again (9)


@kvm
def test_persistent_io_errors_stop_the_run_with_one_line_and_keep_the_rest(tmp_path):
    store = tmp_path / "eio.db"
    r = _run_injected(["run", "--mem", "16M", "--seed", 13, "--checkpoints", 50, "--every-steps", 2000],
                      store, 4, 10 ** 6)
    line = one_line_error(r, 1)
    assert "i/o error" in line.lower() or "injected" in line.lower(), line
    cks = _check_stamp_store(store, 13)
    assert [c.id for c in cks] == [0, 1, 2], [c.id for c in cks]
    # the store is fine for a restore afterwards
    rr = snapctl("restore", 2, "--steps", 100, "--json", store=store)
    assert rr.code == 0, rr.err
    assert len(_check_stamp_store(store, 13)) == 4


@kvm
def test_an_io_error_during_restore_keeps_the_branch_consistent(tmp_path):
    store = tmp_path / "eio.db"
    assert snapctl("run", "--mem", "16M", "--seed", 13, "--checkpoints", 3, "--every-steps", 2000,
                   store=store).code == 0
    r = _run_injected(["restore", 1, "--checkpoints", 6, "--every-steps", 1000], store, 3, 1)
    if r.code != 0:
        one_line_error(r, 1)
    cks = _check_stamp_store(store, 13)
    branch = [c for c in cks if c.id > 3]
    assert branch and branch[0].parent == 1
    if r.code == 0:
        assert max(c.step for c in branch) == 2000 + 6 * 1000
