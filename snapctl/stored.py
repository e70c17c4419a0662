"""snapctl's own fields of a stored checkpoint, type-checked (the store checks
its own): a light module, so that `snapctl list` need not import the VMM."""

from __future__ import annotations


def checked_info(info):
    """A stored checkpoint's snapctl fields, type-checked (the store checked its
    own): ``step``, ``meta.steps`` and the numeric stats the CLI shows. A forged
    value is a ValueError naming it."""
    where = f"checkpoint {info.id}: stored"
    if type(info.step) is not int:
        raise ValueError(f"{where} step is not an integer ({info.step!r:.40})")
    steps = info.meta.get("steps", [info.step])
    if not isinstance(steps, list) or not 1 <= len(steps) <= 64 or not all(
            type(x) is int and 0 <= x < 1 << 64 for x in steps):
        raise ValueError(f"{where} meta.steps is not a list of 1 to 64 step counts ({steps!r:.40})")
    for k, v in info.stats.items():
        if k in _NUMERIC_STATS and (type(v) not in (int, float) or v != v or abs(v) == float("inf")):
            raise ValueError(f"{where} stats.{k} is not a number ({v!r:.40})")
    return info


#: Statistics the CLI formats as numbers (the store's own and the pipeline's).
_NUMERIC_STATS = {"pages", "zero_pages", "unchanged_pages", "dedup_pages", "new_blobs", "delta_blobs",
                  "raw_blobs", "stored_bytes", "raw_bytes", "packs", "write_ms", "dirty_pages", "downtime_ms"}
