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
    monkeypatch.setitem(pageloops.USE, "write", writer == "native")
    monkeypatch.setitem(pageloops.USE, "read", mode != "python")
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


# --- regressions from the review of the C page loops --------------------------

def test_a_failed_job_does_not_leave_others_writing_after_the_read_raises():
    """_Jobs used to forget the jobs it was waiting on behind a failed one:
    decode_into raised while they still wrote into the caller's array."""
    import time
    from storage.packs import _Jobs
    finished = {}

    def bad():
        time.sleep(0.05)
        raise RuntimeError("pack 1 damaged")

    def slow(name):
        time.sleep(0.3)
        finished[name] = True

    with pytest.raises(RuntimeError, match="pack 1 damaged"):
        with _Jobs(True) as jobs:
            jobs.run(1, bad)
            jobs.run(2, slow, "pack 2")
            jobs.run(3, slow, "pack 3")
            jobs.run(4, lambda: None, after=3)       # deltas whose bases are in pack 3
    assert finished == {"pack 2": True, "pack 3": True}


def test_the_thread_pool_works_in_a_forked_child():
    """The executor is inherited by fork() but its threads are not: a child
    that reads or writes a large batch used to hang forever."""
    pageloops.pool().submit(int).result()           # the parent has its threads
    pid = os.fork()
    if pid == 0:                                     # child: exit code says it all
        code = 1
        try:
            code = 0 if pageloops.pool().submit(lambda: 7).result(timeout=10) == 7 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_source_distribution_carries_the_c_loops(tmp_path):
    """setup.py reads storage/native/pagecodec.c; an sdist without it could
    not be installed at all."""
    import shutil
    import subprocess
    import sys
    import tarfile
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build", ".git", "*.db*")
    shutil.copytree(root, src, ignore=skip)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, timeout=120)
    (tarball,) = (tmp_path / "dist").iterdir()
    names = tarfile.open(tarball).getnames()
    assert any(n.endswith("storage/native/pagecodec.c") for n in names), names


@pytest.mark.parametrize("mode", ["native", "python"])
def test_dictionary_only_bases_are_judged_by_their_delta_on_both_paths(tmp_path, monkeypatch, mode):
    """A base decoded only as a delta's dictionary is not hash-checked on its
    own (the delta's check covers what is returned) -- on the C and the
    Python path alike; when the base is what is wrong, the error names it."""
    import sqlite3
    from storage import CorruptionError
    from storage.packs import pack_meta_check
    if mode == "native" and PURE:
        pytest.skip("SNAPCTL_PURE_PYTHON set: the Python loops only")
    monkeypatch.setitem(pageloops.USE, "read", mode == "native")
    rng = np.random.default_rng(8)
    n = 64
    img = random_pages(rng, n, "text")
    path = str(tmp_path / "s.db")
    with Store.create(path, {"mem_size": n * PAGE}, synchronous="OFF") as st:
        with st.checkpoint(None, {"step": 0}) as w:
            w.add_pages(np.arange(n), img)
        img1 = img.copy()
        img1[:, 100] ^= 1                                 # every page: a delta on its base
        with st.checkpoint(w.id, {"step": 1}) as w1:
            w1.add_pages(np.arange(n), img1)
    con = sqlite3.connect(path)
    pid, first, k, cs, bs, hs, es, cr = con.execute(
        "SELECT id, first, n, codecs, bases, hashes, ends, crcs FROM packs ORDER BY id").fetchone()

    def set_hashes(h):
        con.execute("UPDATE packs SET hashes = ?, mchk = ? WHERE id = ?",
                    (h, pack_meta_check(pid, first, k, cs, bs, h, es, cr), pid))
        con.commit()

    bad = bytearray(hs)
    bad[0] ^= 1                        # page 0's base: a wrong stored hash, right bytes
    set_hashes(bytes(bad))
    with Store.open(path) as st:
        assert st.read_page(w1.id, 0) == img1[0].tobytes()
        with pytest.raises(CorruptionError, match="checkpoint 0"):
            st.read_page(w.id, 0)                          # shown there: its digest fails
    set_hashes(hs)
    # the base's bytes rewritten with valid checksums: the delta fails, and
    # the error names the base
    data = bytearray(con.execute("SELECT data FROM pack_data WHERE id = ?", (pid,)).fetchone()[0])
    end0 = int(np.frombuffer(es, "<u4")[0])
    data[end0 // 2] ^= 0xFF
    import xxhash
    crcs = np.frombuffer(cr, "<u8").copy()
    crcs[0] = xxhash.xxh3_64_intdigest(bytes(data[:end0]))
    from storage.codec import check63
    con.execute("UPDATE packs SET crcs = ?, crc = ?, mchk = ? WHERE id = ?",
                (crcs.tobytes(), check63(bytes(data)),
                 pack_meta_check(pid, first, k, cs, bs, hs, es, crcs.tobytes()), pid))
    con.execute("UPDATE pack_data SET data = ? WHERE id = ?", (bytes(data), pid))
    con.commit()
    with Store.open(path) as st:
        with pytest.raises(CorruptionError, match=f"checkpoint {w1.id}, page 0.*(base blob {first}|blob {first})"):
            st.read_page(w1.id, 0)
        assert st.read_page(w1.id, 1) == img1[1].tobytes()


@native
def test_the_c_loops_also_run_on_the_system_lz4_and_xxhash(request):
    """Where python-lz4 or xxhash do not export their C functions, the loops
    take the system libraries' (same formats): both give the same results."""
    import ctypes.util
    lz4_fns, _ = pageloops.entry_points([ctypes.util.find_library("lz4") or "liblz4.so.1"],
                                        pageloops.LZ4_NAMES)
    xxh_fns, _ = pageloops.entry_points([ctypes.util.find_library("xxhash") or "libxxhash.so.0"],
                                        pageloops.XXH_NAMES)
    if lz4_fns is None or xxh_fns is None:
        pytest.skip("no system liblz4 / libxxhash here")
    pages = pages_of_every_kind(np.random.default_rng(9), 30)
    idx = np.arange(len(pages))
    want_h = np.array([list(xxhash.xxh3_128_digest(p)) for p in pages], np.uint8)
    data, codec, size, crc = pageloops.encode(pages, idx, np.zeros(len(idx), np.int64))
    before = pageloops.use_functions(dict(lz4_fns, **xxh_fns))
    request.addfinalizer(lambda: pageloops.use_functions(before))
    words, got_h = pageloops.scan(pages)
    assert (got_h[words > 0] == want_h[words > 0]).all()
    data2, codec2, size2, crc2 = pageloops.encode(pages, idx, np.zeros(len(idx), np.int64))
    assert (codec2 == codec).all()
    for blob_data, sizes in ((data, size), (data2, size2)):     # each decodes with the other's
        out = np.zeros_like(pages)
        buf = np.frombuffer(blob_data, np.uint8)
        src = buf.ctypes.data + np.concatenate(([0], np.cumsum(sizes)[:-1]))
        assert pageloops.decode(src, sizes, codec, out.ctypes.data + idx * PAGE,
                                np.zeros(len(idx), np.int64), want_h) == -1
        assert (out == pages).all()


@native
def test_loaded_functions_that_hash_differently_are_refused():
    """A library whose XXH3 differs from python-xxhash's (libxxhash < 0.8)
    must not be used: every stored hash would look like damage."""
    fns = pageloops.functions()
    assert pageloops.check_functions(fns) == ""
    # XXH3_64bits where XXH3_128bits belongs: the high half is whatever rdx held
    assert pageloops.check_functions(dict(fns, XXH3_128bits=fns["XXH3_64bits"])) == "xxh3_128 differs"
    with pytest.raises(ValueError, match="xxh3_128 differs"):
        pageloops.use_functions(dict(fns, XXH3_128bits=fns["XXH3_64bits"]))
    assert pageloops.check_functions(fns) == ""        # the refused set was not installed


@native
def test_batch_checksums_match_xxhash_and_refuse_bad_ends():
    """pageloops.crcs (one C call per pack, as a received transfer pack's
    checksums are taken) against one xxhash call per blob."""
    from storage_helpers import seed_for
    rng = np.random.default_rng(seed_for("pageloops-crcs", 31))
    for n in (1, 2, 7, 160, 1000):
        lens = rng.integers(1, PAGE + 1, n)
        ends = np.cumsum(lens)
        data = rng.integers(0, 256, int(ends[-1]), dtype=np.uint8).tobytes()
        want = [xxhash.xxh3_64_intdigest(data[e - k:e]) for e, k in zip(ends.tolist(), lens.tolist())]
        assert pageloops.crcs(data, ends).tolist() == want
        assert pageloops.crcs(bytearray(data), ends).tolist() == want     # any bytes-like
    assert pageloops.crcs(b"", np.zeros(0, np.int64)).tolist() == []
    for bad in ([5, 3], [4, 11], [-1]):                  # decreasing, past the data, negative
        with pytest.raises(ValueError):
            pageloops.crcs(b"0123456789", np.array(bad))


@native
def test_digest_update_in_c_matches_the_numpy_terms():
    """pageloops.digest_update against storage.codec's numpy one, on random
    pages and hashes with zero-page hashes among them, and digests that wrap."""
    from storage import codec
    from storage_helpers import seed_for
    rng = np.random.default_rng(seed_for("pageloops-digest", 32))
    zero = np.frombuffer(codec.ZERO_HASH, np.uint8)
    for n in (0, 1, 5, 300, 5000):
        pages = rng.integers(0, 1 << 40, n)
        old = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        new = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        old[rng.random(n) < 0.2] = zero
        new[rng.random(n) < 0.2] = zero
        for digest in (0, int(rng.integers(0, 1 << 62)) << 66 | 12345, (1 << 128) - 1):
            assert pageloops.digest_update(digest, pages, old, new) == \
                codec.digest_update(digest, pages, old, new)
