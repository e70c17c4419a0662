"""verify() and prune(): the cold paths, written for clarity over speed.

Both load the whole ``versions`` table into numpy once ((page, ckpt, blob)
sorted by page then checkpoint) and compute each checkpoint's image as "the
last row per page among the rows on its path", independently of the
writer's cached views and incrementally maintained digests.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from . import codec
import json

from .codec import CODEC_LZ4_DELTA, CODEC_NAMES, PAGE_SIZE
from .errors import CorruptionError, InvalidArgumentError, StoreError


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class PruneReport:
    kept: list[int]
    removed: list[int]
    reparented: dict[int, int]          # kept checkpoint -> its new parent
    folded_versions: int                # rows copied into kept descendants
    blobs_freed: int
    bytes_freed: int                    # blob bytes; the file shrinks on vacuum()
    tags_removed: list[str]
    dry_run: bool = False


class _Versions:
    """All ``versions`` rows as sorted numpy columns."""

    def __init__(self, conn) -> None:
        rows = conn.execute("SELECT page, ckpt, coalesce(blob, 0), chk FROM versions "
                            "ORDER BY page, ckpt").fetchall()
        arr = np.array(rows, np.int64).reshape(-1, 4)
        self.page, self.ckpt, self.blob, self.chk = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]

    def visible_rows(self, path: list[int]) -> np.ndarray:
        """Indices of the rows forming the image at ``path[-1]``: per page,
        the row of the highest checkpoint id on the path."""
        idx = np.flatnonzero(np.isin(self.ckpt, path))
        p = self.page[idx]
        last = np.ones(len(p), bool)
        last[:-1] = p[1:] != p[:-1]
        return idx[last]

    def image(self, path: list[int], page_count: int) -> np.ndarray:
        """Blob id per page (0 = zero page) at ``path[-1]``."""
        rows = self.visible_rows(path)
        view = np.zeros(page_count, np.int64)
        view[self.page[rows]] = self.blob[rows]
        return view


def _path(parents: dict, ckpt: int) -> list[int]:
    out = []
    node = ckpt
    seen = set()
    while node is not None and node in parents and node not in seen:
        seen.add(node)
        out.append(node)
        node = parents[node]
    out.reverse()
    return out


def verify(store) -> VerifyReport:
    """Check every blob, reference, reference count, tree link, state and
    checkpoint digest; return what is damaged (never raises for damage)."""
    rep = VerifyReport()
    try:
        _verify(store, rep)
    except CorruptionError as exc:
        # SQLite's own structure is damaged so far that the walk cannot go on.
        rep.problems.append(str(exc))
    return rep


def _verify(store, rep: VerifyReport) -> None:
    P = rep.problems
    n_pages = store.page_count
    with store._read() as conn:
        # SQLite's own b-trees first: damage there can hide rows from us.
        for (msg,) in conn.execute("PRAGMA quick_check"):
            if msg != "ok":
                P.append(f"database structure: {msg}")
        parents = dict(conn.execute("SELECT id, parent FROM checkpoints"))
        digests = dict(conn.execute("SELECT id, digest FROM checkpoints"))

        # Tree links: one root, parents exist and are older.
        roots = sorted(c for c, p in parents.items() if p is None)
        if parents and len(roots) != 1:
            P.append(f"tree: expected one root checkpoint, found {roots}")
        for c, p in sorted(parents.items()):
            if p is None:
                continue
            if p not in parents:
                P.append(f"checkpoint {c}: parent {p} does not exist")
            elif p >= c:
                P.append(f"checkpoint {c}: parent {p} is not older than it")

        # References from versions rows.
        v = _Versions(conn)
        meta = {r[0]: r[1:] for r in conn.execute(
            "SELECT b.id, b.hash, b.codec, b.base, r.n, b.size FROM blobs AS b "
            "LEFT JOIN refs AS r ON r.blob = b.id")}
        for (b,) in conn.execute("SELECT blob FROM refs WHERE blob NOT IN (SELECT id FROM blobs)"):
            P.append(f"blob {b}: reference count of a missing blob")
        known = np.array(sorted(parents), np.int64)
        for i in np.flatnonzero(~np.isin(v.ckpt, known))[:20].tolist():
            P.append(f"checkpoint {v.ckpt[i]}, page {v.page[i]}: version of an unknown checkpoint")
        for i in np.flatnonzero((v.page < 0) | (v.page >= n_pages))[:20].tolist():
            P.append(f"checkpoint {v.ckpt[i]}, page {v.page[i]}: page number out of range")
        blob_ids = np.array(sorted(meta), np.int64)
        dangling = np.flatnonzero((v.blob > 0) & ~np.isin(v.blob, blob_ids))
        for i in dangling[:20].tolist():
            P.append(f"checkpoint {v.ckpt[i]}, page {v.page[i]}: references missing blob {v.blob[i]}")

        # Every row's check value binds (page, ckpt, content hash of its blob).
        bad_rows = 0
        for p, c, b, k in zip(v.page.tolist(), v.ckpt.tolist(), v.blob.tolist(), v.chk.tolist()):
            h = codec.ZERO_HASH if b == 0 else (meta[b][0] if b in meta else None)
            if h is not None and codec.row_check(p, c, h) != k:
                bad_rows += 1
                if bad_rows <= 20:
                    P.append(f"checkpoint {c}, page {p}: version row naming blob {b or None} "
                             "fails its check value")

        # Every blob: checksum of the stored bytes, decode, content hash.
        users = collections.defaultdict(list)      # blob -> [(ckpt, page)], for messages
        for i in np.flatnonzero(v.blob > 0).tolist():
            b = int(v.blob[i])
            if len(users[b]) < 3:
                users[b].append((int(v.ckpt[i]), int(v.page[i])))

        def who(b: int) -> str:
            u = users.get(b)
            if not u:
                return "unreferenced"
            return "used by " + ", ".join(f"checkpoint {c} page {p}" for c, p in u)

        damaged = 0
        for bid, cdc, hsh, crc, data, base, dcdc, dhsh, dcrc, ddata in conn.execute(
                "SELECT b.id, b.codec, b.hash, b.crc, b.data, b.base, "
                "d.codec, d.hash, d.crc, d.data FROM blobs AS b "
                "LEFT JOIN blobs AS d ON d.id = b.base ORDER BY b.id"):
            try:
                if cdc not in CODEC_NAMES:
                    raise CorruptionError(f"blob {bid}: unknown codec {cdc}")
                dpage = None
                if cdc == CODEC_LZ4_DELTA:
                    if base is None or ddata is None:
                        raise CorruptionError(f"blob {bid}: delta base {base} is missing")
                    if dcdc == CODEC_LZ4_DELTA:
                        raise CorruptionError(f"blob {bid}: delta base {base} is itself a delta")
                    dpage = codec.decode_checked(dcdc, ddata, dcrc, dhsh, blob=base)
                elif base is not None:
                    raise CorruptionError(f"blob {bid}: non-delta blob names a base {base}")
                codec.decode_checked(cdc, data, crc, hsh, dpage, blob=bid)
                if len(data) != meta[bid][4]:
                    raise CorruptionError(f"blob {bid}: size column {meta[bid][4]} != {len(data)}")
            except CorruptionError as exc:
                damaged += 1
                P.append(f"{exc} ({who(bid)})")

        # Reference counts: versions rows + delta blobs naming it as base.
        expect = collections.Counter(v.blob[v.blob > 0].tolist())
        expect.update(m[2] for m in meta.values() if m[2] is not None)
        for bid, m in sorted(meta.items()):
            if m[3] is None:
                P.append(f"blob {bid}: no reference count")
            elif m[3] != expect.get(bid, 0):
                P.append(f"blob {bid}: reference count {m[3]} but {expect.get(bid, 0)} references")

        # Digests, recomputed from the rows and blob hashes.
        row_terms = np.zeros((len(v.page), 2), np.uint64)
        nzr = np.flatnonzero((v.blob > 0) & np.isin(v.blob, blob_ids))
        if len(nzr):
            row_terms[nzr] = codec.contributions(
                v.page[nzr], [meta[b][0] for b in v.blob[nzr].tolist()])
        for c in sorted(parents):
            rows = v.visible_rows(_path(parents, c))
            got = codec.sum128(row_terms[rows])
            if codec.digest_to_bytes(got) != digests[c]:
                P.append(f"checkpoint {c}: image digest {codec.digest_hex(got)} does not match "
                         f"recorded {codec.digest_hex(codec.digest_from_bytes(digests[c]))}")

        n_states = 0
        for c, name, hsh, data in conn.execute("SELECT ckpt, name, hash, data FROM states"):
            n_states += 1
            if c not in parents:
                P.append(f"checkpoint {c}: state {name!r} of an unknown checkpoint")
            if not isinstance(data, bytes) or codec.content_hash(data) != hsh:  # NULL after truncation
                P.append(f"checkpoint {c}: state {name!r} does not match its hash")
        for name, c in conn.execute("SELECT name, ckpt FROM tags"):
            if c not in parents:
                P.append(f"tag {name!r}: names unknown checkpoint {c}")

    rep.checked = dict(checkpoints=len(parents), versions=len(v.page), blobs=len(meta),
                       damaged_blobs=damaged, damaged_rows=bad_rows, states=n_states)


def prune(store, *, keep_last: int | None = None, keep_ids: Iterable[int] = (),
          keep_tagged: bool = True, dry_run: bool = False) -> PruneReport:
    """Remove every checkpoint not kept.  Kept: the base (the tree root,
    always), the ``keep_last`` newest by id, ``keep_ids``, and tagged ones if
    ``keep_tagged``.  Every kept checkpoint materializes byte-for-byte as
    before: its rows are recomputed against its new parent (its nearest kept
    ancestor), which folds in the versions of removed checkpoints that it
    still sees.  Then unreferenced blobs are deleted."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 0):
        raise InvalidArgumentError(f"keep_last must be None or an int >= 0, not {keep_last!r}")
    keep_ids = list(keep_ids)
    with store._write() as conn:
        parents = dict(conn.execute("SELECT id, parent FROM checkpoints"))
        for k in keep_ids:
            store._check_id(k, parents)
        tags = dict(conn.execute("SELECT name, ckpt FROM tags"))
        ids = sorted(parents)
        keep = {c for c, p in parents.items() if p is None}
        if keep_last:
            keep.update(ids[-keep_last:])
        keep.update(int(k) for k in keep_ids)
        if keep_tagged:
            keep.update(tags.values())
        removed = sorted(set(ids) - keep)
        new_parent = {}
        for c in keep:
            p = parents[c]
            while p is not None and p not in keep:
                p = parents[p]
            if p != parents[c]:
                new_parent[c] = p
        report = PruneReport(kept=sorted(keep), removed=removed, reparented=new_parent,
                             folded_versions=0, blobs_freed=0, bytes_freed=0,
                             tags_removed=sorted(t for t, c in tags.items() if c in set(removed)),
                             dry_run=dry_run)
        if dry_run or not removed:
            return report

        v = _Versions(conn)
        n = store.page_count
        dec, inc, new_rows = [], [], []
        for c, a in sorted(new_parent.items()):
            vc = v.image(_path(parents, c), n)
            va = v.image(_path(parents, a), n)
            pages = np.flatnonzero(vc != va)
            old = np.flatnonzero(v.ckpt == c)
            dec.append(v.blob[old])
            inc.append(vc[pages])
            report.folded_versions += int(len(np.setdiff1d(pages, v.page[old])))
            new_rows.extend(zip(pages.tolist(), [c] * len(pages), vc[pages].tolist()))
        dec.append(v.blob[np.isin(v.ckpt, removed)])

        touched = _ids(list(new_parent) + removed)
        conn.execute(f"DELETE FROM versions WHERE ckpt IN ({touched})")
        hashes = {0: codec.ZERO_HASH}
        need = sorted({b for _, _, b in new_rows if b})
        if need:
            hashes.update(conn.execute("SELECT id, hash FROM blobs WHERE id IN "
                                       "(SELECT value FROM json_each(?))", (json.dumps(need),)))
        conn.executemany(
            "INSERT INTO versions(page, ckpt, blob, chk) VALUES (?, ?, ?, ?)",
            [(p, c, b or None, codec.row_check(p, c, hashes[b])) for p, c, b in new_rows])
        delta = collections.Counter()
        for arr in inc:
            delta.update(arr[arr > 0].tolist())
        for arr in dec:
            delta.subtract(arr[arr > 0].tolist())
        conn.executemany("UPDATE refs SET n = n + ? WHERE blob = ?",
                         [(d, b) for b, d in delta.items() if d])
        conn.executemany("UPDATE checkpoints SET parent = ? WHERE id = ?",
                         [(a, c) for c, a in new_parent.items()])
        gone = _ids(removed)
        for table, col in (("states", "ckpt"), ("tags", "ckpt"), ("checkpoints", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {col} IN ({gone})")
        # Depth <= 1, so freeing deltas can orphan their bases at most once more.
        while True:
            dead = conn.execute(
                "SELECT r.blob, b.base, b.size FROM refs AS r JOIN blobs AS b "
                "ON b.id = r.blob WHERE r.n <= 0").fetchall()
            if not dead:
                break
            conn.executemany("DELETE FROM blobs WHERE id = ?", [(d[0],) for d in dead])
            conn.executemany("DELETE FROM refs WHERE blob = ?", [(d[0],) for d in dead])
            conn.executemany("UPDATE refs SET n = n - 1 WHERE blob = ?",
                             [(d[1],) for d in dead if d[1] is not None])
            report.blobs_freed += len(dead)
            report.bytes_freed += sum(d[2] for d in dead)
        store._views.clear()
    return report


def _ids(ids) -> str:
    return ",".join(str(int(i)) for i in ids) or "NULL"
