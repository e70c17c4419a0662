"""Fixtures for the storage tests: small stores and an in-memory model."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# Make the in-repo ``storage`` package importable without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from storage import Store  # noqa: E402

PAGE = 4096


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "machine.snap")


@pytest.fixture
def make_store(store_path):
    """Factory for a fresh store of ``pages`` pages (synchronous=OFF keeps
    the tests fast; durability has its own test)."""
    opened = []

    def make(pages: int = 32, **config):
        cfg = {"mem_size": pages * PAGE, "vcpus": 1, "name": "test-guest",
               "ram": [{"gpa": 0, "size": pages * PAGE, "slot": 0}]}
        cfg.update(config)
        st = Store.create(store_path, cfg, synchronous="OFF")
        opened.append(st)
        return st

    yield make
    for st in opened:
        st.close()


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
