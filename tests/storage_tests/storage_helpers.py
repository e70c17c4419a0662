"""Helpers shared by the storage tests (a module of its own, not conftest,
so that ``import`` cannot pick up another directory's conftest)."""

from __future__ import annotations

import os
import sys

import numpy as np

PAGE = 4096
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def random_pages(rng: np.random.Generator, n: int, kind: str = "text") -> np.ndarray:
    """n pages of content: "random" (incompressible), "text" (compressible,
    like code/data pages), or "zero"."""
    if kind == "zero":
        return np.zeros((n, PAGE), np.uint8)
    if kind == "random":
        return rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
    # 8-byte tokens from a small vocabulary, a quarter of them random: LZ4
    # compresses this to roughly 0.5-0.6, like code and data pages.
    vocab = np.random.default_rng(12345).integers(0, 256, size=(256, 8), dtype=np.uint8)
    tokens = vocab[rng.integers(0, len(vocab), size=(n, PAGE // 8))]
    noise = rng.random((n, PAGE // 8)) < 0.25
    tokens[noise] = rng.integers(0, 256, size=(int(noise.sum()), 8), dtype=np.uint8)
    return tokens.reshape(n, PAGE)


def image_digest(image: np.ndarray) -> str:
    """The image digest exactly as docs/store-format.md defines it, computed
    from scratch over a whole image with Python integers (independent of the
    store's numpy code)."""
    import xxhash
    M = (1 << 64) - 1

    def fmix(x):
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & M
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & M
        return x ^ (x >> 33)

    zero = bytes(PAGE)
    total = 0
    for p in range(image.shape[0]):
        content = image[p].tobytes()
        if content == zero:
            continue
        h = xxhash.xxh3_128_digest(content)
        lo, hi = int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")
        k = (p * 0x9E3779B97F4A7C15) & M
        total += fmix(lo ^ k) | fmix(hi ^ ((k + 0x632BE59BD9B4E019) & M)) << 64
    return format(total % (1 << 128), "032x")


def blob_table(path: str) -> dict[int, tuple[int, int]]:
    """blob id -> (codec, base) read straight from the ``packs`` rows (the
    schema in docs/store-format.md), without the store's own code."""
    import sqlite3
    out = {}
    with sqlite3.connect(path) as c:
        for first, n, codecs, bases in c.execute("SELECT first, n, codecs, bases FROM packs"):
            cs = np.frombuffer(codecs, np.uint8)
            bs = np.frombuffer(bases, "<i8")
            for i in range(n):
                if cs[i] != 255:                      # CODEC_FREED: no blob
                    out[first + i] = (int(cs[i]), int(bs[i]))
    return out


def delta_on_delta(path: str) -> int:
    """Number of delta blobs whose base is itself a delta (must stay 0)."""
    t = blob_table(path)
    return sum(1 for c, b in t.values() if c == 2 and t.get(b, (None,))[0] == 2)


def seed_for(test: str, default: int) -> int:
    """The seed of a random test: ``SNAPCTL_TEST_SEED`` if set (to repeat a
    run), else ``default``; printed either way (pytest shows it on failure)."""
    env = os.environ.get("SNAPCTL_TEST_SEED", "")
    seed = int(env, 0) if env else int(default)
    print(f"{test}: seed {seed} (repeat with SNAPCTL_TEST_SEED={seed})")
    return seed
