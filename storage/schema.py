"""On-disk schema, file identification and connection set-up.

The header of an SQLite file is read directly (no sqlite connection) before
anything opens it, because merely connecting read-write to an empty file or a
foreign database would let SQLite initialise it or change its journal mode.
The 100-byte header carries ``user_version`` (offset 60) and
``application_id`` (offset 68); we set both at create and checkpoint the WAL
so the main file's header is current.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct

from . import validate
from .errors import NotAStoreError, SchemaVersionError, StoreError

#: Bump on any incompatible change to the tables below.
SCHEMA_VERSION = 2
#: ``PRAGMA application_id``: ASCII "SNAP".
APPLICATION_ID = 0x534E4150
FORMAT_NAME = "snapctl-store"
SQLITE_MAGIC = b"SQLite format 3\x00"
#: 64 KiB database pages (SQLite's largest): pack rows are ~1 MiB, and
#: bigger pages mean fewer overflow pages and WAL frames to write and
#: checksum -- measured 0.56-0.62x -> 0.69x raw LZ4 on 100k typical pages,
#: 0.22x -> 0.26x on random ones.  Must be set before the first table.
DB_PAGE_SIZE = 65536
BUSY_TIMEOUT_MS = 60_000
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
MMAP_SIZE = 2**31 - 2**16          # SQLite's default compile-time ceiling

# Page contents live in packs: rows of up to about 1 MiB (writer.PACK_BYTES)
# holding many independently encoded pages ("blobs") back to back, so a
# checkpoint costs a handful of rows instead of one per page.
# Blob ids are global: slot i of a pack is blob ``first + i``.  The per-blob
# metadata are little-endian numpy arrays; ``pack_data`` keeps the bytes
# apart so loading the catalogue of every blob never reads page data.
PACKS_DDL = """
CREATE TABLE packs (
    id INTEGER PRIMARY KEY,
    ckpt INTEGER NOT NULL,   -- checkpoint that wrote it
    first INTEGER NOT NULL,  -- blob id of slot 0
    n INTEGER NOT NULL,      -- blobs in the pack
    codecs BLOB NOT NULL,    -- n x uint8: 0 raw, 1 lz4, 2 lz4-delta
    bases BLOB NOT NULL,     -- n x int64: delta dictionary blob id, 0 = none
    hashes BLOB NOT NULL,    -- n x 16 bytes: xxh3_128 of each decoded page
    ends BLOB NOT NULL,      -- n x uint32: end offset of each blob in data
    crcs BLOB NOT NULL,      -- n x uint64: xxh3_64 of each blob's stored bytes
    mchk INTEGER NOT NULL,   -- check63 of first, n and the five arrays
    size INTEGER NOT NULL,   -- len(data)
    crc INTEGER NOT NULL     -- check63 of data
)
"""

PACK_DATA_DDL = """
CREATE TABLE pack_data (
    id INTEGER PRIMARY KEY,  -- packs.id
    data BLOB NOT NULL
)
"""

# Reference counts per pack, in their own narrow table: a pack is deleted
# when nothing names any of its blobs.
REFS_DDL = """
CREATE TABLE refs (
    pack INTEGER PRIMARY KEY,  -- packs.id
    n INTEGER NOT NULL         -- map entries naming its blobs + deltas based on them
)
"""

# One row per checkpoint: the pages whose content differs from the parent's
# image, sorted, and the blob id each now holds (0 = the zero page).
MAPS_DDL = """
CREATE TABLE maps (
    ckpt INTEGER PRIMARY KEY,
    n INTEGER NOT NULL,
    pages BLOB NOT NULL,     -- n x int64, strictly increasing
    blobs BLOB NOT NULL,     -- n x int64
    chk INTEGER NOT NULL     -- check63 of le64(ckpt), pages, blobs
)
"""


def check_header(path: str) -> None:
    """Identify ``path`` from its header bytes alone; raise ``NotAStoreError``
    or ``SchemaVersionError`` without ever opening it with SQLite."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such store") from None
    except IsADirectoryError:
        raise NotAStoreError(f"{path}: is a directory, not a snapctl store") from None
    if not head:
        raise NotAStoreError(f"{path}: empty file, not a snapctl store")
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise NotAStoreError(f"{path}: not an SQLite database, not a snapctl store")
    user_version, = struct.unpack_from(">I", head, 60)
    app_id, = struct.unpack_from(">I", head, 68)
    if app_id != APPLICATION_ID:
        raise NotAStoreError(
            f"{path}: SQLite database without the snapctl marker "
            f"(application_id {app_id:#x}), not a snapctl store")
    if user_version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: store schema version {user_version} is newer than this "
            f"snapctl supports ({SCHEMA_VERSION}); upgrade snapctl")
    if user_version < 1:
        raise NotAStoreError(f"{path}: snapctl marker without a schema version")
    if user_version < SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: store schema version {user_version} is older than this snapctl "
            f"reads ({SCHEMA_VERSION}); it has no migration yet: re-create the store")


def connect(path: str, *, readonly: bool, synchronous: str,
            immutable: bool = False) -> sqlite3.Connection:
    """A connection set up to read a store that anyone may have made: the
    schema's own SQL is not trusted (no functions with side effects from
    it), DEFENSIVE where Python exposes it, and no stored value may be
    larger than validate.MAX_VALUE_BYTES.  ``immutable``: read-only media
    (no -wal/-shm is created, no lock taken)."""
    if readonly:
        uri = "file:" + _quote(os.path.abspath(path)) + ("?immutable=1" if immutable else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA trusted_schema=OFF")
    if hasattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE") and hasattr(conn, "setconfig"):
        conn.setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)     # Python >= 3.12
    if hasattr(conn, "setlimit"):
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, validate.MAX_VALUE_BYTES)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    # Restore reads every visible blob once; through mmap SQLite skips a
    # read() copy per database page (measured ~8% faster materialize).
    conn.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
    return conn


def _quote(path: str) -> str:
    from urllib.parse import quote
    return quote(path)


def check_synchronous(value: str) -> str:
    mode = str(value).upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {value!r}")
    return mode


# The first four tables as sqlite_utils created them in every store so far
# (the same text: SQLite keeps it in the file; validate.schema compares it).
META_DDL = 'CREATE TABLE "meta" (\n   "key" TEXT PRIMARY KEY,\n   "value" TEXT NOT NULL\n)'
CHECKPOINTS_DDL = ('CREATE TABLE "checkpoints" (\n   "id" INTEGER PRIMARY KEY,\n   "parent" INTEGER,\n'
                   '   "created" REAL NOT NULL,\n   "trigger" TEXT NOT NULL,\n   "step" INTEGER,\n'
                   '   "meta" TEXT NOT NULL,\n   "stats" TEXT NOT NULL,\n   "digest" BLOB NOT NULL\n)')
TAGS_DDL = 'CREATE TABLE "tags" (\n   "name" TEXT PRIMARY KEY,\n   "ckpt" INTEGER NOT NULL\n)'
STATES_DDL = ('CREATE TABLE "states" (\n   "ckpt" INTEGER,\n   "name" TEXT,\n   "hash" BLOB NOT NULL,\n'
              '   "data" BLOB NOT NULL,\n   PRIMARY KEY ("ckpt", "name")\n)')


def create_tables(conn: sqlite3.Connection) -> None:
    """Every table of the store, on ``conn`` (inside the caller's transaction)."""
    for ddl in (META_DDL, CHECKPOINTS_DDL, TAGS_DDL, STATES_DDL, PACKS_DDL, PACK_DATA_DDL, REFS_DDL,
                MAPS_DDL):
        conn.execute(ddl)


def initialise(conn: sqlite3.Connection, config: dict) -> None:
    """Create every table of a new store in one transaction."""
    conn.execute(f"PRAGMA page_size={DB_PAGE_SIZE}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"cannot switch the store to WAL mode (got {mode})")
    conn.execute("BEGIN IMMEDIATE")
    try:
        create_tables(conn)
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
            ("format", FORMAT_NAME),
            ("schema_version", str(SCHEMA_VERSION)),
            ("config", json.dumps(config, sort_keys=True)),
            ("next_checkpoint_id", "0"),
            ("generation", "0"),   # bumped by prune
        ])
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    # Put the header (application_id, user_version) into the main file so
    # check_header() sees it even before any later checkpointing.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def read_meta(conn: sqlite3.Connection, path: str) -> dict[str, str]:
    """The ``meta`` table, after the schema has been checked (validate.schema)."""
    validate.schema(conn, path, create_tables)
    try:
        rows = conn.execute("SELECT key, value FROM meta LIMIT 1000").fetchall()
    except sqlite3.DatabaseError as exc:
        raise NotAStoreError(f"{path}: not a snapctl store ({exc})") from None
    meta = {}
    for key, value in rows:
        meta[validate.text(key, path, "meta.key")] = validate.text(
            value, path, f"meta.{key}", validate.MAX_JSON_BYTES)
    if meta.get("format") != FORMAT_NAME:
        raise NotAStoreError(f"{path}: meta table does not name a snapctl store")
    version = validate.meta_int(meta, "schema_version", path)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: store schema version {version} is newer than this "
            f"snapctl supports ({SCHEMA_VERSION}); upgrade snapctl")
    return meta
