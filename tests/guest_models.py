"""Independent models of the built-in guests, written from docs/guests.md.

Each model replays the guest's documented behaviour in plain Python and
returns what the data area of one vCPU holds after ``n`` steps, plus the
page written at each step. Nothing here imports the guest code or the VMM's
mailbox layout: a bug in either shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np

MASK = (1 << 64) - 1
PAGE = 4096
DATA_GPA = 2 << 20


def xorshift(x: int) -> int:
    x ^= (x << 13) & MASK
    x ^= x >> 7
    x ^= (x << 17) & MASK
    return x


def vcpu_seed(seed: int, i: int) -> int:
    return ((seed + i) & MASK) or 1


def data_split(mem_size: int, vcpus: int) -> list[tuple[int, int]]:
    """[(first data page index relative to 2 MiB, pages)] per vCPU: equal parts."""
    per = (mem_size - DATA_GPA) // PAGE // vcpus
    return [(i * per, per) for i in range(vcpus)]


class Model:
    """Data area of one vCPU as a (P, 4096) array, advanced step by step."""

    def __init__(self, guest: str, seed: int, pages: int, **params):
        self.guest, self.x, self.P, self.n = guest, seed, pages, 0
        self.mem = np.zeros((pages, PAGE), np.uint8)
        self.params = params
        self.round = 0  # dirtylog only: what the VMM put in mailbox.round
        self.written: list[int] = []  # page index written at each step (step n -> written[n-1])

    def _u64(self, page: int, off: int, value: int) -> None:
        self.mem[page, off:off + 8] = np.frombuffer((value & MASK).to_bytes(8, "little"), np.uint8)

    def step(self) -> int:
        self.n += 1
        n, g = self.n, self.guest
        if g == "sweep":
            p = (n - 1) % self.P
            self._u64(p, 0, n)
        elif g == "idle":
            p = -1
        else:
            self.x = xorshift(self.x)
            x = self.x
            if g == "stamp":
                p = x % self.P
                self._u64(p, 0, n)
            elif g == "dirtylog":
                p = x % self.P
                self._u64(p, 0, self.round)
            elif g == "random":
                p = x % self.P
                self._u64(p, ((x >> 32) & 511) * 8, x)
            elif g == "sparse":
                p = x % self.P
                off = ((x >> 32) & 1023) * 4
                self.mem[p, off:off + 4] = np.frombuffer((n & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
            elif g == "hotset":
                hot = max(1, min(self.params.get("hot_pages", 64), self.P))
                pct = self.params.get("hot_percent", 90)
                p = x % (hot if (x >> 56) < pct * 256 // 100 else self.P)
                self._u64(p, 0, n)
            elif g == "fill":
                p = x % self.P
                vals = []
                for _ in range(512):
                    self.x = xorshift(self.x)
                    vals.append(self.x)
                self.mem[p] = np.array(vals, dtype="<u8").view(np.uint8)
            else:
                raise ValueError(g)
        self.written.append(p)
        return p

    def run_to(self, n: int) -> None:
        while self.n < n:
            self.step()

    def pages_written(self, after: int, upto: int) -> set[int]:
        """Pages written by steps after+1 .. upto (relative page indices)."""
        return {p for p in self.written[after:upto] if p >= 0}


def stamp_image(seed: int, pages: int, n: int) -> np.ndarray:
    """The stamp spec stated directly: after step N, page p's first u64 is the last
    n <= N with x_n mod P == p (0 if none). A second, simpler model of stamp."""
    last = np.zeros(pages, np.uint64)
    x = seed
    for i in range(1, n + 1):
        x = xorshift(x)
        last[x % pages] = i
    img = np.zeros((pages, PAGE), np.uint8)
    img[:, :8] = last.view(np.uint8).reshape(pages, 8)
    return img
