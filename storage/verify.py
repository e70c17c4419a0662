"""verify(): every blob, reference, reference count, tree link, state and
checkpoint digest, checked -- the cold path, written for clarity over speed.

It works from the ``maps`` rows (one per checkpoint) and a freshly loaded
blob catalogue, computing each checkpoint's image as its parent's image with
its own map applied -- independently of the writer's cached views and of
the digests it maintained incrementally.  Used by Store.verify(); prune
(maintenance.py) shares the map and image helpers.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from . import codec, validate
from .codec import CODEC_LZ4_DELTA, PAGE_SIZE
from .connection import Connections
from .errors import CorruptionError
from .formats import MAP_COLUMNS, blob_crc, generation, parse_map
from .packs import Catalog, decode_into


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


class Problems:
    """The problems found, each under a structured key (kind, ids...): a
    problem already reported under its key (or one that implies it) is not
    reported again -- no searching of message text."""

    def __init__(self, out: list[str]) -> None:
        self.out = out
        self.keys: set[tuple] = set()

    def add(self, key: tuple, message: str) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self.out.append(message)

    def __contains__(self, key: tuple) -> bool:
        return key in self.keys


_LIMIT = 20                             # problems listed per kind
_VERIFY_BLOBS = 8192                    # blobs decoded at a time (32 MiB)


def load_maps(conn, page_count: int, problems: Problems | None):
    """ckpt -> (pages, blobs) for every intact map row; a damaged one raises
    CorruptionError, or with ``problems`` is reported as ("map-damaged", ckpt)."""
    maps = {}
    for row in conn.execute(f"SELECT {MAP_COLUMNS} FROM maps ORDER BY ckpt"):
        try:
            maps[row[0]] = parse_map(row, page_count)
        except CorruptionError as exc:
            if problems is None:
                raise
            problems.add(("map-damaged", exc.checkpoint), str(exc))
    return maps


def images(parents: dict, maps: dict, page_count: int, wanted=None):
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


def verify(conns: Connections, page_count: int, progress=None) -> VerifyReport:
    """Check every blob, reference, reference count, tree link, state and
    checkpoint digest; return what is damaged (never raises for damage).
    ``progress(done, total)``, if given, is called as the packs are decoded
    and the digests recomputed (units: packs + checkpoints)."""
    rep = VerifyReport()
    try:
        _verify(conns, page_count, rep, progress or (lambda done, total: None))
    except CorruptionError as exc:
        # SQLite's own structure is damaged so far that the walk cannot go on.
        rep.problems.append(str(exc))
    return rep


def _verify(conns: Connections, page_count: int, rep: VerifyReport, progress) -> None:
    P = rep.problems
    problems = Problems(P)
    n_pages = page_count
    with conns.read() as conn:
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
        gen = generation(conn, conns.filename)

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
        maps = load_maps(conn, n_pages, problems)
        for c in sorted(set(parents) - set(maps)):
            if ("map-damaged", c) not in problems:
                problems.add(("map-missing", c), f"checkpoint {c}: page map is missing")
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
        total = len(cat.packs) + len(parents)
        done = 0
        progress(done, total)
        for pk in sorted(cat.packs.values(), key=lambda x: x.id):
            done += 1
            progress(done, total)
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
                        # a delta failing only through its base: the base is reported
                        if exc.blob == b or cat.codec[b] != CODEC_LZ4_DELTA:
                            bad_here.append((b, f"blob {b}: {str(exc).split(': ', 1)[-1]}"))
            if not bad_here:
                bad_here = [(int(ids[0]), first_problem)]
            for b, msg in bad_here:
                damaged += 1
                if damaged <= _LIMIT:
                    P.append(f"{msg} (pack {pk.id} of checkpoint {pk.ckpt}, {_who(users, b)})")

        # Reference counts: map entries + delta bases, per pack.
        expect = expected_refs(cat, maps)
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
        for c, img, base in images(parents, maps, n_pages):
            done += 1
            progress(done, total)
            if parents[c] is None or parents[c] not in terms_ok:
                nz = np.flatnonzero(img)
                val = codec.sum128(codec.terms(nz, cat.hash[np.where(cat.known(img[nz]), img[nz], 0)]))
            else:
                pages = maps[c][0] if c in maps else np.zeros(0, np.int64)
                oldb, newb = base[pages], img[pages]
                val = codec.digest_update(terms_ok[parents[c]], pages,
                                          cat.hash[np.where(cat.known(oldb) | (oldb == 0), oldb, 0)],
                                          cat.hash[np.where(cat.known(newb) | (newb == 0), newb, 0)])
            val &= codec.DIGEST_MASK
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
    progress(total, total)


def _who(users: dict, b: int) -> str:
    u = users.get(b)
    return f"used by {u}" if u else "unreferenced"


def expected_refs(cat: Catalog, maps: dict, live_packs=None) -> dict[int, int]:
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
