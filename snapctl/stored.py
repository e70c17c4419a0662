"""snapctl's own fields of a stored checkpoint, type-checked (the store checks
its own), and opening a store for a command: a light module, so that `snapctl list`
need not import the VMM."""

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


class NoStoreError(ValueError):
    """Nothing at the store path."""


def open_store(path: str, *, write: bool = False):
    """Open the store at ``path`` for a command: read-write, or read-only when this
    process may only read it (and ``write`` is False). A path that is not a regular
    file (a directory, a FIFO that would block the open, a device) is a ValueError
    before anything opens it; nothing at all is :class:`NoStoreError`.

    Read-write even for reading: a read-only SQLite connection cannot remove the
    -wal/-shm sidecars at close, so every `list` would leave two files behind. The
    main file is not changed by reading either way."""
    import os
    import stat

    from storage import Store, StoreError

    if not os.path.lexists(path):
        raise NoStoreError(f"no store at {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a store")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file, not a store")
    try:
        return Store.open(path, readonly=False)
    except (PermissionError, StoreError):
        if write or not os.access(path, os.R_OK) or Store.writable(path):
            raise
        return Store.open(path, readonly=True)  # a store we may only read
