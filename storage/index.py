"""The blob index of one open store: what the readers and the writer
share about the blobs, kept between calls.

* the blob catalogue (:class:`storage.packs.Catalog`) valid for a snapshot;
* views: checkpoint images as blob ids, checked against their digests
  (a few kept, the writer's parent usually among them);
* the writer's dedup index (content hash -> blob id) and its delta
  dictionaries from the last checkpoint (:class:`DictCache`);
* the blobs seen to decode to their content hash.

All of it is a cache of the file: :meth:`BlobIndex.forget` drops it (after a
prune), and every entry is keyed by the store's prune generation.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass

import numpy as np

from . import codec, pageloops
from .codec import PAGE_SIZE
from .errors import CorruptionError
from .formats import MAP_COLUMNS, generation, ids_sql, parse_map
from .packs import Catalog, decode_into

_VIEW_CACHE_SIZE = 4


@dataclass
class View:
    """The image of one checkpoint as blob ids (0 = zero page), and its digest."""
    blob: np.ndarray      # (page_count,) int64
    digest: int


class DictCache:
    """Decoded pages by blob id, kept from one checkpoint as delta
    dictionaries for the next: a few (sorted ids, rows) arrays, looked up
    with searchsorted -- no per-page Python when filling it."""

    def __init__(self) -> None:
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if len(ids) > 1 and not (np.diff(ids) > 0).all():      # callers pass sorted ids
            order = np.argsort(ids, kind="stable")
            ids, rows = ids[order], rows[order]
        self.chunks.append((ids, rows))
        self.size += len(ids)

    def lookup(self, wanted: np.ndarray) -> dict:
        out = {}
        for ids, rows in self.chunks:
            pos = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
            hit = np.flatnonzero(ids[pos] == wanted)
            out.update(zip(wanted[hit].tolist(), rows[pos[hit]]))
        return out


class BlobIndex:
    """The catalogue, views, dedup index, dictionaries and verified blobs of
    the store ``filename`` of ``page_count`` pages (thread-safe)."""

    def __init__(self, filename: str, page_count: int) -> None:
        self.filename = filename
        self.page_count = page_count
        self._views: collections.OrderedDict[int, View] = collections.OrderedDict()
        self._cat_lock = threading.RLock()
        self._cat: Catalog | None = None
        self._hidx: tuple = (None, {})       # ((generation, max_pack), hash -> blob id)
        self._dicts: tuple = (None, None)    # (generation, DictCache)
        # by blob id: seen to decode to its hash, or written here (1 byte an id)
        self._verified = np.zeros(0, bool)

    def catalog(self, conn) -> Catalog:
        """The blob catalogue valid for ``conn``'s snapshot (loaded once,
        extended with new packs, rebuilt after a prune)."""
        gen = generation(conn, self.filename)
        max_pack = conn.execute("SELECT coalesce(max(id), 0) FROM packs").fetchone()[0]
        with self._cat_lock:
            cat = self._cat
            if cat is None or cat.generation != gen:
                cat = Catalog.load(conn, gen)
            elif max_pack > cat.max_pack:
                cat = cat.extend(conn)
            self._cat = cat
        return cat

    def view(self, conn, path: list[int], *, cached: bool = False) -> View:
        """Blob id per page (0 = zero page) and digest of the image at
        ``path[-1]``: the page maps of the path applied in order (ids grow
        along a path), each map checked.  The writer asks for its parent
        with ``cached`` (usually the checkpoint it just wrote); reads always
        load and check the maps (a few ms), so damage is never masked."""
        ckpt = path[-1]
        view = self._views.get(ckpt) if cached else None
        if view is not None:
            return view
        row = conn.execute("SELECT digest FROM checkpoints WHERE id = ?", (ckpt,)).fetchone()
        if row is None:
            raise CorruptionError(f"checkpoint {ckpt}: its row is missing (damaged index)",
                                  checkpoint=ckpt)
        digest = row[0]
        rows = {r[0]: r for r in conn.execute(
            f"SELECT {MAP_COLUMNS} FROM maps WHERE ckpt IN ({ids_sql(path)})")}
        img = np.zeros(self.page_count, np.int64)
        for c in path:
            row = rows.get(c)
            if row is None:
                raise CorruptionError(f"checkpoint {ckpt}: the page map of checkpoint {c} "
                                      "is missing", checkpoint=ckpt)
            pages, blobs = parse_map(row, self.page_count, reading=ckpt)
            img[pages] = blobs
        view = View(img, codec.digest_from_bytes(digest) if isinstance(digest, bytes) else -1)
        # The maps must add up to the recorded digest: terms from the blobs'
        # stored hashes, numpy only (~10 ms for 1 GiB).  Catches a lost map
        # entry or one naming another valid blob before any byte is returned;
        # decoding then checks each page against its hash.
        cat = self.catalog(conn)
        if pageloops.native("read"):       # one pass in C: ~20x the numpy below
            p, got = pageloops.image_digest(img, cat.pack, cat.n, cat.hash)
        else:
            nz = np.flatnonzero(img)
            known = cat.known(img[nz])
            p = int(nz[np.flatnonzero(~known)[0]]) if not known.all() else -1
            got = codec.sum128(codec.terms(nz, cat.hash[img[nz]])) if p < 0 else 0
        if p >= 0:
            raise CorruptionError(f"checkpoint {ckpt}, page {p}: references missing blob "
                                  f"{int(img[p])}{cat.why_missing(int(img[p]))}",
                                  checkpoint=ckpt, page=p, blob=int(img[p]))
        if got != view.digest:
            raise CorruptionError(
                f"checkpoint {ckpt}: its page maps do not match the checkpoint's digest "
                f"({codec.digest_hex(got)} != {codec.digest_hex(max(view.digest, 0))}); "
                "a page map is damaged or a blob is missing", checkpoint=ckpt)
        self.remember_view(ckpt, view)
        return view

    def cached_view(self, ckpt: int) -> View | None:
        """The view of ``ckpt`` kept by :meth:`remember_view`, if still kept
        (what ``view(..., cached=True)`` returns first)."""
        with self._cat_lock:
            return self._views.get(ckpt)

    def remember_view(self, ckpt: int, view: View) -> None:
        with self._cat_lock:
            self._views[ckpt] = view
            self._views.move_to_end(ckpt)
            while len(self._views) > _VIEW_CACHE_SIZE:
                self._views.popitem(last=False)

    def hash_index(self, cat: Catalog) -> dict[bytes, int]:
        """Content hash -> blob id for every blob of ``cat`` (the writer's
        dedup index; built once, extended after each commit)."""
        with self._cat_lock:
            key, idx = self._hidx
            if key != (cat.generation, cat.max_pack):
                if key is not None and key[0] == cat.generation and key[1] < cat.max_pack:
                    newer = [cat.packs.get(i) for i in range(key[1] + 1, cat.max_pack + 1)]
                    ids = np.concatenate([np.arange(p.first, p.first + p.n) for p in newer
                                          if p is not None and not p.damaged]
                                         or [np.zeros(0, np.int64)])
                else:
                    idx = {}
                    ids = np.flatnonzero(cat.pack[:cat.n] >= 0)
                ids = ids[cat.pack[ids] >= 0]
                raw = cat.hash[ids].tobytes()
                idx.update(zip([raw[i:i + 16] for i in range(0, len(raw), 16)], ids.tolist()))
                self._hidx = ((cat.generation, cat.max_pack), idx)
            return idx

    def verify_blobs(self, conn, cat: Catalog, blobs: np.ndarray) -> np.ndarray:
        """Mask of ``blobs`` (known, > 0) that decode to their content hash:
        blobs this Store wrote or decoded before pass at once, the others are
        decoded now (once)."""
        with self._cat_lock:
            seen = self._verified
            ok = np.zeros(len(blobs), bool)
            inside = blobs < len(seen)
            ok[inside] = seen[blobs[inside]]
        todo = np.unique(blobs[~ok])
        if not len(todo):
            return ok
        good = np.ones(len(todo), bool)
        buf = np.empty(len(todo) * PAGE_SIZE, np.uint8)
        try:
            decode_into(conn, cat, todo, np.arange(len(todo)) * PAGE_SIZE, buf)
        except CorruptionError:
            one = np.empty(PAGE_SIZE, np.uint8)
            for i, b in enumerate(todo.tolist()):
                try:
                    decode_into(conn, cat, np.array([b]), np.zeros(1, np.int64), one)
                except CorruptionError:
                    good[i] = False
        self.mark_verified(todo[good])
        return ok | np.isin(blobs, todo[good])

    def dict_cache(self, cat: Catalog) -> DictCache:
        gen, d = self._dicts
        return d if gen == cat.generation and d is not None else DictCache()

    def after_commit(self, cat: Catalog, kept, new_index: dict, next_dicts: DictCache) -> None:
        """Fold a committed checkpoint's packs into the catalogue and the
        dedup index, so the next checkpoint needs no reload."""
        with self._cat_lock:
            cur = self._cat if self._cat is not None and self._cat.generation == cat.generation \
                else cat
            missing = [k for k in kept if k[0].id not in cur.packs]   # a reader may have them
            ids = np.fromiter(new_index.values(), np.int64, len(new_index))
            self.mark_verified(ids)
            new_cat = cur.with_packs(missing) if missing else cur
            self._cat = new_cat
            key, idx = self._hidx
            if key == (cat.generation, cat.max_pack):
                ok = (ids < new_cat.n) & (new_cat.pack[np.minimum(ids, new_cat.n - 1)] >= 0)
                if ok.all():
                    idx.update(new_index)
                else:                                # blobs of packs dropped at commit
                    idx.update(itertools.compress(new_index.items(), ok.tolist()))
                # It now covers exactly the packs up to this commit's last
                # (the current catalogue may hold newer ones from elsewhere).
                top = max([cat.max_pack] + [k[0].id for k in kept])
                self._hidx = ((cat.generation, top), idx)
            self._dicts = (cat.generation, next_dicts)

    def forget(self) -> None:
        """Drop every cache (after a prune)."""
        with self._cat_lock:
            self._views.clear()
            self._cat = None
            self._hidx = (None, {})
            self._dicts = (None, None)

    def mark_verified(self, blobs: np.ndarray) -> None:
        if not len(blobs):
            return
        with self._cat_lock:
            top = int(blobs.max()) + 1
            if top > len(self._verified):
                grown = np.zeros(max(top, 2 * len(self._verified)), bool)
                grown[:len(self._verified)] = self._verified
                self._verified = grown
            self._verified[blobs] = True

    @staticmethod
    def fill(conn, cat: Catalog, img: np.ndarray, flat: np.ndarray, ckpt: int, lo: int,
              zero_rest: bool = True, verified=None) -> None:
        """Decode the image ``img`` (blob id per page, pages ``lo``..) into
        ``flat`` (pages x 4096), zero pages included."""
        nz = np.flatnonzero(img)
        blobs = img[nz]
        ub, first = np.unique(blobs, return_index=True)
        fpages = nz[first]
        decode_into(conn, cat, ub, fpages * PAGE_SIZE, flat, ckpt=ckpt, pages=fpages + lo)
        if verified is not None:
            verified(ub)
        if len(ub) != len(nz):                    # pages sharing a content
            src = fpages[np.searchsorted(ub, blobs)]
            dup = src != nz
            flat[nz[dup]] = flat[src[dup]]
        if zero_rest and len(nz) != len(img):
            flat[img == 0] = 0
