"""Fault 2: random byte flips and truncations of a real store file.

Each trial damages a copy of a store written by `snapctl run` (the `random`
guest: raw, lz4 and lz4-delta blobs in packs), then checks: either verify reports the
damage (or the store is refused with a clear error), or every checkpoint still
reads back byte for byte; and no read ever returns wrong bytes silently.
Flips are spread evenly over the SQLite b-trees (pack data, pack metadata, page
maps, refs, checkpoints, states, meta, indexes, the header page), not only over blob data,
which is most of the file.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3

import numpy as np
import pytest

from cli_helpers import ok, one_line_error, snapctl
from kvm_helpers import kvm, require_kvm
from rel_helpers import image, open_ro, scaled, tree_state

MEM = 8 << 20
TRIALS = scaled(200)  # CI 200, full run (SNAPCTL_REL_SCALE=10) 2000
from storage.schema import DB_PAGE_SIZE as DB_PAGE  # the stores' SQLite page size


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(path, {ckpt: image}, {db page number: owning b-tree}) of a closed, self-contained store."""
    require_kvm()
    d = tmp_path_factory.mktemp("pristine")
    store = d / "p.db"
    ok("run", "--mem", "8M", "--guest", "random", "--seed", 3, "--checkpoints", 4, "--every-steps", 1500,
       store=store)
    for suffix in ("-wal", "-shm"):  # a self-contained file: copy just it
        p = f"{store}{suffix}"
        assert not os.path.exists(p) or suffix == "-shm" or os.path.getsize(p) == 0
    single = d / "single.db"
    shutil.copy(store, single)
    with open_ro(single) as st:
        images = {c.id: image(st, c.id) for c in st.checkpoints()}
    con = sqlite3.connect(f"file:{single}?mode=ro", uri=True)
    owners = {pg: name for name, pg in con.execute("SELECT name, pageno FROM dbstat")}
    con.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{single}{suffix}"):
            os.unlink(f"{single}{suffix}")
    assert {"packs", "pack_data", "maps", "checkpoints", "states", "meta"} <= set(owners.values())
    return single, images, owners


def _damage(src, dst, rng: random.Random, t: int, owners: dict) -> str:
    data = bytearray(open(src, "rb").read())
    if t % 4 == 3:
        cut = rng.choice([rng.randrange(len(data)), rng.randrange(len(data) // DB_PAGE) * DB_PAGE])
        data = data[:cut]
        what = f"truncated to {cut}"
    else:
        groups = sorted(set(owners.values()) | {"header"})
        g = groups[t % len(groups)]
        pages = [1] if g == "header" else [p for p, o in owners.items() if o == g]
        page = rng.choice(pages)
        off = (page - 1) * DB_PAGE + (rng.randrange(100) if g == "header" else rng.randrange(DB_PAGE))
        off = min(off, len(data) - 1)
        bit = rng.randrange(8)
        data[off] ^= 1 << bit
        what = f"bit {bit} of byte {off} flipped ({g}, db page {page})"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{dst}{suffix}"):
            os.unlink(f"{dst}{suffix}")
    with open(dst, "wb") as f:
        f.write(data)
    return what


def _trial(path, images) -> tuple[str, list[str]]:
    """Returns (outcome, violations) for one damaged store, through the Python API."""
    from storage import StoreError

    bad: list[str] = []
    try:
        st = open_ro(path)
    except StoreError:
        return "refused", bad
    except Exception as e:
        return "refused", [f"open raised {type(e).__name__}: {e} (not a clear store error)"]
    with st:
        try:
            rep = st.verify()
            verified = rep.ok
            if not rep.ok:
                assert all(isinstance(p, str) and p for p in rep.problems)
        except StoreError:
            verified = False
        except Exception as e:
            verified = False
            bad.append(f"verify raised {type(e).__name__}: {e} (not a clear store error)")
        for ck, want in images.items():
            out = np.empty_like(want)
            try:
                st.materialize(ck, out)
            except StoreError:
                if verified:
                    bad.append(f"verify passed but checkpoint {ck} cannot be read")
                continue
            except Exception as e:
                bad.append(f"reading checkpoint {ck} raised {type(e).__name__}: {e} (not a clear store error)")
                continue
            if not np.array_equal(out, want):
                n = int((out != want).any(axis=1).sum())
                bad.append(f"checkpoint {ck}: WRONG BYTES returned silently ({n} pages)")
    return ("detected" if not verified else "harmless"), bad


@kvm
@pytest.mark.slow
def test_random_flips_and_truncations_never_return_wrong_bytes(pristine, tmp_path):
    src, images, owners = pristine
    seed = 4242
    print(f"seed {seed}")
    rng = random.Random(seed)
    dst = tmp_path / "damaged.db"
    outcomes: dict[str, int] = {}
    violations = []
    for t in range(TRIALS):
        what = _damage(src, dst, rng, t, owners)
        outcome, bad = _trial(dst, images)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        violations += [f"trial {t}, {what}: {b}" for b in bad]
        if t % 20 == 0:  # the CLI: verify and export say so in one line, never a traceback
            r = snapctl("verify", store=dst)
            if r.code != 0:
                if "Traceback" in r.err or (r.err.strip() and len(r.err.strip().splitlines()) != 1):
                    violations.append(f"trial {t}, {what}: `verify` printed {r.err.strip()[-300:]!r}")
            last = max(images)
            out = tmp_path / f"e{t}.raw"
            r = snapctl("export", last, out, store=dst)
            if r.code == 0:
                if not np.array_equal(np.fromfile(out, np.uint8).reshape(-1, 4096), images[last]):
                    violations.append(f"trial {t}, {what}: export wrote WRONG BYTES with exit 0")
                out.unlink()
            elif "Traceback" in r.err or len(r.err.strip().splitlines()) != 1:
                violations.append(f"trial {t}, {what}: `export` printed {r.err.strip()[-300:]!r}")
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".snapctl-export-")]
            assert not leftovers, leftovers
    print(f"trials: {TRIALS}, outcomes: {outcomes}, violations: {len(violations)}")
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:40])


def _raw_blob_in_file(path, images):
    """(blob id, page, ckpt, file offset) of a blob (any codec) that the last checkpoint's map names,
    stored by that checkpoint and found verbatim (and only once) in the file. Read from the raw
    columns (docs/store-format.md), not through the store's code."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    last = max(images)
    pages, blobs = (np.frombuffer(x, "<i8") for x in
                    con.execute("SELECT pages, blobs FROM maps WHERE ckpt = ?", (last,)).fetchone())
    page_of = dict(zip(blobs.tolist(), pages.tolist()))
    found = []
    for pid, first, ends, data in con.execute(
            "SELECT p.id, p.first, p.ends, d.data FROM packs p JOIN pack_data d ON d.id = p.id "
            "WHERE p.ckpt = ?", (last,)):
        e = np.frombuffer(ends, "<u4").tolist()
        for i, end in enumerate(e):
            start = e[i - 1] if i else 0
            if end - start >= 40 and first + i in page_of:
                found.append((first + i, page_of[first + i], last, data[start:end]))
    con.close()
    blob = open(path, "rb").read()
    for bid, page, ck, data in sorted(found, key=lambda x: x[1]):
        off = blob.find(bytes(data))
        if off >= 0 and blob.find(bytes(data), off + 1) < 0:
            return bid, page, ck, off + len(data) // 2
    pytest.fail("no blob found verbatim in the file")


@kvm
def test_a_flipped_blob_byte_is_named_by_verify_and_fails_reads_clearly(pristine, tmp_path):
    src, images, _ = pristine
    path = tmp_path / "flip.db"
    shutil.copy(src, path)
    bid, page, ck, off = _raw_blob_in_file(path, images)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    r = snapctl("verify", store=path)
    assert r.code == 1 and "Traceback" not in r.err
    assert f"blob {bid}" in r.out and "damaged" in r.out, r.out
    before = tree_state(tmp_path)
    # reading the damaged page: one line naming checkpoint, page and blob
    line = one_line_error(snapctl("read", ck, hex(page * 4096), 64, store=path), 1)
    assert str(ck) in line and f"page {page}" in line and f"blob {bid}" in line, line
    # export of a checkpoint that sees the blob fails and leaves nothing behind
    one_line_error(snapctl("export", ck, tmp_path / "out.raw", store=path), 1, f"blob {bid}")
    assert tree_state(tmp_path) == before
    # other pages of the same checkpoint still read exactly
    other = page - 1 if page > 600 else page + 1
    r = snapctl("read", ck, hex(other * 4096), 4096, "--format", "raw", store=path)
    assert r.code == 0 and r.raw == images[ck][other].tobytes()
    # checkpoints that never saw the blob export exactly
    with open_ro(path) as st:
        for c in images:
            out = np.empty_like(images[c])
            try:
                st.materialize(c, out)
            except Exception as e:
                assert f"blob {bid}" in str(e)
                continue
            assert np.array_equal(out, images[c]), c


def _leaf_page_of(owners, table):
    return sorted(p for p, o in owners.items() if o == table)[-1]


@kvm
def test_a_damaged_btree_page_is_a_one_line_error(pristine, tmp_path):
    src, images, owners = pristine
    path = tmp_path / "btree.db"
    shutil.copy(src, path)
    page = _leaf_page_of(owners, "packs")
    with open(path, "r+b") as f:  # the b-tree page header: page type 0x0d -> 0xff
        f.seek((page - 1) * DB_PAGE)
        f.write(b"\xff")
    before = tree_state(tmp_path)
    for args in (["verify"], ["export", max(images), tmp_path / "out.raw"]):
        one_line_error(snapctl(*args, store=path), 1)
    assert tree_state(tmp_path) == before


def _swap_a_version(path, images):
    """Point one data page of the last checkpoint's map at another page's (valid) blob and give the
    map a matching check value -- what a bug, not random damage, would leave. Returns (ckpt, page)."""
    import xxhash
    last = max(images)
    con = sqlite3.connect(path)
    p, b = (np.frombuffer(x, "<i8").copy() for x in
            con.execute("SELECT pages, blobs FROM maps WHERE ckpt = ?", (last,)).fetchone())
    i0, i1 = [i for i in range(len(p)) if p[i] >= 512 and b[i] > 0][:2]
    b[i0] = b[i1]
    pb, bb = p.astype("<i8").tobytes(), b.astype("<i8").tobytes()
    chk = xxhash.xxh3_64_intdigest(int(last).to_bytes(8, "little") + pb + bb) & (2**63 - 1)
    con.execute("UPDATE maps SET blobs = ?, chk = ? WHERE ckpt = ?", (bb, chk, last))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return last, int(p[i0])


@kvm
def test_a_wrong_version_row_is_not_exported_silently(pristine, tmp_path):
    src, images, _ = pristine
    path = tmp_path / "swap.db"
    shutil.copy(src, path)
    ck, page = _swap_a_version(path, images)
    assert snapctl("verify", store=path).code == 1  # verify sees it (the digest no longer matches)
    out = tmp_path / "out.raw"
    r = snapctl("export", ck, out, store=path)
    if r.code == 0:
        got = np.fromfile(out, np.uint8).reshape(-1, 4096)
        assert np.array_equal(got, images[ck]), f"export of checkpoint {ck} returned wrong bytes for page {page}"
    else:
        one_line_error(r, 1, str(ck))


@kvm
def test_a_wrong_version_row_is_not_read_silently(pristine, tmp_path):
    src, images, _ = pristine
    path = tmp_path / "swap.db"
    shutil.copy(src, path)
    ck, page = _swap_a_version(path, images)
    r = snapctl("read", ck, hex(page * 4096), 4096, "--format", "raw", store=path)
    if r.code == 0:
        assert r.raw == images[ck][page].tobytes(), f"read of checkpoint {ck} page {page} returned wrong bytes"
    else:
        one_line_error(r, 1)


@kvm
def test_truncated_stores_are_refused_with_one_line(pristine, tmp_path):
    """Truncation (a copy cut short, a full disk) never reads as a valid store."""
    src, images, _ = pristine
    size = os.path.getsize(src)
    seed = 7
    print(f"seed {seed}")
    rng = random.Random(seed)
    cuts = [0, 50, 99, 100, DB_PAGE, size // 2, size - DB_PAGE, size - 1] + [rng.randrange(size) for _ in range(4)]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.db"
        with open(src, "rb") as f, open(path, "wb") as g:
            g.write(f.read(cut))
        before = tree_state(tmp_path)
        for args in (["verify"], ["list"], ["export", max(images), tmp_path / "o.raw"]):
            r = snapctl(*args, store=path)
            if r.code == 0 and args[0] == "export":
                got = np.fromfile(tmp_path / "o.raw", np.uint8).reshape(-1, 4096)
                assert np.array_equal(got, images[max(images)]), cut
                (tmp_path / "o.raw").unlink()
            elif r.code == 0 and args[0] == "verify":
                pass  # cut in the free tail: the store is whole
            elif r.code != 0:
                one_line_error(r, 1)
        # SQLite may add -wal/-shm sidecars to a WAL-mode file it reads; nothing else may change
        after = {k: v for k, v in tree_state(tmp_path).items() if not k.endswith(("-wal", "-shm"))}
        assert after == {k: v for k, v in before.items() if not k.endswith(("-wal", "-shm"))}, cut
        path.unlink()
