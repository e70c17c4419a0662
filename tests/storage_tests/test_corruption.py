"""Damage to stored bytes is caught by verify() and by every read path;
wrong bytes are never returned."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from storage_helpers import PAGE, random_pages
from storage import CorruptionError, Store

N = 16


@pytest.fixture
def damaged_store(tmp_path):
    """A store with raw, lz4 and lz4-delta blobs; yields (store, path, images)."""
    path = str(tmp_path / "s.snap")
    rng = np.random.default_rng(7)
    st_ = Store.create(path, {"mem_size": N * PAGE}, synchronous="OFF")
    img0 = np.zeros((N, PAGE), np.uint8)
    img0[:6] = random_pages(rng, 6, "text")
    img0[6:9] = random_pages(rng, 3, "random")
    with st_.checkpoint(None, {"step": 0}) as w:
        w.add_pages(np.arange(N), img0)
        w.add_state("vcpu0", b"regs" * 10)
    img1 = img0.copy()
    img1[0, 100:140] = 1                  # small edits: delta blobs
    img1[7, 5:9] = 2
    with st_.checkpoint(0, {"step": 1}) as w:
        w.add_pages(np.array([0, 7]), img1[[0, 7]])
    yield st_, path, {0: img0, 1: img1}
    st_.close()


def blobs(path):
    with sqlite3.connect(path) as c:
        return c.execute("SELECT id, codec, length(data) FROM blobs ORDER BY id").fetchall()


def flip(path, blob, offset):
    with sqlite3.connect(path) as c:
        data = bytearray(c.execute("SELECT data FROM blobs WHERE id = ?", (blob,)).fetchone()[0])
        data[offset] ^= 0xFF
        c.execute("UPDATE blobs SET data = ? WHERE id = ?", (bytes(data), blob))


def users(path, blob):
    """(ckpt, page) whose image depends on this blob (directly or as delta base)."""
    with sqlite3.connect(path) as c:
        return c.execute(
            "SELECT v.ckpt, v.page FROM versions v JOIN blobs b ON b.id = v.blob "
            "WHERE b.id = ? OR b.base = ?", (blob, blob)).fetchall()


def test_fixture_has_every_codec(damaged_store):
    _, path, _ = damaged_store
    assert {c for _, c, _ in blobs(path)} == {0, 1, 2}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10**6), where=st.floats(0, 1, exclude_max=True))
def test_any_flipped_byte_is_caught(damaged_store, pick, where):
    st_, path, images = damaged_store
    rows = blobs(path)
    blob, codec, size = rows[pick % len(rows)]
    offset = int(where * size)
    flip(path, blob, offset)
    try:
        rep = st_.verify()
        assert not rep.ok
        assert any(f"blob {blob}" in p for p in rep.problems), rep.problems
        # Every read that depends on the blob raises, naming checkpoint and page.
        for ckpt, page in users(path, blob):
            with pytest.raises(CorruptionError) as ei:
                st_.read_page(ckpt, page)
            assert f"checkpoint {ckpt}" in str(ei.value) and f"page {page}" in str(ei.value)
            assert ei.value.page == page
            out = np.zeros((N, PAGE), np.uint8)
            with pytest.raises(CorruptionError):
                st_.materialize(ckpt, out)
        # Reads that do not depend on it still work and are right.
        bad = set(users(path, blob))
        for ckpt, img in images.items():
            for page in range(N):
                if (ckpt, page) not in bad and not any(c <= ckpt and p == page for c, p in bad):
                    assert st_.read_page(ckpt, page) == img[page].tobytes()
    finally:
        flip(path, blob, offset)           # undo: the store verifies again
    assert st_.verify().ok


def test_every_byte_of_a_delta_and_its_base(damaged_store):
    """Exhaustive over two small blobs: a delta and (a prefix of) its base."""
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        delta, base, size = c.execute(
            "SELECT id, base, length(data) FROM blobs WHERE codec = 2 ORDER BY length(data)").fetchone()
    for blob, n in ((delta, size), (base, 64)):
        for off in range(n):
            flip(path, blob, off)
            try:
                assert any(f"blob {blob}" in p for p in st_.verify().problems), (blob, off)
                ckpt, page = users(path, delta)[0]
                with pytest.raises(CorruptionError):
                    st_.read_page(ckpt, page)
            finally:
                flip(path, blob, off)


def test_tampered_metadata_is_reported(damaged_store):
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        c.execute("UPDATE refs SET n = n + 1 WHERE blob = 1")
        c.execute("UPDATE checkpoints SET digest = zeroblob(16) WHERE id = 1")
        c.execute("UPDATE states SET data = X'00' WHERE ckpt = 0")
        c.execute("INSERT INTO versions(page, ckpt, blob, chk) VALUES (3, 1, 999, 0)")
    problems = "\n".join(st_.verify().problems)
    assert "blob 1: reference count" in problems
    assert "checkpoint 1: image digest" in problems
    assert "checkpoint 0: state 'vcpu0'" in problems
    assert "checkpoint 1, page 3: references missing blob 999" in problems
    with pytest.raises(CorruptionError):
        st_.state(0, "vcpu0")


def test_broken_tree_link_is_reported(damaged_store):
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        c.execute("UPDATE checkpoints SET parent = 5 WHERE id = 1")
    assert any("checkpoint 1: parent 5 does not exist" in p for p in st_.verify().problems)


def test_version_row_naming_another_valid_blob_is_caught(damaged_store):
    """Blob hashes cannot see this; the row's check value and the image
    digest do."""
    st_, path, images = damaged_store
    with sqlite3.connect(path) as c:
        (other,) = c.execute("SELECT blob FROM versions WHERE page = 2 AND ckpt = 0").fetchone()
        c.execute("UPDATE versions SET blob = ? WHERE page = 3 AND ckpt = 0", (other,))
    for ckpt in (0, 1):
        with pytest.raises(CorruptionError, match=f"checkpoint {ckpt}, page 3"):
            st_.read_page(ckpt, 3)
        with pytest.raises(CorruptionError):
            st_.materialize(ckpt, np.zeros((N, PAGE), np.uint8))
    assert st_.read_page(1, 2) == images[1][2].tobytes()        # undamaged rows still read
    with pytest.raises(CorruptionError):
        st_.diff(0, 1)
    with pytest.raises(CorruptionError, match="page 3"):
        st_.history(3)
    assert any("checkpoint 0, page 3: version row" in p for p in st_.verify().problems)


def test_lost_version_row_is_caught_by_the_digest(damaged_store):
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        c.execute("DELETE FROM versions WHERE page = 4 AND ckpt = 0")
    with pytest.raises(CorruptionError, match="checkpoint 1: restored image does not match"):
        st_.materialize(1, np.zeros((N, PAGE), np.uint8))
    problems = st_.verify().problems
    assert any("checkpoint 0: image digest" in p for p in problems), problems


def test_damaged_sqlite_pages_are_store_errors_never_wrong_bytes(damaged_store, tmp_path):
    """Garbage over whole SQLite pages (b-tree damage): every call either
    returns the right bytes or raises a StoreError; never sqlite3.Error."""
    from storage import StoreError
    st_, path, images = damaged_store
    st_.close()
    pristine = open(path, "rb").read()
    page_size = 16384
    rng = np.random.default_rng(11)
    for pg in range(1, len(pristine) // page_size):
        bad = tmp_path / f"bad{pg}.snap"
        data = bytearray(pristine)
        data[pg * page_size:(pg + 1) * page_size] = rng.integers(0, 256, page_size, np.uint8).tobytes()
        bad.write_bytes(bytes(data))
        try:
            s = Store.open(bad)
        except StoreError:
            continue
        with s:
            try:
                rep = s.verify()
            except StoreError:
                rep = None
            out = np.zeros((N, PAGE), np.uint8)
            for ckpt, img in images.items():
                try:
                    s.materialize(ckpt, out)
                except StoreError:
                    continue
                assert np.array_equal(out, img), f"db page {pg}: wrong bytes for checkpoint {ckpt}"
            assert rep is None or all(isinstance(p, str) and p for p in rep.problems)
