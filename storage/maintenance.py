"""prune(): remove checkpoints, keeping every other one byte-for-byte --
the cold path, written for clarity over speed.

It works from the ``maps`` rows and a freshly loaded blob catalogue (the
helpers it shares with verify.py), on the store's connections and blob index
(which it empties afterwards: a prune starts a new generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import codec, tree, validate
from .codec import CODEC_LZ4_DELTA
from .connection import Connections
from .errors import CorruptionError, InvalidArgumentError
from .formats import (CODEC_FREED, generation, ids_sql, map_row, pack_data_ok, pack_row, update_map,
                      update_pack)
from .index import BlobIndex
from .packs import Catalog
from .verify import VerifyReport, expected_refs, images, load_maps  # noqa: F401 (VerifyReport: its old home)


@dataclass
class PruneReport:
    kept: list[int]
    removed: list[int]
    reparented: dict[int, int]          # kept checkpoint -> its new parent
    folded_versions: int                # map entries copied into kept descendants
    blobs_freed: int                    # blobs in the packs deleted
    bytes_freed: int                    # pack bytes deleted; the file shrinks on vacuum()
    tags_removed: list[str]
    dry_run: bool = False


#: State names whose checkpoint's *descendants* need them too (docs/store-format.md):
#: a removed checkpoint's ``stream/`` states (what happened during its interval) are put in
#: front of its nearest kept descendant's own, and its ``inherited/`` states (content later
#: checkpoints refer to) are copied there.
STREAM_PREFIX, INHERITED_PREFIX = "stream/", "inherited/"


def _fold_states(conn, parents: dict, new_parent: dict) -> None:
    for c, a in sorted(new_parent.items()):
        chain, p = [], parents[c]
        while p != a:
            chain.append(p)
            p = parents[p]
        if not chain:
            continue
        chain.reverse()
        own = dict(conn.execute("SELECT name, data FROM states WHERE ckpt = ? AND (name LIKE 'stream/%' "
                                "OR name LIKE 'inherited/%')", (c,)))
        folded: dict[str, bytes] = {}
        for r in chain:
            for name, data in conn.execute("SELECT name, data FROM states WHERE ckpt = ? AND (name LIKE "
                                           "'stream/%' OR name LIKE 'inherited/%') ORDER BY name", (r,)):
                if name.startswith(STREAM_PREFIX):
                    folded[name] = folded.get(name, b"") + bytes(data)
                elif name not in own:
                    folded.setdefault(name, bytes(data))
        for name, data in folded.items():
            if name.startswith(STREAM_PREFIX):
                data += bytes(own.get(name, b""))
            conn.execute("INSERT OR REPLACE INTO states(ckpt, name, hash, data) VALUES (?, ?, ?, ?)",
                         (c, name, codec.content_hash(data), data))


def prune(conns: Connections, index: BlobIndex, *, keep_last: int | None = None,
          keep_ids: Iterable[int] = (), keep_tagged: bool = True, dry_run: bool = False,
          progress=None) -> PruneReport:
    """Remove every checkpoint not kept.  Kept: the base (the tree root,
    always), the ``keep_last`` newest by id, ``keep_ids``, and tagged ones if
    ``keep_tagged``.  Every kept checkpoint materializes byte-for-byte as
    before: its map is recomputed against its new parent (its nearest kept
    ancestor), which folds in the versions of removed checkpoints that it
    still sees.  Then packs nothing references any more are deleted.
    ``progress(done, total)``, if given, is called as the kept maps are
    rewritten and the packs compacted (units: checkpoints + packs)."""
    progress = progress or (lambda done, total: None)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 0):
        raise InvalidArgumentError(f"keep_last must be None or an int >= 0, not {keep_last!r}")
    keep_ids = list(keep_ids)
    with conns.write() as conn:
        parents = tree.parents(conn)            # checked: parents exist and are older
        for k in keep_ids:
            tree.check_id(k, parents)
        tags = validate.tags(conn.execute("SELECT name, ckpt FROM tags"), parents)
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

        n = index.page_count
        maps = load_maps(conn, n, None)
        wanted = set(new_parent) | set(new_parent.values())
        image = {c: img for c, img, _ in images(parents, maps, n, wanted)}
        for c in sorted(set(parents) - set(maps)):
            raise CorruptionError(f"checkpoint {c}: page map missing or damaged; prune refuses "
                                  "to rewrite around it (run verify)", checkpoint=c)
        done, total = 0, len(new_parent) + len(removed)
        progress(done, total)
        for c, a in sorted(new_parent.items()):
            pages = np.flatnonzero(image[c] != image[a])
            blobs = image[c][pages]
            report.folded_versions += int(len(np.setdiff1d(pages, maps[c][0])))
            maps[c] = (pages, blobs)
            update_map(conn, map_row(c, pages, blobs))
            done += 1
            progress(done, total)
        for c in removed:
            maps.pop(c, None)
        conn.executemany("UPDATE checkpoints SET parent = ? WHERE id = ?",
                         [(a, c) for c, a in new_parent.items()])
        _fold_states(conn, parents, new_parent)
        gone = ids_sql(removed)
        for table, col in (("maps", "ckpt"), ("states", "ckpt"), ("tags", "ckpt"),
                           ("checkpoints", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {col} IN ({gone})")

        # Reference counts from scratch; packs at zero go, which can free
        # their deltas' bases once more (depth <= 1), so iterate.
        gen = generation(conn, conns.filename)
        cat = Catalog.load(conn, gen)
        live = set(cat.packs)
        total = done + len(live) + 1
        progress(done, total)

        def drop_unreferenced(cat):
            nonlocal live
            while True:
                refs = expected_refs(cat, maps, live)
                dead = {p for p in live if not refs.get(p)}
                if not dead:
                    return refs
                live -= dead
                for p in dead:
                    report.blobs_freed += cat.packs[p].n
                    report.bytes_freed += cat.packs[p].size

        refs = drop_unreferenced(cat)
        freed, saved = _compact(conn, cat, maps, live, lambda k: progress(done + k, total))
        report.blobs_freed += freed
        report.bytes_freed += saved
        if freed:                        # compacted deltas no longer hold their bases
            refs = drop_unreferenced(Catalog.load(conn, gen))
        dead_all = sorted(set(cat.packs) - live)
        for table in ("packs", "pack_data", "refs"):
            conn.execute(f"DELETE FROM {table} WHERE {'pack' if table == 'refs' else 'id'} "
                         f"IN ({ids_sql(dead_all)})")
        conn.executemany("UPDATE refs SET n = ? WHERE pack = ?",
                         [(refs[p], p) for p in sorted(live) if p in refs])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen + 1),))
    index.forget()
    progress(total, total)
    return report


def _compact(conn, cat: Catalog, maps: dict, live: set, progress) -> tuple[int, int]:
    """Rewrite the live packs that lost at least a quarter of their bytes,
    keeping only the blobs still named by a map or by a live delta.  Blob
    ids stay (a freed slot keeps its id, with no bytes and CODEC_FREED), so
    no map changes.  Returns (blobs freed, bytes freed)."""
    named = np.unique(np.concatenate([b[b > 0] for _, b in maps.values()] or
                                     [np.zeros(0, np.int64)]))
    named = named[cat.known(named)]
    needed = np.zeros(cat.n, bool)
    needed[named] = True
    # The base of every delta still stored stays, named or not: an unnamed
    # delta in a pack that is not compacted stays stored, and the dedup
    # index may hand it to a later checkpoint.
    stored = np.flatnonzero(np.isin(cat.pack[:cat.n], list(live)) &
                            (cat.codec[:cat.n] == CODEC_LZ4_DELTA))
    needed[cat.base[stored]] = True
    freed = saved = 0
    for k, pid in enumerate(sorted(live)):
        progress(k)
        pk = cat.packs[pid]
        if pk.damaged:
            continue
        ids = np.arange(pk.first, pk.first + pk.n)
        dead = ~needed[ids] & (cat.pack[ids] >= 0)
        dead_bytes = int((cat.end[ids[dead]] - cat.start[ids[dead]]).sum())
        if not dead.any() or dead_bytes * 4 < pk.size:
            continue
        row = conn.execute("SELECT data FROM pack_data WHERE id = ?", (pid,)).fetchone()
        if row is None or not pack_data_ok(row[0], pk):
            continue                     # damaged: leave it for verify to report
        data = row[0]
        keep = ~dead & (cat.pack[ids] >= 0)
        parts = [data[s:e] if k else b"" for s, e, k in
                 zip(cat.start[ids].tolist(), cat.end[ids].tolist(), keep.tolist())]
        codecs = np.where(keep, cat.codec[ids], CODEC_FREED).astype(np.uint8)
        bases = np.where(keep, cat.base[ids], 0).astype("<i8")
        hashes = cat.hash[ids].copy()
        hashes[~keep] = 0
        crcs = np.where(keep, cat.crc[ids], np.uint64(0))
        ends = np.cumsum([len(p) for p in parts])
        blob = b"".join(parts)
        row = pack_row(pid, pk.ckpt, pk.first, codecs, bases, hashes.tobytes(), ends, crcs, blob)
        update_pack(conn, row)
        conn.execute("UPDATE pack_data SET data = ? WHERE id = ?", (blob, pid))
        freed += int(dead.sum())
        saved += pk.size - len(blob)
    return freed, saved
