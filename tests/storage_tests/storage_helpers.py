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
    """The image digest exactly as docs/store-format.md defines it,
    computed from scratch over a whole image (independent of the store)."""
    import xxhash
    zero = bytes(PAGE)
    total = 0
    for p in range(image.shape[0]):
        content = image[p].tobytes()
        if content == zero:
            continue
        h = xxhash.xxh3_128_digest(content)
        total += int.from_bytes(xxhash.xxh3_128_digest(p.to_bytes(8, "little") + h), "little")
    return format(total % (1 << 128), "032x")
