"""The store's per-page loops in C, when the optional extension is built.

``storage._pagecodec`` (storage/native/pagecodec.c, compiled by setup.py
with cffi) decodes, hashes and compresses whole batches of pages in one call
with the GIL released, so the per-page cost is LZ4's and xxh3's own and two
threads use both cores.  It links no library: it calls LZ4 and xxh3 through
pointers to the functions inside python-lz4's and xxhash's extension
modules, the code that encodes and checks everything else in the store.

``NATIVE`` is False when the extension or those functions are missing, or
when ``SNAPCTL_PURE_PYTHON=1``; the callers then use their Python loops,
which the tests also run and hold to the same results.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .codec import PAGE_SIZE


def _load():
    if os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0"):
        return None, "pure Python (SNAPCTL_PURE_PYTHON set)"
    try:
        from . import _pagecodec
    except ImportError as exc:
        return None, f"pure Python (C extension not built: {exc})"
    try:
        import lz4.block
        import xxhash._xxhash
        lz4lib = ctypes.CDLL(lz4.block._block.__file__)
        xxlib = ctypes.CDLL(xxhash._xxhash.__file__)
        addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
        fns = (addr(lz4lib.LZ4_decompress_safe), addr(lz4lib.LZ4_decompress_safe_usingDict),
               addr(lz4lib.LZ4_compress_default), addr(xxlib.XXH3_128bits))
    except (OSError, AttributeError, ImportError) as exc:
        return None, f"pure Python (LZ4/xxh3 entry points not found: {exc})"
    return (_pagecodec.lib, fns), "C (storage._pagecodec)"


_NATIVE, KIND = _load()
NATIVE = _NATIVE is not None
if NATIVE:
    _lib, (_DEC, _DEC_DICT, _COMP, _H128) = _NATIVE


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def decode(src: np.ndarray, length: np.ndarray, codec: np.ndarray, dst: np.ndarray,
           dict_at: np.ndarray, want: np.ndarray) -> int:
    """Decode blob i (``length[i]`` bytes at address ``src[i]``, codec
    ``codec[i]``) to the page at address ``dst[i]`` and check it against
    ``want[i]`` (16-byte content hash); a delta's dictionary is the page at
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


def hash_pages(pages: np.ndarray) -> np.ndarray:
    """Content hashes (n x 16 uint8) of the C-contiguous n x 4096 pages."""
    pages = np.ascontiguousarray(pages, np.uint8).reshape(-1, PAGE_SIZE)
    out = np.empty((len(pages), 16), np.uint8)
    _lib.pc_hash(len(pages), _p(pages), _p(out), _H128)
    return out


def compress(pages: np.ndarray, idx: np.ndarray, limit: int = PAGE_SIZE) -> tuple[bytes, np.ndarray]:
    """LZ4 of the pages ``pages[idx]`` back to back, and each one's size (0
    where it would not be smaller than ``limit`` bytes: not kept).
    Releases the GIL."""
    pages = np.ascontiguousarray(pages, np.uint8).reshape(-1, PAGE_SIZE)
    idx = np.ascontiguousarray(idx, np.int64)
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(pages))
    size = np.empty(len(idx), np.int64)
    out = np.empty(max(1, len(idx) * limit), np.uint8)
    used = int(_lib.pc_compress(len(idx), _p(pages), _p(idx), _p(out), out.size, _p(size),
                                limit, _COMP))
    assert used >= 0, used
    return out[:used].tobytes(), size
