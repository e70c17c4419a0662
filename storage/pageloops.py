"""The store's per-page loops in C, when the optional extension is built.

``storage._pagecodec`` (storage/native/pagecodec.c, compiled by setup.py
with cffi) decodes, hashes and compresses whole batches of pages in one call
with the GIL released, so the per-page cost is LZ4's and xxh3's own and two
threads use both cores.  It links no library: it calls LZ4 and xxh3 through
pointers to the functions inside python-lz4's and xxhash's extension
modules, the code that encodes and checks everything else in the store.

:func:`native` is False when the extension or those functions are missing,
or when ``SNAPCTL_PURE_PYTHON=1`` (``NATIVE``/``KIND`` say the same, loaded on
first use); the callers then use their Python loops, which the tests also
run and hold to the same results.  ``USE`` is the one switch the store's
readers and writers consult.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from .codec import MASK63, PAGE_SIZE, ZERO_HASH


LZ4_NAMES = ("LZ4_decompress_safe", "LZ4_decompress_safe_usingDict", "LZ4_compress_default",
             "LZ4_createStream", "LZ4_freeStream", "LZ4_loadDict", "LZ4_compress_fast_continue")
XXH_NAMES = ("XXH3_128bits", "XXH3_64bits")

#: The store's one C-or-Python switch, per direction: "read" (decoding
#: packs), "write" (hashing and encoding new pages).  Both True: the C loops
#: wherever they are loaded (:func:`native`).  Tests turn a part off to hold
#: the Python loops to the same results (``monkeypatch.setitem(USE, ...)``).
USE = {"read": True, "write": True}


def lz4_libraries() -> list[str]:
    """Where LZ4's C functions are looked for, in order: python-lz4's own
    extension (the library that compresses the pages; it exports them on
    Linux), else the system's liblz4."""
    import ctypes.util

    import lz4.block
    return [p for p in (getattr(lz4.block._block, "__file__", None), ctypes.util.find_library("lz4")) if p]


def xxhash_libraries() -> list[str]:
    """The same for xxh3: python-xxhash's extension, else the system's libxxhash."""
    import ctypes.util

    import xxhash._xxhash
    return [p for p in (getattr(xxhash._xxhash, "__file__", None), ctypes.util.find_library("xxhash")) if p]


def entry_points(candidates, names):
    """{name: address} from the first library in ``candidates`` (paths) that
    exports all of ``names``, and which one it was; (None, None) if none."""
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            return {n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names}, path
        except (OSError, AttributeError, TypeError):
            continue
    return None, None


def encode_table(lib, fns: dict) -> np.ndarray:
    """pc_encode's function table, in the order the C side names
    (``pc_encode_fns()``), from ``fns`` (name -> address): by name on both
    sides, so the two can never disagree silently."""
    from ._pagecodec import ffi
    names = ffi.string(lib.pc_encode_fns()).decode().split()
    return np.array([fns[n] for n in names], np.uint64)


def _load():
    if os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0"):
        return None, "pure Python (SNAPCTL_PURE_PYTHON set)"
    try:
        from ._pagecodec import lib as pagecodec
    except ImportError as exc:
        return None, f"pure Python (C extension not built: {exc})"
    if not all(hasattr(pagecodec, f) for f in ("pc_encode_fns", "pc_xxh3_64_many", "pc_digest_update")):
        return None, "pure Python (C extension out of date: rebuild it, python setup.py build_ext --inplace)"
    lz4_fns, lz4_from = entry_points(lz4_libraries(), LZ4_NAMES)
    xxh_fns, xxh_from = entry_points(xxhash_libraries(), XXH_NAMES)
    if lz4_fns is None or xxh_fns is None:
        return None, "pure Python (no library exports the LZ4 and xxh3 functions the C loops call)"
    fns = dict(lz4_fns, **xxh_fns)
    try:
        why = _self_check(pagecodec, fns)
    except KeyError as exc:
        return None, f"pure Python (the C loops want a function no library gave: {exc})"
    if why:
        return None, f"pure Python (C loops disagree with python-lz4/xxhash: {why})"
    names = lambda p: os.path.basename(p)  # noqa: E731
    return (pagecodec, fns), f"C (storage._pagecodec; LZ4 from {names(lz4_from)}, xxh3 from {names(xxh_from)})"


def check_functions(fns: dict) -> str:
    """'' when the LZ4 and xxh3 functions ``fns`` (name -> address, LZ4_NAMES +
    XXH_NAMES) code and hash exactly as python-lz4 and xxhash do in the loaded C
    loops, else why not (also "C loops not loaded")."""
    if not loaded():
        return "C loops not loaded"
    return _self_check(_lib, fns)


def use_functions(fns: dict) -> dict:
    """Make the loaded C loops call ``fns`` (name -> address, as :func:`entry_points`
    gives them; checked with :func:`check_functions` first, ValueError if they
    differ) from now on; returns the set they called before, to put back.  For
    running the loops on the system's liblz4/libxxhash instead of the Python
    packages' (both are found on load; this picks one)."""
    if not loaded():
        raise ValueError("C loops not loaded")
    why = _self_check(_lib, fns)
    if why:
        raise ValueError(f"those functions differ from python-lz4/xxhash: {why}")
    with _state_lock:
        before = dict(_FNS)
        _install(_lib, fns)
    return before


def _self_check(lib, fns: dict) -> str:
    """'' when the loaded functions hash and code exactly like python-lz4 and
    xxhash (a system libxxhash before 0.8 has XXH3 functions whose results
    differ: every stored hash would then look damaged), else why not."""
    import lz4.block
    import xxhash
    h128, enc = fns["XXH3_128bits"], encode_table(lib, fns)
    page = np.frombuffer(bytes(range(256)) * 8 + bytes(2048), np.uint8).copy()
    words, got = np.empty(1, np.int64), np.empty(16, np.uint8)
    lib.pc_scan(1, page.ctypes.data, np.zeros(1, np.int64).ctypes.data, words.ctypes.data,
                got.ctypes.data, h128)
    if got.tobytes() != xxhash.xxh3_128_digest(page):
        return "xxh3_128 differs"
    if int(lib.pc_xxh3_64(page.ctypes.data, PAGE_SIZE, fns["XXH3_64bits"])) != xxhash.xxh3_64_intdigest(page):
        return "xxh3_64 differs"
    buf = np.empty(PAGE_SIZE, np.uint8)
    codec, size, crc = np.empty(1, np.uint8), np.empty(1, np.int64), np.empty(1, np.uint64)
    used = lib.pc_encode(1, page.ctypes.data, np.zeros(1, np.int64).ctypes.data,
                         np.zeros(1, np.int64).ctypes.data, buf.ctypes.data, codec.ctypes.data,
                         size.ctypes.data, crc.ctypes.data, enc.ctypes.data)
    if used <= 0 or lz4.block.decompress(buf[:used].tobytes(), uncompressed_size=PAGE_SIZE) != page.tobytes():
        return "LZ4 round trip differs"
    return ""


# Set by _ensure() on first use; until then module __getattr__ loads them.
NATIVE: bool
KIND: str
_lib: object
_DEC: int
_DEC_DICT: int
_H128: int
_ENC_FNS: np.ndarray
_XXH64: int
_FNS: dict
_state: dict = {}
_state_lock = threading.Lock()
#: Loaded on first use (not at import: `snapctl list` needs none of it).
_LAZY = ("NATIVE", "KIND", "_lib", "_DEC", "_DEC_DICT", "_H128", "_ENC_FNS", "_XXH64", "_FNS")


def _install(lib, fns: dict) -> None:
    """The addresses the loops are handed, from the name -> address set ``fns``."""
    g = globals()
    g["_lib"], g["_FNS"] = lib, dict(fns)
    g["_DEC"], g["_DEC_DICT"] = fns["LZ4_decompress_safe"], fns["LZ4_decompress_safe_usingDict"]
    g["_H128"], g["_XXH64"] = fns["XXH3_128bits"], fns["XXH3_64bits"]
    g["_ENC_FNS"] = encode_table(lib, fns)


def _ensure() -> None:
    with _state_lock:
        if _state:
            return
        loaded, kind = _load()
        g = globals()
        g["KIND"] = kind
        g["NATIVE"] = loaded is not None
        if loaded is not None:
            _install(*loaded)
        _state["done"] = True


def __getattr__(name):
    if name in _LAZY:
        _ensure()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def loaded() -> bool:
    """Whether the C loops are loaded (loads them on the first call)."""
    if not _state:
        _ensure()
    return NATIVE


def native(part: str) -> bool:
    """Whether ``part`` ("read" or "write") runs in C: the loops are loaded
    and the switch (USE) is on."""
    return USE[part] and loaded()


def library():
    """The loaded C extension's ``lib`` (cffi), or None: for the lazy-restore
    handler (storage/lazy.py), built into the same extension."""
    return _lib if loaded() else None


def functions() -> dict[str, int]:
    """The addresses of the LZ4 and xxh3 functions the C loops call, by
    name (LZ4_NAMES + XXH_NAMES; {} when not loaded): what other C code in
    the extension is handed, and what :func:`use_functions` returns."""
    if not loaded():
        return {}
    return dict(_FNS)


def kind() -> str:
    """How the page loops were loaded (C, and from which libraries; or why pure Python)."""
    loaded()
    return KIND


#: Added to a codec passed to :func:`decode`: skip that blob's hash check.
NO_CHECK = 0x80


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def decode(src: np.ndarray, length: np.ndarray, codec: np.ndarray, dst: np.ndarray,
           dict_at: np.ndarray, want: np.ndarray) -> int:
    """Decode blob i (``length[i]`` bytes at address ``src[i]``, codec
    ``codec[i]``) to the page at address ``dst[i]`` and check it against
    ``want[i]`` (16-byte content hash; not where ``codec[i]`` has NO_CHECK
    added); a delta's dictionary is the page at
    ``dict_at[i]``, which may be ``dst[i]`` itself.  -1 when every blob
    decodes and matches, else the index of the first that does not.
    Releases the GIL."""
    src, length, dst, dict_at = (np.ascontiguousarray(a, np.int64) for a in (src, length, dst, dict_at))
    codec = np.ascontiguousarray(codec, np.uint8)
    want = np.ascontiguousarray(want, np.uint8)
    n = len(src)
    assert len(length) == len(codec) == len(dst) == len(dict_at) == n and want.size == 16 * n
    return int(_lib.pc_decode(n, _p(src), _p(length), _p(codec), _p(dst), _p(dict_at), _p(want),
                              _DEC, _DEC_DICT, _H128))


def scan(pages: np.ndarray, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the C-contiguous 4096-byte rows ``pages``: the number of
    non-zero 8-byte words of each (0: a zero page) and the content hash of
    each non-zero one (n x 16; zero rows for zero pages).  Split over
    ``threads`` threads (GIL released)."""
    pages = _rows(pages)
    n = len(pages)
    words = np.empty(n, np.int64)
    hashes = np.zeros((n, 16), np.uint8)
    idx = np.arange(n, dtype=np.int64)

    def part(lo, hi):
        _lib.pc_scan(hi - lo, _p(pages), _p(idx[lo:]), _p(words[lo:]), _p(hashes[lo:]), _H128)

    cuts = np.linspace(0, n, max(1, min(threads, n // 1024)) + 1).astype(int).tolist()
    if len(cuts) == 2:
        part(0, n)
    else:
        for f in [pool().submit(part, lo, hi) for lo, hi in zip(cuts, cuts[1:])]:
            f.result()
    return words, hashes


def encode(pages: np.ndarray, idx: np.ndarray, dict_at: np.ndarray):
    """Encode the pages ``pages[idx]`` back to back: LZ4 with the 4096 bytes at
    address ``dict_at[i]`` as dictionary where that is not 0, plain LZ4
    elsewhere, raw where LZ4 does not shrink the page.  Returns (bytes,
    codec, size, crc) with one codec, stored size and xxh3_64 of the stored
    bytes per page.  Releases the GIL."""
    pages = _rows(pages)
    idx = _index(idx, len(pages))
    dict_at = np.ascontiguousarray(dict_at, np.int64)
    n = len(idx)
    assert len(dict_at) == n
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n * PAGE_SIZE:        # one per thread, kept: no fresh
        buf = _scratch.buf = np.empty(max(n, 1024) * PAGE_SIZE, np.uint8)   # pages to fault
    codec = np.empty(n, np.uint8)
    size = np.empty(n, np.int64)
    crc = np.empty(n, np.uint64)
    used = int(_lib.pc_encode(n, _p(pages), _p(idx), _p(dict_at), _p(buf), _p(codec), _p(size),
                              _p(crc), _p(_ENC_FNS)))
    if used < 0:
        raise MemoryError("LZ4 could not allocate a compression stream")
    return buf[:used].tobytes(), codec, size, crc


def image_digest(img: np.ndarray, pack: np.ndarray, nblobs: int, hashes: np.ndarray) -> tuple[int, int]:
    """(first page whose blob id is unknown or -1, image digest) of the image ``img`` (blob id
    per page) from the catalogue arrays ``pack`` and ``hashes`` (blob 0: the zero page): the
    check and sum ``BlobIndex.view`` does in numpy, in one pass without the GIL."""
    img = np.ascontiguousarray(img, np.int64)
    assert pack.dtype == np.int64 and pack.flags.c_contiguous and hashes.flags.c_contiguous
    assert len(pack) >= nblobs and len(hashes) >= nblobs
    out = np.zeros(2, np.uint64)
    bad = int(_lib.pc_image_digest(len(img), _p(img), _p(pack), nblobs, _p(hashes), _p(out)))
    return bad, int(out[0]) | (int(out[1]) << 64)


def crcs(data, ends: np.ndarray) -> np.ndarray:
    """xxh3_64 (``formats.blob_crc``) of each blob stored back to back in
    ``data`` (bytes-like), blob i ending at ``ends[i]``: one call, no per-blob
    Python.  ValueError when the ends decrease or run past ``data``."""
    src = np.frombuffer(data, np.uint8)
    ends = np.ascontiguousarray(ends, np.int64)
    out = np.empty(len(ends), np.uint64)
    bad = int(_lib.pc_xxh3_64_many(len(ends), _p(src) if len(src) else 0, len(src), _p(ends), _p(out),
                                   _XXH64))
    if bad >= 0:
        raise ValueError(f"blob {bad} ends before it starts or past the data")
    return out


def digest_update(digest: int, pages: np.ndarray, old_hashes: np.ndarray, new_hashes: np.ndarray) -> int:
    """``codec.digest_update`` in one pass in C."""
    pages = np.ascontiguousarray(pages, np.int64)
    old = np.ascontiguousarray(old_hashes, np.uint8)
    new = np.ascontiguousarray(new_hashes, np.uint8)
    n = len(pages)
    assert old.shape == new.shape == (n, 16)
    io = np.array([digest & MASK64, (digest >> 64) & MASK64, 0, 0], np.uint64)
    _lib.pc_digest_update(n, _p(pages), _p(old), _p(new), _p(_ZERO), _p(io), _p(io[2:]))
    return int(io[2]) | (int(io[3]) << 64)


_ZERO = np.frombuffer(ZERO_HASH, np.uint8)
MASK64 = (1 << 64) - 1


def check63(data: bytes) -> int:
    """``codec.check63(data)`` (xxh3_64, 63 bits) without the GIL."""
    return int(_lib.pc_xxh3_64(_p(np.frombuffer(data, np.uint8)), len(data), _XXH64)) & MASK63


_scratch = threading.local()


def _rows(pages: np.ndarray) -> np.ndarray:
    if not (isinstance(pages, np.ndarray) and pages.dtype == np.uint8 and pages.flags.c_contiguous):
        raise ValueError("pages must be a C-contiguous uint8 array")
    return pages.reshape(-1, PAGE_SIZE)


def _index(idx, n: int) -> np.ndarray:
    idx = np.ascontiguousarray(idx, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
        raise IndexError("page index out of range")
    return idx


#: How many jobs (pack decodes, page encodes, pack inserts) may be in flight at
#: once: bounds the memory a read or a checkpoint holds beyond its output.
JOBS_IN_FLIGHT = 4

_pool = None
_pool_lock = threading.Lock()


def pool():
    """The two threads the C loops run on (shared by reads and writes)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(2, thread_name_prefix="snapctl-pages")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child inherits the executor but not its threads: jobs would
    # never run.  It makes its own on first use.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def wait_all(futures) -> BaseException | None:
    """Wait until every future has finished -- through KeyboardInterrupt
    too, re-raised once all are done, since a running job may be writing
    into memory its caller is about to free -- and return the first job's
    exception (None if all succeeded)."""
    first, interrupted = None, None
    for f in futures:
        while True:
            try:
                f.result()
            except (KeyboardInterrupt, SystemExit) as exc:
                if not f.done():             # the wait was interrupted, not the job
                    interrupted = interrupted or exc
                    continue
                first = first or exc
            except BaseException as exc:     # noqa: BLE001 -- returned to the caller
                first = first or exc
            break
    if interrupted is not None:
        raise interrupted
    return first
