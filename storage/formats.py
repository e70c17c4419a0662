"""The on-disk row formats (docs/store-format.md), in one place.

Every Python module that reads or writes a ``maps`` or ``packs`` row -- the
store, the checkpoint writer, verify and prune -- encodes and parses it here.
Rows parsed here are checked (check values, ranges, lengths); a damaged row
raises ``CorruptionError`` or is reported as damaged, never trusted.

There is a second reader: the lazy-restore handler in C
(storage/native/lazyfault.c) parses a pack's metadata and ``mchk``
(``lz_load_pack``, as :func:`parse_pack_row`), a map's ``chk`` (as
:func:`parse_map`) and the per-blob ``crcs`` (as :func:`blob_crc`) itself.
A format change is made here *and* there; the damaged-store tests of
tests/test_lazy_restore.py (and the old-store fixture of
tests/storage_tests/test_store_compat.py) catch the two disagreeing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import validate
from .codec import CODEC_NAMES, MASK63, check63, xxh3_64
from .errors import CorruptionError

_PACK_Q = struct.Struct("<q").pack
_HEAD = np.dtype("<i8")

#: Columns of a ``maps`` row, in the order :func:`parse_map` takes them.
MAP_COLUMNS = "ckpt, n, pages, blobs, chk"
#: Columns of a ``packs`` row, in the order :func:`pack_row` returns them.
PACK_COLUMNS = "id, ckpt, first, n, codecs, bases, hashes, ends, crcs, mchk, size, crc"

#: Codec of a slot whose blob prune() removed from a partly dead pack: no
#: bytes, not a blob any more (the ids of the other slots never change).
CODEC_FREED = 255
VALID_CODEC = np.zeros(256, bool)
VALID_CODEC[list(CODEC_NAMES)] = True

#: Pack ids stay below this (checked on load): the decoder sorts on
#: pack << 33 | offset in one int64.
MAX_PACK_ID = 1 << 30


def ids_sql(ids: Iterable[int]) -> str:
    """An SQL list of integer ids for ``IN (...)`` ("NULL" when empty: matches nothing)."""
    return ",".join(str(int(i)) for i in ids) or "NULL"


def generation(conn, filename: str) -> int:
    """The store's prune generation (meta), or CorruptionError if damaged."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    if row is None:
        raise CorruptionError(f"{filename}: meta table damaged (no generation)")
    return validate.meta_int({"generation": row[0]}, "generation", filename)


def _update(conn, table: str, columns: str, row: tuple) -> None:
    """UPDATE the ``table`` row whose key (the first of ``columns``) is
    ``row[0]`` to ``row`` (in ``columns`` order, as map_row/pack_row give it)."""
    names = [c.strip() for c in columns.split(",")]
    if len(row) != len(names):
        raise ValueError(f"a {table} row has {len(names)} columns, not {len(row)}")
    sets = ", ".join(f"{c} = ?" for c in names[1:])
    conn.execute(f"UPDATE {table} SET {sets} WHERE {names[0]} = ?", (*row[1:], row[0]))


# --- maps: one row per checkpoint -------------------------------------------

def map_row(ckpt: int, pages: np.ndarray, blobs: np.ndarray) -> tuple[int, int, bytes, bytes, int]:
    """The ``maps`` row (MAP_COLUMNS) of checkpoint ``ckpt`` whose pages
    ``pages`` (increasing) now hold blobs ``blobs`` (0: the zero page)."""
    pb, bb = np.asarray(pages).astype("<i8").tobytes(), np.asarray(blobs).astype("<i8").tobytes()
    return ckpt, len(pages), pb, bb, check63(_PACK_Q(ckpt), pb, bb)


def update_map(conn, row: tuple) -> None:
    """Rewrite the ``maps`` row of checkpoint ``row[0]`` to ``row`` (a map_row)."""
    _update(conn, "maps", MAP_COLUMNS, row)


def parse_map(row, page_count: int, reading: int | None = None):
    """A ``maps`` row -> (pages, blobs) int64 arrays, checked; a damaged
    row raises ``CorruptionError`` naming the checkpoint being read."""
    ckpt, n, pages, blobs, chk = row
    who = ckpt if reading is None else reading
    ok = (type(ckpt) is int and 0 <= ckpt < validate.MAX_CHECKPOINT_ID
          and isinstance(pages, bytes) and isinstance(blobs, bytes) and type(n) is int
          and len(pages) == len(blobs) == 8 * n
          and check63(_PACK_Q(ckpt), pages, blobs) == chk)
    if ok:
        p = np.frombuffer(pages, "<i8").astype(np.int64)
        b = np.frombuffer(blobs, "<i8").astype(np.int64)
        ok = not n or (p[0] >= 0 and p[-1] < page_count and bool((np.diff(p) > 0).all())
                       and bool((b >= 0).all()) and int(b.max()) < validate.MAX_BLOB_ID)
    if not ok:
        raise CorruptionError(f"checkpoint {who}: the page map of checkpoint {ckpt} is damaged",
                              checkpoint=who)
    return p, b


# --- packs: many blobs per row -----------------------------------------------

@dataclass(frozen=True)
class PackInfo:
    id: int
    ckpt: int
    first: int
    n: int
    size: int
    crc: int
    damaged: str | None = None      # why the metadata cannot be trusted


def pack_meta_check(pid: int, first: int, n: int, codecs: bytes, bases: bytes,
                    hashes: bytes, ends: bytes, crcs: bytes) -> int:
    """Check value of a pack's metadata, its own id included (a row whose id
    changed would otherwise pass)."""
    return check63(np.array([pid, first, n], _HEAD).tobytes(), codecs, bases, hashes, ends, crcs)


def blob_crc(data) -> int:
    """Checksum of one blob's stored bytes.  Reads check the pack's checksum
    (one call per pack); only when that fails are the blobs a read needs
    checked one by one, so damage elsewhere in the pack does not stop it."""
    return xxh3_64(data)


def pack_row(pid: int, ckpt: int, first: int, codecs: np.ndarray, bases: np.ndarray,
             hashes: bytes, ends: np.ndarray, crcs: np.ndarray, data: bytes,
             crc: int | None = None) -> tuple:
    """The ``packs`` row (PACK_COLUMNS) of pack ``pid``: blobs ``first``..
    with per-blob ``codecs`` (uint8), delta ``bases`` (int64), content
    ``hashes`` (16 bytes each, joined), end offsets ``ends`` in ``data`` and
    ``crcs`` (blob_crc of each blob's bytes); ``crc``: check63(data) if the
    caller has it."""
    n = len(codecs)
    cb = np.asarray(codecs, np.uint8).tobytes()
    bb = np.asarray(bases).astype("<i8").tobytes()
    eb = np.asarray(ends).astype("<u4").tobytes()
    rb = np.asarray(crcs).astype("<u8").tobytes()
    return (pid, ckpt, first, n, cb, bb, hashes, eb, rb,
            pack_meta_check(pid, first, n, cb, bb, hashes, eb, rb), len(data),
            check63(data) if crc is None else crc)


def update_pack(conn, row: tuple) -> None:
    """Rewrite the ``packs`` row of pack ``row[0]`` to ``row`` (a pack_row)."""
    _update(conn, "packs", PACK_COLUMNS, row)


def pack_data_ok(data, info: PackInfo, check=check63) -> bool:
    """Whether ``data`` (a ``pack_data.data`` value) are pack ``info``'s bytes
    undamaged: bytes, ``info.size`` long, their check value ``info.crc``.
    ``check``: the check63 to take (``pageloops.check63`` on a decoding
    thread, without the GIL); None: type and length only, the check value
    taken later."""
    return (isinstance(data, bytes) and len(data) == info.size
            and (check is None or check(data) == info.crc))


def parse_pack_row(row) -> tuple[PackInfo, tuple | None]:
    """A ``packs`` row -> (info, arrays) with arrays = (codec, base, hash,
    start, end, crc), or ``None`` when the metadata are damaged."""
    pid, ckpt, first, n, codecs, bases, hashes, ends, crcs, mchk, size, crc = row
    info = PackInfo(pid, ckpt, first, n, size, crc)
    MAX_BLOB_ID, MAX_PACK_BYTES = validate.MAX_BLOB_ID, validate.MAX_PACK_BYTES
    try:
        if not 0 < pid < MAX_PACK_ID:
            raise ValueError(f"pack id {pid} out of range")
        for name, v, hi in (("ckpt", ckpt, validate.MAX_CHECKPOINT_ID - 1),
                            ("first", first, MAX_BLOB_ID - 1),
                            ("n", n, validate.MAX_PACK_BLOBS), ("size", size, MAX_PACK_BYTES),
                            ("mchk", mchk, MASK63), ("crc", crc, MASK63)):
            if type(v) is not int or not 0 <= v <= hi:
                raise ValueError(f"packs.{name} is not an integer in 0..{hi} ({v!r:.40})")
        if first + n > MAX_BLOB_ID:
            raise ValueError(f"blob ids beyond the limit {MAX_BLOB_ID}")
        if not all(isinstance(x, bytes) for x in (codecs, bases, hashes, ends, crcs)):
            raise ValueError("metadata column is not a blob")
        if pack_meta_check(pid, first, n, codecs, bases, hashes, ends, crcs) != mchk:
            raise ValueError("metadata fail their check value")
        if (len(codecs), len(bases), len(hashes), len(ends), len(crcs)) != \
                (n, 8 * n, 16 * n, 4 * n, 8 * n) \
                or n <= 0 or first <= 0:
            raise ValueError("metadata arrays have the wrong length")
        end = np.frombuffer(ends, "<u4").astype(np.int64)
        start = np.concatenate(([0], end[:-1]))
        if (end < start).any() or end[-1] != size:
            raise ValueError("blob offsets are not increasing up to the pack size")
        base = np.frombuffer(bases, "<i8")
        if ((base < 0) | (base >= first + np.arange(n))).any():
            raise ValueError("a delta base is not an older blob")
        arrays = (np.frombuffer(codecs, np.uint8), base.astype(np.int64),
                  np.frombuffer(hashes, np.uint8).reshape(n, 16), start, end,
                  np.frombuffer(crcs, "<u8").astype(np.uint64))
    except ValueError as exc:
        # only plain ints in a damaged pack's info: reports and prune add them up
        ints = [v if type(v) is int and 0 <= v < MAX_PACK_BYTES else 0 for v in (ckpt, first, n, size)]
        return PackInfo(pid, *ints, crc=0, damaged=str(exc)), None
    return info, arrays
