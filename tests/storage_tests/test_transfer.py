"""Checkpoint transfers between stores (storage.transfer): a checkpoint
exported by its writer, imported by another store's writer by content hash;
the images read back equal, verify passes, deltas keep their bases, a page
reverting to an old content is a dedup hit, a whole image moves with its
delta bases; a hostile transfer is refused with the store unchanged."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from storage_helpers import PAGE, random_pages, seed_for
from storage import Store
from storage import pageloops
from storage.codec import CODEC_LZ4_DELTA, content_hash
from storage.transfer import (MissingContentError, Transfer, TransferError, TransferPack, join_maps,
                              parse_map)

PURE = os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0")
N = 96


def _cfg(n=N):
    return {"mem_size": n * PAGE, "vcpus": 1, "name": "test-guest",
            "ram": [{"gpa": 0, "size": n * PAGE, "slot": 0}]}


@pytest.fixture(params=["native", "python"])
def loops(request, monkeypatch):
    if request.param == "native" and PURE:
        pytest.skip("SNAPCTL_PURE_PYTHON set: the Python loops only")
    for part in ("read", "write"):
        monkeypatch.setitem(pageloops.USE, part, request.param == "native")
    return request.param


@pytest.fixture
def stores(tmp_path):
    opened = []

    def make(name):
        st = Store.create(str(tmp_path / f"{name}.snap"), _cfg(), synchronous="OFF")
        opened.append(st)
        return st
    yield make
    for st in opened:
        st.close()


def _evolve(rng, img, step):
    """A few pages change by a few words (deltas), one by a lot, one reverts
    to an old content, one becomes zero."""
    pn = np.sort(rng.choice(N, 12, replace=False))
    for p in pn[:10].tolist():
        img[p, rng.integers(0, PAGE, 24)] = rng.integers(0, 256, 24, dtype=np.uint8)
    img[pn[10]] = random_pages(rng, 1)[0]
    img[pn[11]] = 0
    return pn


def _chain(a, rng, steps, transfer=True):
    """Checkpoints of ``a`` (text-like pages); yields (writer, image) of each."""
    img = random_pages(rng, N)
    img[N - 8:] = 0
    old = img[7].copy()
    parent = None
    for step in range(steps):
        pn = np.arange(N) if step == 0 else _evolve(rng, img, step)
        if step == 3:                               # a page reverts to a content of checkpoint 0
            img[60] = old
            pn = np.union1d(pn, [60])
        with a.checkpoint(parent, {"step": step}, transfer=transfer) as w:
            w.add_pages(pn, img[pn])
        parent = w.id
        yield w, img.copy()


def _image(st, ckpt):
    out = np.zeros((N, PAGE), np.uint8)
    st.materialize(ckpt, out)
    return out


def _snapshot(st):
    """Everything the store holds, to show a refused import changed nothing."""
    conn = sqlite3.connect(st.filename)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("checkpoints", "maps", "packs", "pack_data", "refs", "states", "meta")}
    finally:
        conn.close()


def test_a_chain_exported_and_imported_reads_back_the_same_images(stores, loops):
    rng = np.random.default_rng(seed_for("transfer-chain", 11))
    a, b = stores("a"), stores("b")
    parent = None
    deltas = dedup = 0
    for w, img in _chain(a, rng, 8):
        t = w.transfer
        assert t is not None and t.digest == w.digest
        deltas += sum(int((p.codecs == CODEC_LZ4_DELTA).sum()) for p in t.packs)
        with b.checkpoint(parent, {"step": w.id}) as wb:
            pages, rows = wb.add_transfer(t)
        dedup += wb.stats["dedup_pages"]
        parent = wb.id
        assert wb.digest == w.digest == b.digest(wb.id)
        assert (rows == img[pages]).all()           # the contents a warm image takes
        assert (_image(b, wb.id) == img).all()
    assert deltas > 0, "the chain should hold deltas (their bases travel by content hash)"
    assert dedup > 0, "the reverted page should be a dedup hit"
    assert not b.verify().problems and not a.verify().problems
    assert [a.digest(c.id) for c in a.checkpoints()] == [b.digest(c.id) for c in b.checkpoints()]


def test_a_transfer_survives_its_wire_form(stores, loops):
    rng = np.random.default_rng(seed_for("transfer-wire", 12))
    a, b = stores("a"), stores("b")
    parent = None
    for w, img in _chain(a, rng, 4):
        t = w.transfer
        packs = [TransferPack.from_bytes(p.to_bytes()) for p in t.packs]
        parts = [parse_map(t.map_bytes(lo, lo + 7), N, packs) for lo in range(0, len(t.pages), 7)]
        pages, hashes = join_maps(parts, N)
        assert (pages == t.pages).all() and (hashes == t.hashes).all()
        for p, q in zip(packs, t.packs):
            assert (p.crcs == q.crcs).all() and (p.bases == q.bases).all()
        back = Transfer(pages, hashes, packs, t.digest, t.parent_digest, t.full)
        with b.checkpoint(parent) as wb:
            wb.add_transfer(back)
        parent = wb.id
        assert (_image(b, wb.id) == img).all()


def test_a_whole_image_moves_with_its_delta_bases(stores, loops):
    """A store that holds none of the chain takes one image (a re-sync), then
    the increments after it, whose deltas name bases the image does not show."""
    rng = np.random.default_rng(seed_for("transfer-image", 13))
    a, b = stores("a"), stores("b")
    chain = list(_chain(a, rng, 9))
    w5, img5 = chain[4]
    # b first holds something else: the image replaces it (pages not in it are zero)
    with b.checkpoint(None) as wb:
        wb.add_pages(np.arange(N), random_pages(rng, N))
    it = a.image_transfer(w5.id)
    assert it.full and it.digest == w5.digest
    with b.checkpoint(wb.id) as wb:
        wb.add_transfer(it)
    assert wb.digest == w5.digest and (_image(b, wb.id) == img5).all()
    parent = wb.id
    for w, img in chain[5:]:
        with b.checkpoint(parent) as wb:
            wb.add_transfer(w.transfer)
        parent = wb.id
        assert (_image(b, wb.id) == img).all()
    assert not b.verify().problems


def test_an_increment_over_a_store_that_lacks_its_bases_is_refused(stores):
    rng = np.random.default_rng(seed_for("transfer-missing", 14))
    a, b = stores("a"), stores("b")
    chain = list(_chain(a, rng, 6))
    # b holds image 3 as its own plain pages (not the exporter's bases)
    with b.checkpoint(None) as wb:
        wb.add_pages(np.arange(N), chain[2][1])
    before = _snapshot(b)
    t = chain[3][0].transfer
    assert any((p.codecs == CODEC_LZ4_DELTA).any() for p in t.packs)
    with pytest.raises(MissingContentError, match="not in this store"):
        with b.checkpoint(wb.id) as w2:
            w2.add_transfer(t)
    assert _snapshot(b) == before


def _first_increment(a, rng):
    chain = list(_chain(a, rng, 3))
    return chain


def _hostile(kind, t: Transfer) -> Transfer:
    p = t.packs[0]
    packs = list(t.packs)
    if kind == "content-hash":
        h = p.hashes.copy()
        h[0, 0] ^= 1
        packs[0] = TransferPack(p.codecs, p.bases, h, p.ends, p.crcs, p.data)
    elif kind == "crc":
        c = p.crcs.copy()
        c[0] ^= 1
        packs[0] = TransferPack(p.codecs, p.bases, p.hashes, p.ends, c, p.data)
    elif kind == "bytes":                 # bytes and crc agree, the content does not
        from storage.formats import blob_crc
        s, e = int(p.starts[0]), int(p.ends[0])
        data = bytearray(p.data)
        data[s] ^= 0xFF
        c = p.crcs.copy()
        c[0] = blob_crc(bytes(data[s:e]))
        packs[0] = TransferPack(p.codecs, p.bases, p.hashes, p.ends, c, bytes(data))
    elif kind == "base":
        d = int(np.flatnonzero(p.codecs == CODEC_LZ4_DELTA)[0])
        b = p.bases.copy()
        b[d] = np.frombuffer(content_hash(b"nobody has this page".ljust(PAGE, b".")), np.uint8)
        packs[0] = TransferPack(p.codecs, b, p.hashes, p.ends, p.crcs, p.data)
    elif kind == "codec":
        c = p.codecs.copy()
        c[0] = 7
        packs[0] = TransferPack(c, p.bases, p.hashes, p.ends, p.crcs, p.data)
    elif kind == "count":
        packs = packs * ((2 * N + 256) // sum(q.n for q in packs) + 2)
    elif kind == "map-hash":
        h = t.hashes.copy()
        h[0] = np.frombuffer(content_hash(b"x" * PAGE), np.uint8)
        return Transfer(t.pages, h, packs, t.digest, t.parent_digest, t.full)
    elif kind == "page":
        pg = t.pages.copy()
        pg[-1] = N
        return Transfer(pg, t.hashes, packs, t.digest, t.parent_digest, t.full)
    elif kind == "digest":
        return Transfer(t.pages, t.hashes, packs, "0" * 32, t.parent_digest, t.full)
    elif kind == "parent":
        return Transfer(t.pages, t.hashes, packs, t.digest, "1" * 32, t.full)
    return Transfer(t.pages, t.hashes, packs, t.digest, t.parent_digest, t.full)


@pytest.mark.parametrize("kind, needle", [
    ("content-hash", "content hash"), ("crc", "checksum"), ("bytes", "content hash"),
    ("base", "not in this store"), ("codec", "unknown codec"), ("count", "more than an image"),
    ("map-hash", "not in this store"), ("page", "out of range"), ("digest", "digest"),
    ("parent", "another image"),
])
def test_a_hostile_transfer_is_refused_and_the_store_unchanged(stores, loops, kind, needle):
    rng = np.random.default_rng(seed_for("transfer-hostile", 15))
    a, b = stores("a"), stores("b")
    chain = _first_increment(a, rng)
    parent = None
    for w, _ in chain[:2]:
        with b.checkpoint(parent) as wb:
            wb.add_transfer(w.transfer)
        parent = wb.id
    t = chain[2][0].transfer
    assert (t.packs[0].codecs == CODEC_LZ4_DELTA).any()
    before = _snapshot(b)
    with pytest.raises(TransferError, match=needle):
        with b.checkpoint(parent) as w2:
            w2.add_transfer(_hostile(kind, t))
    assert _snapshot(b) == before
    assert not b.verify().problems
    with b.checkpoint(parent) as w3:                # and the honest one still goes in
        w3.add_transfer(t)
    assert w3.digest == chain[2][0].digest


@pytest.mark.parametrize("cut", ["short", "count", "codec", "ends", "map", "map-ref"])
def test_a_malformed_wire_form_is_refused(stores, cut):
    rng = np.random.default_rng(seed_for("transfer-wire-bad", 16))
    a = stores("a")
    t = list(_chain(a, rng, 2))[1][0].transfer
    raw = bytearray(t.packs[0].to_bytes())
    with pytest.raises(TransferError):
        if cut == "short":
            TransferPack.from_bytes(raw[:-1])
        elif cut == "count":
            raw[0:4] = (10**7).to_bytes(4, "little")
            TransferPack.from_bytes(raw)
        elif cut == "codec":
            raw[12] = 9
            TransferPack.from_bytes(raw)
        elif cut == "ends":
            n = t.packs[0].n
            at = 12 + n
            raw[at:at + 2] = (4000).to_bytes(2, "little")
            TransferPack.from_bytes(raw)
        elif cut == "map":
            m = bytearray(t.map_bytes())
            m[0:4] = (N + 1).to_bytes(4, "little")
            parse_map(m, N, t.packs)
        else:                                        # an index past the transfer's blobs
            parse_map(t.map_bytes(), N, t.packs[:0])


@pytest.mark.parametrize("cut", ["raw-short", "too-large", "delta-no-base", "delta-count"])
def test_a_wire_pack_that_check_would_refuse_is_refused_as_it_is_parsed(loops, cut):
    """from_bytes holds the wire form to what TransferPack.check does (the import
    does not check a parsed pack again): a raw blob shorter than a page, a blob
    larger than one, a delta whose base hash is zero, a wrong delta count."""
    from storage.codec import CODEC_LZ4, CODEC_RAW
    codec = {"raw-short": CODEC_RAW, "too-large": CODEC_LZ4}.get(cut, CODEC_LZ4_DELTA)
    size = PAGE + 1 if cut == "too-large" else 10
    bases = np.full((1, 16), 7 if codec == CODEC_LZ4_DELTA else 0, np.uint8)
    pack = TransferPack(np.array([codec], np.uint8), bases, np.ones((1, 16), np.uint8),
                        np.array([size]), np.zeros(1, np.uint64), bytes(size))
    raw = bytearray(pack.to_bytes())
    if cut == "delta-no-base":
        raw[-size - 16:-size] = bytes(16)
    elif cut == "delta-count":
        raw[8:12] = (0).to_bytes(4, "little")
        del raw[-size - 16:-size]
    with pytest.raises(TransferError):
        TransferPack.from_bytes(raw)


def test_a_parsed_pack_is_checked_again_once_it_is_changed(stores):
    """The import skips check() only for a pack exactly as from_bytes left it."""
    rng = np.random.default_rng(seed_for("transfer-parsed", 18))
    a = stores("a")
    t = list(_chain(a, rng, 2))[1][0].transfer
    p = TransferPack.from_bytes(t.packs[0].to_bytes())
    assert p.parsed_intact() and not p.codecs.flags.writeable
    p.codecs = p.codecs.copy()
    assert not p.parsed_intact()


def test_a_delta_whose_base_the_importer_holds_as_a_delta_is_stored_plainly(stores, loops):
    """Depth stays <= 1: the importer's copy of the base is itself a delta
    (it wrote that content as a delta of an older one), so the imported
    delta is decoded against it and stored as plain LZ4."""
    from storage_helpers import delta_on_delta
    rng = np.random.default_rng(seed_for("transfer-replain", 17))
    a, b = stores("a"), stores("b")
    i0 = random_pages(rng, N)
    i1, i2 = i0.copy(), i0.copy()
    i1[:, :64] ^= 1                                 # a few words differ: deltas
    i2[:] = i1
    i2[:, 128:192] ^= 1
    with b.checkpoint(None) as w:
        w.add_pages(np.arange(N), i0)
    with b.checkpoint(w.id) as wb1:
        wb1.add_pages(np.arange(N), i1)
    assert wb1.stats["delta_blobs"] > 0
    with a.checkpoint(None) as wa0:
        wa0.add_pages(np.arange(N), i1)
    with a.checkpoint(wa0.id, transfer=True) as wa1:
        wa1.add_pages(np.arange(N), i2)
    assert wa1.stats["delta_blobs"] > 0
    with b.checkpoint(wb1.id) as wb2:
        wb2.add_transfer(wa1.transfer)
    assert wb2.digest == wa1.digest and wb2.stats["delta_blobs"] == 0
    assert (_image(b, wb2.id) == i2).all()
    assert not b.verify().problems and delta_on_delta(b.filename) == 0


def test_blobs_a_peer_lacks_travel_with_the_checkpoint_that_names_them(stores, loops):
    """A store that took one image (a re-sync) lacks the exporter's older contents: a
    page going back to one is refused -- until the exporter adds those blobs
    (``Store.transfer_blobs`` of the ids ``Transfer.local`` names)."""
    rng = np.random.default_rng(seed_for("transfer-lacking", 18))
    a, b = stores("a"), stores("b")
    chain = list(_chain(a, rng, 3))                 # 0: base, 1, 2
    it = a.image_transfer(chain[2][0].id)
    shipped = {bytes(h) for p in it.packs for h in p.hashes}
    i1 = chain[1][1]
    gone = [q for q in range(N) if i1[q].any() and content_hash(i1[q]) not in shipped]
    old = i1[gone[0]].copy()             # a content of checkpoint 1 the image does not carry
    with b.checkpoint(None) as wb:
        wb.add_transfer(it)
    img = chain[2][1].copy()
    img[N - 1] = old                                # page N-1 (zero until now) takes it
    with a.checkpoint(chain[2][0].id, transfer=True) as w:
        w.add_pages([N - 1], img[[N - 1]])
    t = w.transfer
    assert w.stats["dedup_pages"] == 1 and not t.packs
    before = _snapshot(b)
    with pytest.raises(MissingContentError), b.checkpoint(wb.id) as w2:
        w2.add_transfer(t)
    assert _snapshot(b) == before
    named = t.local["map"][t.local["map"] > 0]
    extra = a.transfer_blobs(named)
    with b.checkpoint(wb.id) as w3:
        w3.add_transfer(Transfer(t.pages, t.hashes, extra, t.digest, t.parent_digest))
    assert w3.digest == w.digest and (_image(b, w3.id) == img).all()
    assert not b.verify().problems


def test_pages_of_their_own_after_a_transfer_are_refused_and_nothing_is_stored(stores):
    """One checkpoint is either imported or written, not both: add_pages after add_transfer
    is an error at once (it failed at commit with a misleading digest mismatch)."""
    from storage.errors import InvalidArgumentError
    rng = np.random.default_rng(seed_for("transfer-then-pages", 13))
    a, b = stores("a"), stores("b")
    (w, _), = _chain(a, rng, 1)
    with pytest.raises(InvalidArgumentError, match="came from add_transfer"):
        with b.checkpoint(None, {"step": 0}) as wb:
            wb.add_transfer(w.transfer)
            wb.add_pages([0], random_pages(rng, 1))
    assert b.checkpoints() == [] and not b.verify().problems


def test_map_chunks_with_blob_zero_and_explicit_entries_parse_back(stores):
    """parse_map's three kinds of entry, alone and mixed, in chunks of every size: a
    blob of the transfer (the fast path when a chunk holds only those), a zero
    page, a content named by its hash."""
    from storage.codec import ZERO_HASH
    rng = np.random.default_rng(seed_for("transfer-map-kinds", 19))
    a = stores("a")
    t = list(_chain(a, rng, 2))[1][0].transfer
    m = len(t.pages)
    for kind in ("blobs", "zero", "explicit", "mixed"):
        hashes = t.hashes.copy()
        pick = rng.random(m) < 0.5 if kind == "mixed" else np.full(m, kind != "blobs")
        if kind in ("zero", "mixed"):
            hashes[pick] = np.frombuffer(ZERO_HASH, np.uint8)
        if kind in ("explicit", "mixed"):
            ex = pick & (rng.random(m) < 0.5) if kind == "mixed" else pick
            hashes[ex] = rng.integers(0, 256, (int(ex.sum()), 16), dtype=np.uint8)
        u = Transfer(t.pages, hashes, t.packs, t.digest, t.parent_digest, t.full)
        for step in (1, 3, m):
            parts = [parse_map(u.map_bytes(lo, lo + step), N, t.packs) for lo in range(0, m, step)]
            pages, got = join_maps(parts, N)
            assert (pages == t.pages).all() and (got == hashes).all(), (kind, step)
