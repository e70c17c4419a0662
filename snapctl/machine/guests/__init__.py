"""Built-in deterministic guests: metadata, parameters, machine code.

Every guest is a tiny x86-64 program (``<name>.S`` beside this file, built to
``<name>.bin`` by :mod:`.build`) that the VMM loads at :data:`CODE_GPA` and
starts at CPL 3 with rdi = its vCPU's mailbox. No interrupts, timers or RDTSC:
given the same mailbox parameters, a guest writes the same bytes in the same
order, which is what makes checkpoints comparable to a model and replayable.

A *step* is one page write (one loop iteration for ``idle``); the guest keeps
its step counter in the mailbox, stores it *after* the step's page write, and
yields (OUT to PORT_YIELD) after every K steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

# Mailbox layout (u64 fields; keep in sync with common.inc)
MB_MAGIC = 0
MB_SEED = 8
MB_K = 16
MB_DATA_BASE = 24
MB_DATA_PAGES = 32
MB_STEP = 40
MB_STOP_AT = 48
MB_PARAM1 = 56
MB_PARAM2 = 64
MB_ROUND = 72

PORT_YIELD = 0x10
PORT_STOP = 0x11

MAILBOX_MAGIC = 0x4C544350414E53  # "SNAPCTL" little-endian


@dataclass(frozen=True)
class GuestParam:
    name: str
    default: int
    help: str


@dataclass(frozen=True)
class Guest:
    name: str
    summary: str
    params: tuple[GuestParam, ...] = field(default=())

    def code(self) -> bytes:
        return resources.files(__package__).joinpath(f"{self.name}.bin").read_bytes()

    def param_values(self, given: dict[str, int], data_pages: int) -> tuple[int, int]:
        """Resolve (param1, param2) for the mailbox, validating user values."""
        unknown = set(given) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"guest {self.name!r} has no parameter {sorted(unknown)[0]!r}"
                             + (f" (it takes: {', '.join(p.name for p in self.params)})" if self.params else ""))
        vals = [int(given.get(p.name, p.default)) for p in self.params]
        if self.name == "hotset":
            hot, pct = vals
            if not 1 <= pct <= 100:
                raise ValueError(f"hotset hot_percent must be 1..100, got {pct}")
            hot = max(1, min(hot, data_pages))
            return hot, (pct * 256) // 100
        if self.name == "idle":
            (spin,) = vals
            if spin < 1:
                raise ValueError(f"idle spin must be >= 1, got {spin}")
            return spin, 0
        return 0, 0


GUESTS: dict[str, Guest] = {
    g.name: g
    for g in (
        Guest("stamp", "step n stores n (u64) at the start of page x mod P (xorshift64 x); the reference model guest"),
        Guest("sweep", "step n stores n at the start of page (n-1) mod P: sequential passes over the data area"),
        Guest("random", "stores x at a random qword of a uniformly random page: random-content writes"),
        Guest(
            "hotset",
            "like stamp, but hot_percent of the writes go to the first hot_pages pages",
            (GuestParam("hot_pages", 64, "size of the hot set in pages"),
             GuestParam("hot_percent", 90, "share of writes that hit the hot set (1-100)")),
        ),
        Guest("sparse", "stores the low 32 bits of n at a random dword of a random page: few bytes per page"),
        Guest("fill", "fills a whole random page with 512 pseudo-random u64 per step"),
        Guest("idle", "writes no data page; a step is a spin of `spin` iterations",
              (GuestParam("spin", 1000, "loop iterations per step"),)),
        Guest("dirtylog", "the kernel dirty_log_test guest: stores mailbox.round at the start of page x mod P"),
    )
}


def get_guest(name: str) -> Guest:
    try:
        return GUESTS[name]
    except KeyError:
        raise ValueError(f"unknown guest {name!r}; built-in guests: {', '.join(GUESTS)}") from None


def vcpu_seed(seed: int, vcpu: int) -> int:
    """Seed of vCPU i: seed + i (mod 2^64), skipping 0 (xorshift's fixed point)."""
    s = (seed + vcpu) % (1 << 64)
    return s or 1
