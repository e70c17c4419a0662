"""Exceptions raised by the page store.

Every error the store raises on purpose is a ``StoreError``; callers that only
want "the store refused" catch that.  Bad arguments (wrong array shape, page
out of range, negative length) raise ``InvalidArgumentError``, which is both a
``StoreError`` and a ``ValueError`` so either spelling catches it.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidArgumentError(StoreError, ValueError):
    """An argument is out of range or of the wrong shape; the store is unchanged."""


class NotAStoreError(StoreError):
    """The file is empty, not SQLite, or SQLite without the snapctl marker."""


class SchemaVersionError(StoreError):
    """The store was written by a newer snapctl (higher schema version)."""


class StoreBusyError(StoreError):
    """Another process is writing the store (a run or restore): see storage/lock.py."""


class UnknownCheckpointError(StoreError, KeyError):
    """No checkpoint (or tag) of that id or name exists in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown checkpoint"


class CorruptionError(StoreError):
    """A stored blob or state does not match its recorded hash or checksum.

    ``checkpoint``, ``page`` and ``blob`` say where, when known.
    """

    def __init__(self, message: str, *, checkpoint: int | None = None,
                 page: int | None = None, blob: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.page = page
        self.blob = blob
