"""Fixtures for the storage tests: small stores."""

from __future__ import annotations

import pytest

from storage_helpers import PAGE  # also puts the repo root on sys.path
from storage import Store


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
