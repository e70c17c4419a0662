"""snapctl's page store: everything snapctl keeps on disk.

One SQLite file per machine holds its configuration, a tree of checkpoints,
per-checkpoint state blobs and content-addressed, LZ4-compressed page
versions.  Nothing here knows about KVM.  Format: docs/store-format.md.
"""

from .codec import PAGE_SIZE, ZERO_HASH_HEX
from .errors import (CorruptionError, InvalidArgumentError, NotAStoreError,
                     SchemaVersionError, StoreBusyError, StoreError, UnknownCheckpointError)
from .maintenance import PruneReport
from .schema import SCHEMA_VERSION
from .store import CheckpointInfo, CheckpointWriter, Store
from .verify import VerifyReport

__all__ = [
    "Store", "CheckpointWriter", "CheckpointInfo", "VerifyReport", "PruneReport",
    "StoreError", "StoreBusyError", "InvalidArgumentError", "NotAStoreError", "SchemaVersionError",
    "CorruptionError", "UnknownCheckpointError",
    "PAGE_SIZE", "ZERO_HASH_HEX", "SCHEMA_VERSION",
]
