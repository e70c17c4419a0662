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

The store is built from parts with one job each: the connections and
transactions (connection.py), the row formats (formats.py), the blob index --
catalogue, views, dedup index, dictionaries (index.py) --, the checkpoint
writer (writer.py), verify (verify.py) and prune (maintenance.py).
"""

from __future__ import annotations

import collections
import json
import numbers
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from . import codec, lock, schema, tree, validate
from .codec import PAGE_SIZE, content_hash
from .connection import Connections, sqlite_errors
from .deferred import numpy as np
from .errors import CorruptionError, InvalidArgumentError, StoreError, UnknownCheckpointError

if TYPE_CHECKING:
    from .packs import Catalog
    from .writer import CheckpointWriter

# Imported on first use, not here, so that opening a store and listing its
# checkpoints (`snapctl list`) loads neither numpy nor the page codecs:
# .formats, .index, .packs, .writer, .verify, .maintenance.


def __getattr__(name):
    if name == "CheckpointWriter":
        from .writer import CheckpointWriter
        return CheckpointWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Store", "CheckpointInfo", "CheckpointWriter", "PageIndex", "sqlite_errors"]


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
class PageIndex:
    """Where checkpoint ``ckpt``'s image is: its path's page maps, its digest,
    and the directory of the packs that hold the blobs (see :meth:`Store.page_index`)."""
    ckpt: int
    path: list
    maps: np.ndarray      # (2, len(path)) int64: checkpoint and entries of each page map
    digest: int           # the checkpoint's recorded digest (128 bits)
    packs: np.ndarray     # (3, packs) int64: id, first blob id, blob count; by first id


class Store:
    """A snapctl page store.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, wconn, rconn, meta: dict[str, str],
                 synchronous: str = "FULL", lock_key: tuple | None = None) -> None:
        self.filename = path
        self.config: dict = validate.config(meta, path)
        self.page_count: int = self.config["mem_size"] // PAGE_SIZE
        self.schema_version = validate.meta_int(meta, "schema_version", path)
        self._conns = Connections(path, wconn, rconn, synchronous, lock_key)
        self._blob_index = None

    @property
    def _index(self):
        """The blob index (storage.index), made on first use."""
        if self._blob_index is None:
            from .index import BlobIndex
            self._blob_index = BlobIndex(self.filename, self.page_count)
        return self._blob_index

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
        self._conns.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wal_status(self) -> dict:
        """How the background copy of the write-ahead log into the main file is doing
        (``copies_started``, ``commits_since_copy``, ``incomplete``): see
        storage.connection.WalCheckpointer."""
        return self._conns.wal_status()

    @property
    def readonly(self) -> bool:
        return self._conns.readonly

    def claim(self) -> None:
        """Become the store's one writing process now, rather than at the
        first write (storage.lock): ``StoreBusyError`` if another process
        writes it. A restore calls this before it starts the guest."""
        self._conns.check_writable()
        self._conns.claim()

    # --- the tree ------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        with self._conns.read() as conn:
            return self._infos(conn, None)

    def get(self, ckpt: int) -> CheckpointInfo:
        with self._conns.read() as conn:
            infos = self._infos(conn, ckpt)
        if not infos:
            raise UnknownCheckpointError(f"no checkpoint {ckpt} in this store")
        return infos[0]

    def _infos(self, conn, ckpt: int | None) -> list[CheckpointInfo]:
        sql = ("SELECT id, parent, created, trigger, step, meta, stats, digest "
               "FROM checkpoints")
        args: tuple = ()
        if ckpt is not None:
            if isinstance(ckpt, bool) or not isinstance(ckpt, numbers.Integral):
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
        with self._conns.read() as conn:
            parents = tree.parents(conn)
            if isinstance(ref, str) and not ref.isdigit():
                row = conn.execute("SELECT name, ckpt FROM tags WHERE name = ?", (ref,)).fetchone()
                if row is None:
                    raise UnknownCheckpointError(f"no checkpoint or tag named {ref!r}")
                return validate.tags([row], parents)[ref]
            if isinstance(ref, str):
                ref = int(ref)
            return tree.check_id(ref, parents)

    def children(self, ckpt: int) -> list[int]:
        with self._conns.read() as conn:
            parents = tree.parents(conn)
            ckpt = tree.check_id(ckpt, parents)
            return sorted(c for c, p in parents.items() if p == ckpt)

    def path(self, ckpt: int) -> list[int]:
        """Checkpoint ids from the base to ``ckpt`` inclusive."""
        with self._conns.read() as conn:
            return tree.path_in(conn, ckpt)

    def digest(self, ckpt: int) -> str:
        return self.get(ckpt).digest

    def tag(self, ckpt: int, name: str) -> None:
        """Give ``ckpt`` the unique tag ``name`` (not all digits)."""
        if not isinstance(name, str) or not name or name.isdigit() or name.strip() != name:
            raise InvalidArgumentError(
                f"tag name must be a non-empty string, not all digits, without "
                f"surrounding spaces: {name!r}")
        validate.to_store(name, "tag name", validate.text)
        with self._conns.write() as conn:
            ckpt = tree.check_id(ckpt, tree.parents(conn))
            row = conn.execute("SELECT ckpt FROM tags WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != ckpt:
                raise StoreError(f"tag {name!r} already names checkpoint {row[0]}")
            conn.execute("INSERT OR IGNORE INTO tags(name, ckpt) VALUES (?, ?)", (name, ckpt))

    def untag(self, name: str) -> None:
        with self._conns.write() as conn:
            if conn.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount == 0:
                raise UnknownCheckpointError(f"no tag named {name!r}")

    # --- states --------------------------------------------------------------

    def state(self, ckpt: int, name: str) -> bytes:
        with self._conns.read() as conn:
            ckpt = tree.check_id(ckpt, tree.parents(conn))
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
        with self._conns.read() as conn:
            ckpt = tree.check_id(ckpt, tree.parents(conn))
            return [validate.text(r[0], f"checkpoint {ckpt}", "states.name") for r in conn.execute(
                "SELECT name FROM states WHERE ckpt = ? ORDER BY name LIMIT 100000", (ckpt,))]

    # --- writing -------------------------------------------------------------

    def checkpoint(self, parent: int | None, meta: dict | None = None, *,
                   transfer: bool = False) -> "CheckpointWriter":
        """Start writing a checkpoint; use as a context manager.  Everything
        added inside the ``with`` block commits atomically on exit.  With
        ``transfer``, the writer's ``transfer`` is, after commit, what the
        checkpoint added as a ``storage.transfer.Transfer`` (for another
        store's ``CheckpointWriter.add_transfer``)."""
        self._conns.check_writable()
        from .writer import CheckpointWriter
        return CheckpointWriter(self._conns, self._index, parent, dict(meta or {}), transfer=transfer)

    # --- images ----------------------------------------------------------------

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
        with self._conns.read() as conn:
            path = tree.path_in(conn, ckpt)
            ckpt = path[-1]
            cat = self._index.catalog(conn)
            view = self._index.view(conn, path)
            self._index.fill(conn, cat, view.blob, flat, ckpt, 0, zero_rest=not out_is_zero,
                       verified=self._index.mark_verified)

    def image_transfer(self, ckpt: int):
        """The whole image of ``ckpt`` as a ``full`` ``storage.transfer.Transfer``:
        every non-zero page by content hash, and the blobs they name plus their
        delta bases, as stored (each pack's checksum checked), in blob order.
        What another store imports to hold this image with the blobs this
        store's later checkpoints may name as delta bases."""
        from .transfer import Transfer
        with self._conns.read() as conn:
            path = tree.path_in(conn, ckpt)
            ckpt = path[-1]
            cat = self._index.catalog(conn)
            view = self._index.view(conn, path)
            nz = np.flatnonzero(view.blob)
            blobs = view.blob[nz]
            ub = np.unique(blobs)
            bases = cat.base[ub[cat.codec[ub] == codec.CODEC_LZ4_DELTA]]
            need = np.union1d(ub, bases[bases > 0])
            packs = self._blob_packs(conn, cat, need, ckpt)
            return Transfer(nz, cat.hash[blobs].copy(), packs, codec.digest_hex(view.digest),
                            None, full=True, local={"map": blobs, "new": need,
                                                    "bases": np.zeros(0, np.int64)})

    def transfer_blobs(self, blobs) -> list:
        """The blobs ``blobs`` (this store's ids, as a ``Transfer.local`` names them) and
        their delta bases, as stored: ``storage.transfer.TransferPack`` s in blob order,
        for a transfer to a peer that may not hold them (a page reverting to a content
        of a checkpoint the peer never received)."""
        with self._conns.read() as conn:
            cat = self._index.catalog(conn)
            ids = np.unique(np.asarray(blobs, np.int64))
            if len(ids) and not cat.known(ids).all():
                raise InvalidArgumentError("transfer_blobs: not a blob of this store")
            d = ids[cat.codec[ids] == codec.CODEC_LZ4_DELTA]
            return self._blob_packs(conn, cat, np.union1d(ids, cat.base[d]), None)

    @staticmethod
    def _blob_packs(conn, cat, need, ckpt) -> list:
        """The blobs ``need`` (sorted, known) as TransferPacks, one per stored pack."""
        from .formats import pack_data_ok
        from .transfer import TransferPack
        pk = cat.pack[need]
        packs = []
        for pid in np.unique(pk).tolist():
            sel = need[pk == pid]
            info = cat.packs[pid]
            row = conn.execute("SELECT data FROM pack_data WHERE id = ?", (pid,)).fetchone()
            if row is None or not pack_data_ok(row[0], info):
                raise CorruptionError(f"pack {pid} is damaged or missing", checkpoint=ckpt)
            mv = memoryview(row[0])
            st, en = cat.start[sel], cat.end[sel]
            if len(sel) == info.n:
                data = row[0]
            else:
                data = b"".join([mv[a:b] for a, b in zip(st.tolist(), en.tolist())])
            cd = cat.codec[sel].copy()
            bh = np.zeros((len(sel), 16), np.uint8)
            d = cd == codec.CODEC_LZ4_DELTA
            bh[d] = cat.hash[cat.base[sel[d]]]
            packs.append(TransferPack(cd, bh, cat.hash[sel].copy(), np.cumsum(en - st),
                                      cat.crc[sel].copy(), data))
        return packs

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
        with self._conns.read() as conn:
            path = tree.path_in(conn, ckpt)
            cat = self._index.catalog(conn)
            img = self._index.view(conn, path).blob
            buf = np.empty((min(chunk_pages, self.page_count), PAGE_SIZE), np.uint8)
            for lo in range(0, self.page_count, chunk_pages):
                part = img[lo:lo + chunk_pages]
                out = buf[:len(part)]
                nonzero = part != 0
                if nonzero.any():
                    self._index.fill(conn, cat, part, out, path[-1], lo, zero_rest=False)
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
        from .formats import ids_sql
        with self._conns.read() as conn:
            path = tree.path_in(conn, ckpt)
            ckpt = path[-1]
            row = conn.execute("SELECT digest FROM checkpoints WHERE id = ?", (ckpt,)).fetchone()
            if row is None or not isinstance(row[0], bytes) or len(row[0]) != 16:
                raise CorruptionError(f"checkpoint {ckpt}: its row or digest is missing (damaged index)",
                                      checkpoint=ckpt)
            rows = {r[0]: r for r in conn.execute(
                f"SELECT ckpt, n FROM maps WHERE ckpt IN ({ids_sql(path)})")}
            # the pack directory in one step (one row of text, not one Python row per pack:
            # a restore reads this while building the VM on another thread, and every row
            # handed to Python waits for the GIL); a non-integer value reads as -1, a row
            # pack_directory leaves out, as it leaves out any other out-of-range row
            text = conn.execute(
                "SELECT group_concat(CASE WHEN typeof(id) = 'integer' AND typeof(first) = 'integer' "
                "AND typeof(n) = 'integer' THEN id || ' ' || first || ' ' || n ELSE '-1 -1 -1' END, ' ') "
                "FROM packs").fetchone()[0]
        packs = np.array((text or "").split(), np.int64).reshape(-1, 3).tolist()
        from .lazy import pack_directory
        maps = np.zeros((2, len(path)), np.int64)
        for i, c in enumerate(path):
            r = rows.get(c)
            if r is None or not (type(r[1]) is int and 0 <= r[1] <= self.page_count):
                raise CorruptionError(f"checkpoint {ckpt}: the page map of checkpoint {c} "
                                      f"is {'missing' if r is None else 'damaged'}", checkpoint=ckpt)
            maps[:, i] = c, r[1]
        return PageIndex(ckpt, path, maps, codec.digest_from_bytes(row[0]), pack_directory(packs))

    def read(self, ckpt: int, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest memory at guest-physical ``gpa`` as of ``ckpt``."""
        for name, v in (("gpa", gpa), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise InvalidArgumentError(f"{name} must be an int, not {v!r}")
        gpa, length = int(gpa), int(length)
        mem = self.page_count * PAGE_SIZE
        if gpa < 0 or length < 0:
            raise InvalidArgumentError(f"gpa and length must be >= 0 (gpa={gpa}, length={length})")
        if gpa + length > mem:
            raise InvalidArgumentError(
                f"read of {length} bytes at gpa {gpa:#x} runs past the end of RAM ({mem:#x})")
        with self._conns.read() as conn:
            path = tree.path_in(conn, ckpt)
            if length == 0:
                return b""
            lo, hi = gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE
            cat = self._index.catalog(conn)
            img = self._index.view(conn, path).blob[lo:hi + 1]
            buf = np.empty((hi - lo + 1, PAGE_SIZE), np.uint8)
            self._index.fill(conn, cat, img, buf, path[-1], lo)
        start = gpa - lo * PAGE_SIZE
        return buf.reshape(-1)[start:start + length].tobytes()

    def read_page(self, ckpt: int, page: int) -> bytes:
        page = self._check_page(page)
        return self.read(ckpt, page * PAGE_SIZE, PAGE_SIZE)

    def _check_page(self, page) -> int:
        if isinstance(page, bool) or not isinstance(page, numbers.Integral):
            raise InvalidArgumentError(f"page must be an int, not {page!r}")
        if not 0 <= int(page) < self.page_count:
            raise InvalidArgumentError(
                f"page {page} out of range (the image has {self.page_count} pages)")
        return int(page)

    def diff(self, a: int, b: int) -> np.ndarray:
        """Sorted page numbers whose content differs between images ``a`` and
        ``b``: pages whose blob ids differ and whose blobs' content hashes
        differ too (a store from elsewhere may hold one content twice)."""
        with self._conns.read() as conn:
            va = self._index.view(conn, tree.path_in(conn, a)).blob
            vb = self._index.view(conn, tree.path_in(conn, b)).blob
            cat = self._index.catalog(conn)
        cand = np.flatnonzero(va != vb)
        same = (cat.hash[va[cand]] == cat.hash[vb[cand]]).all(axis=1)
        return cand[~same].astype(np.int64)

    def history(self, page: int) -> list[tuple[int, str]]:
        """``(checkpoint, content hash hex)`` for every checkpoint that stored
        a new version of ``page``, in id order (zero page: ``ZERO_HASH_HEX``)."""
        page = self._check_page(page)
        out = []
        from .formats import MAP_COLUMNS, parse_map
        with self._conns.read() as conn:
            cat = self._index.catalog(conn)
            for row in conn.execute(f"SELECT {MAP_COLUMNS} FROM maps ORDER BY ckpt"):
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

    # --- maintenance (storage/verify.py, storage/maintenance.py) -------------

    def verify(self, progress=None):
        """Check the whole store (:class:`storage.verify.VerifyReport`).
        ``progress(done, total)``, if given, is called as it goes."""
        from .verify import verify
        return verify(self._conns, self.page_count, progress)

    def prune(self, keep_last: int | None = None, keep_ids: Iterable[int] = (),
              keep_tagged: bool = True, *, dry_run: bool = False, progress=None):
        """Remove every checkpoint not kept (:func:`storage.maintenance.prune`).
        ``progress(done, total)``, if given, is called as it goes."""
        from .maintenance import prune
        return prune(self._conns, self._index, keep_last=keep_last, keep_ids=keep_ids,
                     keep_tagged=keep_tagged, dry_run=dry_run, progress=progress)

    def vacuum(self, progress=None) -> None:
        """Give the space freed by ``prune`` back to the file system.
        ``progress(done, total)``, if given, is called about every
        VACUUM_PROGRESS_STEPS SQLite steps with ``total`` None (SQLite cannot
        say how far a VACUUM is), and once at the end with done == total."""
        with self._conns.exclusive() as conn:
            if progress is None:
                conn.execute("VACUUM")
                return
            ticks = [0]

            def tick():
                ticks[0] += 1
                progress(ticks[0], None)
                return 0
            conn.set_progress_handler(tick, VACUUM_PROGRESS_STEPS)
            try:
                conn.execute("VACUUM")
            finally:
                conn.set_progress_handler(None, 0)
            progress(ticks[0], ticks[0])


#: SQLite virtual-machine steps between two progress calls of Store.vacuum().
VACUUM_PROGRESS_STEPS = 1 << 20


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
