"""The checkpoint pipeline: merge of failed captures, write failures, pre-copy."""

from __future__ import annotations

import numpy as np
import pytest

from guest_models import DATA_GPA, PAGE, data_split, stamp_image
from kvm_helpers import kvm
from snapctl.checkpoint import captures
from snapctl.checkpoint.captures import Capture, merge
from snapctl.checkpoint.schedule import Schedule
from snapctl.checkpoint.session import Checkpointer
from snapctl.checkpoint.writer import CheckpointWriteError
from snapctl.machine import Machine, MachineConfig
from storage import Store


def _cap(pages, data):
    return Capture(np.array(pages, np.int64), np.array(data, np.uint8).reshape(len(pages), PAGE), [], [0], "sync")


def test_merge_equals_applying_both_in_order():
    seed = 5
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(50):
        image = np.zeros((64, PAGE), np.uint8)
        a_pages = np.unique(rng.integers(0, 64, 20))
        b_pages = np.unique(rng.integers(0, 64, 20))
        a = _cap(a_pages, rng.integers(0, 255, (a_pages.size, PAGE)))
        b = _cap(b_pages, rng.integers(0, 255, (b_pages.size, PAGE)))
        want = image.copy()
        want[a.pages] = a.data
        want[b.pages] = b.data
        m = merge(a, b)
        got = image.copy()
        got[m.pages] = m.data
        assert np.array_equal(got, want)
        assert np.all(np.diff(m.pages) > 0)
        assert m.timings["carried_pages"] == np.setdiff1d(a_pages, b_pages).size


def _stamp_ok(store, ckpt, mem):
    img = np.empty((mem // PAGE, PAGE), np.uint8)
    store.materialize(ckpt, img)
    (first, pages), = data_split(mem, 1)
    return np.array_equal(img[DATA_GPA // PAGE:], stamp_image(1, pages, store.get(ckpt).step))


@kvm
def test_a_failed_write_is_carried_into_the_next_checkpoint(tmp_path, monkeypatch):
    real_commit = captures.commit
    calls = {"n": 0}

    def flaky_commit(store, parent, cap, extra=None, **kw):
        calls["n"] += 1
        if calls["n"] in (3, 4):  # checkpoints 3 and 4 of the schedule fail (the base is call 1)
            raise OSError(28, "No space left on device (injected)")
        return real_commit(store, parent, cap, extra, **kw)

    monkeypatch.setattr(captures, "commit", flaky_commit)
    mem = 16 << 20
    cfg = MachineConfig(guest="stamp", mem_size=mem, ring_entries=256)
    with Machine(cfg) as m, Store.create(tmp_path / "f.db", cfg.to_dict()) as st:
        cp = Checkpointer(m, st, None)
        cp.base()
        cp.run(Schedule(count=6, every_steps=3000))
        listed = st.checkpoints()
        assert [c.step for c in listed] == [0, 3000, 12000, 15000, 18000]  # 6000 and 9000 failed
        assert all(_stamp_ok(st, c.id, mem) for c in listed)
        assert st.get(listed[2].id).stats["carried_pages"] > 0
        assert st.verify().ok


@kvm
def test_writes_that_keep_failing_stop_the_run_and_keep_what_was_committed(tmp_path, monkeypatch):
    real_commit = captures.commit
    calls = {"n": 0}

    def broken_after_two(store, parent, cap, extra=None, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(5, "Input/output error (injected)")
        return real_commit(store, parent, cap, extra, **kw)

    monkeypatch.setattr(captures, "commit", broken_after_two)
    mem = 16 << 20
    cfg = MachineConfig(guest="stamp", mem_size=mem)
    with Machine(cfg) as m, Store.create(tmp_path / "g.db", cfg.to_dict()) as st:
        cp = Checkpointer(m, st, None)
        cp.base()
        with pytest.raises(CheckpointWriteError, match="Input/output error"):
            cp.run(Schedule(count=10, every_steps=2000))
        listed = st.checkpoints()
        assert [c.step for c in listed] == [0, 2000, 4000]
        assert all(_stamp_ok(st, c.id, mem) for c in listed)
        assert st.verify().ok


@kvm
@pytest.mark.parametrize("trigger", ["sync", "async"])
def test_precopy_images_equal_the_model(tmp_path, trigger):
    mem = 16 << 20
    cfg = MachineConfig(guest="stamp", mem_size=mem, ring_entries=256, steps_per_yield=500)
    sched = Schedule(count=6, every_steps=5000) if trigger == "sync" else Schedule(count=6, interval_ms=3)
    with Machine(cfg) as m, Store.create(tmp_path / "p.db", cfg.to_dict()) as st:
        cp = Checkpointer(m, st, None, precopy=True)
        cp.base()
        cp.run(sched)
        listed = st.checkpoints()[1:]
        assert sum(c.stats["precopied_pages"] for c in listed) > 0
        (first, pages), = data_split(mem, 1)
        img = np.empty((mem // PAGE, PAGE), np.uint8)
        for c in listed:
            st.materialize(c.id, img)
            data = img[DATA_GPA // PAGE:]
            assert (np.array_equal(data, stamp_image(1, pages, c.step))
                    or (trigger == "async" and np.array_equal(data, stamp_image(1, pages, c.step + 1)))), c.id


def test_the_writer_waits_out_a_pause_before_each_step(tmp_path, monkeypatch):
    """While the checkpointer's pause window is closed, the background writer begins no
    transaction and commits nothing; once it opens, the capture is committed whole."""
    import threading
    import time

    from snapctl.checkpoint.captures import PauseWindow
    from snapctl.checkpoint.writer import Writer
    monkeypatch.setattr(PauseWindow, "LONGEST", 600.0)   # the test's own stalls must not end a wait
    seed = 11
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    pages = np.unique(rng.integers(0, 64, 20))
    data = rng.integers(0, 255, (pages.size, PAGE))
    window = PauseWindow()
    with Store.create(tmp_path / "w.db", {"mem_size": 64 * PAGE}) as st:
        w = Writer(st, None, window=window)
        with window.closed():
            w.submit(_cap(pages, data))
            time.sleep(0.3)            # a writer that ignored the window would have committed by now
            assert st.checkpoints() == []
        done = threading.Thread(target=w.close)
        done.start()
        done.join(60)
        assert not done.is_alive()
        (c,) = st.checkpoints()
        img = np.zeros((64, PAGE), np.uint8)
        st.materialize(c.id, img)
        want = np.zeros((64, PAGE), np.uint8)
        want[pages] = data
        assert np.array_equal(img, want)
