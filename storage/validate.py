"""Every value read from a store passes through here before it is used.

A store can come from anyone (a colleague's checkpoint, a file attached to
a bug report), so nothing read from it is trusted: its schema is compared
with the one this code creates before any other statement reads it, and
each stored value is checked for its type and range before it sizes an
allocation, bounds a loop or indexes an array.  A value that fails raises
``CorruptionError`` naming the table, column and row, e.g. ``checkpoint 3:
stored checkpoints.created is not a time in range ('yesterday')``.

The limits are stated in docs/store-format.md ("Limits").
"""

from __future__ import annotations

import json
import math
import sqlite3


from .codec import PAGE_SIZE
from .deferred import numpy as np
from .errors import CorruptionError, InvalidArgumentError, NotAStoreError

#: Largest guest memory a store may describe (the page tables snapctl's
#: guests use map 64 GiB): images are arrays of 8 bytes per page.
MAX_MEM_SIZE = 64 << 30
#: Blob ids stay below this: the blob catalogue is indexed by id (about
#: 57 bytes per id up to the highest), so this bounds what loading it costs.
MAX_BLOB_ID = 1 << 25
#: Checkpoint ids stay below this.
MAX_CHECKPOINT_ID = 1 << 31
#: Blobs in one pack, and bytes of one pack's data.
MAX_PACK_BLOBS = 1 << 17
MAX_PACK_BYTES = 1 << 28
#: One stored value (SQLite's length limit on every connection): the
#: largest legitimate ones are a page map of 64 GiB (128 MiB) and a pack.
MAX_VALUE_BYTES = 1 << 28
#: JSON texts (config, checkpoint meta and stats) and their nesting.
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
#: Named states (vCPU registers and the like) of one checkpoint.
MAX_STATE_BYTES = 16 << 20
MAX_NAME_CHARS = 1024
#: ``created`` is a unix time from 1970 to the year 3000.
MAX_TIME = 32503680000.0
MAX_STEP = (1 << 64) - 1


def fail(where: str, column: str, problem: str, value=None, **kw) -> CorruptionError:
    shown = "" if value is None else f" ({value!r:.60})"
    return CorruptionError(f"{where}: stored {column} {problem}{shown}", **kw)


def integer(value, where: str, column: str, lo: int = 0, hi: int = (1 << 63) - 1, **kw) -> int:
    """An INTEGER column: an int (SQLite hands REAL and TEXT through as is) in lo..hi."""
    if type(value) is not int:
        raise fail(where, column, "is not an integer", value, **kw)
    if not lo <= value <= hi:
        raise fail(where, column, f"is out of range {lo}..{hi}", value, **kw)
    return value


def optional_integer(value, where: str, column: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int | None:
    return None if value is None else integer(value, where, column, lo, hi)


def _sized(value, kind: type, what: str, unit: str, where: str, column: str, limit: int):
    if type(value) is not kind:
        raise fail(where, column, f"is not {what}", value)
    if len(value) > limit:
        raise fail(where, column, f"is longer than {limit} {unit}")
    return value


def text(value, where: str, column: str, limit: int = MAX_NAME_CHARS) -> str:
    return _sized(value, str, "text", "characters", where, column, limit)


def blob(value, where: str, column: str, limit: int = MAX_VALUE_BYTES) -> bytes:
    return _sized(value, bytes, "a blob", "bytes", where, column, limit)


def timestamp(value, where: str, column: str) -> float:
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= MAX_TIME):
        raise fail(where, column, "is not a time in range", value)
    return float(value)


def _depth_ok(obj) -> bool:
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def json_object(value, where: str, column: str) -> dict:
    """A JSON text holding an object, at most MAX_JSON_BYTES and MAX_JSON_DEPTH deep."""
    text(value, where, column, MAX_JSON_BYTES)
    if value.count("[") + value.count("{") > MAX_JSON_DEPTH and not _shallow_text(value):
        raise fail(where, column, f"is JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError) as exc:       # JSONDecodeError is a ValueError
        raise fail(where, column, f"is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise fail(where, column, f"is JSON {type(obj).__name__}, not an object")
    if not _depth_ok(obj):
        raise fail(where, column, f"is JSON nested deeper than {MAX_JSON_DEPTH}")
    return obj


def _shallow_text(value: str) -> bool:
    """Nesting depth of a JSON text by its brackets outside strings, without
    parsing it (json.loads recurses once per level)."""
    depth = 0
    in_str = esc = False
    for ch in value:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def to_store(value, what: str, check, *args):
    """What the writer is given must pass the check the reader applies:
    ``check(value, *args)`` failing is an InvalidArgumentError about ``what``."""
    try:
        return check(value, "", what, *args)
    except CorruptionError as exc:
        raise InvalidArgumentError(str(exc).split("stored ", 1)[-1]) from None


# --- the stored configuration and meta -----------------------------------------

def mem_size(value, where: str = "config") -> int:
    if type(value) is not int or value <= 0 or value % PAGE_SIZE:
        raise fail(where, "config mem_size", f"is not a positive multiple of {PAGE_SIZE}", value)
    if value > MAX_MEM_SIZE:
        raise fail(where, "config mem_size", f"is larger than the {MAX_MEM_SIZE >> 30} GiB limit", value)
    return value


def config(meta: dict, path: str) -> dict:
    where = f"{path}: stored configuration is damaged"
    cfg = json_object(meta.get("config"), where, "meta.config")
    mem_size(cfg.get("mem_size"), where)
    return cfg


def meta_int(meta: dict, key: str, path: str, default: int | None = None,
             hi: int = (1 << 63) - 1) -> int:
    """An integer kept as text in ``meta`` (next ids, generation)."""
    raw = meta.get(key)
    if raw is None and default is not None:
        return default
    if type(raw) is not str or not raw.isdigit() or len(raw) > 20:
        raise fail(f"{path}: meta table damaged", f"meta.{key}", "is not a whole number", raw)
    value = int(raw)
    if value > hi:
        raise fail(f"{path}: meta table damaged", f"meta.{key}", f"is beyond {hi}", raw)
    return value


# --- rows ----------------------------------------------------------------------

def checkpoint_row(r) -> tuple:
    """(id, parent, created, trigger, step, meta, stats, digest) checked."""
    cid = integer(r[0], "checkpoint", "checkpoints.id", 0, MAX_CHECKPOINT_ID - 1)
    where = f"checkpoint {cid}"
    parent = optional_integer(r[1], where, "checkpoints.parent", 0, MAX_CHECKPOINT_ID - 1)
    created = timestamp(r[2], where, "checkpoints.created")
    trigger = text(r[3], where, "checkpoints.trigger", 64)
    step = optional_integer(r[4], where, "checkpoints.step", 0, MAX_STEP)
    meta = json_object(r[5], where, "checkpoints.meta")
    stats = json_object(r[6], where, "checkpoints.stats")
    digest = blob(r[7], where, "checkpoints.digest", 16)
    if len(digest) != 16:
        raise fail(where, "checkpoints.digest", "is not 16 bytes")
    return cid, parent, created, trigger, step, meta, stats, digest


def tree(rows) -> dict[int, int | None]:
    """``id -> parent`` from (id, parent) rows: every parent exists and is
    older (so the tree has no cycle and every walk up it ends), one root.
    Checked in numpy (a long run's store has 10^5 checkpoints, and every
    read and checkpoint asks); the loop below only names what is wrong."""
    parents = dict(rows)
    if _tree_ok(parents):
        return parents
    return _tree_slow(parents.items())


def _tree_ok(parents: dict) -> bool:
    if not parents:
        return True
    if set(map(type, parents)) != {int} or not set(map(type, parents.values())) <= {int, type(None)}:
        return False
    if len(parents) < 4096:              # small: in Python, without importing numpy (`snapctl list`)
        roots = sum(p is None for p in parents.values())
        return roots <= 1 and all(0 <= c < MAX_CHECKPOINT_ID and (p is None or (0 <= p < c and p in parents))
                                  for c, p in parents.items())
    try:
        ids = np.fromiter(parents, np.int64, len(parents))
        par = np.fromiter([-1 if p is None else p for p in parents.values()], np.int64, len(parents))
    except OverflowError:
        return False
    root = par == -1
    return bool(ids.min() >= 0 and ids.max() < MAX_CHECKPOINT_ID and root.sum() <= 1
                and (par[~root] >= 0).all() and (par[~root] < ids[~root]).all()
                and np.isin(par[~root], ids).all())


def _tree_slow(rows) -> dict[int, int | None]:
    parents = {}
    for cid, parent in rows:
        cid = integer(cid, "checkpoint", "checkpoints.id", 0, MAX_CHECKPOINT_ID - 1)
        parents[cid] = optional_integer(parent, f"checkpoint {cid}", "checkpoints.parent",
                                        0, MAX_CHECKPOINT_ID - 1)
    roots = 0
    for cid, parent in parents.items():
        if parent is None:
            roots += 1
        elif parent not in parents or parent >= cid:
            raise CorruptionError(f"checkpoint {cid}: names parent {parent}, which is missing "
                                  "or not older (damaged tree; run verify)", checkpoint=cid)
    if roots > 1:
        raise CorruptionError(f"the checkpoint tree has {roots} roots (damaged tree; run verify)")
    return parents


def tags(rows, parents: dict | None = None) -> dict[str, int]:
    out = {}
    for name, ckpt in rows:
        name = text(name, "tag", "tags.name")
        ckpt = integer(ckpt, f"tag {name!r}", "tags.ckpt", 0, MAX_CHECKPOINT_ID - 1)
        if parents is not None and ckpt not in parents:
            raise CorruptionError(f"tag {name!r}: names unknown checkpoint {ckpt} (run verify)")
        out[name] = ckpt
    return out


def state_data(ckpt: int, name, data) -> bytes:
    return blob(data, f"checkpoint {ckpt}", f"state {name!r}", MAX_STATE_BYTES)


# --- the schema ----------------------------------------------------------------

#: Words a CREATE TABLE of ours may contain besides table and column names:
#: nothing that runs (CHECK, DEFAULT, GENERATED ... AS, REFERENCES, COLLATE).
_DDL_WORDS = {"create", "table", "integer", "text", "real", "blob", "primary", "key", "not", "null"}


def _ddl_words(sql: str) -> list[str]:
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    s = " ".join(lines)
    for ch in '"[]`(),':
        s = s.replace(ch, " ")
    return s.lower().split()


_REFERENCE = None


def _reference(create_tables):
    """sqlite_master and each table's columns as ``create_tables`` makes them."""
    global _REFERENCE
    if _REFERENCE is None:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            create_tables(conn)
            master = {(t, n) for t, n in conn.execute("SELECT type, name FROM sqlite_master")}
            cols = {n: conn.execute(f"PRAGMA table_xinfo({n})").fetchall()
                    for t, n in master if t == "table"}
        finally:
            conn.close()
        _REFERENCE = (master, cols)
    return _REFERENCE


def schema(conn: sqlite3.Connection, path: str, create_tables) -> None:
    """Refuse a store whose schema is not exactly ours: only our tables (no
    view, trigger or other index, which would run the store's own SQL when
    we query or write), with our columns, nothing that computes a value."""
    master, cols = _reference(create_tables)
    try:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError as exc:
        raise NotAStoreError(f"{path}: not a snapctl store (cannot read its schema: {exc})") from None
    got = set()
    for typ, name, _tbl, sql in rows:
        if typ not in ("table", "index") or (typ, name) not in master:
            raise NotAStoreError(f"{path}: not a snapctl store: unexpected {typ} {name!r} "
                                 "in its schema")
        if typ == "index" and sql is not None:
            raise NotAStoreError(f"{path}: not a snapctl store: index {name!r} is not ours")
        if typ == "table":
            allowed = _DDL_WORDS | {name} | {c[1].lower() for c in cols[name]}
            extra = [w for w in _ddl_words(sql or "") if w not in allowed]
            if extra:
                raise NotAStoreError(f"{path}: not a snapctl store: table {name!r} is not "
                                     f"ours ({extra[0]!r} in its definition)")
            try:
                have = conn.execute(f"PRAGMA table_xinfo({name})").fetchall()
            except sqlite3.DatabaseError as exc:
                raise NotAStoreError(f"{path}: not a snapctl store ({exc})") from None
            if have != cols[name]:
                raise NotAStoreError(f"{path}: not a snapctl store: table {name!r} has other "
                                     "columns than ours")
        got.add((typ, name))
    missing = sorted(n for t, n in master - got)
    if missing:
        raise NotAStoreError(f"{path}: not a snapctl store: no {missing[0]!r} in its schema")
