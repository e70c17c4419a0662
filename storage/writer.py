"""The checkpoint writer: one checkpoint, written inside one transaction.

Built from the store's parts -- its connections (storage.connection), its
blob index (storage.index) and the row formats (storage.formats) -- not from
the Store object.  Pages are deduplicated store-wide by content hash,
compressed (LZ4, or LZ4 against the page's previous version) in C when
storage.pageloops is loaded, and joined into packs; a checkpoint's only
pack is inserted on the writer's own thread at commit, a larger one's packs
by a second thread while the next pack is encoded.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import codec, pageloops, tree, validate
from .codec import CODEC_LZ4, CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE, ZERO_HASH, content_hash
from .connection import Connections, sqlite_errors
from .errors import CorruptionError, InvalidArgumentError, StoreError
from .formats import MAP_COLUMNS, MAX_PACK_ID, PACK_COLUMNS, PackInfo, blob_crc, map_row, pack_row
from .index import BlobIndex, DictCache, View
from .packs import decode_blobs, decode_into
from .transfer import MissingContentError, Transfer, TransferError, TransferPack

#: New contents compressed at a time (<= 1 MiB of data): SQLite reads a
#: ~1 MiB row several times faster than a 20 MiB one, and prune frees space
#: per pack ...
PACK_PAGES = 256
#: Pages one C encoding job takes (its blobs then go to packs PACK_PAGES at a
#: time): fewer, larger jobs keep the two threads busy.
ENCODE_PAGES = 4 * PACK_PAGES
#: ... joined into one pack row until it holds this many bytes.
PACK_BYTES = 1 << 20
#: A page is stored as an LZ4-dictionary delta against its previous version
#: when at most this many of its 512 8-byte words changed.
DELTA_MAX_CHANGED_WORDS = 256
#: ... and when it has at least this many non-zero words (plain LZ4 of a
#: sparser page is already ~100 bytes).
DELTA_MIN_WORDS = 16
#: Plain pages that compress to at most this many bytes are not kept as
#: dictionaries: they are sparse, and a sparse page's successor is stored
#: plainly anyway (DELTA_MIN_WORDS).
DICT_MIN_BYTES = 128
#: Pack bytes inserted between early flushes of the WAL (durable stores).
EARLY_SYNC_BYTES = 32 << 20
#: Decoded pages the writer keeps from one checkpoint as delta dictionaries
#: for the next (hot pages are rewritten checkpoint after checkpoint).
DICT_CACHE_PAGES = 32768


def _encode_py(data: np.ndarray, rows: np.ndarray, use: np.ndarray, base: np.ndarray,
               dict_of: dict) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """The pure-Python twin of ``pageloops.encode``: pages ``data[rows]``,
    LZ4-delta against ``dict_of[base]`` where ``use``, else LZ4, raw where
    that does not shrink a page.  Returns (bytes, codecs, lengths, crcs)."""
    c, P = codec.lz4_compress, PAGE_SIZE
    flat = memoryview(data.reshape(-1))
    rl = rows.tolist()
    enc = [c(flat[i * P:(i + 1) * P], store_size=False, dict=dict_of[b]) if u
           else c(flat[i * P:(i + 1) * P], store_size=False)
           for i, u, b in zip(rl, use.tolist(), base.tolist())]
    codecs = np.where(use, CODEC_LZ4_DELTA, CODEC_LZ4).astype(np.uint8)
    lens = np.fromiter(map(len, enc), np.int64, len(enc))
    for k in np.flatnonzero(lens >= P).tolist():      # incompressible: raw
        enc[k] = flat[rl[k] * P:(rl[k] + 1) * P]
        codecs[k], lens[k] = CODEC_RAW, P
    crcs = np.fromiter(map(blob_crc, enc), np.uint64, len(enc))
    return b"".join(enc), codecs, lens, crcs


def _split_chunks(results, size: int):
    """Each (bytes, codecs, lengths, crcs) of ``results`` as runs of ``size`` blobs."""
    for blob, codecs, lens, crcs in results:
        ends = np.cumsum(lens).tolist()
        for lo in range(0, len(lens), size):
            hi = min(len(lens), lo + size)
            yield (blob[(ends[lo - 1] if lo else 0):ends[hi - 1]], codecs[lo:hi], lens[lo:hi],
                   crcs[lo:hi])


def _in_order(pool, fn, args_iter, ahead: int = pageloops.JOBS_IN_FLIGHT):
    """``fn(*args)`` for each args on ``pool``, results yielded in order, at
    most ``ahead`` running at once; on leaving early, waits for those."""
    from collections import deque
    running: deque = deque()
    try:
        for args in args_iter:
            running.append(pool.submit(fn, *args))
            if len(running) >= ahead:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for f in running:
            f.cancel()
        pageloops.wait_all([f for f in running if not f.cancelled()])   # errors: already raised


class CheckpointWriter:
    """Writes one checkpoint inside one transaction (see ``Store.checkpoint``)."""

    def __init__(self, conns: Connections, index: BlobIndex, parent: int | None, meta: dict,
                 *, transfer: bool = False) -> None:
        self._conns = conns
        #: keep what this checkpoint adds as a :class:`Transfer` (``self.transfer`` after commit)
        self._keep_transfer = bool(transfer)
        self.transfer: Transfer | None = None
        self._imported = False
        self._expect_digest: str | None = None
        self._bi = index
        self._filename = conns.filename
        self._page_count = index.page_count
        self._parent = parent
        self._meta = meta
        self._active = False
        self._failed: BaseException | None = None
        self.id: int | None = None
        self.digest: str | None = None     # hex, set on commit
        self.stats: dict = {}
        try:
            text = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"meta is not JSON-serialisable: {exc}") from None
        validate.to_store(text, "meta", validate.json_object)
        self._meta_text = text                     # what is stored: the meta as checked here
        step = meta.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise InvalidArgumentError(f"meta['step'] must be an int, not {step!r}")
        validate.to_store(step, "meta['step']", validate.optional_integer, 0, validate.MAX_STEP)
        trigger = meta.get("trigger", "base" if parent is None else "sync")
        if not isinstance(trigger, str):
            raise InvalidArgumentError(f"meta['trigger'] must be a str, not {trigger!r}")
        validate.to_store(trigger, "meta['trigger']", validate.text, 64)
        self._step, self._trigger = step, trigger

    def __enter__(self) -> "CheckpointWriter":
        conn = self._conn = self._conns.begin_write()
        try:
            with sqlite_errors(self._filename):
                try:
                    self._begin(conn)
                except BaseException:
                    self._conns.rollback()
                    raise
        except BaseException:
            self._conns.end_write()
            raise
        self._active = True
        return self

    def _begin(self, conn) -> None:
        bi, filename = self._bi, self._filename
        parents = self._conns.checked_parents(conn, tree.parents)
        if self._parent is None:
            if parents:
                raise InvalidArgumentError(
                    "parent=None is only for the base checkpoint; this store already has "
                    f"{len(parents)} checkpoint(s)")
        else:
            self._parent = tree.check_id(self._parent, parents)
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                 "('next_checkpoint_id', 'next_blob_id')"))
        self.id = validate.meta_int(meta, "next_checkpoint_id", filename,
                                    hi=validate.MAX_CHECKPOINT_ID - 1)
        next_blob = validate.meta_int(meta, "next_blob_id", filename, default=1,
                                      hi=validate.MAX_BLOB_ID)
        if parents and self.id <= max(parents):
            raise CorruptionError(f"{filename}: stored meta.next_checkpoint_id {self.id} is "
                                  f"not above the newest checkpoint {max(parents)}")
        self._t0 = time.perf_counter()
        cat = self._cat = bi.catalog(conn)
        if self._parent is None:
            view = View(np.zeros(self._page_count, np.int64), 0)
        else:
            # usually the checkpoint just written: no path needed
            view = bi.cached_view(self._parent) or bi.view(conn, tree.path_to(parents, self._parent),
                                                           cached=True)
        self._pblob = view.blob                   # read-only: the parent image
        self._pdigest = view.digest
        self._blob = view.blob.copy()             # this checkpoint's image
        self._written = np.zeros(self._page_count, bool)
        self._touched: np.ndarray | None = None    # the pages written, when known without _written
        # The highest blob id any pack row claims: the catalogue (just
        # brought up to date in this transaction) holds it for every intact
        # pack up to its max_pack, so SQL adds up only the rows it did not
        # take whole -- newer ones (none, normally) and damaged ones -- by
        # rowid, not a scan of every pack row per checkpoint (that grew with
        # the store: 0.6 ms a checkpoint at 1000 packs).
        top_pack = conn.execute("SELECT coalesce(max(id), 0) FROM packs").fetchone()[0]
        top_blob = conn.execute(
            "SELECT coalesce(max(first + n), 1) FROM packs WHERE id > ? OR id IN "
            "(SELECT value FROM json_each(?))",
            (cat.max_pack, json.dumps(sorted(cat.damaged_ids)))).fetchone()[0]
        # Blob ids are never reused (a kept high-water mark): a dropped or
        # pruned pack's ids may still key another Store object's caches.
        top_blob = validate.integer(top_blob, filename, "packs.first + packs.n", 1,
                                    validate.MAX_BLOB_ID)
        self._first_blob = self._next_blob = max(top_blob, cat.n, next_blob)
        self._next_pack = validate.integer(top_pack, filename, "packs.id", 0,
                                           MAX_PACK_ID - 2) + 1
        self._index = bi.hash_index(cat)         # content hash -> blob id, store-wide
        self._new_index: dict[bytes, int] = {}    # ... for blobs of this checkpoint
        self._new_hashes: list[bytes] = []        # by blob id - first_blob
        self._new_packs: list[tuple[PackInfo, tuple]] = []
        self._pack_data: dict[int, bytes] = {}     # pack id -> bytes (only for a transfer)
        self._inserter: ThreadPoolExecutor | None = None
        self._inserts: list = []
        self._held: tuple | None = None            # the first pack's row, not yet inserted
        self._unsynced = 0
        self._wal_fd: int | None = None
        self._native = pageloops.native("write")
        self._dicts = bi.dict_cache(cat)         # blob id -> decoded page, from recent writes
        self._next_dicts = DictCache()
        self._states: dict[str, bytes] = {}
        self.stats = dict(pages=0, zero_pages=0, unchanged_pages=0, dedup_pages=0,
                          new_blobs=0, delta_blobs=0, raw_blobs=0,
                          stored_bytes=0, raw_bytes=0, packs=0)
        self._extra_stats: dict = {}

    def _require_active(self) -> None:
        if not self._active:
            raise StoreError("checkpoint writer used outside its with-block")
        if self._failed is not None:
            raise StoreError(f"checkpoint not written: an earlier add_pages/add_transfer failed "
                             f"({self._failed}); leave the with-block to roll back")

    # -- pages --

    def add_pages(self, page_numbers, pages) -> None:
        """Store new contents of ``pages[i]`` for page ``page_numbers[i]``.
        A later call (or a later row) for the same page wins."""
        self._require_active()
        if self._imported:
            raise InvalidArgumentError("add_pages: this checkpoint's pages came from add_transfer")
        page_count = self._page_count
        pn = np.asarray(page_numbers)
        if pn.ndim != 1 or (pn.size and not np.issubdtype(pn.dtype, np.integer)):
            raise InvalidArgumentError(
                f"page_numbers must be a 1-D integer array, got shape {pn.shape} dtype {pn.dtype}")
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8 \
                or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
            got = (pages.shape, pages.dtype) if isinstance(pages, np.ndarray) else type(pages)
            raise InvalidArgumentError(f"pages must be a uint8 array of shape (n, {PAGE_SIZE}), got {got}")
        if pages.shape[0] != pn.shape[0]:
            raise InvalidArgumentError(
                f"{pn.shape[0]} page numbers for {pages.shape[0]} pages")
        if pn.size == 0:
            return
        pn = pn.astype(np.int64)
        bad = (pn < 0) | (pn >= page_count)
        if bad.any():
            raise InvalidArgumentError(
                f"page {int(pn[bad][0])} out of range (the image has {page_count} pages)")
        # Last row wins.
        uniq, last_rev = np.unique(pn[::-1], return_index=True)
        rows = len(pn) - 1 - last_rev
        if len(uniq) == len(pn) and np.array_equal(rows, np.arange(len(pn))):
            data = np.ascontiguousarray(pages)
        else:
            data = pages[rows]                       # gather copy
        try:
            with sqlite_errors(self._filename):
                self._write_batch(uniq, data)
        except BaseException as exc:
            # Part of this batch may be in the dedup index, the image or the
            # insert queue already: the checkpoint cannot be committed now.
            self._failed = exc
            raise
        self.stats["pages"] += len(uniq)
        self.stats["raw_bytes"] += len(uniq) * PAGE_SIZE

    def _write_batch(self, pn: np.ndarray, data: np.ndarray) -> None:
        stats = self.stats
        n = len(pn)
        flat = memoryview(data.reshape(-1))
        if self._native:
            # One pass in C on two threads: non-zero words and content hash of
            # each page (16-byte keys straight from numpy, no slicing loop).
            words, all_hashes = pageloops.scan(data)
            nz = np.flatnonzero(words)
            hashes = all_hashes[nz].view("V16").ravel().tolist()
        else:
            words = None
            nz = np.flatnonzero(data.view(np.uint64).any(axis=1))
            h = content_hash
            hashes = [h(flat[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in nz.tolist()]
        stats["zero_pages"] += n - len(nz)

        # Dedup against the whole store, then against this checkpoint's
        # earlier batches, through dicts (map() in C, ~0.1 us a page).
        ids = self._known_ids(hashes)
        fresh_a = np.flatnonzero(ids == 0)
        new = self._new_index
        new_k = fresh_a                              # first row of each new content
        if len(fresh_a):
            # Distinct new contents in first-seen order, their ids and first
            # rows -- dict operations in C, no per-page Python statements.
            fresh = fresh_a.tolist()
            fh = hashes if len(fresh) == len(hashes) else [hashes[k] for k in fresh]
            first = self._next_blob
            if first + len(fh) > validate.MAX_BLOB_ID:
                raise StoreError(f"{self._filename}: the store has used up its blob ids "
                                 f"(limit {validate.MAX_BLOB_ID}); start a new store")
            got = dict(zip(fh, range(first, first + len(fh))))
            if len(got) == len(fh):                  # all distinct: the common case
                uniq = fh
                ids[fresh_a] = np.arange(first, first + len(fh))
            else:
                uniq = list(dict.fromkeys(fh))
                got = dict(zip(uniq, range(first, first + len(uniq))))
                first_row = dict(zip(reversed(fh), reversed(fresh)))
                new_k = np.array(list(map(first_row.__getitem__, uniq)), np.int64)
                ids[fresh_a] = list(map(got.__getitem__, fh))
            new.update(got)
            self._new_hashes.extend(uniq)
            self._next_blob += len(uniq)
        new_ids = np.zeros(n, np.int64)
        new_ids[nz] = ids
        if len(new_k):
            rows = nz[new_k]
            self._encode_pack(pn, data, rows, uniq, ids[new_k].tolist(),
                              None if words is None else words[rows])

        changed = new_ids != self._pblob[pn]
        stats["unchanged_pages"] += int(n - changed.sum())
        stats["dedup_pages"] += int((changed & (new_ids > 0)).sum()) - len(new_k)
        self._blob[pn] = new_ids
        self._written[pn] = True

    def _known_ids(self, hashes: list) -> np.ndarray:
        """Blob id of each content hash (16-byte keys) this store holds and may
        reuse -- store-wide or written earlier in this checkpoint -- else 0."""
        new = self._new_index
        ids = np.fromiter(map(self._index.get, hashes, itertools.repeat(0)), np.int64, len(hashes))
        if new:
            miss = np.flatnonzero(ids == 0)
            if len(miss):
                ids[miss] = np.fromiter(map(new.get, [hashes[k] for k in miss.tolist()],
                                            itertools.repeat(0)), np.int64, len(miss))
        cat = self._cat
        known = (ids > 0) & (ids < cat.n)
        if known.any():
            # Never reuse a stored content that cannot be decoded any more
            # (a delta whose base is gone): store it again instead.
            k = np.flatnonzero(known)
            dead = ~cat.known(ids[k]) | ((cat.codec[ids[k]] == CODEC_LZ4_DELTA)
                                         & ~cat.known(cat.base[ids[k]]))
            ids[k[dead]] = 0
            # Never reuse a stored blob this Store has not seen decode to its
            # content hash: a forged blob can declare the hash of a page the
            # guest writes later and hold other bytes (checked once per blob).
            k = k[~dead]
            if len(k):
                self._drain()                      # one thread on the connection at a time
                ids[k[~self._bi.verify_blobs(self._conn, cat, ids[k])]] = 0
        return ids

    def _encode_pack(self, pn, data, rows, hashes, ids, words=None) -> None:
        """Encode the new contents at batch ``rows`` (blob ``ids``, increasing
        and contiguous; ``words``: their non-zero word counts, if known) into
        one or more packs.

        A page with a non-zero version in the parent image is LZ4-compressed
        with that version (or that version's base, if it is itself a delta:
        depth <= 1) as dictionary when it has at least DELTA_MIN_WORDS
        non-zero 8-byte words and at most half of them (and at most
        DELTA_MAX_CHANGED_WORDS) differ from the dictionary; every other page
        plainly.  One compression per page: the word counts (numpy, whole
        batch) predict which of the two wins without trying both.  A sparse
        page compresses to a few dozen bytes plainly, so a delta would only
        add a decompression to every restore."""
        cat = self._cat
        m = len(rows)
        prev = self._pblob[pn[rows]]
        prev = np.where(cat.known(prev), prev, 0)
        base = np.where(cat.codec[prev] == CODEC_LZ4_DELTA, cat.base[prev], prev)
        base = np.where(cat.known(base), base, 0)
        cand = np.flatnonzero(base > 0)
        if words is None:
            nonzero = (data[rows[cand]].view(np.uint64) != 0).sum(axis=1)
        else:
            nonzero = words[cand]
        dense = nonzero >= DELTA_MIN_WORDS
        cand, nonzero = cand[dense], nonzero[dense]
        words = data[rows[cand]].view(np.uint64)           # only dense pages with a base
        use = np.zeros(m, bool)
        dict_of: dict[int, bytes] = {}
        if len(cand):
            dict_of = self._dictionaries(np.unique(base[cand]))
            have = np.array([int(b) in dict_of for b in base[cand].tolist()], bool)
            cand, words, nonzero = cand[have], words[have], nonzero[have]
        if len(cand):
            dicts = np.frombuffer(b"".join(dict_of[b] for b in base[cand].tolist()),
                                  np.uint8).reshape(-1, PAGE_SIZE)
            changed = (words != dicts.view(np.uint64)).sum(axis=1)
            use[cand[changed <= np.minimum(DELTA_MAX_CHANGED_WORDS, nonzero // 2)]] = True
        # Chunks of PACK_PAGES are encoded at a time -- in C on two threads
        # (GIL released) when storage.pageloops is built -- and joined into
        # one pack until it holds PACK_BYTES (deltas are small: 256 of them
        # are a ~25 KiB row, and every row a restore touches costs a
        # lookup).  While SQLite inserts one pack (in the writer's insert
        # thread, GIL released too), the next is being encoded.
        dense: list = []                 # plain pages worth keeping as dictionaries
        # The pack being filled: its first blob id, per-chunk arrays and data.
        pend = {"first": None, "arrays": [], "hashes": [], "data": [], "bytes": 0}

        def flush():
            if pend["data"]:
                codecs, bases, lens, crcs = (np.concatenate(x) for x in zip(*pend["arrays"]))
                self._insert_pack(pend["first"], codecs, bases, pend["hashes"], lens, crcs,
                                  b"".join(pend["data"]))
                pend.update(first=None, arrays=[], hashes=[], data=[], bytes=0)

        if self._native:
            dict_at = np.zeros(m, np.int64)
            if use.any():
                dict_at[cand] = dicts.ctypes.data + np.arange(len(cand)) * PAGE_SIZE
                dict_at[~use] = 0
            encode = functools.partial(pageloops.encode, data)
            if m <= ENCODE_PAGES:          # one job: here, without a thread hand-off
                jobs = iter([encode(rows, dict_at)])
            else:
                jobs = _in_order(pageloops.pool(), encode,
                                 ((rows[lo:lo + ENCODE_PAGES], dict_at[lo:lo + ENCODE_PAGES])
                                  for lo in range(0, m, ENCODE_PAGES)))
            chunks = _split_chunks(jobs, PACK_PAGES)
        else:
            chunks = (_encode_py(data, rows[lo:lo + PACK_PAGES], use[lo:lo + PACK_PAGES],
                                 base[lo:lo + PACK_PAGES], dict_of)
                      for lo in range(0, m, PACK_PAGES))
        try:
            self._pack_chunks(chunks, m, base, ids, hashes, dense, pend, flush)
        finally:
            # no encoding job may outlive this frame (they read ``data`` and
            # the dictionaries through raw addresses)
            chunks.close()
            if self._native and hasattr(jobs, "close"):
                jobs.close()
        flush()
        # Dictionaries for the next checkpoint: those this one used and the
        # plain contents it stored -- not for a base checkpoint (all of
        # memory) and at most DICT_CACHE_PAGES.
        if self._parent is not None and self._next_dicts.size + m <= DICT_CACHE_PAGES:
            used = np.unique(base[use])
            if len(used):
                self._next_dicts.add(used, np.stack([np.frombuffer(dict_of[b], np.uint8)
                                                     for b in used.tolist()]))
            plain = np.concatenate(dense)
            if len(plain):
                self._next_dicts.add(np.asarray(ids, np.int64)[plain], data[rows[plain]])

    def _pack_chunks(self, chunks, m, base, ids, hashes, dense, pend, flush) -> None:
        """Account for each encoded chunk and add it to the pack being filled."""
        stats = self.stats
        for lo, (blob, codecs, lens, crcs) in zip(range(0, m, PACK_PAGES), chunks):
            hi = min(m, lo + PACK_PAGES)
            cu = codecs == CODEC_LZ4_DELTA
            bases = np.where(cu, base[lo:hi], 0).astype("<i8")
            dense.append(lo + np.flatnonzero(~cu & (lens > DICT_MIN_BYTES)))
            nbytes = len(blob)
            stats["new_blobs"] += hi - lo
            stats["delta_blobs"] += int(cu.sum())
            stats["raw_blobs"] += int((codecs == CODEC_RAW).sum())
            stats["stored_bytes"] += nbytes
            if pend["first"] is None:
                pend["first"] = ids[lo]
            pend["arrays"].append((codecs, bases, lens, crcs))
            pend["hashes"].extend(hashes[lo:hi])
            pend["data"].append(blob)
            pend["bytes"] += nbytes
            if pend["bytes"] >= PACK_BYTES:
                flush()

    def _insert_pack(self, first, codecs, bases, hashes, lens, crcs, blob: bytes) -> None:
        n = len(lens)
        ends = np.cumsum(lens)
        hb = b"".join(hashes)
        pid = self._next_pack
        self._next_pack += 1
        row = pack_row(pid, self.id, first, codecs, bases, hb, ends, crcs, blob)
        crc = row[-1]
        # A checkpoint's first pack is held back: most checkpoints (a few
        # hundred dirty pages) have only one, and it is then inserted on
        # this thread at commit -- starting the insert thread cost more
        # than the insert itself (1.2 of 1.5 ms a checkpoint on 2 busy
        # cores).  Only a second pack starts the thread, which takes both.
        if self._inserter is None and self._held is None:
            self._held = (row, blob)
        else:
            if self._inserter is None:
                self._inserter = ThreadPoolExecutor(1, thread_name_prefix="snapctl-pack-insert")
            if self._held is not None:
                self._inserts.append(self._inserter.submit(self._insert_rows, *self._held))
                self._held = None
            self._inserts.append(self._inserter.submit(self._insert_rows, row, blob))
            if len(self._inserts) >= pageloops.JOBS_IN_FLIGHT:    # at most JOBS_IN_FLIGHT, as packs.py/_in_order
                self._inserts.pop(0).result()
        end = ends.astype(np.int64)
        if self._keep_transfer:
            self._pack_data[pid] = blob
        self._new_packs.append((PackInfo(pid, self.id, first, n, len(blob), crc),
                                (codecs, bases.astype(np.int64),
                                 np.frombuffer(hb, np.uint8).reshape(n, 16),
                                 np.concatenate(([0], end[:-1])), end, crcs)))
        self.stats["packs"] += 1

    def _insert_rows(self, row, blob) -> None:
        conn = self._conn
        conn.execute(f"INSERT INTO packs({PACK_COLUMNS}) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        conn.execute("INSERT INTO pack_data(id, data) VALUES (?, ?)", (row[0], blob))
        # A large checkpoint spills to the WAL as it goes; with durable
        # commits, flush those frames to disk now, on this thread, while the
        # other one compresses -- so COMMIT's own fsync has little left to do
        # (it still runs: durability is SQLite's, unchanged).
        self._unsynced += len(blob)
        if self._unsynced >= EARLY_SYNC_BYTES and self._conns.synchronous in ("FULL", "EXTRA"):
            self._unsynced = 0
            try:
                if self._wal_fd is None:
                    self._wal_fd = os.open(self._filename + "-wal", os.O_RDONLY | os.O_CLOEXEC)
                os.fdatasync(self._wal_fd)
            except OSError:
                pass                               # COMMIT's fsync reports real failures

    def _drain(self) -> None:
        """Insert the held-back pack here, or wait for the pack inserts in
        flight; re-raise the first failure."""
        if self._held is not None:
            held, self._held = self._held, None
            self._insert_rows(*held)
        pending, self._inserts = self._inserts, []
        first = None
        for f in pending:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first

    def _dictionaries(self, bases: np.ndarray) -> dict[int, bytes]:
        """Decoded content of the (non-delta) blobs ``bases``: from the
        writer's cache of recent pages, else decoded from the store.  A
        damaged base is skipped (the page is stored whole; verify reports it)."""
        out = self._dicts.lookup(bases)
        missing = np.array([b for b in bases.tolist() if b not in out], np.int64)
        if len(missing):
            self._drain()                          # one thread on the connection at a time
            buf = np.empty((len(missing), PAGE_SIZE), np.uint8)
            try:
                decode_into(self._conn, self._cat, missing,
                            np.arange(len(missing)) * PAGE_SIZE, buf)
            except CorruptionError:
                self.stats["corrupt_dictionaries"] = self.stats.get("corrupt_dictionaries", 0) + 1
                return out
            for b, row in zip(missing.tolist(), buf):
                out[b] = row
        return out

    # -- transfers (another store's checkpoint, by content hash) --

    def add_transfer(self, t: Transfer) -> tuple[np.ndarray, np.ndarray]:
        """Import ``t`` -- what another store's checkpoint added (see
        storage.transfer) -- as this checkpoint's pages: its packs are
        inserted with this store's own blob ids (a content this store holds
        already is not stored again), its delta bases and page map resolved
        through this store's hash index.  Untrusted: every blob's checksum
        and decoded content hash are checked, and the image digest at commit
        against ``t.digest``, before anything is committed; ``TransferError``
        (``MissingContentError`` for a content this store does not hold)
        otherwise, and the checkpoint is rolled back.  At most one transfer,
        before any ``add_pages``.  Returns (pages, contents): the map's pages
        and their decoded contents (zero pages included), for a caller that
        keeps the image in memory too."""
        self._require_active()
        if self._imported or self.stats["pages"]:
            raise InvalidArgumentError("add_transfer: one transfer per checkpoint, before any add_pages")
        if not isinstance(t, Transfer):
            raise InvalidArgumentError(f"add_transfer takes a Transfer, not {type(t).__name__}")
        self._imported = True
        try:
            with sqlite_errors(self._filename):
                return self._import(t)
        except BaseException as exc:
            self._failed = exc
            raise

    def _import(self, t: Transfer) -> tuple[np.ndarray, np.ndarray]:
        P, pc, cat, stats = PAGE_SIZE, self._page_count, self._cat, self.stats
        pages = np.asarray(t.pages)
        mhash = np.asarray(t.hashes)
        if pages.ndim != 1 or (pages.size and not np.issubdtype(pages.dtype, np.integer)) \
                or mhash.dtype != np.uint8 or mhash.shape != (len(pages), 16):
            raise TransferError("transfer: malformed page map")
        pages = pages.astype(np.int64)
        if len(pages) > pc or (len(pages) and (pages[0] < 0 or pages[-1] >= pc
                                               or not (pages[1:] > pages[:-1]).all())):
            raise TransferError(f"transfer: page map out of range or not increasing "
                                f"(the image has {pc} pages)")
        packs = list(t.packs)
        nblobs = sum(p.n for p in packs if isinstance(p, TransferPack))
        if len(packs) > nblobs or nblobs > 2 * pc + 256:
            raise TransferError(f"transfer: {nblobs} blobs in {len(packs)} packs is more than an "
                                f"image of {pc} pages can need")
        if not t.full and t.parent_digest is not None \
                and t.parent_digest != codec.digest_hex(self._pdigest):
            raise TransferError("transfer: it applies to another image than this checkpoint's parent")
        for p in packs:
            if not isinstance(p, TransferPack):
                raise TransferError("transfer: a pack is not a TransferPack")
            if not p.parsed_intact():                # (a parsed pack was checked as it was parsed)
                p.check()
        # Every blob's checksum (what this store will record for it).
        xh = blob_crc
        for k, p in enumerate(packs):
            if p.crcs_from_data:
                continue                             # taken from these very bytes on arrival
            if pageloops.native("read"):           # one C call per pack
                got = pageloops.crcs(p.data, p.ends)
            else:
                mv = memoryview(p.data)
                got = np.fromiter(map(xh, [mv[s:e] for s, e in zip(p.starts.tolist(), p.ends.tolist())]),
                                  np.uint64, p.n)
            if not np.array_equal(got, np.asarray(p.crcs, np.uint64)):
                i = int(np.flatnonzero(got != p.crcs)[0])
                raise TransferError(f"transfer: pack {k}, blob {i}: its bytes fail their checksum")

        # All blobs as flat arrays (transfer order: a base before its deltas).
        if len(packs) == 1:                        # the usual case: no joining
            p = packs[0]
            codecs = np.asarray(p.codecs, np.uint8)
            bhash = np.asarray(p.bases)
            thash = np.ascontiguousarray(p.hashes)
            ends = np.asarray(p.ends, np.int64)
            starts = np.zeros(nblobs, np.int64)
            starts[1:] = ends[:-1]
            lens = ends - starts
            which = np.zeros(nblobs, np.int64)
        elif packs:
            codecs = np.concatenate([p.codecs for p in packs]).astype(np.uint8)
            bhash = np.concatenate([p.bases for p in packs])
            thash = np.ascontiguousarray(np.concatenate([p.hashes for p in packs]))
            starts = np.concatenate([p.starts for p in packs])
            lens = np.concatenate([np.diff(np.concatenate(([0], p.ends))) for p in packs])
            which = np.repeat(np.arange(len(packs)), [p.n for p in packs])
        else:
            codecs, which = np.zeros(0, np.uint8), np.zeros(0, np.int64)
            bhash = thash = np.zeros((0, 16), np.uint8)
            starts = lens = np.zeros(0, np.int64)
        th = thash.view("V16").ravel().tolist() if nblobs else []
        # first occurrence of each content (later keys of the reversed zip win)
        pos_of = dict(zip(reversed(th), range(nblobs - 1, -1, -1)))
        have = self._known_ids(th) if th else np.zeros(0, np.int64)
        is_delta = codecs == CODEC_LZ4_DELTA
        dj = np.flatnonzero(is_delta)
        bh = bhash[dj].view("V16").ravel().tolist() if len(dj) else []
        # A delta's base: earlier in this transfer, else held by this store.
        bpos = np.fromiter(map(pos_of.get, bh, itertools.repeat(-1)), np.int64, len(bh))
        inside = bpos >= 0
        if (bpos[inside] >= dj[inside]).any() or is_delta[bpos[inside]].any():
            raise TransferError("transfer: a delta's base is not an earlier plain blob")
        bstore = np.zeros(len(dj), np.int64)
        if (~inside).any():
            out_k = np.flatnonzero(~inside)
            bstore[out_k] = self._known_ids([bh[k] for k in out_k.tolist()])
            if (bstore[out_k] == 0).any():
                k = int(out_k[np.flatnonzero(bstore[out_k] == 0)[0]])
                raise MissingContentError(f"transfer: delta base {bh[k].hex()} is not in this store")
        # A transfer blob this store holds already is not stored again -- unless a
        # delta of the transfer needs it as its base and this store's copy is a delta.
        keep = have == 0
        as_base = np.zeros(nblobs, bool)
        as_base[bpos[inside]] = True
        keep |= as_base & (have > 0) & (cat.codec[np.where(have < cat.n, have, 0)] == CODEC_LZ4_DELTA)
        repeats = len(pos_of) != nblobs
        if repeats:                                # a repeated content: once
            first_pos = np.fromiter(map(pos_of.__getitem__, th), np.int64, nblobs)
            keep &= first_pos == np.arange(nblobs)

        # Decode everything (plain first, then deltas) and check every content hash.
        buf = np.empty((nblobs, P), np.uint8)
        dict_at = np.zeros(nblobs, np.int64)
        dicts = None
        if len(dj):
            dict_at[dj[inside]] = buf.ctypes.data + bpos[inside] * P
            if (~inside).any():
                ids = bstore[~inside]
                got = self._dictionaries(np.unique(ids))
                if not all(int(b) in got for b in ids.tolist()):
                    raise MissingContentError("transfer: a delta base of this store cannot be read")
                u = np.unique(ids)
                dicts = np.stack([np.asarray(got[int(b)], np.uint8).reshape(P) for b in u.tolist()])
                dict_at[dj[~inside]] = dicts.ctypes.data + np.searchsorted(u, ids) * P
        parts = (np.flatnonzero(~is_delta), dj) if len(dj) else (np.arange(nblobs),)
        for part in parts:
            for k in (range(len(packs)) if len(packs) == 1 else np.unique(which[part]).tolist()):
                sel = part if len(packs) == 1 else part[which[part] == k]
                if not len(sel):
                    continue
                bad = decode_blobs(packs[k].data, starts[sel], lens[sel], codecs[sel], buf, sel,
                                   dict_at[sel], thash[sel])
                if bad >= 0:
                    raise TransferError(f"transfer: pack {k}, blob "
                                        f"{int(sel[bad]) - int(np.flatnonzero(which == k)[0])}: does "
                                        "not decode to its content hash")

        # Resolve the page map: every content must be in the transfer or this store.
        mh = mhash.view("V16").ravel().tolist() if len(pages) else []
        mpos = np.fromiter(map(pos_of.get, mh, itertools.repeat(-1)), np.int64, len(mh))
        zero = (mhash == np.frombuffer(ZERO_HASH, np.uint8)).all(axis=1)
        mstore = np.zeros(len(mh), np.int64)
        look = np.flatnonzero((mpos < 0) & ~zero)
        if len(look):
            mstore[look] = self._known_ids([mh[k] for k in look.tolist()])
            if (mstore[look] == 0).any():
                k = int(look[np.flatnonzero(mstore[look] == 0)[0]])
                raise MissingContentError(f"transfer: page {int(pages[k])}'s content {mh[k].hex()} "
                                          "is not in this store")

        # Ids: new blobs in transfer order; the others are this store's.
        first = self._next_blob
        kept = np.flatnonzero(keep)
        if first + len(kept) > validate.MAX_BLOB_ID:
            raise StoreError(f"{self._filename}: the store has used up its blob ids "
                             f"(limit {validate.MAX_BLOB_ID}); start a new store")
        blob_of = np.where(keep, 0, have)
        blob_of[kept] = np.arange(first, first + len(kept))
        if repeats:
            blob_of = blob_of[first_pos]           # repeats: their first's id
        base_of = np.zeros(nblobs, np.int64)
        base_of[dj[inside]] = blob_of[bpos[inside]]
        base_of[dj[~inside]] = bstore[~inside]
        # A delta whose base this store holds only as a delta: stored plainly (depth <= 1).
        replain = is_delta & keep & (base_of > 0) & (base_of < cat.n) \
            & (cat.codec[np.minimum(base_of, cat.n - 1)] == CODEC_LZ4_DELTA)
        self._next_blob += len(kept)
        kh = th if len(kept) == nblobs else [th[i] for i in kept.tolist()]
        self._new_index.update(zip(kh, blob_of[kept].tolist()))
        self._new_hashes.extend(kh)
        for k, p in enumerate(packs):
            sel = kept if len(packs) == 1 else kept[which[kept] == k]
            if not len(sel):
                continue
            lo = 0 if len(packs) == 1 else int(np.flatnonzero(which == k)[0])
            cd, ln, cr = codecs[sel].copy(), lens[sel].copy(), np.asarray(p.crcs)[sel - lo].copy()
            if len(sel) == p.n and not replain[sel].any():
                data = p.data
            else:
                mv = memoryview(p.data)
                parts = []
                for j, i in enumerate(sel.tolist()):
                    if replain[i]:
                        enc = codec.lz4_compress(buf[i], store_size=False)
                        cd[j] = CODEC_LZ4
                        if len(enc) >= P:
                            enc, cd[j] = buf[i].tobytes(), CODEC_RAW
                        ln[j], cr[j] = len(enc), blob_crc(enc)
                        parts.append(enc)
                    else:
                        parts.append(mv[int(starts[i]):int(starts[i] + lens[i])])
                data = b"".join(parts)
            bases = np.where(cd == CODEC_LZ4_DELTA, base_of[sel], 0).astype("<i8")
            self._insert_pack(int(blob_of[sel[0]]), cd, bases,
                              kh if len(packs) == 1 else [th[i] for i in sel.tolist()], ln, cr, data)
            stats["new_blobs"] += len(sel)
            stats["delta_blobs"] += int(np.count_nonzero(cd == CODEC_LZ4_DELTA))
            stats["raw_blobs"] += int(np.count_nonzero(cd == CODEC_RAW))
            stats["stored_bytes"] += len(data)

        ids = np.where(zero, 0, np.where(mpos >= 0, blob_of[np.maximum(mpos, 0)] if nblobs else 0,
                                         mstore))
        if t.full:                                 # the whole image: unlisted pages are zero
            self._blob[:] = 0
            self._written[:] = True
        self._blob[pages] = ids
        self._written[pages] = True
        if not t.full:
            self._touched = pages                  # increasing (checked above)
        self._expect_digest = t.digest
        changed = ids != self._pblob[pages]
        stats["pages"] += len(pages)
        stats["raw_bytes"] += len(pages) * P
        stats["zero_pages"] += int(zero.sum())
        stats["unchanged_pages"] += int(len(pages) - changed.sum())
        stats["dedup_pages"] += int((changed & ~zero & (mpos < 0)).sum())

        # Delta dictionaries for the next checkpoint, as add_pages keeps them.
        if self._parent is not None and self._next_dicts.size + len(kept) <= DICT_CACHE_PAGES:
            plain = kept[~is_delta[kept] & (lens[kept] > DICT_MIN_BYTES)]
            if len(plain):
                self._next_dicts.add(blob_of[plain], buf[plain])
            if dicts is not None:
                self._next_dicts.add(np.unique(bstore[~inside]), dicts)

        # The contents of the map's pages, for the caller.
        if len(mpos) == nblobs and (mpos == np.arange(nblobs)).all():
            return pages, buf                      # page i holds blob i: the usual case
        rows = np.zeros((len(pages), P), np.uint8)
        tin = mpos >= 0
        rows[tin] = buf[mpos[tin]]
        if len(look):
            ub, inv = np.unique(mstore[look], return_inverse=True)
            tmp = np.empty((len(ub), P), np.uint8)
            self._drain()
            decode_into(self._conn, cat, ub, np.arange(len(ub)) * P, tmp)
            rows[look] = tmp[inv.reshape(-1)]
        return pages, rows

    # -- states and stats --

    def add_state(self, name: str, data: bytes) -> None:
        self._require_active()
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"state name must be a non-empty string, not {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"state data must be bytes, not {type(data).__name__}")
        validate.to_store(name, "state name", validate.text)
        self._states[name] = validate.to_store(bytes(data), f"state {name!r}", validate.blob,
                                               validate.MAX_STATE_BYTES)

    def set_stats(self, d: dict) -> None:
        try:
            text = json.dumps(dict(self._extra_stats, **d))
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"stats are not JSON-serialisable: {exc}") from None
        validate.to_store(text, "stats", validate.json_object)
        self._extra_stats.update(d)

    # -- commit --

    def __exit__(self, exc_type, exc, tb) -> None:
        conn = self._conn
        try:
            with sqlite_errors(self._filename):
                if exc_type is not None:
                    self._rollback(conn)
                    return
                if self._failed is not None:
                    self._rollback(conn)
                    raise StoreError(f"checkpoint not written: add_pages/add_transfer failed inside the "
                                     f"with-block ({self._failed}); rolled back")
                try:
                    self._drain()
                    self._commit(conn)
                except BaseException:
                    self._rollback(conn)
                    raise
        finally:
            self._active = False
            if self._inserter is not None:
                self._inserter.shutdown(wait=True)
                self._inserter = None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            self._conns.end_write()

    def _export(self, pages, hashes, kept, first, new_hash, digest) -> Transfer:
        """This checkpoint as a Transfer: its map by content hash and the packs
        it wrote as encoded (delta bases by content hash), from memory."""
        cat = self._cat
        packs, new, based = [], [], []
        for info, (codecs, bases, bhashes, _start, end, crcs) in kept:
            new.append(np.arange(info.first, info.first + info.n))
            based.append(bases[bases > 0])
            bh = np.zeros((info.n, 16), np.uint8)
            d = np.flatnonzero(bases > 0)
            if len(d):
                b = bases[d]
                old = b < first
                bh[d[old]] = cat.hash[b[old]]
                bh[d[~old]] = new_hash[b[~old] - first]
            packs.append(TransferPack(codecs.copy(), bh, bhashes.copy(), end.copy(), crcs.copy(),
                                      self._pack_data[info.id]))
        cat_ids = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        return Transfer(pages.copy(), hashes.copy(), packs, codec.digest_hex(digest),
                        codec.digest_hex(self._pdigest), full=self._parent is None,
                        local={"map": self._blob[pages].copy(), "new": cat_ids(new),
                               "bases": cat_ids(based)})

    def _rollback(self, conn) -> None:
        """Let the inserts in flight finish first (their errors no longer
        matter; an interrupt while waiting still waits for them), so nothing
        touches the connection concurrently; then roll back unless SQLite
        already did (a failed COMMIT can end the transaction itself)."""
        interrupted = None
        self._held = None                          # never inserted: nothing to undo
        while self._inserts:
            try:
                self._drain()
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc
            except BaseException:  # noqa: BLE001 - the transaction is rolled back anyway
                pass
        self._conns.rollback()
        if interrupted is not None:
            raise interrupted

    def _commit(self, conn) -> None:
        cat = self._cat
        # The page map: pages whose blob differs from the parent's image.
        touched = self._touched if self._touched is not None else np.flatnonzero(self._written)
        pages = touched[self._blob[touched] != self._pblob[touched]]
        blobs = self._blob[pages]
        # Digest: the parent's, minus the old terms of those pages, plus the new.
        first = self._first_blob
        new_hash = (np.frombuffer(b"".join(self._new_hashes), np.uint8).reshape(-1, 16)
                    if self._new_hashes else np.zeros((0, 16), np.uint8))
        is_new = blobs >= first
        hashes = np.empty((len(blobs), 16), np.uint8)
        hashes[~is_new] = cat.hash[blobs[~is_new]]
        hashes[is_new] = new_hash[blobs[is_new] - first]
        digest = (pageloops.digest_update if self._native else codec.digest_update)(
            self._pdigest, pages, cat.hash[self._pblob[pages]], hashes)
        if self._expect_digest is not None and codec.digest_hex(digest) != self._expect_digest:
            raise TransferError(f"transfer: the imported image's digest {codec.digest_hex(digest)} "
                                f"is not the exporter's {self._expect_digest}")
        conn.execute(f"INSERT INTO maps({MAP_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                     map_row(self.id, pages, blobs))

        # Packs of this checkpoint that nothing names (every blob in them was
        # overwritten later in the same checkpoint) are dropped again.
        live = np.zeros(self._next_blob - first, bool)
        live[blobs[is_new] - first] = True
        for _, arrays in self._new_packs:          # an imported delta's base among the new blobs
            b = arrays[1]
            live[b[b >= first] - first] = True
        kept = []
        for info, arrays in self._new_packs:
            if live[info.first - first:info.first - first + info.n].any():
                kept.append((info, arrays))
            else:
                conn.execute("DELETE FROM packs WHERE id = ?", (info.id,))
                conn.execute("DELETE FROM pack_data WHERE id = ?", (info.id,))
                self.stats["packs"] -= 1
        if self._keep_transfer:
            self.transfer = self._export(pages, hashes, kept, first, new_hash, digest)
        # Reference counts per pack: map entries + delta bases of kept packs.
        pack_of_new = np.full(self._next_blob - first, -1, np.int64)
        for info, _ in kept:
            pack_of_new[info.first - first:info.first - first + info.n] = info.id
        def pack_of(ids):
            return np.concatenate((cat.pack[ids[ids < first]], pack_of_new[ids[ids >= first] - first]))
        # (an imported transfer's delta may have its base among its own new blobs)
        refs = [pack_of(blobs[blobs > 0])] + [pack_of(a[1][a[1] > 0]) for _, a in kept]
        counted = np.concatenate(refs) if refs else np.zeros(0, np.int64)
        conn.executemany("INSERT INTO refs(pack, n) VALUES (?, ?) "
                         "ON CONFLICT(pack) DO UPDATE SET n = n + excluded.n",
                         sorted(collections.Counter(counted.tolist()).items()))

        conn.executemany("INSERT INTO states(ckpt, name, hash, data) VALUES (?, ?, ?, ?)",
                         [(self.id, k, content_hash(v), v) for k, v in self._states.items()])
        stats = dict(self.stats)
        stats.update(self._extra_stats)
        stats["write_ms"] = round((time.perf_counter() - self._t0) * 1000, 3)
        conn.execute(
            "INSERT INTO checkpoints(id, parent, created, trigger, step, meta, stats, digest) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.id, self._parent, time.time(), self._trigger, self._step,
             self._meta_text, json.dumps(stats, sort_keys=True),
             codec.digest_to_bytes(digest)))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_checkpoint_id'",
                     (str(self.id + 1),))
        conn.execute("INSERT INTO meta(key, value) VALUES ('next_blob_id', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                     (str(self._next_blob),))
        self._conns.commit(stats.get("stored_bytes", 0) + len(pages) * 16)
        self._conns.committed_checkpoint(conn, self.id, self._parent)
        self.stats = stats
        self.digest = codec.digest_hex(digest)
        self._bi.after_commit(cat, kept, self._new_index, self._next_dicts)
        self._bi.remember_view(self.id, View(self._blob, digest))
