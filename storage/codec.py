"""Codec numbers, content hashes, check values and the image digest.

Costs per 4 KiB page that shaped the store (the project's storage notes): xxh3_128 is
0.18 µs, LZ4 block compression 7 µs, decompression ~1.3 µs, and one
python-lz4 call has ~1 µs of fixed cost.  So: the per-page loops run in C a
batch at a time (storage/pageloops.py; per-page Python calls only where the
C loops are not built), numpy for everything that sees the whole batch.
Encoding lives in the writer (writer.py), decoding in packs.py, the row
formats in formats.py.
"""

from __future__ import annotations

import lz4.block
import xxhash

from .deferred import numpy as np

PAGE_SIZE = 4096

#: Stored verbatim (4096 bytes); used when LZ4 would not shrink the page
#: (random content), because decoding it is a plain copy.
CODEC_RAW = 0
#: LZ4 block format, no size prefix (the size is always 4096).
CODEC_LZ4 = 1
#: LZ4 block compressed with ``dict=`` the decoded content of the blob's
#: base, which is always a RAW or LZ4 blob (delta depth <= 1).
CODEC_LZ4_DELTA = 2

CODEC_NAMES = {CODEC_RAW: "raw", CODEC_LZ4: "lz4", CODEC_LZ4_DELTA: "lz4-delta"}

ZERO_PAGE = bytes(PAGE_SIZE)
content_hash = xxhash.xxh3_128_digest
#: The content hash of the all-zero page.  Zero pages are never stored as
#: blobs (blob 0 in a map); this is the hash ``history()`` reports for them.
ZERO_HASH: bytes = content_hash(ZERO_PAGE)
ZERO_HASH_HEX: str = ZERO_HASH.hex()

#: Image digests are sums modulo 2**128.
DIGEST_MASK = (1 << 128) - 1
MASK63 = (1 << 63) - 1
#: xxh3_64 of a bytes-like object, as an int.
xxh3_64 = xxhash.xxh3_64_intdigest


def check63(*parts) -> int:
    """xxh3_64 of the concatenated byte strings, 63 bits (an SQLite INTEGER):
    the check value of a pack's metadata, its data, and a page map."""
    if len(parts) > 1 and sum(map(len, parts)) > (1 << 20):   # no copy of a big page map
        h = xxhash.xxh3_64()
        for p in parts:
            h.update(p)
        return h.intdigest() & MASK63
    return xxh3_64(b"".join(parts)) & MASK63


#: LZ4 block (de)compression as the store uses it (``store_size=False``,
#: ``uncompressed_size=PAGE_SIZE``, ``dict=`` for deltas).
lz4_compress = lz4.block.compress
lz4_decompress = lz4.block.decompress


# --- image digest -----------------------------------------------------------
#
# For a non-zero page p whose content hash is H (16 bytes, little-endian
# halves lo, hi) the digest term is the 128-bit integer  b << 64 | a  with
#     k = p * 0x9E3779B97F4A7C15            (mod 2**64)
#     a = fmix64(lo ^ k)
#     b = fmix64(hi ^ (k + 0x632BE59BD9B4E019 mod 2**64))
# (fmix64: MurmurHash3's 64-bit finalizer), and the image digest is the sum
# of the terms modulo 2**128.  A sum (not a chain) is order-free, so a
# checkpoint's digest is its parent's minus the old terms plus the new terms
# of the pages it rewrote -- no scan of the image; and every step is uint64
# arithmetic, so numpy computes the terms of a whole image at once (restore
# checks 262 144 pages in a few milliseconds).  Zero pages contribute 0, so
# a page never written and a page written back to zero are the same image.

_K: dict = {}


def _k() -> dict:
    """The uint64 constants below, made on first use (numpy is imported then)."""
    if not _K:
        u = np.uint64
        zlo, zhi = (u(x) for x in np.frombuffer(ZERO_HASH, "<u8"))
        _K.update(G=u(0x9E3779B97F4A7C15), C=u(0x632BE59BD9B4E019), F1=u(0xFF51AFD7ED558CCD),
                  F2=u(0xC4CEB9FE1A85EC53), S33=u(33), ZLO=zlo, ZHI=zhi)
    return _K


def _fmix64(x: np.ndarray) -> np.ndarray:
    k = _k()
    s33 = k["S33"]
    x = x ^ (x >> s33)
    x = x * k["F1"]
    x = x ^ (x >> s33)
    x = x * k["F2"]
    return x ^ (x >> s33)


def hash_halves(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 16)`` uint8 content hashes -> little-endian (lo, hi) uint64."""
    h = np.ascontiguousarray(hashes).view("<u8").reshape(-1, 2).astype(np.uint64)
    return h[:, 0], h[:, 1]


def terms(pages: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Digest terms of ``(page, content hash)`` pairs as an ``(n, 2)`` uint64
    array (low, high halves); pairs with the zero-page hash give 0."""
    n = len(pages)
    out = np.zeros((n, 2), np.uint64)
    if not n:
        return out
    hashes = np.ascontiguousarray(hashes, np.uint8).reshape(n, 16)
    lo, hi = hash_halves(hashes)
    c = _k()
    k = np.asarray(pages).astype(np.uint64) * c["G"]
    out[:, 0] = _fmix64(lo ^ k)
    out[:, 1] = _fmix64(hi ^ (k + c["C"]))
    out[(lo == c["ZLO"]) & (hi == c["ZHI"])] = 0
    return out


def sum128(terms: np.ndarray) -> int:
    """Sum of ``(n, 2)`` uint64 128-bit terms modulo 2**128, vectorised by
    summing 32-bit lanes (no uint64 overflow below 2**32 terms)."""
    if len(terms) == 0:
        return 0
    lo, hi = terms[:, 0], terms[:, 1]
    m = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    total = (int((lo & m).sum(dtype=np.uint64))
             + (int((lo >> s32).sum(dtype=np.uint64)) << 32)
             + (int((hi & m).sum(dtype=np.uint64)) << 64)
             + (int((hi >> s32).sum(dtype=np.uint64)) << 96))
    return total & DIGEST_MASK


def digest_hex(value: int) -> str:
    return format(value & DIGEST_MASK, "032x")


def digest_to_bytes(value: int) -> bytes:
    return (value & DIGEST_MASK).to_bytes(16, "little")


def digest_from_bytes(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def digest_update(digest: int, pages: np.ndarray, old_hashes: np.ndarray, new_hashes: np.ndarray) -> int:
    """The digest of an image whose ``pages`` changed from contents
    ``old_hashes`` to ``new_hashes``, given its digest ``digest`` before."""
    return (digest - sum128(terms(pages, old_hashes)) + sum128(terms(pages, new_hashes))) & DIGEST_MASK
