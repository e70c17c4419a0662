"""Shared helpers for the reliability suite (tests/test_rel_*.py).

Counts: every loop count in the suite is ``scaled(ci)``: the CI count times
$SNAPCTL_REL_SCALE (default 1). A full run is ``SNAPCTL_REL_SCALE=10``; the
table in docs/reliability.md lists both.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from guest_models import DATA_GPA, PAGE, Model, data_split, vcpu_seed, xorshift

SCALE = float(os.environ.get("SNAPCTL_REL_SCALE", "1") or 1)


def scaled(ci: int) -> int:
    """The CI count ``ci`` times $SNAPCTL_REL_SCALE (at least ``ci``... unless scale < 1)."""
    return max(1, int(round(ci * SCALE)))


# -- processes ------------------------------------------------------------------------------------
# (the CLI itself is run by tests/cli_helpers.py: snapctl(), spawn(), snapctl_many())

def sigkill(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# -- files ----------------------------------------------------------------------------------------

def tree_state(root: Path) -> dict:
    """name -> (mode, size, sha256 or link target) of everything under ``root``: to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = (st.st_mode, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (st.st_mode,)
    return out


def remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(str(path) + suffix)
        except FileNotFoundError:
            pass


# -- images ----------------------------------------------------------------------------------------

def open_ro(path):
    from storage import Store

    return Store.open(str(path), readonly=True)


def image(store, ckpt: int) -> np.ndarray:
    out = np.empty((store.page_count, PAGE), np.uint8)
    store.materialize(ckpt, out)
    return out


def data_area(img: np.ndarray, mem: int, vcpus: int, i: int) -> np.ndarray:
    """vCPU i's data pages of a (pages, 4096) or flat image, as (P, 4096)."""
    first, pages = data_split(mem, vcpus)[i]
    flat = img.reshape(-1)
    start = DATA_GPA + first * PAGE
    return flat[start:start + pages * PAGE].reshape(pages, PAGE)


class StampTimeline:
    """The stamp model (docs/guests.md) advanced incrementally: ``last(step)`` is,
    per data page, the last n <= step whose xorshift x_n mod P chose it. Steps
    must be asked for in non-decreasing order (one pass, any number of checkpoints)."""

    def __init__(self, seed: int, pages: int):
        self.x, self.n, self.P = seed, 0, pages
        self.last = np.zeros(pages, np.uint64)

    def at(self, step: int) -> np.ndarray:
        assert step >= self.n, (step, self.n)
        x, P, last = self.x, self.P, self.last
        for i in range(self.n + 1, step + 1):
            x = xorshift(x)
            last[x % P] = i
        self.x, self.n = x, step
        return last.copy()


def stamp_matches(data: np.ndarray, last: np.ndarray) -> bool:
    """A (P, 4096) data area equals the stamp model ``last`` (first u64 per page, rest zero)."""
    if data[:, 8:].any():
        return False
    return np.array_equal(np.ascontiguousarray(data[:, :8]).view("<u8").reshape(-1), last)


def model_data(guest: str, seed: int, i: int, mem: int, vcpus: int) -> Model:
    _, pages = data_split(mem, vcpus)[i]
    return Model(guest, vcpu_seed(seed, i), pages)


def wait_for(pred, timeout: float, interval: float = 0.0005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# the one seed rule of the suite (SNAPCTL_TEST_SEED repeats a run): storage_tests' helper
from storage_tests.storage_helpers import seed_for  # noqa: E402,F401
