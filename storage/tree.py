"""The checkpoint tree as stored (``checkpoints.id``, ``parent``), checked."""

from __future__ import annotations

import numbers

from . import validate
from .errors import InvalidArgumentError, UnknownCheckpointError


def parents(conn) -> dict[int, int | None]:
    """id -> parent, checked: parents exist and are older, one root."""
    return validate.tree(conn.execute("SELECT id, parent FROM checkpoints"))


def check_id(ckpt, known) -> int:
    """``ckpt`` as an int, if it is a checkpoint of ``known`` (id -> parent)."""
    if isinstance(ckpt, bool) or not isinstance(ckpt, numbers.Integral):
        raise InvalidArgumentError(f"checkpoint id must be an int, not {ckpt!r}")
    ckpt = int(ckpt)
    if ckpt not in known:
        raise UnknownCheckpointError(f"no checkpoint {ckpt} in this store")
    return ckpt


def path_in(conn, ckpt: int) -> list[int]:
    """Checkpoint ids from the base to ``ckpt`` inclusive."""
    ps = parents(conn)
    return path_to(ps, check_id(ckpt, ps))


def path_to(ps: dict, ckpt: int) -> list[int]:
    """Checkpoint ids from the base to ``ckpt`` inclusive in the checked tree
    ``ps`` (child -> parent, as :func:`parents` returns)."""
    path: list[int] = []
    node: int | None = ckpt
    while node is not None:          # parents are older (validate.tree): this ends
        path.append(node)
        node = ps[node]
    path.reverse()
    return path
