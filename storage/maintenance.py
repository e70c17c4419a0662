"""verify() and prune(): the cold paths, written for clarity over speed.

Both work from the ``maps`` rows (one per checkpoint) and a freshly loaded
blob catalogue, computing each checkpoint's image as its parent's image with
its own map applied -- independently of the writer's cached views and of
the digests it maintained incrementally.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from . import codec, validate
from .codec import CODEC_LZ4_DELTA, PAGE_SIZE
from .errors import CorruptionError, InvalidArgumentError
from .store import generation
from .packs import CODEC_FREED, Catalog, blob_crc, decode_into, pack_meta_check


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
    folded_versions: int                # map entries copied into kept descendants
    blobs_freed: int                    # blobs in the packs deleted
    bytes_freed: int                    # pack bytes deleted; the file shrinks on vacuum()
    tags_removed: list[str]
    dry_run: bool = False


_LIMIT = 20                             # problems listed per kind
_VERIFY_BLOBS = 8192                    # blobs decoded at a time (32 MiB)


def _load_maps(conn, page_count: int, problems: list | None):
    """ckpt -> (pages, blobs) for every intact map row."""
    from .store import parse_map
    maps = {}
    for row in conn.execute("SELECT ckpt, n, pages, blobs, chk FROM maps ORDER BY ckpt"):
        try:
            maps[row[0]] = parse_map(row, page_count)
        except CorruptionError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return maps


def _images(parents: dict, maps: dict, page_count: int, wanted=None):
    """Yield (ckpt, image, parent image) in id order, keeping an image only
    until its last child is done (a chain holds two at a time)."""
    children = collections.Counter(p for p in parents.values() if p is not None)
    alive: dict[int, np.ndarray] = {}
    zero = np.zeros(page_count, np.int64)
    for c in sorted(parents):
        p = parents[c]
        base = zero if p is None else alive.get(p)
        if base is None:                 # parent missing (reported elsewhere)
            base = zero
        img = base.copy()
        if c in maps:
            pages, blobs = maps[c]
            img[pages] = blobs
        if wanted is None or c in wanted:
            yield c, img, base
        if p is not None and p in alive:
            children[p] -= 1
            if children[p] <= 0:
                del alive[p]
        if children[c] > 0:
            alive[c] = img


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
        parents, digests = {}, {}
        for row in conn.execute("SELECT id, parent, created, trigger, step, meta, stats, digest "
                                "FROM checkpoints"):
            try:
                c = validate.integer(row[0], "checkpoint", "checkpoints.id", 0,
                                     validate.MAX_CHECKPOINT_ID - 1)
                parents[c], digests[c] = row[1] if row[1] is None or type(row[1]) is int else -1, row[7]
                validate.checkpoint_row(row)
            except CorruptionError as exc:
                P.append(f"{exc}")
        gen = generation(conn, store.filename)

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

        # Packs: metadata, then every blob decoded and checked.
        cat = Catalog.load(conn, gen)
        for pk in sorted(cat.packs.values(), key=lambda x: x.id):
            if pk.damaged:
                P.append(f"pack {pk.id} (checkpoint {pk.ckpt}): {pk.damaged}")
        maps = _load_maps(conn, n_pages, P)
        for c in sorted(set(parents) - set(maps)):
            if not any(f"page map of checkpoint {c} " in p for p in P):
                P.append(f"checkpoint {c}: page map is missing")
        for c in sorted(set(maps) - set(parents)):
            P.append(f"page map of unknown checkpoint {c}")

        users = {}                                  # blob -> "checkpoint c page p", for messages
        missing = 0
        for c, (pages, blobs) in sorted(maps.items()):
            nz = blobs > 0
            for p, b in zip(pages[nz].tolist(), blobs[nz].tolist()):
                users.setdefault(b, f"checkpoint {c} page {p}")
            bad = nz & ~cat.known(blobs)
            for i in np.flatnonzero(bad).tolist():
                missing += 1
                if missing <= _LIMIT:
                    P.append(f"checkpoint {c}, page {int(pages[i])}: references missing blob "
                             f"{int(blobs[i])}")

        damaged = 0
        n_blobs = 0
        data_ids = {r[0] for r in conn.execute("SELECT id FROM pack_data")}
        for pid in sorted(data_ids - set(cat.packs)):
            P.append(f"pack {pid}: data without a pack row")
        for pk in sorted(cat.packs.values(), key=lambda x: x.id):
            if pk.damaged:
                continue
            ids = np.arange(pk.first, pk.first + pk.n)
            ids = ids[cat.pack[ids] == pk.id]          # freed slots hold no blob
            n_blobs += len(ids)
            if not len(ids):
                P.append(f"pack {pk.id} (checkpoint {pk.ckpt}): holds no blob")
                continue
            # in slices: a pack may claim many blobs, and memory stays bounded
            buf = np.empty(min(len(ids), _VERIFY_BLOBS) * PAGE_SIZE, np.uint8)
            try:
                for lo in range(0, len(ids), _VERIFY_BLOBS):
                    part = ids[lo:lo + _VERIFY_BLOBS]
                    decode_into(conn, cat, part, np.arange(len(part)) * PAGE_SIZE, buf)
                continue
            except CorruptionError as exc:
                first_problem = str(exc)
            bad_here = []
            one = np.empty(PAGE_SIZE, np.uint8)
            data = conn.execute("SELECT data FROM pack_data WHERE id = ?", (pk.id,)).fetchone()
            data = data[0] if data else None
            if not isinstance(data, bytes):
                bad_here = [(int(ids[0]), f"pack {pk.id}: has no data")]
            else:
                for b in ids.tolist():
                    s, e = int(cat.start[b]), int(cat.end[b])
                    if len(data) < e or blob_crc(data[s:e]) != int(cat.crc[b]):
                        bad_here.append((b, f"blob {b}: stored bytes fail their checksum"))
                        continue
                    try:
                        decode_into(conn, cat, np.array([b]), np.zeros(1, np.int64), one)
                    except CorruptionError as exc:
                        if f"blob {b}" in str(exc) or cat.codec[b] != CODEC_LZ4_DELTA:
                            bad_here.append((b, f"blob {b}: {str(exc).split(': ', 1)[-1]}"))
            if not bad_here:
                bad_here = [(int(ids[0]), first_problem)]
            for b, msg in bad_here:
                damaged += 1
                if damaged <= _LIMIT:
                    P.append(f"{msg} (pack {pk.id} of checkpoint {pk.ckpt}, {_who(users, b)})")

        # Reference counts: map entries + delta bases, per pack.
        expect = _expected_refs(cat, maps)
        got = {}
        for pid, n in conn.execute("SELECT pack, n FROM refs"):
            if type(n) is int:
                got[pid] = n
            else:
                P.append(f"pack {pid}: stored refs.n is not an integer ({n!r:.40})")
        for pid in sorted(set(got) | set(cat.packs)):
            if pid not in cat.packs:
                P.append(f"pack {pid}: reference count of a missing pack")
            elif pid not in got:
                P.append(f"pack {pid}: no reference count")
            elif got[pid] != expect.get(pid, 0):
                P.append(f"pack {pid}: reference count {got[pid]} but "
                         f"{expect.get(pid, 0)} references")
            elif not got[pid]:
                P.append(f"pack {pid}: referenced by nothing")

        # Digests, recomputed from the maps and the blobs' content hashes.
        terms_ok = {}
        for c, img, base in _images(parents, maps, n_pages):
            if parents[c] is None or parents[c] not in terms_ok:
                nz = np.flatnonzero(img)
                val = codec.sum128(codec.terms(nz, cat.hash[np.where(cat.known(img[nz]), img[nz], 0)]))
            else:
                pages = maps[c][0] if c in maps else np.zeros(0, np.int64)
                oldb, newb = base[pages], img[pages]
                val = (terms_ok[parents[c]]
                       - codec.sum128(codec.terms(pages, cat.hash[np.where(cat.known(oldb) | (oldb == 0), oldb, 0)]))
                       + codec.sum128(codec.terms(pages, cat.hash[np.where(cat.known(newb) | (newb == 0), newb, 0)])))
            val &= (1 << 128) - 1
            terms_ok[c] = val
            rec = digests[c]
            if not isinstance(rec, bytes) or len(rec) != 16:
                P.append(f"checkpoint {c}: recorded image digest is damaged ({rec!r:.40})")
            elif codec.digest_to_bytes(val) != rec:
                P.append(f"checkpoint {c}: image digest {codec.digest_hex(val)} does not match "
                         f"recorded {codec.digest_hex(codec.digest_from_bytes(rec))}")

        n_states = 0
        for c, name, hsh, data in conn.execute("SELECT ckpt, name, hash, data FROM states"):
            name = name if isinstance(name, str) else repr(name)[:40]
            n_states += 1
            if c not in parents:
                P.append(f"checkpoint {c}: state {name!r} of an unknown checkpoint")
            if not isinstance(data, bytes) or codec.content_hash(data) != hsh:  # NULL after truncation
                P.append(f"checkpoint {c}: state {name!r} does not match its hash")
        for name, c in conn.execute("SELECT name, ckpt FROM tags"):
            if c not in parents:
                P.append(f"tag {name!r:.60}: names unknown checkpoint {c!r:.40}")

    rep.checked = dict(checkpoints=len(parents), maps=len(maps),
                       map_entries=int(sum(len(p) for p, _ in maps.values())),
                       packs=len(cat.packs), blobs=n_blobs, damaged_blobs=damaged,
                       states=n_states)


def _who(users: dict, b: int) -> str:
    u = users.get(b)
    return f"used by {u}" if u else "unreferenced"


def _expected_refs(cat: Catalog, maps: dict, live_packs=None) -> dict[int, int]:
    """pack -> map entries naming its blobs + delta blobs (in ``live_packs``,
    default all intact packs) based on them."""
    parts = [cat.pack[b[(b > 0) & cat.known(b)]] for _, b in maps.values()]
    ids = np.flatnonzero((cat.pack[:cat.n] >= 0) & (cat.codec[:cat.n] == CODEC_LZ4_DELTA))
    if live_packs is not None:
        ids = ids[np.isin(cat.pack[ids], list(live_packs))]
    bases = cat.base[ids]
    parts.append(cat.pack[bases[cat.known(bases)]])
    allp = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    u, n = np.unique(allp, return_counts=True)
    return dict(zip(u.tolist(), n.tolist()))


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


def prune(store, *, keep_last: int | None = None, keep_ids: Iterable[int] = (),
          keep_tagged: bool = True, dry_run: bool = False) -> PruneReport:
    """Remove every checkpoint not kept.  Kept: the base (the tree root,
    always), the ``keep_last`` newest by id, ``keep_ids``, and tagged ones if
    ``keep_tagged``.  Every kept checkpoint materializes byte-for-byte as
    before: its map is recomputed against its new parent (its nearest kept
    ancestor), which folds in the versions of removed checkpoints that it
    still sees.  Then packs nothing references any more are deleted."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 0):
        raise InvalidArgumentError(f"keep_last must be None or an int >= 0, not {keep_last!r}")
    keep_ids = list(keep_ids)
    with store._write() as conn:
        parents = store._parents(conn)          # checked: parents exist and are older
        for k in keep_ids:
            store._check_id(k, parents)
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

        n = store.page_count
        maps = _load_maps(conn, n, None)
        wanted = set(new_parent) | set(new_parent.values())
        images = {c: img for c, img, _ in _images(parents, maps, n, wanted)}
        from .store import _PACK_Q
        for c in sorted(set(parents) - set(maps)):
            raise CorruptionError(f"checkpoint {c}: page map missing or damaged; prune refuses "
                                  "to rewrite around it (run verify)", checkpoint=c)
        for c, a in sorted(new_parent.items()):
            pages = np.flatnonzero(images[c] != images[a])
            blobs = images[c][pages]
            report.folded_versions += int(len(np.setdiff1d(pages, maps[c][0])))
            maps[c] = (pages, blobs)
            pb, bb = pages.astype("<i8").tobytes(), blobs.astype("<i8").tobytes()
            conn.execute("UPDATE maps SET n = ?, pages = ?, blobs = ?, chk = ? WHERE ckpt = ?",
                         (len(pages), pb, bb, codec.check63(_PACK_Q(c), pb, bb), c))
        for c in removed:
            maps.pop(c, None)
        conn.executemany("UPDATE checkpoints SET parent = ? WHERE id = ?",
                         [(a, c) for c, a in new_parent.items()])
        _fold_states(conn, parents, new_parent)
        gone = _ids(removed)
        for table, col in (("maps", "ckpt"), ("states", "ckpt"), ("tags", "ckpt"),
                           ("checkpoints", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {col} IN ({gone})")

        # Reference counts from scratch; packs at zero go, which can free
        # their deltas' bases once more (depth <= 1), so iterate.
        gen = generation(conn, store.filename)
        cat = Catalog.load(conn, gen)
        live = set(cat.packs)

        def drop_unreferenced(cat):
            nonlocal live
            while True:
                refs = _expected_refs(cat, maps, live)
                dead = {p for p in live if not refs.get(p)}
                if not dead:
                    return refs
                live -= dead
                for p in dead:
                    report.blobs_freed += cat.packs[p].n
                    report.bytes_freed += cat.packs[p].size

        refs = drop_unreferenced(cat)
        freed, saved = _compact(conn, cat, maps, live)
        report.blobs_freed += freed
        report.bytes_freed += saved
        if freed:                        # compacted deltas no longer hold their bases
            refs = drop_unreferenced(Catalog.load(conn, gen))
        dead_all = sorted(set(cat.packs) - live)
        for table in ("packs", "pack_data", "refs"):
            conn.execute(f"DELETE FROM {table} WHERE {'pack' if table == 'refs' else 'id'} "
                         f"IN ({_ids(dead_all)})")
        conn.executemany("UPDATE refs SET n = ? WHERE pack = ?",
                         [(refs[p], p) for p in sorted(live) if p in refs])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen + 1),))
    store._forget()
    return report


def _compact(conn, cat: Catalog, maps: dict, live: set) -> tuple[int, int]:
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
    for pid in sorted(live):
        pk = cat.packs[pid]
        if pk.damaged:
            continue
        ids = np.arange(pk.first, pk.first + pk.n)
        dead = ~needed[ids] & (cat.pack[ids] >= 0)
        dead_bytes = int((cat.end[ids[dead]] - cat.start[ids[dead]]).sum())
        if not dead.any() or dead_bytes * 4 < pk.size:
            continue
        row = conn.execute("SELECT data FROM pack_data WHERE id = ?", (pid,)).fetchone()
        if row is None or not isinstance(row[0], bytes) or codec.check63(row[0]) != pk.crc:
            continue                     # damaged: leave it for verify to report
        data = row[0]
        keep = ~dead & (cat.pack[ids] >= 0)
        parts = [data[s:e] if k else b"" for s, e, k in
                 zip(cat.start[ids].tolist(), cat.end[ids].tolist(), keep.tolist())]
        codecs = np.where(keep, cat.codec[ids], CODEC_FREED).astype(np.uint8)
        bases = np.where(keep, cat.base[ids], 0).astype("<i8")
        hashes = cat.hash[ids].copy()
        hashes[~keep] = 0
        crcs = np.where(keep, cat.crc[ids], 0).astype("<u8")
        ends = np.cumsum([len(p) for p in parts]).astype("<u4")
        blob = b"".join(parts)
        cb, bb, hb, eb, rb = (codecs.tobytes(), bases.tobytes(), hashes.tobytes(), ends.tobytes(),
                              crcs.tobytes())
        conn.execute("UPDATE packs SET codecs = ?, bases = ?, hashes = ?, ends = ?, crcs = ?, "
                     "mchk = ?, size = ?, crc = ? WHERE id = ?",
                     (cb, bb, hb, eb, rb, pack_meta_check(pid, pk.first, pk.n, cb, bb, hb, eb, rb),
                      len(blob), codec.check63(blob), pid))
        conn.execute("UPDATE pack_data SET data = ? WHERE id = ?", (blob, pid))
        freed += int(dead.sum())
        saved += pk.size - len(blob)
    return freed, saved


def _ids(ids) -> str:
    return ",".join(str(int(i)) for i in ids) or "NULL"
