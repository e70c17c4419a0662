"""When to take checkpoints, checked before anything runs.

A bad schedule is a :class:`ScheduleError` naming the command-line option it
came from, so the CLI reports it as a usage error (exit 2) without checking
anything itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: The longest interval between checkpoints: one day.
MAX_INTERVAL_MS = 86_400_000


class ScheduleError(ValueError):
    """A schedule that cannot be run; ``option`` is the command-line option at fault."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def check_common(count: int | None, interval_ms: float | None, stop_after: int | None,
                 *, per: str, every: int | None) -> None:
    """The checks every schedule shares: ``per`` names the option that counts guest
    progress (``--every-steps``, ``--every-syscalls``) and ``every`` is its value."""
    if every is not None and interval_ms is not None:
        raise ScheduleError(per, f"give either {per} or --interval, not both")
    if count is not None and count < 0:
        raise ScheduleError("--checkpoints", f"must be >= 0, got {count}")
    if interval_ms is not None and not (isinstance(interval_ms, (int, float)) and math.isfinite(interval_ms)
                                        and 0 < interval_ms <= MAX_INTERVAL_MS):
        raise ScheduleError("--interval", f"must be a number of ms from > 0 to {MAX_INTERVAL_MS} (one day), "
                                          f"got {interval_ms}")
    if every is not None and every < 1:
        raise ScheduleError(per, f"must be positive, got {every}")
    if stop_after is not None and stop_after < 1:
        raise ScheduleError("--steps", f"must be positive, got {stop_after}")


@dataclass
class Schedule:
    """When to take checkpoints: ``count`` of them, every ``every_steps`` guest steps
    (sync, at the guest's yields) or every ``interval_ms`` (async kicks).
    ``stop_after`` (restore --steps): run exactly that many more steps, then one sync checkpoint."""

    count: int = 10
    every_steps: int | None = None
    interval_ms: float | None = None
    stop_after: int | None = None

    def validate(self) -> None:
        check_common(self.count, self.interval_ms, self.stop_after, per="--every-steps", every=self.every_steps)

    @property
    def trigger(self) -> str:
        return "async" if self.interval_ms is not None else "sync"

    @property
    def checkpoints_expected(self) -> int:
        """Checkpoints this schedule takes (``--steps``: one)."""
        return 1 if self.stop_after else self.count

    def as_dict(self) -> dict:
        return asdict(self)
