"""The page store: one SQLite file holding one machine's checkpoint tree.

Tables (see docs/store-format.md): ``checkpoints`` (the tree), ``maps`` (one
row per checkpoint: the pages it changed and the blob each now holds),
``packs`` / ``pack_data`` (content-addressed page blobs, raw, LZ4 or
LZ4-delta, many per row), ``refs`` (per pack), ``states`` (named byte blobs
per checkpoint), ``tags``, ``meta``.

Invariants the code relies on:

* A checkpoint's id is larger than its parent's (ids are handed out in
  creation order), so the image at N is the page maps of the path base..N
  applied in id order.
* Blobs are unique by content hash, so two versions hold equal bytes exactly
  when they name the same blob (or are both zero) -- in stores this code
  wrote; ``diff`` compares content hashes, for stores from elsewhere.
* A map entry exists only where the page differs from the parent's image
  (writes of unchanged content are dropped); ``history`` is the entries.

Two connections: a write connection (held by one checkpoint writer or
maintenance call at a time) and a read connection, so the main thread can
read committed checkpoints while a worker thread writes the next one.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import sqlite3
import struct
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import codec, lock, pageloops, schema, validate
from .codec import CODEC_LZ4, CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE, content_hash
from .errors import (CorruptionError, InvalidArgumentError, StoreError,
                     UnknownCheckpointError)
from .packs import MAX_PACK_ID, Catalog, PackInfo, blob_crc, decode_into, pack_meta_check

_PACK_Q = struct.Struct("<q").pack
_VIEW_CACHE_SIZE = 4

#: New contents compressed at a time (<= 1 MiB of data): SQLite reads a
#: ~1 MiB row several times faster than a 20 MiB one, and prune frees space
#: per pack ...
PACK_PAGES = 256
#: Pages one C encoding job takes (its blobs then go to packs PACK_PAGES at a
#: time): fewer, larger jobs keep the two threads busy.
ENCODE_PAGES = 4 * PACK_PAGES
#: The WAL is copied back into the main file (in the background) after
#: this many commits, or sooner once they stored WAL_CHECKPOINT_BYTES: small
#: checkpoints then share one copy instead of each paying for its own
#: before the next may begin (see _WalCheckpointer).
WAL_CHECKPOINT_COMMITS = 8
WAL_CHECKPOINT_BYTES = 4 << 20
#: Writers hash and encode in C (storage.pageloops) when it is built.
_USE_NATIVE = True
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
    """The image of one checkpoint as blob ids (0 = zero page), and its digest."""
    blob: np.ndarray      # (page_count,) int64
    digest: int


@dataclass
class PageIndex:
    """Where checkpoint ``ckpt``'s image is: its path's page maps, its digest,
    and the directory of the packs that hold the blobs (see :meth:`Store.page_index`)."""
    ckpt: int
    path: list
    maps: np.ndarray      # (2, len(path)) int64: checkpoint and entries of each page map
    digest: int           # the checkpoint's recorded digest (128 bits)
    packs: np.ndarray     # (3, packs) int64: id, first blob id, blob count; by first id


class _DictCache:
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


def generation(conn, filename: str) -> int:
    """The store's prune generation (meta), or CorruptionError if damaged."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    if row is None:
        raise CorruptionError(f"{filename}: meta table damaged (no generation)")
    return validate.meta_int({"generation": row[0]}, "generation", filename)


def parse_map(row, page_count: int, reading: int | None = None):
    """A ``maps`` row -> (pages, blobs) int64 arrays, checked; a damaged
    row raises ``CorruptionError`` naming the checkpoint being read."""
    ckpt, n, pages, blobs, chk = row
    who = ckpt if reading is None else reading
    ok = (type(ckpt) is int and 0 <= ckpt < validate.MAX_CHECKPOINT_ID
          and isinstance(pages, bytes) and isinstance(blobs, bytes) and type(n) is int
          and len(pages) == len(blobs) == 8 * n
          and codec.check63(_PACK_Q(ckpt), pages, blobs) == chk)
    if ok:
        p = np.frombuffer(pages, "<i8").astype(np.int64)
        b = np.frombuffer(blobs, "<i8").astype(np.int64)
        ok = not n or (p[0] >= 0 and p[-1] < page_count and bool((np.diff(p) > 0).all())
                       and bool((b >= 0).all()) and int(b.max()) < validate.MAX_BLOB_ID)
    if not ok:
        raise CorruptionError(f"checkpoint {who}: the page map of checkpoint {ckpt} is damaged",
                              checkpoint=who)
    return p, b


def _ids_sql(ids: Iterable[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class Store:
    """A snapctl page store.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, wconn: sqlite3.Connection | None,
                 rconn: sqlite3.Connection, meta: dict[str, str],
                 synchronous: str = "FULL", lock_key: tuple | None = None) -> None:
        self.filename = path
        self._lock_key = lock_key            # storage.lock: this process's hold on the file
        self._sync = synchronous
        self._wconn = wconn
        self._rconn = rconn
        self._wlock = threading.RLock()
        self._rlock = threading.RLock()
        self.config: dict = validate.config(meta, path)
        self.page_count: int = self.config["mem_size"] // PAGE_SIZE
        self.schema_version = validate.meta_int(meta, "schema_version", path)
        self._views: collections.OrderedDict[int, _View] = collections.OrderedDict()
        self._cat_lock = threading.RLock()
        self._cat: Catalog | None = None
        self._hidx: tuple = (None, {})       # ((generation, max_pack), hash -> blob id)
        self._dicts: tuple = (None, None)    # (generation, _DictCache)
        # by blob id: seen to decode to its hash, or written here (1 byte an id)
        self._verified = np.zeros(0, bool)
        self._closed = False
        self._wal = None
        self._wal_commits = self._wal_bytes = 0    # since the last WAL copy was started
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
        if not isinstance(mem, int) or isinstance(mem, bool) or mem <= 0 or mem % PAGE_SIZE \
                or mem > validate.MAX_MEM_SIZE:
            raise InvalidArgumentError(
                f"config['mem_size'] must be a positive multiple of {PAGE_SIZE} up to "
                f"{validate.MAX_MEM_SIZE >> 30} GiB, got {mem!r}")
        try:
            text = json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"config is not JSON-serialisable: {exc}") from None
        validate.to_store(text, "config", validate.json_object)
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
        name_max = _name_max(directory)
        if len(os.fsencode(os.path.basename(path))) + len("-wal") > name_max:
            raise StoreError(f"{path}: file name too long for a store (at most "
                             f"{name_max - len('-wal')} bytes: SQLite adds -wal and -shm)")
        # A short name of our own (the target's name may be near NAME_MAX).
        tmp = os.path.join(directory, f".snapctl-creating-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise StoreError(f"{path}: directory {directory} does not exist") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store ({exc.strerror})") from None
        # The writer's lock (storage.lock) is taken on the new inode before it
        # has a name, so the store is never visible unlocked while we live.
        key = None
        try:
            os.fchmod(fd, 0o600)
            lock.lock_file(fd, path)
            key = lock.attach(path, fd, locked=True)
            with sqlite_errors(path):
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
        except BaseException:
            if key is not None:
                lock.detach(key)
            else:
                os.close(fd)
            raise
        finally:
            Store.remove(tmp)
        try:
            with sqlite_errors(path):
                wconn = schema.connect(path, readonly=False, synchronous=sync)
                _chmod_sidecars(path)
                meta = schema.read_meta(wconn, path)
                rconn = schema.connect(path, readonly=False, synchronous=sync)
        except BaseException:
            Store.remove(path)
            lock.detach(key)
            raise
        return cls(path, wconn, rconn, meta, sync, lock_key=key)

    @staticmethod
    def remove(path) -> None:
        """Delete a store file and its -wal/-shm sidecars (missing ones are fine)."""
        path = os.fspath(path)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass

    @staticmethod
    def writable(path) -> bool:
        """Whether this process can write the store at ``path``: its file
        and its directory (where SQLite keeps -wal and -shm)."""
        path = os.fspath(path)
        return os.access(path, os.W_OK) and os.access(
            os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK)

    @classmethod
    def open(cls, path, *, readonly: bool = False, synchronous: str = "FULL") -> "Store":
        """Open an existing store.  Raises ``NotAStoreError`` /
        ``SchemaVersionError`` without touching foreign or newer files."""
        path = os.fspath(path)
        sync = schema.check_synchronous(synchronous)
        schema.check_header(path)
        immutable = False
        if not readonly and not Store.writable(path):
            raise StoreError(f"{path}: the store is read-only here (its file or directory is "
                             "not writable)")
        if readonly and not Store.writable(path):
            # Read-only media, a read-only directory or file: SQLite could
            # neither create -shm nor remove what it created, so read the
            # file as it is -- unless a -wal holds commits not yet copied in.
            try:
                immutable = os.path.getsize(path + "-wal") == 0
            except OSError:
                immutable = True
        key = None if readonly else lock.attach(path)
        try:
            with sqlite_errors(path):
                rconn = schema.connect(path, readonly=readonly, synchronous=sync,
                                       immutable=immutable)
                try:
                    meta = schema.read_meta(rconn, path)
                    wconn = None if readonly else schema.connect(path, readonly=False,
                                                                 synchronous=sync)
                except BaseException:
                    rconn.close()
                    raise
            if wconn is not None:
                _chmod_sidecars(path)
            return cls(path, wconn, rconn, meta, sync, lock_key=key)
        except BaseException:
            if key is not None:
                lock.detach(key)
            raise

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
            if self._lock_key is not None:
                lock.detach(self._lock_key)      # after every connection is closed

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
            self._claim()
            self._wal.wait_idle()
            conn = self._wconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._wal_committed()

    def _wal_committed(self, nbytes: int = 0) -> None:
        """After a COMMIT that stored about ``nbytes``: start the background
        copy of the WAL into the main file every WAL_CHECKPOINT_COMMITS
        commits, or once they stored WAL_CHECKPOINT_BYTES -- but after every
        commit while the last copy could not finish (a reader's snapshot
        held it back), and always with synchronous=NORMAL, where that copy
        is what makes commits durable."""
        self._wal_commits += 1
        self._wal_bytes += nbytes
        if self._wal_commits >= WAL_CHECKPOINT_COMMITS or self._wal_bytes >= WAL_CHECKPOINT_BYTES \
                or self._wal.incomplete or self._sync == "NORMAL":
            self._wal_commits = self._wal_bytes = 0
            self._wal.poke()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.filename}: store is closed")

    def claim(self) -> None:
        """Become the store's one writing process now, rather than at the
        first write (storage.lock): ``StoreBusyError`` if another process
        writes it. A restore calls this before it starts the guest."""
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")
        self._claim()

    def _claim(self) -> None:
        """This process becomes the store's one writer (storage.lock)."""
        if self._lock_key is not None:
            lock.claim(self._lock_key, self.filename)

    # --- the tree ------------------------------------------------------------

    @staticmethod
    def _parents(conn) -> dict[int, int | None]:
        """id -> parent, checked: parents exist and are older, one root."""
        return validate.tree(conn.execute("SELECT id, parent FROM checkpoints"))

    def _path_in(self, conn, ckpt: int) -> list[int]:
        parents = self._parents(conn)
        ckpt = self._check_id(ckpt, parents)
        path = []
        node: int | None = ckpt
        while node is not None:          # parents are older (validate.tree): this ends
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
        for name, c in sorted(validate.tags(conn.execute("SELECT name, ckpt FROM tags")).items()):
            tags[c].append(name)
        out = []
        for r in conn.execute(sql + " ORDER BY id", args):
            cid, parent, created, trigger, step, meta, stats, digest = validate.checkpoint_row(r)
            out.append(CheckpointInfo(
                id=cid, parent=parent, created=created, trigger=trigger, step=step,
                meta=meta, stats=stats, tags=tags.get(cid, []),
                digest=codec.digest_hex(codec.digest_from_bytes(digest))))
        return out

    def resolve(self, ref: int | str) -> int:
        """A checkpoint id from an int, a string of digits, or a tag name."""
        with self._read() as conn:
            parents = self._parents(conn)
            if isinstance(ref, str) and not ref.isdigit():
                row = conn.execute("SELECT name, ckpt FROM tags WHERE name = ?", (ref,)).fetchone()
                if row is None:
                    raise UnknownCheckpointError(f"no checkpoint or tag named {ref!r}")
                return validate.tags([row], parents)[ref]
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
        validate.to_store(name, "tag name", validate.text)
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
        validate.state_data(ckpt, name, row[1])
        if not isinstance(row[1], bytes) or content_hash(row[1]) != row[0]:
            raise CorruptionError(f"checkpoint {ckpt}: state {name!r} does not match its hash",
                                  checkpoint=ckpt)
        return bytes(row[1])

    def state_names(self, ckpt: int) -> list[str]:
        with self._read() as conn:
            ckpt = self._check_id(ckpt, self._parents(conn))
            return [validate.text(r[0], f"checkpoint {ckpt}", "states.name") for r in conn.execute(
                "SELECT name FROM states WHERE ckpt = ? ORDER BY name LIMIT 100000", (ckpt,))]

    # --- writing -------------------------------------------------------------

    def checkpoint(self, parent: int | None, meta: dict | None = None) -> "CheckpointWriter":
        """Start writing a checkpoint; use as a context manager.  Everything
        added inside the ``with`` block commits atomically on exit."""
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")
        return CheckpointWriter(self, parent, dict(meta or {}))

    # --- images and the catalogue --------------------------------------------

    def _catalog(self, conn) -> Catalog:
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

    def _view(self, conn, path: list[int], *, cached: bool = False) -> _View:
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
            f"SELECT ckpt, n, pages, blobs, chk FROM maps WHERE ckpt IN ({_ids_sql(path)})")}
        img = np.zeros(self.page_count, np.int64)
        for c in path:
            row = rows.get(c)
            if row is None:
                raise CorruptionError(f"checkpoint {ckpt}: the page map of checkpoint {c} "
                                      "is missing", checkpoint=ckpt)
            pages, blobs = parse_map(row, self.page_count, reading=ckpt)
            img[pages] = blobs
        view = _View(img, codec.digest_from_bytes(digest) if isinstance(digest, bytes) else -1)
        # The maps must add up to the recorded digest: terms from the blobs'
        # stored hashes, numpy only (~10 ms for 1 GiB).  Catches a lost map
        # entry or one naming another valid blob before any byte is returned;
        # decoding then checks each page against its hash.
        cat = self._catalog(conn)
        if _USE_NATIVE and pageloops.NATIVE:       # one pass in C: ~20x the numpy below
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
        self._remember_view(ckpt, view)
        return view

    def _remember_view(self, ckpt: int, view: _View) -> None:
        with self._cat_lock:
            self._views[ckpt] = view
            self._views.move_to_end(ckpt)
            while len(self._views) > _VIEW_CACHE_SIZE:
                self._views.popitem(last=False)

    def _hash_index(self, cat: Catalog) -> dict[bytes, int]:
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

    def _verify_blobs(self, conn, cat: Catalog, blobs: np.ndarray) -> np.ndarray:
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
        self._mark_verified(todo[good])
        return ok | np.isin(blobs, todo[good])

    def _dict_cache(self, cat: Catalog) -> "_DictCache":
        gen, d = self._dicts
        return d if gen == cat.generation and d is not None else _DictCache()

    def _after_commit(self, cat: Catalog, kept, new_index: dict, next_dicts: "_DictCache") -> None:
        """Fold a committed checkpoint's packs into the catalogue and the
        dedup index, so the next checkpoint needs no reload."""
        with self._cat_lock:
            cur = self._cat if self._cat is not None and self._cat.generation == cat.generation \
                else cat
            missing = [k for k in kept if k[0].id not in cur.packs]   # a reader may have them
            self._mark_verified(np.fromiter(new_index.values(), np.int64, len(new_index)))
            new_cat = cur.with_packs(missing) if missing else cur
            self._cat = new_cat
            key, idx = self._hidx
            if key == (cat.generation, cat.max_pack):
                ids = np.fromiter(new_index.values(), np.int64, len(new_index))
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

    def _forget(self) -> None:
        """Drop every cache (after a prune)."""
        with self._cat_lock:
            self._views.clear()
            self._cat = None
            self._hidx = (None, {})
            self._dicts = (None, None)

    # --- reading -------------------------------------------------------------

    def _check_out(self, out) -> np.ndarray:
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
        return out.reshape(self.page_count, PAGE_SIZE)

    def materialize(self, ckpt: int, out, *, out_is_zero: bool = False) -> None:
        """Fill ``out`` with guest memory as it was at ``ckpt``: the page maps
        of the path merged in numpy and checked against the checkpoint's
        digest, every needed blob decoded once (and checked against its
        hash), pages sharing a content copied, the rest zeroed -- unless
        ``out_is_zero`` says ``out`` is known to be all zeros (fresh anonymous
        memory), where writing zeros would only fault in every page."""
        flat = self._check_out(out)
        with self._read() as conn:
            path = self._path_in(conn, ckpt)
            ckpt = path[-1]
            cat = self._catalog(conn)
            view = self._view(conn, path)
            self._fill(conn, cat, view.blob, flat, ckpt, 0, zero_rest=not out_is_zero,
                       verified=self._mark_verified)

    def _mark_verified(self, blobs: np.ndarray) -> None:
        if not len(blobs):
            return
        with self._cat_lock:
            top = int(blobs.max()) + 1
            if top > len(self._verified):
                grown = np.zeros(max(top, 2 * len(self._verified)), bool)
                grown[:len(self._verified)] = self._verified
                self._verified = grown
            self._verified[blobs] = True

    def image_chunks(self, ckpt: int, chunk_pages: int = 16384):
        """The image of ``ckpt`` a chunk at a time, from one snapshot (for
        writing it out without holding all of it): yields ``(first page,
        pages, nonzero)`` with ``pages`` a (k, 4096) uint8 array, valid only
        until the next chunk, and ``nonzero`` the mask of its pages that hold
        a stored blob (the others are zero and left unset in ``pages``).
        Use it in a ``with contextlib.closing(...)`` so that leaving early
        ends the read transaction."""
        if isinstance(chunk_pages, bool) or not isinstance(chunk_pages, int) or chunk_pages < 1:
            raise InvalidArgumentError(f"chunk_pages must be an int >= 1, not {chunk_pages!r}")
        with self._read() as conn:
            path = self._path_in(conn, ckpt)
            cat = self._catalog(conn)
            img = self._view(conn, path).blob
            buf = np.empty((min(chunk_pages, self.page_count), PAGE_SIZE), np.uint8)
            for lo in range(0, self.page_count, chunk_pages):
                part = img[lo:lo + chunk_pages]
                out = buf[:len(part)]
                nonzero = part != 0
                if nonzero.any():
                    self._fill(conn, cat, part, out, path[-1], lo, zero_rest=False)
                yield lo, out, nonzero

    def page_index(self, ckpt: int) -> "PageIndex":
        """What a lazy restore (storage/lazy.py) serves pages from, read in time
        independent of the guest's size: the checkpoint's path, the leading
        columns of its page maps (checkpoint, entries), its recorded digest
        and the directory of packs (id, first blob id, count: the columns
        before the arrays, so no overflow page is read).
        Neither the maps' arrays nor the blob catalogue are read here: the
        lazy handler (storage/native/lazyfault.c) merges and checks the maps,
        reads a pack's metadata when it first needs one of its blobs, and
        checks the image against the digest, beside the guest."""
        with self._read() as conn:
            path = self._path_in(conn, ckpt)
            ckpt = path[-1]
            row = conn.execute("SELECT digest FROM checkpoints WHERE id = ?", (ckpt,)).fetchone()
            if row is None or not isinstance(row[0], bytes) or len(row[0]) != 16:
                raise CorruptionError(f"checkpoint {ckpt}: its row or digest is missing (damaged index)",
                                      checkpoint=ckpt)
            rows = {r[0]: r for r in conn.execute(
                f"SELECT ckpt, n FROM maps WHERE ckpt IN ({_ids_sql(path)})")}
            packs = conn.execute("SELECT id, first, n FROM packs").fetchall()
        from .lazy import pack_directory
        maps = np.zeros((2, len(path)), np.int64)
        for i, c in enumerate(path):
            r = rows.get(c)
            if r is None or not (type(r[1]) is int and 0 <= r[1] <= self.page_count):
                raise CorruptionError(f"checkpoint {ckpt}: the page map of checkpoint {c} "
                                      f"is {'missing' if r is None else 'damaged'}", checkpoint=ckpt)
            maps[:, i] = c, r[1]
        return PageIndex(ckpt, path, maps, codec.digest_from_bytes(row[0]), pack_directory(packs))

    @staticmethod
    def _fill(conn, cat: Catalog, img: np.ndarray, flat: np.ndarray, ckpt: int, lo: int,
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
            cat = self._catalog(conn)
            img = self._view(conn, path).blob[lo:hi + 1]
            buf = np.empty((hi - lo + 1, PAGE_SIZE), np.uint8)
            self._fill(conn, cat, img, buf, path[-1], lo)
        start = gpa - lo * PAGE_SIZE
        return buf.reshape(-1)[start:start + length].tobytes()

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

    def diff(self, a: int, b: int) -> np.ndarray:
        """Sorted page numbers whose content differs between images ``a`` and
        ``b``: pages whose blob ids differ and whose blobs' content hashes
        differ too (a store from elsewhere may hold one content twice)."""
        with self._read() as conn:
            va = self._view(conn, self._path_in(conn, a)).blob
            vb = self._view(conn, self._path_in(conn, b)).blob
            cat = self._catalog(conn)
        cand = np.flatnonzero(va != vb)
        same = (cat.hash[va[cand]] == cat.hash[vb[cand]]).all(axis=1)
        return cand[~same].astype(np.int64)

    def history(self, page: int) -> list[tuple[int, str]]:
        """``(checkpoint, content hash hex)`` for every checkpoint that stored
        a new version of ``page``, in id order (zero page: ``ZERO_HASH_HEX``)."""
        page = self._check_page(page)
        out = []
        with self._read() as conn:
            cat = self._catalog(conn)
            for row in conn.execute("SELECT ckpt, n, pages, blobs, chk FROM maps ORDER BY ckpt"):
                pages, blobs = parse_map(row, self.page_count)
                i = int(np.searchsorted(pages, page))
                if i < len(pages) and pages[i] == page:
                    b = int(blobs[i])
                    if b and not cat.known(np.array([b]))[0]:
                        raise CorruptionError(
                            f"checkpoint {row[0]}, page {page}: references missing blob {b}",
                            checkpoint=row[0], page=page, blob=b)
                    out.append((row[0], cat.hash[b].tobytes().hex()))
        return out

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
            self._check_open()
            self._claim()
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
    overlaps the guest running until checkpoint N+1, not N+1's write.  It is
    started every WAL_CHECKPOINT_COMMITS commits, or sooner once they stored
    WAL_CHECKPOINT_BYTES (one copy for many small checkpoints), so the WAL
    holds at most that many commits' frames plus one checkpoint's."""

    def __init__(self, path: str, synchronous: str) -> None:
        super().__init__(name="snapctl-wal-checkpoint", daemon=True)
        self._conn = schema.connect(path, readonly=False, synchronous=synchronous)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self.incomplete = False     # the last copy left frames behind

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
                    busy, log, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    # a reader's snapshot can stop the copy short of the end
                    self.incomplete = bool(busy) or log != copied
                except (sqlite3.Error, TypeError, ValueError):
                    self.incomplete = True
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
                or not isinstance(exc, (sqlite3.OperationalError, sqlite3.DataError))):
            raise CorruptionError(f"{filename}: database damaged ({msg})") from exc
        raise StoreError(f"{filename}: {msg}") from exc


def _name_max(directory: str) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _chmod_sidecars(path: str) -> None:
    for suffix in ("-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def _encode_py(data: np.ndarray, rows: np.ndarray, use: np.ndarray, base: np.ndarray,
               dict_of: dict) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """The pure-Python twin of ``pageloops.encode``: pages ``data[rows]``,
    LZ4-delta against ``dict_of[base]`` where ``use``, else LZ4, raw where
    that does not shrink a page.  Returns (bytes, codecs, lengths, crcs)."""
    c, P = codec._compress, PAGE_SIZE
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


def _in_order(pool, fn, args_iter, ahead: int = 4):
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

    def __init__(self, store: Store, parent: int | None, meta: dict) -> None:
        self._store = store
        self._parent = parent
        self._meta = meta
        self._active = False
        self._failed: BaseException | None = None
        self.id: int | None = None
        self.digest: str | None = None     # hex, set on commit
        self.stats: dict = {}
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"meta is not JSON-serialisable: {exc}") from None
        validate.to_store(text, "meta", validate.json_object)
        step = meta.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise InvalidArgumentError(f"meta['step'] must be an int, not {step!r}")
        validate.to_store(step, "meta['step']", validate.optional_integer, 0, validate.MAX_STEP)
        trigger = meta.get("trigger", "base" if parent is None else "sync")
        if not isinstance(trigger, str):
            raise InvalidArgumentError(f"meta['trigger'] must be a str, not {trigger!r}")
        validate.to_store(trigger, "meta['trigger']", validate.text, 64)

    def __enter__(self) -> "CheckpointWriter":
        st = self._store
        st._wlock.acquire()
        try:
            with sqlite_errors(st.filename):
                st._check_open()
                st._claim()
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
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                 "('next_checkpoint_id', 'next_blob_id')"))
        self.id = validate.meta_int(meta, "next_checkpoint_id", st.filename,
                                    hi=validate.MAX_CHECKPOINT_ID - 1)
        next_blob = validate.meta_int(meta, "next_blob_id", st.filename, default=1,
                                      hi=validate.MAX_BLOB_ID)
        if parents and self.id <= max(parents):
            raise CorruptionError(f"{st.filename}: stored meta.next_checkpoint_id {self.id} is "
                                  f"not above the newest checkpoint {max(parents)}")
        self._t0 = time.perf_counter()
        cat = self._cat = st._catalog(conn)
        if self._parent is None:
            view = _View(np.zeros(st.page_count, np.int64), 0)
        else:
            view = st._view(conn, st._path_in(conn, self._parent), cached=True)
        self._pblob = view.blob                   # read-only: the parent image
        self._pdigest = view.digest
        self._blob = view.blob.copy()             # this checkpoint's image
        self._written = np.zeros(st.page_count, bool)
        top_blob, top_pack = conn.execute(
            "SELECT coalesce(max(first + n), 1), coalesce(max(id), 0) FROM packs").fetchone()
        # Blob ids are never reused (a kept high-water mark): a dropped or
        # pruned pack's ids may still key another Store object's caches.
        top_blob = validate.integer(top_blob, st.filename, "packs.first + packs.n", 1,
                                    validate.MAX_BLOB_ID)
        self._first_blob = self._next_blob = max(top_blob, cat.n, next_blob)
        self._next_pack = validate.integer(top_pack, st.filename, "packs.id", 0,
                                           MAX_PACK_ID - 2) + 1
        self._index = st._hash_index(cat)         # content hash -> blob id, store-wide
        self._new_index: dict[bytes, int] = {}    # ... for blobs of this checkpoint
        self._new_hashes: list[bytes] = []        # by blob id - first_blob
        self._new_packs: list[tuple[PackInfo, tuple]] = []
        self._inserter: ThreadPoolExecutor | None = None
        self._inserts: list = []
        self._unsynced = 0
        self._wal_fd: int | None = None
        self._native = pageloops.NATIVE and _USE_NATIVE
        self._dicts = st._dict_cache(cat)         # blob id -> decoded page, from recent writes
        self._next_dicts = _DictCache()
        self._states: dict[str, bytes] = {}
        self.stats = dict(pages=0, zero_pages=0, unchanged_pages=0, dedup_pages=0,
                          new_blobs=0, delta_blobs=0, raw_blobs=0,
                          stored_bytes=0, raw_bytes=0, packs=0)
        self._extra_stats: dict = {}

    def _require_active(self) -> None:
        if not self._active:
            raise StoreError("checkpoint writer used outside its with-block")
        if self._failed is not None:
            raise StoreError(f"checkpoint not written: an earlier add_pages failed "
                             f"({self._failed}); leave the with-block to roll back")

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
        # Last row wins.
        uniq, last_rev = np.unique(pn[::-1], return_index=True)
        rows = len(pn) - 1 - last_rev
        if len(uniq) == len(pn) and np.array_equal(rows, np.arange(len(pn))):
            data = np.ascontiguousarray(pages)
        else:
            data = pages[rows]                       # gather copy
        try:
            with sqlite_errors(st.filename):
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
                ids[k[~self._store._verify_blobs(self._conn, cat, ids[k])]] = 0
        fresh_a = np.flatnonzero(ids == 0)
        new_k = fresh_a                              # first row of each new content
        if len(fresh_a):
            # Distinct new contents in first-seen order, their ids and first
            # rows -- dict operations in C, no per-page Python statements.
            fresh = fresh_a.tolist()
            fh = hashes if len(fresh) == len(hashes) else [hashes[k] for k in fresh]
            first = self._next_blob
            if first + len(fh) > validate.MAX_BLOB_ID:
                raise StoreError(f"{self._store.filename}: the store has used up its blob ids "
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
        stats = self.stats
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
        ends = np.cumsum(lens).astype("<u4")
        cb, bb, hb, eb = codecs.tobytes(), bases.tobytes(), b"".join(hashes), ends.tobytes()
        pid = self._next_pack
        self._next_pack += 1
        crc = codec.check63(blob)
        rb = crcs.astype("<u8").tobytes()
        row = (pid, self.id, first, n, cb, bb, hb, eb, rb,
               pack_meta_check(pid, first, n, cb, bb, hb, eb, rb), len(blob), crc)
        if self._inserter is None:
            self._inserter = ThreadPoolExecutor(1, thread_name_prefix="snapctl-pack-insert")
        self._inserts.append(self._inserter.submit(self._insert_rows, row, blob))
        if len(self._inserts) > 4:                 # bound the bytes in flight
            self._inserts.pop(0).result()
        end = ends.astype(np.int64)
        self._new_packs.append((PackInfo(pid, self.id, first, n, len(blob), crc),
                                (codecs, bases.astype(np.int64),
                                 np.frombuffer(hb, np.uint8).reshape(n, 16),
                                 np.concatenate(([0], end[:-1])), end, crcs)))
        self.stats["packs"] += 1

    def _insert_rows(self, row, blob) -> None:
        conn = self._conn
        conn.execute(f"INSERT INTO packs({Catalog.PACK_COLUMNS}) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        conn.execute("INSERT INTO pack_data(id, data) VALUES (?, ?)", (row[0], blob))
        # A large checkpoint spills to the WAL as it goes; with durable
        # commits, flush those frames to disk now, on this thread, while the
        # other one compresses -- so COMMIT's own fsync has little left to do
        # (it still runs: durability is SQLite's, unchanged).
        self._unsynced += len(blob)
        if self._unsynced >= EARLY_SYNC_BYTES and self._store._sync in ("FULL", "EXTRA"):
            self._unsynced = 0
            try:
                if self._wal_fd is None:
                    self._wal_fd = os.open(self._store.filename + "-wal", os.O_RDONLY | os.O_CLOEXEC)
                os.fdatasync(self._wal_fd)
            except OSError:
                pass                               # COMMIT's fsync reports real failures

    def _drain(self) -> None:
        """Wait for the pack inserts in flight; re-raise the first failure."""
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
        st = self._store
        conn = self._conn
        try:
            with sqlite_errors(st.filename):
                if exc_type is not None:
                    self._rollback(conn)
                    return
                if self._failed is not None:
                    self._rollback(conn)
                    raise StoreError(f"checkpoint not written: add_pages failed inside the "
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
            st._wlock.release()

    def _rollback(self, conn) -> None:
        """Let the inserts in flight finish first (their errors no longer
        matter; an interrupt while waiting still waits for them), so nothing
        touches the connection concurrently; then roll back unless SQLite
        already did (a failed COMMIT can end the transaction itself)."""
        interrupted = None
        while self._inserts:
            try:
                self._drain()
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc
            except BaseException:  # noqa: BLE001 - the transaction is rolled back anyway
                pass
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if interrupted is not None:
            raise interrupted

    def _commit(self, conn) -> None:
        st = self._store
        cat = self._cat
        # The page map: pages whose blob differs from the parent's image.
        touched = np.flatnonzero(self._written)
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
        digest = (self._pdigest - codec.sum128(codec.terms(pages, cat.hash[self._pblob[pages]]))
                  + codec.sum128(codec.terms(pages, hashes))) & ((1 << 128) - 1)
        pb, bb = pages.astype("<i8").tobytes(), blobs.astype("<i8").tobytes()
        conn.execute("INSERT INTO maps(ckpt, n, pages, blobs, chk) VALUES (?, ?, ?, ?, ?)",
                     (self.id, len(pages), pb, bb,
                      codec.check63(_PACK_Q(self.id), pb, bb)))

        # Packs of this checkpoint that nothing names (every blob in them was
        # overwritten later in the same checkpoint) are dropped again.
        live = np.zeros(self._next_blob - first, bool)
        live[blobs[is_new] - first] = True
        kept = []
        for info, arrays in self._new_packs:
            if live[info.first - first:info.first - first + info.n].any():
                kept.append((info, arrays))
            else:
                conn.execute("DELETE FROM packs WHERE id = ?", (info.id,))
                conn.execute("DELETE FROM pack_data WHERE id = ?", (info.id,))
                self.stats["packs"] -= 1
        # Reference counts per pack: map entries + delta bases of kept packs.
        pack_of_new = np.full(self._next_blob - first, -1, np.int64)
        for info, _ in kept:
            pack_of_new[info.first - first:info.first - first + info.n] = info.id
        nzb = blobs[blobs > 0]
        refs = [cat.pack[nzb[nzb < first]], pack_of_new[nzb[nzb >= first] - first]]
        refs += [cat.pack[a[1][a[1] > 0]] for _, a in kept]
        counted = np.concatenate(refs) if refs else np.zeros(0, np.int64)
        u, cnt = np.unique(counted, return_counts=True)
        conn.executemany("INSERT INTO refs(pack, n) VALUES (?, ?) "
                         "ON CONFLICT(pack) DO UPDATE SET n = n + excluded.n",
                         zip(u.tolist(), cnt.tolist()))

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
             codec.digest_to_bytes(digest)))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_checkpoint_id'",
                     (str(self.id + 1),))
        conn.execute("INSERT INTO meta(key, value) VALUES ('next_blob_id', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                     (str(self._next_blob),))
        conn.execute("COMMIT")
        st._wal_committed(stats.get("stored_bytes", 0) + len(pages) * 16)
        self.stats = stats
        self.digest = codec.digest_hex(digest)
        st._after_commit(cat, kept, self._new_index, self._next_dicts)
        st._remember_view(self.id, _View(self._blob, digest))
