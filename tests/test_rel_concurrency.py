"""Fault 4: readers (`list`, `show`, `read`, `diff`, `verify`) looping while `run` writes.

Readers in other processes (the real CLI) and reader threads in this process
(the Store API, read-only) run against a store that `snapctl run` is writing:
no errors, no "database is locked", and everything they see is committed and
consistent (a checkpoint read while the writer runs equals the stamp model).
"""

from __future__ import annotations

import threading
import time
from subprocess import DEVNULL

import numpy as np
import pytest

from cli_helpers import snapctl, spawn
from guest_models import data_split
from kvm_helpers import kvm
from rel_helpers import StampTimeline, data_area, image, open_ro, scaled, sigkill, stamp_matches, wait_for

MEM = 16 << 20
SEED = 21
EVERY = 2000
SECONDS = 6 * scaled(1)  # CI 6 s of reading, full run (SNAPCTL_REL_SCALE=10) 60 s
HANG_S = 600
#: reads that must be done, however long they take, for the test to mean something
MIN_CLI, MIN_API = 5, 10


@kvm
@pytest.mark.slow
def test_readers_loop_while_run_writes(tmp_path):
    store = tmp_path / "live.db"
    writer = spawn("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 100000, "--every-steps", EVERY,
                   store=store, stdout=DEVNULL)
    errors: list[str] = []
    counts = {"cli": 0, "api": 0}
    stop = threading.Event()
    P = data_split(MEM, 1)[0][1]

    def api_reader(k: int):
        try:
            with open_ro(store) as st:
                while not stop.is_set():
                    cks = st.checkpoints()
                    last = cks[-1]
                    assert [c.id for c in cks] == list(range(len(cks)))
                    st.get(last.id)
                    st.read(last.id, (2 << 20) + k * 4096, 4096)
                    st.diff(0, last.id)
                    st.history(512 + k)
                    if counts["api"] % 10 == 5:
                        rep = st.verify()
                        assert rep.ok, rep.problems
                    if k == 0:  # one thread also checks content against the model
                        data = data_area(image(st, last.id), MEM, 1, 0)
                        assert stamp_matches(data, StampTimeline(SEED, P).at(last.step)), last.id
                    counts["api"] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"api reader {k}: {type(e).__name__}: {e}")

    try:
        assert wait_for(lambda: store.exists() and snapctl("list", "--json", store=store).code == 0
                        and snapctl("list", "--json", store=store).json(), 30, interval=0.05), writer.stderr
        threads = [threading.Thread(target=api_reader, args=(k,)) for k in range(1)]
        for t in threads:
            t.start()
        # Read for SECONDS, and on a loaded machine on until enough reads were done to mean
        # something: the counts below are a minimum amount of work, never a rate. Only a
        # reader stuck for HANG_S fails for time (a hang).
        end, hang = time.monotonic() + SECONDS, time.monotonic() + HANG_S
        rounds = 0
        while ((time.monotonic() < end or counts["cli"] < MIN_CLI or counts["api"] < MIN_API) and writer.poll() is None
               and time.monotonic() < hang):
            rounds += 1
            r = snapctl("list", "--json", store=store)
            results = [("list", r)]
            if r.code == 0:
                last = r.json()[-1]["id"]
                results += [("show", snapctl("show", last, "--json", store=store)),
                            ("read", snapctl("read", last, "0x200000", 64, store=store)),
                            ("diff", snapctl("diff", 0, last, "--json", store=store))]
                if rounds % 4 == 2:  # verify reads the whole store (seconds): not every round
                    results.append(("verify", snapctl("verify", "--json", store=store)))
            for name, res in results:
                counts["cli"] += 1
                if res.code != 0 or "locked" in res.err.lower() or "Traceback" in res.err:
                    errors.append(f"`snapctl {name}` exit {res.code}: {res.err.strip()[-300:]}")
        stop.set()
        for t in threads:
            t.join(60)
        assert writer.poll() is None, f"the writer stopped: {writer.stderr.read().decode()[-500:]}"
    finally:
        stop.set()
        sigkill(writer)
    print(f"reads: {counts}")
    assert not errors, "\n".join(errors[:20])
    assert counts["cli"] >= MIN_CLI and counts["api"] >= MIN_API, counts   # reached by the loop: never a rate
    # and the store the readers watched is whole
    with open_ro(store) as st:
        assert st.verify().ok


@kvm
def test_the_wal_stays_bounded_during_a_long_run(tmp_path):
    """Regression guard: before 2a13f03 the -wal grew ~15x the store within seconds (GBs over a
    long run) because the background PASSIVE WAL copy never let the WAL restart."""
    store = tmp_path / "wal.db"
    writer = spawn("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 100000, "--every-steps", EVERY,
                   store=store, stdout=DEVNULL)
    try:
        assert wait_for(lambda: store.exists(), 30)
        wait_for(lambda: False, 6)
        assert writer.poll() is None
        db = store.stat().st_size
        wal = (tmp_path / "wal.db-wal").stat().st_size
    finally:
        sigkill(writer)
    assert wal <= 4 * db + (32 << 20), f"-wal is {wal >> 20} MiB for a {db >> 20} MiB store"
