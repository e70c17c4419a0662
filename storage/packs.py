"""The blob catalogue and the pack decoder: the hot path of every read.

A *blob* is one stored page content (raw, LZ4 or LZ4-delta); blobs live
back to back in *packs* (one SQLite row of data per pack).  The
:class:`Catalog` holds, for every blob id, its pack, byte range, codec,
delta base and content hash as numpy arrays, loaded once from the small
``packs`` rows (never from the data) and extended as packs are added.
:func:`decode_into` turns a set of blob ids into page bytes: one query for
the pack rows, then per pack one checksum and one C call that decodes and
hash-checks all its blobs (storage.pageloops; on two threads for large
reads), or the same steps as Python loops when the C loops are not built.
"""

from __future__ import annotations

import json
from itertools import repeat

import numpy as np

from .codec import (CODEC_LZ4, CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE, ZERO_HASH, check63,
                    content_hash)
from .codec import lz4_decompress as _decompress
from . import pageloops
from .errors import CorruptionError, StoreError
# The row formats, defined in formats.py (re-exported here for the callers that know them here).
from .formats import (CODEC_FREED, MAX_PACK_ID, PACK_COLUMNS, VALID_CODEC, PackInfo,  # noqa: F401
                      blob_crc, pack_data_ok, pack_meta_check, parse_pack_row)


class Catalog:
    """Every blob of one store generation, indexed by blob id.

    Immutable once built: ``extend`` returns a new catalogue.  The arrays
    grow by doubling and are shared with older catalogues, which only ever
    look below their own ``n``, so readers need no lock."""

    PACK_COLUMNS = PACK_COLUMNS
    ARRAYS = ("pack", "start", "end", "codec", "base", "hash", "crc")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.max_pack = 0
        self.n = 1                       # blob ids start at 1; 0 = zero page
        self.packs: dict[int, PackInfo] = {}
        #: ids of the packs found damaged (their blob ids are not in ``n``)
        self.damaged_ids: frozenset = frozenset()
        self._alloc(1024)
        self.hash[0] = np.frombuffer(ZERO_HASH, np.uint8)   # blob 0: the zero page

    def _alloc(self, cap: int) -> None:
        try:
            self._arrays(cap)
        except MemoryError:
            raise StoreError(f"not enough memory for the catalogue of {cap} blob ids "
                             f"(about {cap * 57 >> 20} MiB)") from None

    def _arrays(self, cap: int) -> None:
        self.pack = np.full(cap, -1, np.int64)
        self.start = np.zeros(cap, np.int64)
        self.end = np.zeros(cap, np.int64)
        self.codec = np.zeros(cap, np.uint8)
        self.base = np.zeros(cap, np.int64)
        self.hash = np.zeros((cap, 16), np.uint8)
        self.crc = np.zeros(cap, np.uint64)

    @classmethod
    def load(cls, conn, generation: int) -> "Catalog":
        return cls(generation).extend(conn)

    def extend(self, conn) -> "Catalog":
        rows = conn.execute(f"SELECT {self.PACK_COLUMNS} FROM packs WHERE id > ? ORDER BY id",
                            (self.max_pack,)).fetchall()
        if not rows:
            return self
        return self.with_packs([parse_pack_row(r) for r in rows])

    def with_packs(self, parsed) -> "Catalog":
        new = Catalog.__new__(Catalog)
        new.generation = self.generation
        # Shared and only ever added to (like the arrays): an older catalogue
        # seeing newer packs is harmless, and copying it per commit would
        # make a long run's commits O(packs).  Only lookups read it.
        new.packs = self.packs
        new.max_pack = max([self.max_pack] + [info.id for info, _ in parsed])
        new.damaged_ids = self.damaged_ids
        top = max([self.n] + [info.first + info.n for info, a in parsed if a is not None])
        cap = len(self.pack)
        if top > cap:
            while cap < top:
                cap *= 2
            new._alloc(cap)
            for name in self.ARRAYS:
                getattr(new, name)[:self.n] = getattr(self, name)[:self.n]
        else:
            for name in self.ARRAYS:
                setattr(new, name, getattr(self, name))
        for info, arrays in parsed:
            known = new.packs.get(info.id)
            if known is not None and not known.damaged:
                continue                 # already here (shared with a newer catalogue)
            if arrays is None:
                new.packs[info.id] = info
                new.damaged_ids = new.damaged_ids | {info.id}
                continue
            sl = slice(info.first, info.first + info.n)
            if ((new.pack[sl] >= 0) & (new.pack[sl] != info.id)).any():
                new.packs[info.id] = PackInfo(info.id, info.ckpt, info.first, info.n, info.size,
                                              info.crc, damaged="blob ids overlap another pack")
                new.damaged_ids = new.damaged_ids | {info.id}
                continue
            new.packs[info.id] = info
            (new.codec[sl], new.base[sl], new.hash[sl], new.start[sl], new.end[sl],
             new.crc[sl]) = arrays
            new.pack[sl] = np.where(arrays[0] == CODEC_FREED, -1, info.id)
        new.n = max(self.n, top)
        return new

    def why_missing(self, blob: int) -> str:
        """Why blob ``blob`` is not in the catalogue, when a damaged pack can
        say: the one whose ids cover it, else the first damaged one."""
        damaged = sorted((p for p in self.packs.values() if p.damaged), key=lambda p: p.id)
        pk = next((p for p in damaged if p.first <= blob < p.first + p.n), damaged[0] if damaged else None)
        return f" (pack {pk.id} is damaged: {pk.damaged})" if pk else ""

    def known(self, blobs: np.ndarray) -> np.ndarray:
        """Mask of blob ids (> 0) that exist in an intact pack."""
        ok = (blobs > 0) & (blobs < self.n)
        out = np.zeros(len(blobs), bool)
        out[ok] = self.pack[blobs[ok]] >= 0
        return out


def _where(ckpt, page, blob) -> str:
    parts = [f"checkpoint {ckpt}"] if ckpt is not None else []
    if page is not None:
        parts.append(f"page {page}")
    parts.append(f"blob {blob}")
    return ", ".join(parts)


def lz4_entry_points(kind: str):
    """LZ4's C decoders, called so that pages decompress straight into the
    caller's array (no bytes object, no copy).  ``kind`` "cffi": pointers
    declared as ``uintptr_t`` so plain ints pass without wrapping, 1.46 us a
    page -- as fast as python-lz4 returning bytes (1.49), without its copy;
    "ctypes": 1.76 us.  From the libraries pageloops.lz4_libraries() names
    (the same the C loops use).  Returns (plain, with_dict), or (None, None)
    when unavailable; decoding then goes through python-lz4 and a copy."""
    import ctypes
    libs = pageloops.lz4_libraries()
    if kind == "cffi":
        try:
            import cffi
        except ImportError:
            return None, None
        ffi = cffi.FFI()
        ffi.cdef("int LZ4_decompress_safe(uintptr_t, uintptr_t, int, int);"
                 "int LZ4_decompress_safe_usingDict(uintptr_t, uintptr_t, int, int, uintptr_t, int);")
        for cand in libs:
            try:
                lib = ffi.dlopen(cand)
                return lib.LZ4_decompress_safe, lib.LZ4_decompress_safe_usingDict
            except (OSError, AttributeError):
                continue
    elif kind == "ctypes":
        for cand in libs:
            try:
                lib = ctypes.CDLL(cand)
                plain, with_dict = lib.LZ4_decompress_safe, lib.LZ4_decompress_safe_usingDict
            except (OSError, AttributeError):
                continue
            v = ctypes.c_void_p
            plain.argtypes = [v, v, ctypes.c_int, ctypes.c_int]
            with_dict.argtypes = [v, v, ctypes.c_int, ctypes.c_int, v, ctypes.c_int]
            plain.restype = with_dict.restype = ctypes.c_int
            return plain, with_dict
    return None, None


#: The LZ4 decoders the Python loops call: {"plain": f, "dict": f} (None:
#: python-lz4 plus a copy), chosen on first use -- cffi, else ctypes -- or
#: set by a test (``monkeypatch.setitem``).
PYTHON_DECODER: dict = {}


def _python_decoder():
    if not PYTHON_DECODER:
        for kind in ("cffi", "ctypes"):
            pair = lz4_entry_points(kind)
            if pair[0] is not None:
                break
        PYTHON_DECODER.update(plain=pair[0], dict=pair[1])
    return PYTHON_DECODER["plain"], PYTHON_DECODER["dict"]


def _address(data: bytes) -> int:
    import ctypes
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def _decode_plain(data: bytes, st: np.ndarray, ln, cd, dst) -> bool:
    """Decode raw/LZ4 blobs (offsets ``st``, lengths ``ln`` in ``data``) to
    the addresses ``dst``; False if any does not decode to exactly one page."""
    import ctypes
    P, move = PAGE_SIZE, ctypes.memmove
    _DEC = _python_decoder()[0]
    if _DEC is None:
        mv = memoryview(data)
        try:
            for s, n, c, d in zip(st.tolist(), ln, cd, dst):
                page = _decompress(mv[s:s + n], uncompressed_size=P) if c == CODEC_LZ4 \
                    else bytes(mv[s:s + n])
                if len(page) != P:
                    return False
                move(d, page, P)
        except Exception:
            return False
        return True
    src = (st + _address(data)).tolist()
    if CODEC_RAW not in cd:                        # the common case: one map() over C calls
        got = list(map(_DEC, src, dst, ln, repeat(P)))
    else:
        got = [_DEC(s, d, n, P) if c == CODEC_LZ4 else (P if n == P and move(d, s, P) else -1)
               for s, n, c, d in zip(src, ln, cd, dst)]
    return got.count(P) == len(got)


def _decode_deltas(data: bytes, st: np.ndarray, ln, dst, dict_at) -> bool:
    """Decode LZ4-delta blobs to the addresses ``dst``; ``dict_at[i]`` is the
    address of blob i's 4096-byte dictionary (its base, already decoded)."""
    import ctypes
    P = PAGE_SIZE
    _DEC_DICT = _python_decoder()[1]
    if _DEC_DICT is None:
        mv = memoryview(data)
        try:
            for s, n, d, a in zip(st.tolist(), ln, dst, dict_at):
                page = _decompress(mv[s:s + n], uncompressed_size=P, dict=ctypes.string_at(a, P))
                if len(page) != P:
                    return False
                ctypes.memmove(d, page, P)
        except Exception:
            return False
        return True
    src = (st + _address(data)).tolist()
    got = list(map(_DEC_DICT, src, dst, ln, repeat(P), dict_at, repeat(P)))
    return got.count(P) == len(got)


def _hashes(out: np.ndarray, offs) -> bytes:
    """Content hashes of the decoded pages at byte offsets ``offs`` of ``out``."""
    h, P, mv = content_hash, PAGE_SIZE, memoryview(out)
    return b"".join([h(mv[o:o + P]) for o in offs])


#: Reads of at least this many blobs decode on two threads (C loops only).
_PARALLEL_MIN = 4096


class _Jobs:
    """Runs the job of pack ``pid`` inline, or on a two-thread pool with at
    most ``pageloops.JOBS_IN_FLIGHT`` packs in flight, after the jobs of packs ``<= after`` (those
    holding its deltas' bases) have finished.  On leaving, waits for all
    (nothing may still write into the caller's array) and raises the first
    job's error."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.pending: list = []

    def run(self, pid: int, fn, *args, after: int = 0) -> None:
        if not self.parallel:
            fn(*args)
            return
        k = next((i for i, (p, _) in enumerate(self.pending) if p > after), len(self.pending))
        self._wait(max(k, len(self.pending) - (pageloops.JOBS_IN_FLIGHT - 1)))
        self.pending.append((pid, pageloops.pool().submit(fn, *args)))

    def _wait(self, k: int) -> None:
        # one at a time: until a job has finished it stays in ``pending``,
        # so that leaving on an error still waits for it
        while k > 0:
            self.pending[0][1].result()
            self.pending.pop(0)
            k -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        first = pageloops.wait_all([f for _, f in self.pending])
        self.pending = []
        if first is not None and exc[0] is None:
            raise first


def decode_into(conn, cat: Catalog, blobs: np.ndarray, offs: np.ndarray, out: np.ndarray,
                *, ckpt=None, pages=None) -> None:
    """Decode the distinct blob ids ``blobs`` (all > 0) into the flat,
    C-contiguous uint8 array ``out`` at byte offsets ``offs``, checking every
    pack's checksum and every page's content hash; raise ``CorruptionError``
    naming the checkpoint, page (``pages[i]`` for ``blobs[i]``) and blob
    otherwise.  Offsets are multiples of 4096.  Deltas are decoded after the
    plain blobs of their pack, against their base: read from ``out`` when the
    base is among ``blobs``, else decoded first into the delta's own page."""
    blobs = np.asarray(blobs, np.int64)
    offs = np.asarray(offs, np.int64)
    if pages is None:
        pages = np.full(len(blobs), -1, np.int64)
    page_of = lambda i: None if pages[i] < 0 else int(pages[i])  # noqa: E731
    if not len(blobs):
        return
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    out = out.reshape(-1)
    known = cat.known(blobs)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        b = int(blobs[i])
        why = cat.why_missing(b)
        where = ", ".join([f"checkpoint {ckpt}"] * (ckpt is not None)
                          + [f"page {page_of(i)}"] * (page_of(i) is not None)) or "read"
        raise CorruptionError(f"{where}: references missing blob {b}{why}",
                              checkpoint=ckpt, page=page_of(i), blob=b)
    for pid in np.unique(cat.pack[blobs]).tolist():
        info = cat.packs[pid]
        if info.damaged:
            i = int(np.flatnonzero(cat.pack[blobs] == pid)[0])
            raise CorruptionError(
                f"{_where(ckpt, page_of(i), int(blobs[i]))}: pack {pid} is damaged ({info.damaged})",
                checkpoint=ckpt, page=page_of(i), blob=int(blobs[i]))
    codec = cat.codec[blobs]
    bad = ~VALID_CODEC[codec]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptionError(f"{_where(ckpt, page_of(i), int(blobs[i]))}: unknown codec "
                              f"{int(codec[i])}", checkpoint=ckpt, page=page_of(i),
                              blob=int(blobs[i]))
    is_delta = codec == CODEC_LZ4_DELTA

    # Delta dictionaries: the address of each delta's base content.  A base
    # among ``blobs`` is read where it lands in ``out``; a base no page of
    # this read shows is decoded, with its own (older) pack, into the page
    # of its delta, and that delta then takes its dictionary from its own
    # page (set aside just before the delta overwrites it).  So a read
    # writes nothing but ``out``: no side buffer to allocate and fault in.
    dict_addr = np.zeros(len(blobs), np.int64)
    n_req = len(blobs)                     # entries past this: bases no page shows
    if is_delta.any():
        dj = np.flatnonzero(is_delta)
        bases = cat.base[blobs[dj]]
        bknown = cat.known(bases)
        bad = ~bknown | (cat.codec[np.where(bknown, bases, 0)] == CODEC_LZ4_DELTA)
        if bad.any():
            j = int(dj[np.flatnonzero(bad)[0]])
            b = int(blobs[j])
            raise CorruptionError(
                f"{_where(ckpt, page_of(j), b)}: delta base blob {int(cat.base[b])} is "
                f"{'itself a delta' if bknown[np.flatnonzero(bad)[0]] else 'missing'}",
                checkpoint=ckpt, page=page_of(j), blob=b)
        # Where each plain blob of this read lands, by blob id (one array
        # over the id space: cheaper than isin/searchsorted on 10^5 ids).
        plain = np.flatnonzero(~is_delta)
        where = np.full(cat.n, -1, np.int64)
        where[blobs[plain]] = offs[plain]
        at = where[bases]
        inside = at >= 0
        dict_addr[dj] = out.ctypes.data + np.where(inside, at, offs[dj])
        if (~inside).any():
            k = int((~inside).sum())
            blobs = np.concatenate((blobs, bases[~inside]))
            pages = np.concatenate((pages, pages[dj[~inside]]))
            offs = np.concatenate((offs, offs[dj[~inside]]))
            is_delta = np.concatenate((is_delta, np.zeros(k, bool)))
            dict_addr = np.concatenate((dict_addr, np.zeros(k, np.int64)))
    dst = out.ctypes.data + offs

    # One pass of numpy for every blob, in (pack, plain-before-delta, offset)
    # order; the per-pack loop below only slices.
    bpack = cat.pack[blobs]
    # (pack, plain before delta, offset) as one int64 key: one argsort is
    # faster than a three-key lexsort (packs < 2**30, offsets < 2**32).
    # Stable (timsort): the key is mostly in order already (blob ids grow
    # with pack and offset), ~40 % faster than quicksort on it.
    order = np.argsort((bpack << 33) | (is_delta.astype(np.int64) << 32) | cat.start[blobs],
                       kind="stable")
    bo = blobs[order]
    pk_o = bpack[order]
    cut = np.flatnonzero(np.diff(pk_o)) + 1
    starts, stops = np.concatenate(([0], cut)).tolist(), np.concatenate((cut, [len(pk_o)])).tolist()
    n_plain = np.cumsum(~is_delta[order])
    mids = [lo + int(n_plain[hi - 1] - (n_plain[lo - 1] if lo else 0)) for lo, hi in zip(starts, stops)]
    pids = pk_o[starts].tolist()
    bound_of = dict(zip(pids, zip(starts, mids, stops)))
    st_a = cat.start[bo]
    ln_a = cat.end[bo] - st_a
    cd_a, dst_a, da_a = cat.codec[bo], dst[order], dict_addr[order]
    hash_a = cat.hash[bo]
    # A delta's base is a blob of the parent image, so it lives in an older
    # pack, which this pass (in pack id order) has decoded already: deltas
    # are decoded with their own pack.  (Keeping packs with deltas for a
    # second pass held their data alive, made every later row a fresh
    # allocation, and those first-touch faults cost ~0.08 s per GiB.)
    base_pack = np.where(is_delta[order], cat.pack[np.where(is_delta[order], cat.base[bo], 0)], -1)

    def fail(data, lo, hi, k):
        """Name the damage in the pack's blobs lo..hi (k: first suspect, or None)."""
        import ctypes
        sel = range(lo, hi) if k is None else range(lo + k, lo + k + 1)
        _check_blob_crcs(cat, order[list(sel)], blobs, data, cat.packs[int(pk_o[lo])], ckpt, page_of)
        dicts = [ctypes.string_at(int(da_a[i]), PAGE_SIZE) if cd_a[i] == CODEC_LZ4_DELTA else None
                 for i in sel]
        for i, d in zip(sel, dicts):
            # a base decoded only as this delta's dictionary was not checked
            # on its own: if it is what is wrong, name it
            b = int(bo[i])
            if d is not None and da_a[i] == dst_a[i] and content_hash(d) != cat.hash[cat.base[b]].tobytes():
                j = int(order[i])
                raise CorruptionError(
                    f"{_where(ckpt, page_of(j), b)}: delta base blob {int(cat.base[b])} does not "
                    "decode to its content hash", checkpoint=ckpt, page=page_of(j), blob=b)
        _raise_first_bad(cat, order[list(sel)], blobs, data, dicts, ckpt, page_of)

    native = pageloops.native("read")
    if native:
        # A base decoded only as its delta's dictionary skips its own hash
        # check (NO_CHECK): the delta's check covers the bytes returned.
        cd_n = cd_a | np.where(order >= n_req, pageloops.NO_CHECK, 0).astype(np.uint8)

        def decode(data, lo, mid, hi):
            # the pack's checksum here, on the decoding thread, without the GIL
            info = cat.packs[int(pk_o[lo])]
            if not pack_data_ok(data, info, pageloops.check63):
                _check_blob_crcs(cat, order[lo:hi], blobs, data, info, ckpt, page_of)
            src = np.frombuffer(data, np.uint8).ctypes.data + st_a[lo:hi]
            k = pageloops.decode(src, ln_a[lo:hi], cd_n[lo:hi], dst_a[lo:hi], da_a[lo:hi],
                                 hash_a[lo:hi])
            if k >= 0:
                fail(data, lo, hi, k)
    else:
        ln_l, cd_l, dst_l = ln_a.tolist(), cd_a.tolist(), dst_a.tolist()
        offs_o = offs[order]
        of_l = offs_o.tolist()
        hb = hash_a.tobytes()
        rows = out[:out.size - out.size % PAGE_SIZE].reshape(-1, PAGE_SIZE)

        checked = order < n_req            # as in C: dictionary-only bases are not checked

        def decode(data, lo, mid, hi):
            if mid > lo:
                ok = _decode_plain(data, st_a[lo:mid], ln_l[lo:mid], cd_l[lo:mid], dst_l[lo:mid])
                if ok:
                    c = np.flatnonzero(checked[lo:mid]) + lo
                    ok = _hashes(out, offs_o[c].tolist()) == hash_a[c].tobytes()
                if not ok:
                    fail(data, lo, mid, None)
            if hi > mid:
                da = da_a[mid:hi].copy()
                own = da == dst_a[mid:hi]
                if own.any():               # dictionary = the delta's own page: set it aside
                    aside = rows[offs_o[mid:hi][own] // PAGE_SIZE]
                    da[own] = aside.ctypes.data + np.arange(len(aside)) * PAGE_SIZE
                if not _decode_deltas(data, st_a[mid:hi], ln_l[mid:hi], dst_l[mid:hi], da.tolist()) \
                        or _hashes(out, of_l[mid:hi]) != hb[mid * 16:hi * 16]:
                    if own.any():
                        rows[offs_o[mid:hi][own] // PAGE_SIZE] = aside
                    fail(data, mid, hi, None)

    # In C, packs decode on two threads (the GIL is released) while this one
    # reads the next rows; a pack with deltas first waits for the packs that
    # hold their bases (all older).
    jobs = _Jobs(native and len(blobs) >= _PARALLEL_MIN)
    seen = set()
    with jobs:
        for pid, data in conn.execute("SELECT id, data FROM pack_data WHERE id IN "
                                      "(SELECT value FROM json_each(?)) ORDER BY id",
                                      (json.dumps(pids),)):
            lo, mid, hi = bound_of[pid]
            seen.add(pid)
            info = cat.packs[pid]
            if not pack_data_ok(data, info, None if native else check63):   # C: on its thread
                _check_blob_crcs(cat, order[lo:hi], blobs, data, info, ckpt, page_of)
            if hi > mid and base_pack[mid:hi].max() >= pid:     # only metadata damage can do this
                i = int(order[mid + int(np.argmax(base_pack[mid:hi]))])
                raise CorruptionError(
                    f"{_where(ckpt, page_of(i), int(blobs[i]))}: delta base blob "
                    f"{int(cat.base[blobs[i]])} is not older than the delta",
                    checkpoint=ckpt, page=page_of(i), blob=int(blobs[i]))
            jobs.run(pid, decode, data, lo, mid, hi,
                     after=int(base_pack[mid:hi].max()) if hi > mid else 0)
    if len(seen) != len(pids):
        pid = min(set(pids) - seen)
        i = int(order[bound_of[pid][0]])
        raise CorruptionError(f"{_where(ckpt, page_of(i), int(blobs[i]))}: pack {pid} "
                              "has no data", checkpoint=ckpt, page=page_of(i),
                              blob=int(blobs[i]))


def decode_one(cat: Catalog, blob: int, data: bytes, dict_page: bytes | None) -> bytes:
    """Decode blob ``blob`` from its pack's ``data``; ``ValueError`` on failure
    (undecodable, wrong length or wrong content hash)."""
    s, e, c = int(cat.start[blob]), int(cat.end[blob]), int(cat.codec[blob])
    raw = data[s:e]
    if c == CODEC_RAW:
        page = raw
    elif c == CODEC_LZ4:
        page = _decompress(raw, uncompressed_size=PAGE_SIZE)
    elif c == CODEC_LZ4_DELTA:
        if dict_page is None:
            raise ValueError("delta without its base")
        page = _decompress(raw, uncompressed_size=PAGE_SIZE, dict=dict_page)
    else:
        raise ValueError(f"unknown codec {c}")
    if len(page) != PAGE_SIZE:
        raise ValueError(f"decodes to {len(page)} bytes")
    if content_hash(page) != cat.hash[blob].tobytes():
        raise ValueError("content does not match its hash")
    return bytes(page)


def _check_blob_crcs(cat, sel, blobs, data, info, ckpt, page_of) -> None:
    """Raise for the first blob of ``sel`` whose stored bytes fail their
    checksum (or lie outside ``data``); return if none does: a pack whose
    checksum fails only in blobs this read does not need can still serve it
    (verify reports the damage)."""
    for i in sel.tolist():
        b = int(blobs[i])
        s, e = int(cat.start[b]), int(cat.end[b])
        if not isinstance(data, bytes) or len(data) < e or blob_crc(data[s:e]) != int(cat.crc[b]):
            raise CorruptionError(
                f"{_where(ckpt, page_of(i), b)}: stored bytes fail their checksum "
                f"(pack {info.id}, checkpoint {info.ckpt})",
                checkpoint=ckpt, page=page_of(i), blob=b)


def _raise_first_bad(cat, sel, blobs, data, dicts, ckpt, page_of):
    """Slow path, only on damage: find and name the first bad blob among
    ``blobs[sel]`` (decoded again with python-lz4, independently)."""
    for k, i in enumerate(sel.tolist()):
        blob = int(blobs[i])
        try:
            decode_one(cat, blob, data, None if dicts is None else dicts[k])
        except Exception as exc:  # lz4.block.LZ4BlockError is a ValueError too
            raise CorruptionError(f"{_where(ckpt, page_of(i), blob)}: cannot decode ({exc})",
                                  checkpoint=ckpt, page=page_of(i), blob=blob) from None
    i = int(sel[0])
    raise CorruptionError(f"{_where(ckpt, page_of(i), int(blobs[i]))}: cannot decode",
                          checkpoint=ckpt, page=page_of(i), blob=int(blobs[i]))


def decode_blobs(data: bytes, starts: np.ndarray, lengths: np.ndarray, codecs: np.ndarray,
                 out: np.ndarray, rows: np.ndarray, dict_at: np.ndarray,
                 hashes: np.ndarray) -> int:
    """Decode blob i (``lengths[i]`` bytes at ``starts[i]`` of ``data``, codec
    ``codecs[i]``) into row ``rows[i]`` of ``out`` (pages x 4096, C-contiguous)
    and check it against ``hashes[i]``; a delta's dictionary is the page at
    address ``dict_at[i]``.  -1 when all decode and match, else the index of
    the first that does not.  Blobs that arrive from outside the store (an
    imported transfer): in C when the page loops are loaded, one call."""
    starts = np.asarray(starts, np.int64)
    n = len(starts)
    if not n:
        return -1
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.shape[1:] == (PAGE_SIZE,)
    dst = out.ctypes.data + np.asarray(rows, np.int64) * PAGE_SIZE
    if pageloops.native("read"):
        buf = np.frombuffer(data, np.uint8)
        return pageloops.decode(buf.ctypes.data + starts, np.asarray(lengths, np.int64),
                                np.asarray(codecs, np.uint8), dst, np.asarray(dict_at, np.int64),
                                np.ascontiguousarray(hashes, np.uint8))
    import ctypes
    mv = memoryview(data)
    for i, (s, ln, c, r, d, h) in enumerate(zip(starts.tolist(), np.asarray(lengths).tolist(),
                                                np.asarray(codecs).tolist(), np.asarray(rows).tolist(),
                                                np.asarray(dict_at).tolist(), hashes)):
        try:
            if c == CODEC_RAW:
                page = bytes(mv[s:s + ln])
            elif c == CODEC_LZ4:
                page = _decompress(mv[s:s + ln], uncompressed_size=PAGE_SIZE)
            elif c == CODEC_LZ4_DELTA:
                page = _decompress(mv[s:s + ln], uncompressed_size=PAGE_SIZE,
                                   dict=ctypes.string_at(d, PAGE_SIZE))
            else:
                return i
        except Exception:  # lz4.block.LZ4BlockError is a ValueError too
            return i
        if len(page) != PAGE_SIZE or content_hash(page) != bytes(h):
            return i
        out[r] = np.frombuffer(page, np.uint8)
    return -1
