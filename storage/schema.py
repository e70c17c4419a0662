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

import sqlite_utils

from .errors import NotAStoreError, SchemaVersionError, StoreError

#: Bump on any incompatible change to the tables below.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id``: ASCII "SNAP".
APPLICATION_ID = 0x534E4150
FORMAT_NAME = "snapctl-store"
SQLITE_MAGIC = b"SQLite format 3\x00"
#: 16 KiB database pages gave the smallest file and fastest inserts for ~3 KB
#: compressed blobs (storage-notes.md); must be set before the first table.
DB_PAGE_SIZE = 16384
BUSY_TIMEOUT_MS = 60_000
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
MMAP_SIZE = 2**31 - 2**16          # SQLite's default compile-time ceiling

VERSIONS_DDL = """
CREATE TABLE versions (
    page INTEGER NOT NULL,  -- guest page number (gpa // 4096)
    ckpt INTEGER NOT NULL,  -- checkpoint that stored this version
    blob INTEGER,           -- blobs.id; NULL = the zero page
    chk INTEGER NOT NULL,   -- row_check(page, ckpt, content hash of blob)
    PRIMARY KEY (page, ckpt)
) WITHOUT ROWID
"""

BLOBS_DDL = """
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,   -- xxh3_128 of the decoded 4096 bytes
    codec INTEGER NOT NULL,      -- 0 raw, 1 lz4, 2 lz4-delta
    base INTEGER,                -- delta dictionary blob (never itself a delta)
    size INTEGER NOT NULL,       -- len(data)
    crc BLOB NOT NULL,           -- xxh3_64 of data (the stored bytes)
    data BLOB NOT NULL
)
"""


# Reference counts live apart from the blobs: a checkpoint of small edits
# bumps the count of thousands of scattered base blobs, and with the count in
# the blob row each bump rewrote a whole 16 KiB page of blob data into the WAL
# (~60 MB per 4096-page checkpoint of a 1 GiB guest).  ~1500 counts fit a page.
REFS_DDL = """
CREATE TABLE refs (
    blob INTEGER PRIMARY KEY,    -- blobs.id
    n INTEGER NOT NULL           -- versions rows + delta blobs naming it as base
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


def connect(path: str, *, readonly: bool, synchronous: str) -> sqlite3.Connection:
    if readonly:
        uri = "file:" + _quote(os.path.abspath(path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    # Restore reads every visible blob once; through mmap SQLite skips a
    # read() copy per 16 KiB page (measured ~8% faster materialize).
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


def initialise(conn: sqlite3.Connection, config: dict) -> None:
    """Create every table of a new store in one transaction."""
    conn.execute(f"PRAGMA page_size={DB_PAGE_SIZE}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"cannot switch the store to WAL mode (got {mode})")
    db = sqlite_utils.Database(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        db["meta"].create({"key": str, "value": str}, pk="key", not_null={"value"})
        db["checkpoints"].create(
            {"id": int, "parent": int, "created": float, "trigger": str,
             "step": int, "meta": str, "stats": str, "digest": bytes},
            pk="id", not_null={"created", "trigger", "meta", "stats", "digest"})
        db["tags"].create({"name": str, "ckpt": int}, pk="name", not_null={"ckpt"})
        db["states"].create({"ckpt": int, "name": str, "hash": bytes, "data": bytes},
                            pk=("ckpt", "name"), not_null={"hash", "data"})
        conn.execute(BLOBS_DDL)
        conn.execute(REFS_DDL)
        conn.execute(VERSIONS_DDL)
        db["meta"].insert_all([
            {"key": "format", "value": FORMAT_NAME},
            {"key": "schema_version", "value": str(SCHEMA_VERSION)},
            {"key": "config", "value": json.dumps(config, sort_keys=True)},
            {"key": "next_checkpoint_id", "value": "0"},
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
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as exc:
        raise NotAStoreError(f"{path}: not a snapctl store ({exc})") from None
    meta = dict(rows)
    if meta.get("format") != FORMAT_NAME:
        raise NotAStoreError(f"{path}: meta table does not name a snapctl store")
    version = int(meta.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: store schema version {version} is newer than this "
            f"snapctl supports ({SCHEMA_VERSION}); upgrade snapctl")
    return meta
