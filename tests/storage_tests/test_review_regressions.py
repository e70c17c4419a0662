"""Regression tests for bugs a review of store schema 2 found (each failed
before its fix): data that became unreadable after a prune, a stale delta
dictionary across Store objects, a checkpoint committed after a failed
add_pages, a catalogue race, and raw exceptions on damaged rows."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from storage_helpers import PAGE
from storage import CorruptionError, Store, StoreError

RNG = np.random.default_rng(1)


def rnd():
    return RNG.integers(0, 256, PAGE, dtype=np.uint8)


def half_random():
    a = np.zeros(PAGE, np.uint8)
    a[:2048] = RNG.integers(0, 256, 2048, dtype=np.uint8)
    return a


def rows(*pages):
    return np.stack(pages)


def new_store(tmp_path, name="s.snap", pages=64):
    return Store.create(str(tmp_path / name), {"mem_size": pages * PAGE}, synchronous="OFF")


def test_prune_keeps_the_base_of_a_delta_no_map_names(tmp_path):
    """Compaction once freed the base of a stored but unnamed delta; a later
    checkpoint deduplicated to that delta and could not be read."""
    with new_store(tmp_path) as st:
        with st.checkpoint(None) as w:
            w.add_pages([63], rows(rnd()))
        a, r1 = half_random(), rnd()
        with st.checkpoint(0) as w:
            w.add_pages([0, 1], rows(a, r1))
        a2 = a.copy()
        a2[:8] ^= 0xFF
        with st.checkpoint(1) as w:                        # a2 is a delta on a
            w.add_pages([0, 10], rows(a2, rnd()))
            assert w.stats["delta_blobs"] == 1
        with st.checkpoint(2) as w:                        # nothing names a2 any more
            w.add_pages([0], rows(rnd()))
        st.prune(keep_ids=[3])
        assert st.verify().ok
        with st.checkpoint(3) as w:                        # a2's content again
            w.add_pages([20], rows(a2))
        assert st.read_page(4, 20) == a2.tobytes()
        assert st.verify().ok


def test_blob_ids_are_never_reused_across_store_objects(tmp_path):
    """A pack dropped at commit gave its blob ids back; another Store object
    reused one for other content, and the first one's dictionary cache
    (keyed by blob id) then encoded a delta against the wrong bytes."""
    a_store = new_store(tmp_path)
    try:
        with a_store.checkpoint(None) as w:
            w.add_pages([63], rows(rnd()))
        x = half_random()
        with a_store.checkpoint(0) as w:
            w.add_pages([1], rows(half_random()))
            w.add_pages([5], rows(x))
            w.add_pages([5], rows(np.zeros(PAGE, np.uint8)))   # x's pack is dropped
        with Store.open(a_store.filename, synchronous="OFF") as b_store:
            y = x.copy()
            y[:800] ^= 0x5A
            with b_store.checkpoint(1) as w:
                w.add_pages([2], rows(y))
        y2 = x.copy()
        y2[4000:4008] ^= 1
        with a_store.checkpoint(2) as w:
            w.add_pages([2], rows(y2))
        assert a_store.read_page(3, 2) == y2.tobytes()
        with Store.open(a_store.filename, readonly=True) as again:
            assert again.read_page(3, 2) == y2.tobytes()
            assert again.verify().ok
    finally:
        a_store.close()


def test_a_failed_add_pages_means_the_checkpoint_is_not_committed(tmp_path, monkeypatch):
    """A pack insert that fails in the insert thread surfaces in a later call;
    a caller that catches it must not be able to commit the checkpoint."""
    from storage import validate
    with new_store(tmp_path, pages=1024) as st:
        with st.checkpoint(None) as w:
            w.add_pages([1023], rows(rnd()))
        path = st.filename
    # reopened with SQLite's length limit (set on every connection from this constant) at
    # 512 KiB: a ~1 MiB pack row fails inside SQLite, in the pack-insert thread
    monkeypatch.setattr(validate, "MAX_VALUE_BYTES", 512 * 1024)
    with Store.open(path, synchronous="OFF") as st:
        big = np.stack([rnd() for _ in range(256)])                    # one ~1 MiB pack
        failures = []
        with pytest.raises(StoreError, match="checkpoint not written"):
            with st.checkpoint(0) as w:
                w.add_pages(np.arange(256), big)
                for i in range(6):
                    try:
                        w.add_pages([300 + i], rows(rnd()))
                    except StoreError as exc:
                        failures.append(str(exc))
        assert failures and "too big" in failures[0]               # not "database damaged"
        assert [c.id for c in st.checkpoints()] == [0]
        assert st.verify().ok
        with st.checkpoint(0) as w:                                # the store goes on
            w.add_pages([0], rows(rnd()))
        assert st.verify().ok


def test_a_reader_between_commit_and_catalogue_update(tmp_path, monkeypatch):
    """A reader thread that extends the shared catalogue with the pack just
    committed, before the writer folds it in, made the writer mark its own
    pack damaged."""
    from storage.index import BlobIndex
    with new_store(tmp_path) as st:
        with st.checkpoint(None) as w:
            w.add_pages([0], rows(rnd()))
        orig = BlobIndex.after_commit
        seen = []

        def reader_first(self, *args):
            t = threading.Thread(target=lambda: seen.append(st.read_page(1, 1)))
            t.start()
            t.join()
            return orig(self, *args)

        monkeypatch.setattr(BlobIndex, "after_commit", reader_first)
        p1 = rnd()
        with st.checkpoint(0) as w:
            w.add_pages([1], rows(p1))
        monkeypatch.setattr(BlobIndex, "after_commit", orig)
        assert seen == [p1.tobytes()]
        assert st.read_page(1, 1) == p1.tobytes()
        with st.checkpoint(1) as w:                                # and it goes on
            w.add_pages([2], rows(p1))
        assert st.read_page(2, 2) == p1.tobytes()


def _damaged(tmp_path, sql):
    path = str(tmp_path / "d.snap")
    with Store.create(path, {"mem_size": 8 * PAGE}, synchronous="OFF") as st:
        for c in range(3):
            with st.checkpoint(c - 1 if c else None) as w:
                w.add_pages([c], rows(rnd()))
    with sqlite3.connect(path) as con:
        for stmt in sql:
            con.execute(stmt)
    return path


@pytest.mark.parametrize("sql", [
    ["UPDATE checkpoints SET parent = 2 WHERE id = 1"],              # a cycle
    ["UPDATE checkpoints SET parent = 99 WHERE id = 2"],             # a missing parent
    ["UPDATE checkpoints SET meta = '{x' WHERE id = 1"],             # damaged JSON
    ["UPDATE checkpoints SET digest = 'text' WHERE id = 1"],         # digest not bytes
], ids=["parent-cycle", "parent-missing", "meta-json", "digest-text"])
def test_damaged_rows_raise_store_errors(tmp_path, sql):
    path = _damaged(tmp_path, sql)
    with Store.open(path) as st:
        with pytest.raises(CorruptionError):
            st.checkpoints()
            st.materialize(2, np.zeros((8, PAGE), np.uint8))
        assert not st.verify().ok


def test_damaged_meta_and_missing_map_stop_writes_and_prune_cleanly(tmp_path):
    path = _damaged(tmp_path, ["UPDATE meta SET value = 'x' WHERE key = 'next_checkpoint_id'"])
    with Store.open(path) as st:
        with pytest.raises(CorruptionError, match="meta table damaged"):
            with st.checkpoint(2) as w:
                w.add_pages([5], rows(rnd()))
    p3 = tmp_path / "m"
    p3.mkdir()
    path3 = _damaged(p3, ["DELETE FROM maps WHERE ckpt = 1"])
    with Store.open(path3) as st:
        with pytest.raises(CorruptionError, match="page map missing"):
            st.prune(keep_last=1)
        assert [c.id for c in st.checkpoints()] == [0, 1, 2]       # nothing changed


def test_a_pack_id_out_of_range_is_damage_not_a_crash(tmp_path):
    path = _damaged(tmp_path, ["UPDATE packs SET id = 2147483650 WHERE id = 1",
                               "UPDATE pack_data SET id = 2147483650 WHERE id = 1"])
    with Store.open(path) as st:
        with pytest.raises(CorruptionError):
            st.materialize(2, np.zeros((8, PAGE), np.uint8))
        assert any("out of range" in p for p in st.verify().problems)


def test_a_damaged_configuration_is_refused(tmp_path):
    import json
    path = _damaged(tmp_path, [f"UPDATE meta SET value = '{json.dumps({'mem_size': -4096})}' "
                               "WHERE key = 'config'"])
    with pytest.raises(CorruptionError, match="configuration is damaged"):
        Store.open(path)
