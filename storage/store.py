"""The page store: one SQLite file holding one machine's checkpoint tree.

Tables (see docs/store-format.md): ``checkpoints`` (the tree), ``versions``
(page, ckpt) -> blob, ``blobs`` (content-addressed, LZ4 or LZ4-delta encoded
pages), ``states`` (named byte blobs per checkpoint), ``tags``, ``meta``.

Invariants the code relies on:

* A checkpoint's id is larger than its parent's (ids are handed out in
  creation order), so "newest version of a page on the path base..N" is the
  row with the largest ``ckpt`` among the path's ids.
* Blobs are unique by content hash, so two versions hold equal bytes exactly
  when they name the same blob (or are both zero).  ``diff`` compares ids.
* A ``versions`` row exists only where the page differs from the parent's
  image (writes of unchanged content are dropped); ``history`` is the rows.

Two connections: a write connection (held by one checkpoint writer or
maintenance call at a time) and a read connection, so the main thread can
read committed checkpoints while a worker thread writes the next one.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import threading
import struct
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import xxhash

from . import codec, schema
from .codec import (CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE, ZERO_HASH,
                    content_hash, stored_checksum)
from .errors import (CorruptionError, InvalidArgumentError, StoreError,
                     UnknownCheckpointError)

_HASH_LOOKUP_CHUNK = 5000
_PACK_Q = struct.Struct("<q").pack
_VIEW_CACHE_SIZE = 2


DELTA_MIN = 128  # bytes of plain LZ4 below which no delta is tried


@dataclass
class CheckpointInfo:
    id: int
    parent: int | None
    created: float
    trigger: str
    step: int | None
    meta: dict
    stats: dict
    tags: list[str]
    digest: str


@dataclass
class _View:
    """The image of one checkpoint as blob ids (0 = zero page) and digest
    terms per page; what the writer needs of its parent."""
    blob: np.ndarray      # (page_count,) int64
    terms: np.ndarray     # (page_count, 2) uint64
    digest: int


def _ids_sql(ids: Iterable[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class Store:
    """A snapctl page store.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, wconn: sqlite3.Connection | None,
                 rconn: sqlite3.Connection, meta: dict[str, str],
                 synchronous: str = "FULL") -> None:
        self.filename = path
        self._wconn = wconn
        self._rconn = rconn
        self._wlock = threading.RLock()
        self._rlock = threading.RLock()
        self.config: dict = json.loads(meta["config"])
        self.page_count: int = int(self.config["mem_size"]) // PAGE_SIZE
        self.schema_version = int(meta["schema_version"])
        self._views: collections.OrderedDict[int, _View] = collections.OrderedDict()
        self._closed = False
        self._wal = None
        if wconn is not None:
            # SQLite's automatic WAL checkpoint runs inside COMMIT and copies
            # the whole checkpoint a second time (into the main file) before
            # the writer gets control back: measured 0.3 s -> 0.14 s commit
            # for 50k pages without it.  A background thread does that copy.
            wconn.execute("PRAGMA wal_autocheckpoint=0")
            self._wal = _WalCheckpointer(path, synchronous)
            self._wal.start()
            # A Store dropped without close() must not leak its thread.
            weakref.finalize(self, self._wal.stop)

    # --- opening -------------------------------------------------------------

    @classmethod
    def create(cls, path, config: dict, *, synchronous: str = "FULL") -> "Store":
        """Create a new store at ``path`` (which must not exist), mode 0600."""
        path = os.fspath(path)
        sync = schema.check_synchronous(synchronous)
        if not isinstance(config, dict):
            raise InvalidArgumentError("config must be a dict")
        mem = config.get("mem_size")
        if not isinstance(mem, int) or isinstance(mem, bool) or mem <= 0 or mem % PAGE_SIZE:
            raise InvalidArgumentError(
                f"config['mem_size'] must be a positive multiple of {PAGE_SIZE}, got {mem!r}")
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"config is not JSON-serialisable: {exc}") from None
        # Crash-atomic: the schema is written into a temporary file beside the
        # target and linked into place only when complete, so a process killed
        # at any moment leaves either no store or a whole (empty) one at
        # ``path`` -- never a half-made file indistinguishable from a foreign
        # SQLite database. Guest memory can hold secrets: the file is created
        # 0600 by us, so SQLite never creates it under the caller's umask;
        # SQLite gives the -wal and -shm files the main file's mode.
        if os.path.lexists(path):
            raise StoreError(f"{path}: already exists; refusing to overwrite")
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.creating-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            raise StoreError(f"{path}: directory {directory} does not exist") from None
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        try:
            conn = schema.connect(tmp, readonly=False, synchronous=sync)
            try:
                schema.initialise(conn, config)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            try:
                os.link(tmp, path)  # atomic, and fails rather than overwrite
            except FileExistsError:
                raise StoreError(f"{path}: already exists; refusing to overwrite") from None
        finally:
            Store.remove(tmp)
        try:
            wconn = schema.connect(path, readonly=False, synchronous=sync)
            _chmod_sidecars(path)
            meta = schema.read_meta(wconn, path)
            rconn = schema.connect(path, readonly=False, synchronous=sync)
        except BaseException:
            Store.remove(path)
            raise
        return cls(path, wconn, rconn, meta, sync)

    @staticmethod
    def remove(path) -> None:
        """Delete a store file and its -wal/-shm sidecars (missing ones are fine)."""
        path = os.fspath(path)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass

    @classmethod
    def open(cls, path, *, readonly: bool = False, synchronous: str = "FULL") -> "Store":
        """Open an existing store.  Raises ``NotAStoreError`` /
        ``SchemaVersionError`` without touching foreign or newer files."""
        path = os.fspath(path)
        sync = schema.check_synchronous(synchronous)
        schema.check_header(path)
        with sqlite_errors(path):
            rconn = schema.connect(path, readonly=readonly, synchronous=sync)
            try:
                meta = schema.read_meta(rconn, path)
                wconn = None if readonly else schema.connect(path, readonly=False,
                                                             synchronous=sync)
            except BaseException:
                rconn.close()
                raise
        if wconn is not None:
            _chmod_sidecars(path)
        return cls(path, wconn, rconn, meta, sync)

    def close(self) -> None:
        if self._closed:
            return
        with self._wlock, self._rlock:
            self._closed = True
            self._rconn.close()
            if self._wal is not None:
                self._wal.stop()
            if self._wconn is not None:
                # Leave a self-contained file after writing. Only then: TRUNCATE
                # waits out an active writer, so a reader in another process
                # (`snapctl list` during a run) would stall for seconds on close.
                if self._wconn.total_changes:
                    try:
                        self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error:
                        pass
                self._wconn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def readonly(self) -> bool:
        return self._wconn is None

    # --- transactions --------------------------------------------------------

    @contextmanager
    def _read(self):
        """A read transaction on the read connection: one consistent snapshot
        for multi-statement reads even while another process prunes."""
        with self._rlock, sqlite_errors(self.filename):
            self._check_open()
            conn = self._rconn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self):
        """A write transaction on the write connection (BEGIN IMMEDIATE takes
        SQLite's write lock up front, so no upgrade deadlock later)."""
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")
        with self._wlock, sqlite_errors(self.filename):
            self._check_open()
            self._wal.wait_idle()
            conn = self._wconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._wal.poke()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.filename}: store is closed")

    # --- the tree ------------------------------------------------------------

    @staticmethod
    def _parents(conn) -> dict[int, int | None]:
        return dict(conn.execute("SELECT id, parent FROM checkpoints"))

    def _path_in(self, conn, ckpt: int) -> list[int]:
        parents = self._parents(conn)
        ckpt = self._check_id(ckpt, parents)
        path = []
        node: int | None = ckpt
        while node is not None:
            path.append(node)
            node = parents[node]
        path.reverse()
        return path

    @staticmethod
    def _check_id(ckpt, parents) -> int:
        if isinstance(ckpt, bool) or not isinstance(ckpt, (int, np.integer)):
            raise InvalidArgumentError(f"checkpoint id must be an int, not {ckpt!r}")
        ckpt = int(ckpt)
        if ckpt not in parents:
            raise UnknownCheckpointError(f"no checkpoint {ckpt} in this store")
        return ckpt

    def checkpoints(self) -> list[CheckpointInfo]:
        with self._read() as conn:
            return self._infos(conn, None)

    def get(self, ckpt: int) -> CheckpointInfo:
        with self._read() as conn:
            infos = self._infos(conn, ckpt)
        if not infos:
            raise UnknownCheckpointError(f"no checkpoint {ckpt} in this store")
        return infos[0]

    def _infos(self, conn, ckpt: int | None) -> list[CheckpointInfo]:
        sql = ("SELECT id, parent, created, trigger, step, meta, stats, digest "
               "FROM checkpoints")
        args: tuple = ()
        if ckpt is not None:
            if isinstance(ckpt, bool) or not isinstance(ckpt, (int, np.integer)):
                raise InvalidArgumentError(f"checkpoint id must be an int, not {ckpt!r}")
            sql += " WHERE id = ?"
            args = (int(ckpt),)
        tags = collections.defaultdict(list)
        for name, c in conn.execute("SELECT name, ckpt FROM tags ORDER BY name"):
            tags[c].append(name)
        return [CheckpointInfo(id=r[0], parent=r[1], created=r[2], trigger=r[3],
                               step=r[4], meta=json.loads(r[5]), stats=json.loads(r[6]),
                               tags=tags.get(r[0], []),
                               digest=codec.digest_hex(codec.digest_from_bytes(r[7])))
                for r in conn.execute(sql + " ORDER BY id", args)]

    def resolve(self, ref: int | str) -> int:
        """A checkpoint id from an int, a string of digits, or a tag name."""
        with self._read() as conn:
            parents = self._parents(conn)
            if isinstance(ref, str) and not ref.isdigit():
                row = conn.execute("SELECT ckpt FROM tags WHERE name = ?", (ref,)).fetchone()
                if row is None:
                    raise UnknownCheckpointError(f"no checkpoint or tag named {ref!r}")
                return row[0]
            if isinstance(ref, str):
                ref = int(ref)
            return self._check_id(ref, parents)

    def children(self, ckpt: int) -> list[int]:
        with self._read() as conn:
            parents = self._parents(conn)
            ckpt = self._check_id(ckpt, parents)
            return sorted(c for c, p in parents.items() if p == ckpt)

    def path(self, ckpt: int) -> list[int]:
        """Checkpoint ids from the base to ``ckpt`` inclusive."""
        with self._read() as conn:
            return self._path_in(conn, ckpt)

    def digest(self, ckpt: int) -> str:
        return self.get(ckpt).digest

    def tag(self, ckpt: int, name: str) -> None:
        """Give ``ckpt`` the unique tag ``name`` (not all digits)."""
        if not isinstance(name, str) or not name or name.isdigit() or name.strip() != name:
            raise InvalidArgumentError(
                f"tag name must be a non-empty string, not all digits, without "
                f"surrounding spaces: {name!r}")
        with self._write() as conn:
            ckpt = self._check_id(ckpt, self._parents(conn))
            row = conn.execute("SELECT ckpt FROM tags WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != ckpt:
                raise StoreError(f"tag {name!r} already names checkpoint {row[0]}")
            conn.execute("INSERT OR IGNORE INTO tags(name, ckpt) VALUES (?, ?)", (name, ckpt))

    def untag(self, name: str) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount == 0:
                raise UnknownCheckpointError(f"no tag named {name!r}")

    # --- states --------------------------------------------------------------

    def state(self, ckpt: int, name: str) -> bytes:
        with self._read() as conn:
            ckpt = self._check_id(ckpt, self._parents(conn))
            row = conn.execute("SELECT hash, data FROM states WHERE ckpt = ? AND name = ?",
                               (ckpt, name)).fetchone()
        if row is None:
            raise StoreError(f"checkpoint {ckpt} has no state named {name!r}")
        if not isinstance(row[1], bytes) or content_hash(row[1]) != row[0]:
            raise CorruptionError(f"checkpoint {ckpt}: state {name!r} does not match its hash",
                                  checkpoint=ckpt)
        return bytes(row[1])

    def state_names(self, ckpt: int) -> list[str]:
        with self._read() as conn:
            ckpt = self._check_id(ckpt, self._parents(conn))
            return [r[0] for r in conn.execute(
                "SELECT name FROM states WHERE ckpt = ? ORDER BY name", (ckpt,))]

    # --- writing -------------------------------------------------------------

    def checkpoint(self, parent: int | None, meta: dict | None = None) -> "CheckpointWriter":
        """Start writing a checkpoint; use as a context manager.  Everything
        added inside the ``with`` block commits atomically on exit."""
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")
        return CheckpointWriter(self, parent, dict(meta or {}))

    def _view_in(self, conn, ckpt: int | None) -> _View:
        """The writer's view of ``ckpt`` (cached for the checkpoint just
        written, otherwise one index scan of the path)."""
        n = self.page_count
        if ckpt is None:
            return _View(np.zeros(n, np.int64), np.zeros((n, 2), np.uint64), 0)
        view = self._views.get(ckpt)
        if view is not None:
            return view
        path = self._path_in(conn, ckpt)
        rows = conn.execute(
            "SELECT v.page, v.blob, b.hash FROM (SELECT page, max(ckpt) AS ck, blob "
            f"FROM versions WHERE ckpt IN ({_ids_sql(path)}) GROUP BY page) AS v "
            "JOIN blobs AS b ON b.id = v.blob").fetchall()
        blob = np.zeros(n, np.int64)
        terms = np.zeros((n, 2), np.uint64)
        if rows:
            pages = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            blob[pages] = np.fromiter((r[1] for r in rows), np.int64, len(rows))
            terms[pages] = codec.contributions(pages, [r[2] for r in rows])
        raw = conn.execute("SELECT digest FROM checkpoints WHERE id = ?", (ckpt,)).fetchone()[0]
        view = _View(blob, terms, codec.digest_from_bytes(raw))
        self._remember_view(ckpt, view)
        return view

    def _remember_view(self, ckpt: int, view: _View) -> None:
        self._views[ckpt] = view
        self._views.move_to_end(ckpt)
        while len(self._views) > _VIEW_CACHE_SIZE:
            self._views.popitem(last=False)

    # --- reading -------------------------------------------------------------

    def _check_out(self, out) -> memoryview:
        n = self.page_count
        if not isinstance(out, np.ndarray):
            raise InvalidArgumentError("out must be a numpy array (or np.memmap)")
        if out.dtype != np.uint8:
            raise InvalidArgumentError(f"out must have dtype uint8, not {out.dtype}")
        if out.shape not in ((n, PAGE_SIZE), (n * PAGE_SIZE,)):
            raise InvalidArgumentError(
                f"out must have shape ({n}, {PAGE_SIZE}) or ({n * PAGE_SIZE},), not {out.shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidArgumentError("out must be C-contiguous and writable")
        return memoryview(out.reshape(-1)).cast("B")

    def materialize(self, ckpt: int, out) -> None:
        """Fill ``out`` with guest memory as it was at ``ckpt``: one query for
        the newest version of every page on the path, decode, scatter."""
        mv = self._check_out(out)
        with self._read() as conn:
            path = self._path_in(conn, ckpt)
            digest = conn.execute("SELECT digest FROM checkpoints WHERE id = ?",
                                  (path[-1],)).fetchone()[0]
            filled = self._decode_range(conn, path, mv, 0, self.page_count - 1,
                                        check_digest=digest)
        flat = out.reshape(self.page_count, PAGE_SIZE)
        if not filled.all():
            flat[~filled] = 0

    def _decode_range(self, conn, path: list[int], mv: memoryview,
                      lo: int, hi: int, *, check_digest: bytes | None = None) -> np.ndarray:
        """Decode the visible non-zero pages ``lo..hi`` of the image at
        ``path[-1]`` into ``mv`` (page ``lo`` at offset 0); return a bool mask
        of the pages written.

        The hot loop of restore.  Phase 1: one index scan of ``versions``
        for the newest row per page on the path.  Phase 2: each distinct
        blob is read once, in id order (sequential in the file), decoded and
        checked; pages sharing a blob are copied with one numpy scatter.
        Deltas wait until their base is decoded (usually already in ``mv``).
        Per page: one row, one decompression, three hashes -- nothing else.

        Every visible ``versions`` row is checked against its ``chk`` (so a
        row damaged into naming another valid blob is caught), and with
        ``check_digest`` the whole image against the checkpoint's digest (so
        is a lost row)."""
        ckpt = path[-1]
        filled = np.zeros(hi - lo + 1, bool)
        rows = conn.execute(
            "SELECT page, max(ckpt), coalesce(blob, 0), chk FROM versions "
            f"WHERE ckpt IN ({_ids_sql(path)}) AND page BETWEEN ? AND ? GROUP BY page",
            (lo, hi)).fetchall()
        hash_of: dict[int, bytes] = {0: ZERO_HASH}
        if not rows:
            self._check_rows(ckpt, rows, hash_of, check_digest)
            return filled
        arr = np.array(rows, np.int64)
        keep = arr[:, 2] > 0
        pages, blobs = arr[keep, 0] - lo, arr[keep, 2]       # pages relative to lo
        if not len(pages):
            self._check_rows(ckpt, rows, hash_of, check_digest)
            return filled
        order = np.argsort(blobs, kind="stable")
        blobs_s, pages_s = blobs[order], pages[order]
        first = np.ones(len(blobs_s), bool)
        first[1:] = blobs_s[1:] != blobs_s[:-1]
        ubl, upg = blobs_s[first], pages_s[first]
        page_of = dict(zip(ubl.tolist(), upg.tolist()))

        decompress = codec._decompress
        h128, h64 = content_hash, stored_checksum
        deferred = []
        seen = 0
        for bid, cdc, hsh, crc, data, base in conn.execute(
                "SELECT id, codec, hash, crc, data, base FROM blobs "
                "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (json.dumps(ubl.tolist()),)):
            seen += 1
            page = page_of[bid]
            hash_of[bid] = hsh
            if cdc == 1:
                try:
                    out = decompress(data, uncompressed_size=PAGE_SIZE)
                except Exception:
                    out = None
            elif cdc == CODEC_RAW:
                out = data
            else:
                deferred.append((bid, page, cdc, hsh, crc, data, base))
                continue
            if out is None or h128(out) != hsh or h64(data) != crc:
                self._raise_corrupt(ckpt, page + lo, bid, cdc, data, crc, hsh)
            off = page * PAGE_SIZE
            mv[off:off + PAGE_SIZE] = out
        if seen != len(ubl):
            self._raise_missing(conn, ckpt, ubl, page_of, lo)
        self._check_rows(ckpt, rows, hash_of, check_digest)
        if deferred:
            self._decode_deltas(conn, ckpt, deferred, page_of, mv, lo)
        if len(ubl) != len(blobs_s):                          # pages sharing a blob
            img = np.frombuffer(mv, np.uint8).reshape(-1, PAGE_SIZE)
            src = upg[np.cumsum(first) - 1]
            img[pages_s[~first]] = img[src[~first]]
        filled[pages] = True
        return filled

    @staticmethod
    def _check_rows(ckpt, rows, hash_of, check_digest) -> None:
        """Raise unless the rows are intact.  For a whole image the digest
        alone decides (one xxh3_128 per non-zero page): a row naming another
        blob or page, or a lost row, changes the image and so the digest.
        For a partial read each row's check value is verified instead.  On a
        digest mismatch the row checks run too, to name the damaged row."""
        if check_digest is not None:
            x128, pk = xxhash.xxh3_128_digest, _PACK_Q
            terms = [x128(pk(p) + hash_of[b]) for p, _, b, _ in rows if b]
            got = codec.sum128(np.frombuffer(b"".join(terms), "<u8").reshape(-1, 2)
                               .astype(np.uint64)) if terms else 0
            if codec.digest_to_bytes(got) == check_digest:
                return
        rc = codec.row_check
        for p, c, b, k in rows:
            if rc(p, c, hash_of[b]) != k:
                raise CorruptionError(
                    f"checkpoint {ckpt}, page {p}: version row of checkpoint {c} naming blob "
                    f"{b or None} fails its check value (damaged row)",
                    checkpoint=ckpt, page=p, blob=b or None)
        if check_digest is not None:
            raise CorruptionError(
                f"checkpoint {ckpt}: restored image does not match the checkpoint's digest "
                f"({codec.digest_hex(got)} != "
                f"{codec.digest_hex(codec.digest_from_bytes(check_digest))}); "
                "a version row is missing or damaged", checkpoint=ckpt)

    def _decode_deltas(self, conn, ckpt, deferred, page_of, mv, lo) -> None:
        bases: dict[int, object] = {}
        outside = []
        for _, _, _, _, _, _, base in deferred:
            p = page_of.get(base)
            if p is not None:            # already decoded and checked into mv
                bases[base] = mv[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
            elif base is not None:
                outside.append(base)
        if outside:
            for bid, cdc, hsh, crc, data in conn.execute(
                    "SELECT id, codec, hash, crc, data FROM blobs "
                    "WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(sorted(set(outside))),)):
                try:
                    bases[bid] = codec.decode_checked(cdc, data, crc, hsh, blob=bid)
                except CorruptionError:
                    pass                 # reported against the dependent page below
        h128, h64 = content_hash, stored_checksum
        decompress = codec._decompress
        for bid, page, cdc, hsh, crc, data, base in deferred:
            d = bases.get(base)
            out = None
            if d is not None:
                try:
                    out = decompress(data, uncompressed_size=PAGE_SIZE, dict=d)
                except Exception:
                    pass
            if out is None or h128(out) != hsh or h64(data) != crc:
                self._raise_corrupt(ckpt, page + lo, bid, cdc, data, crc, hsh,
                                    conn=conn, base=base)
            off = page * PAGE_SIZE
            mv[off:off + PAGE_SIZE] = out

    @staticmethod
    def _raise_missing(conn, ckpt, ubl, page_of, lo):
        present = {r[0] for r in conn.execute(
            "SELECT id FROM blobs WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(ubl.tolist()),))}
        for b in ubl.tolist():
            if b not in present:
                raise CorruptionError(
                    f"checkpoint {ckpt}, page {page_of[b] + lo}: references missing blob {b}",
                    checkpoint=ckpt, page=page_of[b] + lo, blob=b)

    @staticmethod
    def _raise_corrupt(ckpt, page, blob, cdc, data, crc, hsh, *, conn=None, base=None):
        """Slow path, only on damage: say which blob (or its delta base) is bad."""
        dpage = None
        if cdc == CODEC_LZ4_DELTA:
            row = None
            if conn is not None and base is not None:
                row = conn.execute("SELECT codec, data, crc, hash FROM blobs WHERE id = ?",
                                   (base,)).fetchone()
            if row is None:
                raise CorruptionError(
                    f"checkpoint {ckpt}, page {page}, blob {blob}: delta base blob {base} is missing",
                    checkpoint=ckpt, page=page, blob=blob)
            dpage = codec.decode_checked(row[0], row[1], row[2], row[3], checkpoint=ckpt,
                                         page=page, blob=base)
        codec.decode_checked(cdc, data, crc, hsh, dpage, checkpoint=ckpt, page=page, blob=blob)
        raise CorruptionError(f"checkpoint {ckpt}, page {page}, blob {blob}: cannot decode",
                              checkpoint=ckpt, page=page, blob=blob)

    def read(self, ckpt: int, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest memory at guest-physical ``gpa`` as of ``ckpt``."""
        for name, v in (("gpa", gpa), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgumentError(f"{name} must be an int, not {v!r}")
        gpa, length = int(gpa), int(length)
        mem = self.page_count * PAGE_SIZE
        if gpa < 0 or length < 0:
            raise InvalidArgumentError(f"gpa and length must be >= 0 (gpa={gpa}, length={length})")
        if gpa + length > mem:
            raise InvalidArgumentError(
                f"read of {length} bytes at gpa {gpa:#x} runs past the end of RAM ({mem:#x})")
        with self._read() as conn:
            path = self._path_in(conn, ckpt)
            if length == 0:
                return b""
            lo, hi = gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE
            buf = bytearray((hi - lo + 1) * PAGE_SIZE)   # zero pages stay zero
            self._decode_range(conn, path, memoryview(buf), lo, hi)
        start = gpa - lo * PAGE_SIZE
        return bytes(buf[start:start + length])

    def read_page(self, ckpt: int, page: int) -> bytes:
        page = self._check_page(page)
        return self.read(ckpt, page * PAGE_SIZE, PAGE_SIZE)

    def _check_page(self, page) -> int:
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)):
            raise InvalidArgumentError(f"page must be an int, not {page!r}")
        if not 0 <= int(page) < self.page_count:
            raise InvalidArgumentError(
                f"page {page} out of range (the image has {self.page_count} pages)")
        return int(page)

    def _blob_view(self, conn, path: list[int]) -> np.ndarray:
        """Blob id per page (0 = zero) at ``path[-1]``, rows checked."""
        rows = conn.execute(
            "SELECT v.page, v.ck, coalesce(v.blob, 0), v.chk, coalesce(b.hash, ?) FROM "
            "(SELECT page, max(ckpt) AS ck, blob, chk FROM versions "
            f" WHERE ckpt IN ({_ids_sql(path)}) GROUP BY page) AS v "
            "LEFT JOIN blobs AS b ON b.id = v.blob", (ZERO_HASH,)).fetchall()
        self._check_rows(path[-1], [(p, c, b, k) for p, c, b, k, _ in rows],
                         {r[2]: r[4] for r in rows} | {0: ZERO_HASH}, None)
        view = np.zeros(self.page_count, np.int64)
        if rows:
            arr = np.array([(r[0], r[2]) for r in rows], np.int64)
            view[arr[:, 0]] = arr[:, 1]
        return view

    def diff(self, a: int, b: int) -> np.ndarray:
        """Sorted page numbers whose content differs between images ``a`` and
        ``b``.  Blobs are unique by content, so this compares ids, not bytes."""
        with self._read() as conn:
            va = self._blob_view(conn, self._path_in(conn, a))
            vb = self._blob_view(conn, self._path_in(conn, b))
        return np.flatnonzero(va != vb).astype(np.int64)

    def history(self, page: int) -> list[tuple[int, str]]:
        """``(checkpoint, content hash hex)`` for every checkpoint that stored
        a new version of ``page``, in id order (zero page: ``ZERO_HASH_HEX``)."""
        page = self._check_page(page)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT v.ckpt, coalesce(v.blob, 0), v.chk, coalesce(b.hash, ?) "
                "FROM versions AS v LEFT JOIN blobs AS b ON b.id = v.blob "
                "WHERE v.page = ? ORDER BY v.ckpt", (ZERO_HASH, page)).fetchall()
        for c, b, k, h in rows:
            if codec.row_check(page, c, h) != k:
                raise CorruptionError(
                    f"checkpoint {c}, page {page}: version row naming blob {b or None} "
                    "fails its check value (damaged row)", checkpoint=c, page=page, blob=b or None)
        return [(c, h.hex()) for c, _, _, h in rows]

    # --- maintenance (storage/maintenance.py) ---------------------------------

    def verify(self):
        from .maintenance import verify
        return verify(self)

    def prune(self, keep_last: int | None = None, keep_ids: Iterable[int] = (),
              keep_tagged: bool = True, *, dry_run: bool = False):
        from .maintenance import prune
        return prune(self, keep_last=keep_last, keep_ids=keep_ids,
                     keep_tagged=keep_tagged, dry_run=dry_run)

    def vacuum(self) -> None:
        """Give the space freed by ``prune`` back to the file system."""
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")
        with self._wlock, sqlite_errors(self.filename):
            self._wconn.execute("VACUUM")


class _WalCheckpointer(threading.Thread):
    """Copies committed WAL frames into the main file off the writer's path
    (PASSIVE: never blocks readers or the writer).  Its own connection, its
    own thread.

    SQLite only rewinds the WAL to its start when a write transaction begins
    after *every* frame has been copied back.  If the next checkpoint began
    while this copy was still running, the WAL would never rewind and grow
    without bound (it did: 67 GB under a continuous `snapctl run`).  So
    writers call ``wait_idle()`` before BEGIN: the copy of checkpoint N
    overlaps the guest running until checkpoint N+1, not N+1's write."""

    def __init__(self, path: str, synchronous: str) -> None:
        super().__init__(name="snapctl-wal-checkpoint", daemon=True)
        self._conn = schema.connect(path, readonly=False, synchronous=synchronous)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False

    def poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    def wait_idle(self) -> None:
        if self.is_alive():
            self._idle.wait()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass
                if not self._wake.is_set():
                    self._idle.set()
        finally:
            self._idle.set()
            self._conn.close()


@contextmanager
def sqlite_errors(filename: str):
    """Turn SQLite's exceptions into the store's: damage inside SQLite's own
    b-tree pages ("database disk image is malformed") is a CorruptionError,
    anything else SQLite raises (locked, I/O error) a StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        msg = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and (
                "malformed" in msg or "not a database" in msg or "corrupt" in msg
                or not isinstance(exc, sqlite3.OperationalError)):
            raise CorruptionError(f"{filename}: database damaged ({msg})") from exc
        raise StoreError(f"{filename}: {msg}") from exc


def _chmod_sidecars(path: str) -> None:
    for suffix in ("-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


class CheckpointWriter:
    """Writes one checkpoint inside one transaction (see ``Store.checkpoint``)."""

    def __init__(self, store: Store, parent: int | None, meta: dict) -> None:
        self._store = store
        self._parent = parent
        self._meta = meta
        self._active = False
        self.id: int | None = None
        self.digest: str | None = None     # hex, set on commit
        self.stats: dict = {}
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"meta is not JSON-serialisable: {exc}") from None
        step = meta.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise InvalidArgumentError(f"meta['step'] must be an int, not {step!r}")
        trigger = meta.get("trigger", "base" if parent is None else "sync")
        if not isinstance(trigger, str):
            raise InvalidArgumentError(f"meta['trigger'] must be a str, not {trigger!r}")

    def __enter__(self) -> "CheckpointWriter":
        st = self._store
        st._wlock.acquire()
        try:
            with sqlite_errors(st.filename):
                st._check_open()
                st._wal.wait_idle()
                conn = self._conn = st._wconn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._begin(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            st._wlock.release()
            raise
        self._active = True
        return self

    def _begin(self, conn) -> None:
        st = self._store
        parents = st._parents(conn)
        if self._parent is None:
            if parents:
                raise InvalidArgumentError(
                    "parent=None is only for the base checkpoint; this store already has "
                    f"{len(parents)} checkpoint(s)")
        else:
            self._parent = st._check_id(self._parent, parents)
        self.id = int(conn.execute(
            "SELECT value FROM meta WHERE key = 'next_checkpoint_id'").fetchone()[0])
        self._t0 = time.perf_counter()
        parent_view = st._view_in(conn, self._parent)
        self._pblob = parent_view.blob            # read-only: the parent image
        self._blob = parent_view.blob.copy()      # this checkpoint's image
        self._terms = parent_view.terms.copy()
        self._digest = parent_view.digest
        self._written = np.zeros(st.page_count, bool)
        self._next_blob = (conn.execute("SELECT max(id) FROM blobs").fetchone()[0] or 0) + 1
        self._first_new_blob = self._next_blob
        self._states: dict[str, bytes] = {}
        self.stats = dict(pages=0, zero_pages=0, unchanged_pages=0, dedup_pages=0,
                          new_blobs=0, delta_blobs=0, raw_blobs=0,
                          stored_bytes=0, raw_bytes=0)
        self._extra_stats: dict = {}

    def _require_active(self) -> None:
        if not self._active:
            raise StoreError("checkpoint writer used outside its with-block")

    # -- pages --

    def add_pages(self, page_numbers, pages) -> None:
        """Store new contents of ``pages[i]`` for page ``page_numbers[i]``.
        A later call (or a later row) for the same page wins."""
        self._require_active()
        st = self._store
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
        bad = (pn < 0) | (pn >= st.page_count)
        if bad.any():
            raise InvalidArgumentError(
                f"page {int(pn[bad][0])} out of range (the image has {st.page_count} pages)")

        # Last row wins; sorted page order also makes the versions inserts
        # append-like in the (page, ckpt) primary key.
        uniq, last_rev = np.unique(pn[::-1], return_index=True)
        rows = len(pn) - 1 - last_rev
        if len(uniq) == len(pn) and np.array_equal(rows, np.arange(len(pn))):
            data = np.ascontiguousarray(pages)
        else:
            data = pages[rows]                       # gather copy
        pn = uniq
        n = len(pn)
        with sqlite_errors(st.filename):
            self._write_batch(pn, data)
        self.stats["pages"] += n
        self.stats["raw_bytes"] += n * PAGE_SIZE

    def _write_batch(self, pn: np.ndarray, data: np.ndarray) -> None:
        conn = self._conn
        stats = self.stats
        n = len(pn)
        flat = memoryview(data.reshape(-1))
        zero = ~data.view(np.uint64).any(axis=1)
        nz = np.flatnonzero(~zero)
        stats["zero_pages"] += n - len(nz)

        h = content_hash
        hashes = [h(flat[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in nz.tolist()]
        new_ids = np.zeros(n, np.int64)              # 0 = zero page
        new_blob_rows = []
        if hashes:
            harr = np.frombuffer(b"".join(hashes), dtype="V16")
            uh, first, inverse = np.unique(harr, return_index=True, return_inverse=True)
            uhash = [hashes[i] for i in first.tolist()]
            found = self._lookup_hashes(uhash)
            uid = np.fromiter((found.get(x, 0) for x in uhash), np.int64, len(uhash))
            missing = np.flatnonzero(uid == 0)
            n_new = len(missing)
            uid[missing] = np.arange(self._next_blob, self._next_blob + n_new)
            self._next_blob += n_new
            new_ids[nz] = uid[inverse.reshape(-1)]
            if n_new:
                rep = nz[first[missing]]             # batch row holding each new content
                new_blob_rows = self._encode(pn, flat, rep, uid[missing],
                                             [uhash[i] for i in missing.tolist()])

        # Drop writes that leave the page as in the parent (keeps "a row means
        # a change" true), and replace rows this checkpoint already wrote.
        changed = new_ids != self._pblob[pn]
        stats["unchanged_pages"] += int(n - changed.sum())
        again = self._written[pn]
        refdelta = []
        if again.any():
            ap = pn[again]
            old = self._blob[ap]
            refdelta.append((old[old > 0], -1))
            conn.executemany("DELETE FROM versions WHERE page = ? AND ckpt = ?",
                             [(p, self.id) for p in ap.tolist()])
        ins = np.flatnonzero(changed)
        ins_ids = new_ids[ins]
        refdelta.append((ins_ids[ins_ids > 0], +1))

        refcount = _count(refdelta)
        if new_blob_rows:
            bases = [r[3] for r in new_blob_rows if r[3] is not None]
            if bases:
                refcount = _merge_counts(refcount, _count([(np.array(bases, np.int64), 1)]))
            conn.executemany(
                "INSERT INTO blobs(id, hash, codec, base, size, crc, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r[0], r[1], r[2], r[3], len(r[4]), stored_checksum(r[4]), r[4])
                 for r in new_blob_rows])
            conn.executemany("INSERT INTO refs(blob, n) VALUES (?, ?)",
                             [(r[0], refcount.pop(r[0], 0)) for r in new_blob_rows])
        if refcount:
            conn.executemany("UPDATE refs SET n = n + ? WHERE blob = ?",
                             [(c, b) for b, c in refcount.items() if c])
        row_hash = [ZERO_HASH] * n
        for i, h_ in zip(nz.tolist(), hashes):
            row_hash[i] = h_
        cid = self.id
        rc = codec.row_check
        conn.executemany(
            "INSERT INTO versions(page, ckpt, blob, chk) VALUES (?, ?, ?, ?)",
            [(p, cid, b if b else None, rc(p, cid, row_hash[i]))
             for i, p, b in zip(ins.tolist(), pn[ins].tolist(), ins_ids.tolist())])
        # Changed non-zero pages whose content was already stored (or repeats
        # within this batch); unchanged pages are counted separately.
        stats["dedup_pages"] += int(len(ins_ids[ins_ids > 0])) - len(new_blob_rows)

        # Digest: old terms out, new terms in (pages only, never the image).
        terms = np.zeros((n, 2), np.uint64)
        if len(nz):
            terms[nz] = codec.contributions(pn[nz], hashes)
        self._digest += codec.sum128(terms) - codec.sum128(self._terms[pn])
        self._terms[pn] = terms
        self._blob[pn] = new_ids
        self._written[pn] = changed

    def _lookup_hashes(self, hashes: list[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        conn = self._conn
        for i in range(0, len(hashes), _HASH_LOOKUP_CHUNK):
            chunk = hashes[i:i + _HASH_LOOKUP_CHUNK]
            found.update(conn.execute(
                f"SELECT hash, id FROM blobs WHERE hash IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def _encode(self, pn, flat, rep, ids, hashes) -> list[tuple]:
        """Encode the new unique contents; a page whose parent version exists
        may become an LZ4-dictionary delta against that version (or against
        that version's own base, so no delta depends on a delta).

        Plain LZ4 first; only pages still larger than DELTA_MIN bytes get the
        dictionary fetched and a delta tried: below that a delta saves at most
        a few dozen bytes but costs a fetch, a decompression and a second
        compression (measured: most of the write time on sparse pages)."""
        encoded = [codec.encode(flat[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], None) for i in rep.tolist()]
        big = [k for k, (_, data) in enumerate(encoded) if len(data) > DELTA_MIN]
        dicts = self._dictionaries(pn[rep[big]]) if big else {}
        for k in big:
            i = int(rep[k])
            d = dicts.get(int(pn[i]))
            if d is not None:
                delta = codec.delta(flat[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], d[1])
                if len(delta) < len(encoded[k][1]):
                    encoded[k] = (CODEC_LZ4_DELTA, delta, d[0])
        out = []
        stats = self.stats
        for k, enc in enumerate(encoded):
            cdc, data = enc[0], enc[1]
            base = enc[2] if cdc == CODEC_LZ4_DELTA else None
            out.append((int(ids[k]), hashes[k], cdc, base, data))
            stats["stored_bytes"] += len(data)
            stats["delta_blobs"] += cdc == CODEC_LZ4_DELTA
            stats["raw_blobs"] += cdc == CODEC_RAW
        stats["new_blobs"] += len(out)
        return out

    def _dictionaries(self, pages: np.ndarray) -> dict[int, tuple[int, bytes]]:
        """page -> (dictionary blob id, decoded bytes) for pages that have a
        non-zero version in the parent."""
        prev = self._pblob[pages]
        has = prev > 0
        if not has.any():
            return {}
        want = np.unique(prev[has])
        conn = self._conn
        blobs: dict[int, tuple[int, bytes]] = {}
        ids = want.tolist()
        for i in range(0, len(ids), _HASH_LOOKUP_CHUNK):
            chunk = ids[i:i + _HASH_LOOKUP_CHUNK]
            for bid, did, dcdc, dhash, dcrc, ddata in conn.execute(
                    "SELECT b.id, d.id, d.codec, d.hash, d.crc, d.data FROM blobs AS b "
                    "JOIN blobs AS d ON d.id = CASE WHEN b.codec = 2 THEN b.base ELSE b.id END "
                    f"WHERE b.id IN ({_ids_sql(chunk)})"):
                if dcdc == CODEC_LZ4_DELTA:
                    continue
                try:
                    blobs[bid] = (did, codec.decode_checked(dcdc, ddata, dcrc, dhash, blob=did))
                except CorruptionError:
                    # Never build on damaged bytes; the page is stored whole
                    # and verify() reports the damaged blob.
                    self.stats["corrupt_dictionaries"] = self.stats.get("corrupt_dictionaries", 0) + 1
        return {int(p): blobs[b] for p, b in zip(pages[has].tolist(), prev[has].tolist())
                if b in blobs}

    # -- states and stats --

    def add_state(self, name: str, data: bytes) -> None:
        self._require_active()
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"state name must be a non-empty string, not {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"state data must be bytes, not {type(data).__name__}")
        self._states[name] = bytes(data)

    def set_stats(self, d: dict) -> None:
        try:
            json.dumps(d)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"stats are not JSON-serialisable: {exc}") from None
        self._extra_stats.update(d)

    # -- commit --

    def __exit__(self, exc_type, exc, tb) -> None:
        st = self._store
        conn = self._conn
        try:
            with sqlite_errors(st.filename):
                if exc_type is not None:
                    conn.execute("ROLLBACK")
                    return
                try:
                    self._commit(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        finally:
            self._active = False
            st._wlock.release()

    def _commit(self, conn) -> None:
        st = self._store
        # Blobs created earlier in this checkpoint and since overwritten.
        orphans = conn.execute(
            "SELECT r.blob, b.base FROM refs AS r JOIN blobs AS b ON b.id = r.blob "
            "WHERE r.n <= 0 AND r.blob >= ?", (self._first_new_blob,)).fetchall()
        if orphans:
            conn.executemany("DELETE FROM blobs WHERE id = ?", [(o[0],) for o in orphans])
            conn.executemany("DELETE FROM refs WHERE blob = ?", [(o[0],) for o in orphans])
            conn.executemany("UPDATE refs SET n = n - 1 WHERE blob = ?",
                             [(o[1],) for o in orphans if o[1] is not None])
            self.stats["new_blobs"] -= len(orphans)
        conn.executemany("INSERT INTO states(ckpt, name, hash, data) VALUES (?, ?, ?, ?)",
                         [(self.id, k, content_hash(v), v) for k, v in self._states.items()])
        stats = dict(self.stats)
        stats.update(self._extra_stats)
        stats["write_ms"] = round((time.perf_counter() - self._t0) * 1000, 3)
        meta = self._meta
        trigger = meta.get("trigger", "base" if self._parent is None else "sync")
        conn.execute(
            "INSERT INTO checkpoints(id, parent, created, trigger, step, meta, stats, digest) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.id, self._parent, time.time(), trigger, meta.get("step"),
             json.dumps(meta, sort_keys=True), json.dumps(stats, sort_keys=True),
             codec.digest_to_bytes(self._digest)))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_checkpoint_id'",
                     (str(self.id + 1),))
        conn.execute("COMMIT")
        st._wal.poke()
        self.stats = stats
        self.digest = codec.digest_hex(self._digest)
        st._remember_view(self.id, _View(self._blob, self._terms,
                                         self._digest & ((1 << 128) - 1)))


def _count(parts) -> dict[int, int]:
    """Net reference-count change per blob id from ``(ids, +1/-1)`` parts."""
    arrays = [np.asarray(a, np.int64) for a, _ in parts]
    if not sum(len(a) for a in arrays):
        return {}
    ids = np.concatenate(arrays)
    w = np.concatenate([np.full(len(a), s, np.int64) for a, (_, s) in zip(arrays, parts)])
    u, inv = np.unique(ids, return_inverse=True)
    tot = np.bincount(inv.reshape(-1), weights=w, minlength=len(u)).astype(np.int64)
    return {int(b): int(c) for b, c in zip(u.tolist(), tot.tolist()) if c}


def _merge_counts(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out
