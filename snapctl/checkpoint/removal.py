"""What `prune` and `delete` may remove: the rules on top of ``Store.prune``,
which keeps the base always and takes any ``keep_last >= 0``."""

from __future__ import annotations

from .schedule import ScheduleError


def check_keep_last(keep_last: int) -> None:
    """Keep the newest ``keep_last >= 1``. The store takes 0 (drop every untagged
    checkpoint but the base); prune refuses it as the likelier slip -- removing
    one checkpoint is `delete`'s job."""
    if keep_last < 1:
        raise ScheduleError("--keep-last", f"must be >= 1, got {keep_last}")


def keep_all_but(st, ckpt: int) -> list[int]:
    """The ids to keep to delete checkpoint ``ckpt`` alone. ValueError if it is the
    base: every other checkpoint is stored against it."""
    if st.get(ckpt).parent is None:
        raise ValueError(f"checkpoint {ckpt} is the base of the tree; every other checkpoint is stored against it")
    return [c.id for c in st.checkpoints() if c.id != ckpt]
