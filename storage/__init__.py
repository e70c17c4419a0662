"""snapctl's page store: everything snapctl keeps on disk.

One SQLite file per machine holds its configuration, a tree of checkpoints,
per-checkpoint state blobs and content-addressed, LZ4-compressed page
versions.  Nothing here knows about KVM.  Format: docs/store-format.md.
"""

from .codec import PAGE_SIZE, ZERO_HASH_HEX
from .errors import (CorruptionError, InvalidArgumentError, NotAStoreError,
                     SchemaVersionError, StoreBusyError, StoreError, UnknownCheckpointError)
from .schema import SCHEMA_VERSION
from .store import CheckpointInfo, Store

#: Imported on first use (``import storage`` stays light for `snapctl list`).
_LATER = {"CheckpointWriter": "writer", "VerifyReport": "verify", "PruneReport": "maintenance"}


def __getattr__(name):
    if name in _LATER:
        import importlib
        value = getattr(importlib.import_module(f".{_LATER[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Store", "CheckpointWriter", "CheckpointInfo", "VerifyReport", "PruneReport",
    "StoreError", "StoreBusyError", "InvalidArgumentError", "NotAStoreError", "SchemaVersionError",
    "CorruptionError", "UnknownCheckpointError",
    "PAGE_SIZE", "ZERO_HASH_HEX", "SCHEMA_VERSION",
]
