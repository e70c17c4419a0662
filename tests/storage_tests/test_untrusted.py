"""A store someone else made, at the API level (no KVM): the schema is checked
before anything reads it, forged values are named, a forged blob is never
deduplicated against, a second writing process is refused, and the writer
refuses what the reader would refuse. The CLI corpus and fuzzer are in
tests/test_rel_untrusted_store.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from storage_helpers import random_pages
from storage import (CorruptionError, InvalidArgumentError, NotAStoreError, Store, StoreBusyError,
                     StoreError)
from storage.codec import content_hash
from storage.packs import pack_meta_check


def _sql(path, *statements):
    conn = sqlite3.connect(path, isolation_level=None)
    for s in statements:
        conn.execute(s)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.fixture
def two(make_store, store_path):
    """A closed store with checkpoints 0 (pages 0..7) and 1 (page 3 rewritten)."""
    st = make_store(16)
    rng = np.random.default_rng(1)
    with st.checkpoint(None, {"step": 0}) as w:
        w.add_pages(np.arange(8), random_pages(rng, 8))
    with st.checkpoint(0, {"step": 1}) as w:
        w.add_pages([3], random_pages(rng, 1))
    st.close()
    return str(store_path)


@pytest.mark.parametrize("statements, needle", [
    (["ALTER TABLE meta RENAME TO m0", "CREATE VIEW meta AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
      "SELECT i + 1 FROM r) SELECT 'k' || i AS key, 'v' AS value FROM r"], "m0|view"),
    (["CREATE TRIGGER t AFTER INSERT ON tags BEGIN DELETE FROM pack_data; END"], "trigger"),
    (["CREATE INDEX ix ON packs(abs(first))"], "index"),
    (["ALTER TABLE tags ADD COLUMN g INTEGER GENERATED ALWAYS AS (length(name)) VIRTUAL"], "not ours"),
    (["CREATE TABLE evil (x)"], "evil"),
    (["ALTER TABLE refs RENAME TO r0", "CREATE TABLE refs (pack INTEGER PRIMARY KEY, n INTEGER NOT NULL "
      "DEFAULT (length(zeroblob(1000))))", "INSERT INTO refs SELECT * FROM r0", "DROP TABLE r0"], "default"),
], ids=["view", "trigger", "index", "generated", "extra-table", "default"])
def test_a_schema_that_is_not_ours_is_refused_before_use(two, statements, needle):
    _sql(two, *statements)
    for ro in (False, True):
        with pytest.raises(NotAStoreError, match=needle):
            Store.open(two, readonly=ro)


@pytest.mark.parametrize("statement, call, needle", [
    ("UPDATE checkpoints SET created = 'yesterday' WHERE id = 1", "checkpoints", "checkpoints.created"),
    ("UPDATE checkpoints SET meta = '[1]' WHERE id = 1", "checkpoints", "checkpoints.meta"),
    ("UPDATE checkpoints SET parent = 1 WHERE id = 0", "path", "parent"),
    ("UPDATE checkpoints SET parent = 99 WHERE id = 1", "prune", "parent 99"),
    ("INSERT INTO tags VALUES ('ghost', 99)", "prune", "unknown checkpoint 99"),
    ("UPDATE meta SET value = json_set(value, '$.mem_size', 1099511627776) WHERE key = 'config'", "open",
     "mem_size"),
])
def test_forged_values_are_named(two, statement, call, needle):
    _sql(two, statement)
    with pytest.raises(CorruptionError, match=needle):
        with Store.open(two) as st:
            {"checkpoints": st.checkpoints, "path": lambda: st.path(1),
             "prune": lambda: st.prune(keep_last=1), "open": lambda: None}[call]()
    with Store.open(two, readonly=True) if call != "open" else _nothing() as st:
        if st is not None:
            assert not st.verify().ok


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_forged_blob_is_never_deduplicated_against(two):
    """A pack whose declared hash is that of a page written later, with other
    bytes: the later checkpoint stores the page itself and reads back exactly."""
    future = random_pages(np.random.default_rng(9), 1)
    with Store.open(two) as st:
        with st.checkpoint(1, {"step": 2}) as w:
            w.add_pages([9], random_pages(np.random.default_rng(10), 1))   # the pack to forge
    conn = sqlite3.connect(two, isolation_level=None)
    pid, first, n, codecs, bases, hashes, ends, crcs = conn.execute(
        "SELECT id, first, n, codecs, bases, hashes, ends, crcs FROM packs ORDER BY id DESC LIMIT 1").fetchone()
    h = content_hash(future[0].tobytes())
    conn.execute("UPDATE packs SET hashes = ?, mchk = ? WHERE id = ?",
                 (h, pack_meta_check(pid, first, n, codecs, bases, h, ends, crcs), pid))
    conn.close()
    with Store.open(two) as st:
        with st.checkpoint(1, {"step": 3}) as w:
            w.add_pages([5], future)
        assert w.stats["new_blobs"] == 1
        assert st.read_page(w.id, 5) == future[0].tobytes()


def test_a_second_writing_process_is_refused_while_readers_read(two):
    child = subprocess.Popen([sys.executable, "-c", "import sys\nfrom storage import Store\n"
                              f"st = Store.open({two!r})\nst.tag(1, 'held')\nprint('ready', flush=True)\n"
                              "sys.stdin.read()\nst.close()\n"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready"
        with Store.open(two) as st:
            assert [c.id for c in st.checkpoints()] == [0, 1]
            with pytest.raises(StoreBusyError, match="in use"):
                st.tag(0, "mine")
            with pytest.raises(StoreBusyError):
                with st.checkpoint(1, {}):
                    pass
            with pytest.raises(StoreBusyError):
                st.claim()
    finally:
        child.communicate(b"", timeout=60)
    with Store.open(two) as st:           # its writer is gone
        st.tag(0, "mine")


def test_two_store_objects_of_one_process_share_the_writer_lock(two):
    with Store.open(two) as a, Store.open(two) as b:
        a.tag(0, "a")
        b.tag(1, "b")


def test_the_writer_refuses_what_the_reader_would_refuse(make_store):
    st = make_store(4)
    deep = [1]
    for _ in range(40):
        deep = [deep]
    for meta, needle in (({"step": -1}, "step"), ({"trigger": "x" * 100}, "trigger"), ({"x": deep}, "nested")):
        with pytest.raises(InvalidArgumentError, match=needle):
            st.checkpoint(None, meta)
    with pytest.raises(InvalidArgumentError, match="tag name"):
        st.tag(0, "x" * 2000)
    with pytest.raises(InvalidArgumentError, match="mem_size"):
        Store.create(st.filename + "-2", {"mem_size": 1 << 40})
