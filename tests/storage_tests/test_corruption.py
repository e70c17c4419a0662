"""Damage to stored bytes is caught by verify() and by every read path;
wrong bytes are never returned."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from storage_helpers import PAGE, blob_table, random_pages
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


def packs(path):
    """[(pack id, size)] straight from the table."""
    with sqlite3.connect(path) as c:
        return c.execute("SELECT id, size FROM packs ORDER BY id").fetchall()


def blob_span(path, blob):
    """(pack, start, end) of a blob in its pack's data, from the raw columns."""
    with sqlite3.connect(path) as c:
        for pid, first, n, ends in c.execute("SELECT id, first, n, ends FROM packs"):
            if first <= blob < first + n:
                e = np.frombuffer(ends, "<u4")
                i = blob - first
                return pid, int(e[i - 1]) if i else 0, int(e[i])
    raise KeyError(blob)


def flip(path, pack, offset):
    with sqlite3.connect(path) as c:
        data = bytearray(c.execute("SELECT data FROM pack_data WHERE id = ?", (pack,)).fetchone()[0])
        data[offset] ^= 0xFF
        c.execute("UPDATE pack_data SET data = ? WHERE id = ?", (bytes(data), pack))


def images_as_blobs(path):
    """ckpt -> blob id per page, from the maps (checkpoint 1's parent is 0)."""
    with sqlite3.connect(path) as c:
        maps = {k: (np.frombuffer(p, "<i8"), np.frombuffer(b, "<i8"))
                for k, p, b in c.execute("SELECT ckpt, pages, blobs FROM maps")}
    img = np.zeros(N, np.int64)
    out = {}
    for k in sorted(maps):
        img = img.copy()
        img[maps[k][0]] = maps[k][1]
        out[k] = img
    return out


def blob_at(path, pack, offset):
    """The blob whose stored bytes hold byte ``offset`` of the pack's data."""
    with sqlite3.connect(path) as c:
        first, ends = c.execute("SELECT first, ends FROM packs WHERE id = ?", (pack,)).fetchone()
    return first + int(np.searchsorted(np.frombuffer(ends, "<u4"), offset, side="right"))


def users(path, blob):
    """(ckpt, page) whose content depends on the blob (directly or as base)."""
    t = blob_table(path)
    return [(k, page) for k, img in images_as_blobs(path).items()
            for page, b in enumerate(img.tolist())
            if b and (b == blob or (t[b][0] == 2 and t[b][1] == blob))]


def test_fixture_has_every_codec(damaged_store):
    _, path, _ = damaged_store
    assert {c for c, _ in blob_table(path).values()} == {0, 1, 2}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10**6), where=st.floats(0, 1, exclude_max=True))
def test_any_flipped_byte_is_caught(damaged_store, pick, where):
    st_, path, images = damaged_store
    rows = packs(path)
    pack, size = rows[pick % len(rows)]
    offset = int(where * size)
    blob = blob_at(path, pack, offset)
    bad = set(users(path, blob))
    assert bad
    flip(path, pack, offset)
    try:
        rep = st_.verify()
        assert not rep.ok
        assert any(f"blob {blob}" in p and f"pack {pack}" in p for p in rep.problems), rep.problems
        # Every read that depends on the blob raises, naming checkpoint and page.
        for ckpt, page in bad:
            with pytest.raises(CorruptionError) as ei:
                st_.read_page(ckpt, page)
            assert f"checkpoint {ckpt}" in str(ei.value) and f"page {page}" in str(ei.value)
            assert ei.value.page == page
            out = np.zeros((N, PAGE), np.uint8)
            with pytest.raises(CorruptionError):
                st_.materialize(ckpt, out)
        # Reads that do not depend on it -- other blobs of the same pack
        # included -- still work and are right.
        for ckpt, img in images.items():
            for page in range(N):
                if (ckpt, page) not in bad:
                    assert st_.read_page(ckpt, page) == img[page].tobytes()
    finally:
        flip(path, pack, offset)           # undo: the store verifies again
    assert st_.verify().ok


def test_every_byte_of_a_delta_and_its_base(damaged_store):
    """Exhaustive over two small blobs: a delta and (a prefix of) its base."""
    st_, path, _ = damaged_store
    t = blob_table(path)
    delta = min(b for b, (c, _) in t.items() if c == 2)
    base = t[delta][1]
    dpack, ds, de = blob_span(path, delta)
    bpack, bs, _ = blob_span(path, base)
    (ckpt, page), = [(k, p) for k, img in images_as_blobs(path).items()
                     for p, b in enumerate(img.tolist()) if b == delta]
    for pack, blob, lo, hi in ((dpack, delta, ds, de), (bpack, base, bs, bs + 64)):
        for off in range(lo, hi):
            flip(path, pack, off)
            try:
                assert any(f"blob {blob}" in p for p in st_.verify().problems), (pack, off)
                with pytest.raises(CorruptionError):
                    st_.read_page(ckpt, page)
            finally:
                flip(path, pack, off)


def _rewrite_map(path, ckpt, pages, blobs):
    """Replace a map with a *consistent* one (valid check value): what a bug,
    not random damage, would leave."""
    import xxhash
    pb, bb = np.asarray(pages, "<i8").tobytes(), np.asarray(blobs, "<i8").tobytes()
    chk = xxhash.xxh3_64_intdigest(int(ckpt).to_bytes(8, "little") + pb + bb) & (2**63 - 1)
    with sqlite3.connect(path) as c:
        c.execute("UPDATE maps SET n = ?, pages = ?, blobs = ?, chk = ? WHERE ckpt = ?",
                  (len(pages), pb, bb, chk, ckpt))


def _map(path, ckpt):
    with sqlite3.connect(path) as c:
        p, b = c.execute("SELECT pages, blobs FROM maps WHERE ckpt = ?", (ckpt,)).fetchone()
    return np.frombuffer(p, "<i8").copy(), np.frombuffer(b, "<i8").copy()


def test_tampered_metadata_is_reported(damaged_store):
    st_, path, _ = damaged_store
    pages, blobs = _map(path, 1)
    at = np.searchsorted(pages, 3)
    _rewrite_map(path, 1, np.insert(pages, at, 3), np.insert(blobs, at, 999))
    with sqlite3.connect(path) as c:
        c.execute("UPDATE refs SET n = n + 1 WHERE pack = 1")
        c.execute("UPDATE checkpoints SET digest = zeroblob(16) WHERE id = 1")
        c.execute("UPDATE states SET data = X'00' WHERE ckpt = 0")
    problems = "\n".join(st_.verify().problems)
    assert "pack 1: reference count" in problems
    assert "checkpoint 1: image digest" in problems
    assert "checkpoint 0: state 'vcpu0'" in problems
    assert "checkpoint 1, page 3: references missing blob 999" in problems
    with pytest.raises(CorruptionError):
        st_.state(0, "vcpu0")
    with pytest.raises(CorruptionError, match="checkpoint 1, page 3: references missing blob 999"):
        st_.read_page(1, 3)


@pytest.mark.parametrize("column", ["pages", "blobs"])
def test_damaged_page_map_is_caught(damaged_store, column):
    """Any flipped byte in a map fails its check value: every read of a
    checkpoint whose path uses the map raises; verify names the map."""
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        data = bytearray(c.execute(f"SELECT {column} FROM maps WHERE ckpt = 0").fetchone()[0])
        data[len(data) // 2] ^= 0x10
        c.execute(f"UPDATE maps SET {column} = ? WHERE ckpt = 0", (bytes(data),))
    for ckpt in (0, 1):
        with pytest.raises(CorruptionError, match=f"checkpoint {ckpt}: the page map of checkpoint 0"):
            st_.read_page(ckpt, 2)
        with pytest.raises(CorruptionError):
            st_.materialize(ckpt, np.zeros((N, PAGE), np.uint8))
    with pytest.raises(CorruptionError):
        st_.diff(0, 1)
    with pytest.raises(CorruptionError, match="page map of checkpoint 0"):
        st_.history(3)
    assert any("page map of checkpoint 0 is damaged" in p for p in st_.verify().problems)


def test_map_naming_another_valid_blob_is_caught_by_the_digest(damaged_store):
    """A consistent map that names the wrong (valid) blob: the image digest
    catches it on every read and in verify."""
    st_, path, _ = damaged_store
    pages, blobs = _map(path, 0)
    blobs[list(pages).index(3)] = blobs[list(pages).index(2)]
    _rewrite_map(path, 0, pages, blobs)
    for ckpt in (0, 1):
        with pytest.raises(CorruptionError, match=f"checkpoint {ckpt}: its page maps do not match"):
            st_.materialize(ckpt, np.zeros((N, PAGE), np.uint8))
        with pytest.raises(CorruptionError, match=f"checkpoint {ckpt}: its page maps do not match"):
            st_.read_page(ckpt, 3)
    problems = st_.verify().problems
    assert any("checkpoint 0: image digest" in p for p in problems), problems


def test_lost_map_entry_and_lost_map_are_caught(damaged_store):
    st_, path, _ = damaged_store
    pages, blobs = _map(path, 0)
    keep = pages != 4
    _rewrite_map(path, 0, pages[keep], blobs[keep])
    with pytest.raises(CorruptionError, match="checkpoint 1: its page maps do not match"):
        st_.materialize(1, np.zeros((N, PAGE), np.uint8))
    assert any("checkpoint 0: image digest" in p for p in st_.verify().problems)
    with sqlite3.connect(path) as c:
        c.execute("DELETE FROM maps WHERE ckpt = 0")
    with pytest.raises(CorruptionError, match="page map of checkpoint 0 is missing"):
        st_.read_page(1, 0)
    assert any("checkpoint 0: page map is missing" in p for p in st_.verify().problems)


def test_broken_tree_link_is_reported(damaged_store):
    st_, path, _ = damaged_store
    with sqlite3.connect(path) as c:
        c.execute("UPDATE checkpoints SET parent = 5 WHERE id = 1")
    assert any("checkpoint 1: parent 5 does not exist" in p for p in st_.verify().problems)


def test_damaged_sqlite_pages_are_store_errors_never_wrong_bytes(damaged_store, tmp_path):
    """Garbage over whole SQLite pages (b-tree damage): every call either
    returns the right bytes or raises a StoreError; never sqlite3.Error."""
    from storage import StoreError
    st_, path, images = damaged_store
    st_.close()
    pristine = open(path, "rb").read()
    page_size = int.from_bytes(pristine[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size    # SQLite's header writes 65536 as 1
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


@pytest.mark.parametrize("kind", ["native-threads", "native", "cffi", "ctypes", "python-lz4"])
def test_every_decoder_path_reads_right_and_catches_damage(damaged_store, monkeypatch, kind):
    """Reads decode whole packs in C (storage.pageloops; on two threads for
    large reads), else call LZ4's C decoder per page through cffi, else
    ctypes, else python-lz4 plus a copy; each path returns the right bytes
    and refuses damage."""
    from storage import packs, pageloops
    if kind.startswith("native"):
        if os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0"):
            pytest.skip("SNAPCTL_PURE_PYTHON set: the Python loops only")
        assert pageloops.NATIVE, f"C page loops not built: {pageloops.KIND}"
        monkeypatch.setitem(pageloops.USE, "read", True)
        monkeypatch.setattr(packs, "_PARALLEL_MIN", 1 if kind == "native-threads" else 10**9)
    else:
        pair = packs.lz4_entry_points(kind) if kind != "python-lz4" else (None, None)
        if kind != "python-lz4":
            assert pair[0] is not None, f"{kind} decoder not available here"
        monkeypatch.setitem(pageloops.USE, "read", False)
        monkeypatch.setattr(packs, "PYTHON_DECODER", {"plain": pair[0], "dict": pair[1]})
    st_, path, images = damaged_store
    out = np.zeros((N, PAGE), np.uint8)
    for ckpt, img in images.items():
        st_.materialize(ckpt, out)
        assert np.array_equal(out, img)
    t = blob_table(path)
    delta = min(b for b, (c, _) in t.items() if c == 2)
    (ckpt, page), = [(k, p) for k, img in images_as_blobs(path).items()
                     for p, b in enumerate(img.tolist()) if b == delta]
    pack, s, e = blob_span(path, delta)
    for tamper in (flip, flip_with_valid_checksums):
        tamper(path, pack, (s + e) // 2)
        try:
            with pytest.raises(CorruptionError, match=f"checkpoint {ckpt}, page {page}"):
                st_.read_page(ckpt, page)
            with pytest.raises(CorruptionError):
                st_.materialize(ckpt, out)
        finally:
            tamper(path, pack, (s + e) // 2)


def flip_with_valid_checksums(path, pack, offset):
    """Flip a stored byte and recompute the pack's checksums (data, per-blob,
    metadata): what a writer bug, not the disk, would leave.  Only the
    content hash after decoding can catch it."""
    import xxhash
    flip(path, pack, offset)
    with sqlite3.connect(path) as c:
        first, n, codecs, bases, hashes, ends, crcs = c.execute(
            "SELECT first, n, codecs, bases, hashes, ends, crcs FROM packs WHERE id = ?",
            (pack,)).fetchone()
        head = np.array([pack, first, n], "<i8").tobytes()
        data = c.execute("SELECT data FROM pack_data WHERE id = ?", (pack,)).fetchone()[0]
        e = np.frombuffer(ends, "<u4").tolist()
        crcs = np.array([xxhash.xxh3_64_intdigest(data[(e[i - 1] if i else 0):e[i]])
                         for i in range(n)], "<u8").tobytes()
        m63 = 2**63 - 1
        mchk = xxhash.xxh3_64_intdigest(head + codecs + bases + hashes + ends + crcs) & m63
        c.execute("UPDATE packs SET crcs = ?, mchk = ?, crc = ? WHERE id = ?",
                  (crcs, mchk, xxhash.xxh3_64_intdigest(data) & m63, pack))
