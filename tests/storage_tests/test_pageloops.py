"""The C page loops (storage.pageloops) against python-lz4 and xxhash, and
reads through them (serial and on two threads) against the pure-Python
loops and an independent model of the images."""

from __future__ import annotations

import os

import lz4.block
import numpy as np
import pytest
import xxhash

from storage_helpers import PAGE, blob_table, random_pages
from storage import Store, packs, pageloops
from storage import store as store_module

PURE = os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0")
native = pytest.mark.skipif(PURE, reason="SNAPCTL_PURE_PYTHON set: the Python loops only")


def test_loops_are_built_where_a_compiler_is():
    """The install builds them on this machine (gcc is part of it): a silent
    fallback to the Python loops would pass every other test here."""
    import shutil
    if shutil.which("gcc") or shutil.which("cc"):
        assert pageloops.NATIVE or PURE, pageloops.KIND


def pages_of_every_kind(rng, n):
    kinds = ["text", "random", "zero"]
    return np.concatenate([random_pages(rng, n, k) for k in kinds])


@native
def test_hash_pages_is_xxh3_128_of_each_page():
    pages = pages_of_every_kind(np.random.default_rng(1), 50)
    got = pageloops.hash_pages(pages)
    assert [bytes(h) for h in got] == [xxhash.xxh3_128_digest(p) for p in pages]


@native
def test_scan_counts_words_and_hashes_non_zero_pages():
    rng = np.random.default_rng(2)
    pages = pages_of_every_kind(rng, 1500)
    pages[rng.integers(0, len(pages), 200), rng.integers(0, PAGE, 200)] = 1    # sparse edits
    words, hashes = pageloops.scan(pages)
    assert (words == (pages.view(np.uint64) != 0).sum(axis=1)).all()
    assert [bytes(h) for h in hashes[words > 0]] == \
        [xxhash.xxh3_128_digest(p) for p in pages[words > 0]]
    assert not hashes[words == 0].any()


@native
def test_encode_gives_valid_blocks_deltas_and_raw_pages():
    rng = np.random.default_rng(3)
    pages = pages_of_every_kind(rng, 40)
    dicts = pages[:40].copy()
    pages[:20] = dicts[:20]
    pages[:20, 100:110] ^= 0x5A                          # small edits of their dictionary
    idx = rng.permutation(len(pages))
    dict_at = np.where(idx < 20, dicts.ctypes.data + idx * PAGE, 0)
    data, codec, size, crc = pageloops.encode(pages, idx, dict_at)
    ends = np.cumsum(size)
    assert len(data) == ends[-1]
    for k, i in enumerate(idx.tolist()):
        blob = data[ends[k] - size[k]:ends[k]]
        assert crc[k] == xxhash.xxh3_64_intdigest(blob)
        if i < 20:
            assert codec[k] == 2 and size[k] < 100, "a small edit is a small delta"
            got = lz4.block.decompress(blob, uncompressed_size=PAGE, dict=dicts[i].tobytes())
        elif 40 <= i < 80:
            assert codec[k] == 0 and size[k] == PAGE, "random content is stored raw"
            got = blob
        else:
            assert codec[k] == 1 and size[k] < PAGE
            got = lz4.block.decompress(blob, uncompressed_size=PAGE)
        assert got == pages[i].tobytes()


@native
def test_decode_reports_the_first_bad_blob_and_keeps_a_delta_dictionary():
    rng = np.random.default_rng(4)
    base = random_pages(rng, 1, "text")[0]
    new = base.copy()
    new[10:20] = 7
    delta = lz4.block.compress(new, store_size=False, dict=base.tobytes())
    out = np.zeros((2, PAGE), np.uint8)
    out[1] = base                          # the delta's dictionary is its own page
    buf = np.frombuffer(delta + delta, np.uint8)
    want = np.array([list(xxhash.xxh3_128_digest(new))] * 2, np.uint8)
    src = buf.ctypes.data + np.array([0, len(delta)])
    dst = out.ctypes.data + np.array([0, PAGE])
    dict_at = np.array([out.ctypes.data + PAGE, out.ctypes.data + PAGE])
    args = (src, np.array([len(delta)] * 2), np.array([2, 2], np.uint8), dst, dict_at)
    # page 0 uses page 1 as dictionary, page 1 itself: both come out right
    assert pageloops.decode(*args, want) == -1
    assert (out == new).all()
    out[1] = base
    bad = want.copy()
    bad[1, 0] ^= 1
    assert pageloops.decode(*args, bad) == 1
    assert (out[1] == base).all(), "a failed delta must leave its dictionary in place"


@pytest.mark.parametrize("writer", ["native", "python"])
@pytest.mark.parametrize("mode", ["native-threads", "native", "python"])
def test_reads_of_a_delta_chain_match_the_model(tmp_path, monkeypatch, mode, writer):
    """A chain whose checkpoints rewrite pages by a few bytes (deltas whose
    bases sit in older packs, some shown by the image, most not), written by
    each encoding path and read whole and in pieces by each decoding path."""
    if (mode != "python" or writer != "python") and PURE:
        pytest.skip("SNAPCTL_PURE_PYTHON set: the Python loops only")
    monkeypatch.setattr(store_module, "_USE_NATIVE", writer == "native")
    monkeypatch.setattr(packs, "_USE_NATIVE", mode != "python")
    monkeypatch.setattr(packs, "_PARALLEL_MIN", 1 if mode == "native-threads" else 10**9)
    rng = np.random.default_rng(5)
    n = 3000
    img = np.concatenate([random_pages(rng, 1000, "text"), random_pages(rng, 500, "random"),
                          random_pages(rng, 500, "zero"), random_pages(rng, 1000, "text")])
    img[2000:2100] = img[0]                          # shared contents
    images = {}
    with Store.create(str(tmp_path / "s.db"), {"mem_size": n * PAGE}, synchronous="OFF") as st:
        with st.checkpoint(None, {"step": 0}) as w:
            w.add_pages(np.arange(n), img)
        images[w.id] = img.copy()
        parent = w.id
        for k in range(6):
            pages = np.unique(rng.integers(0, n, 400))
            img[pages, rng.integers(0, PAGE - 8)] ^= np.uint8(k + 1)     # small edits: deltas
            if k == 3:
                img[pages[:20]] = img[pages[20:40]]                    # a content moves
            with st.checkpoint(parent, {"step": k + 1}) as w:
                w.add_pages(pages, img[pages])
            images[w.id] = img.copy()
            parent = w.id
        out = np.zeros((n, PAGE), np.uint8)
        for ckpt, want in images.items():
            out[:] = 0xAB
            st.materialize(ckpt, out)
            assert np.array_equal(out, want), f"checkpoint {ckpt}"
            assert st.read(ckpt, 1234 * PAGE + 100, 5 * PAGE) == \
                want.reshape(-1)[1234 * PAGE + 100:1239 * PAGE + 100].tobytes()
    assert {c for c, _ in blob_table(str(tmp_path / "s.db")).values()} == {0, 1, 2}
