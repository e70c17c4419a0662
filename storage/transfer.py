"""A checkpoint as what it added to a store, addressed by content hash: the
unit one store exports and another imports (replication ships these).

Blob ids are local to a store, so a :class:`Transfer` names contents by
their xxh3_128 content hash (the hash every blob row already stores):

* the page map: for each page the checkpoint changed (or every non-zero page
  of a ``full`` image), the content hash of its new content -- ``ZERO_HASH``
  for a zero page;
* the packs it wrote, as encoded: per blob its codec, the content hash of
  its delta base (an LZ4-delta's dictionary; zeros for a plain blob), its
  content hash, its checksum (``formats.blob_crc`` of the stored bytes) and
  the stored bytes themselves.

The exporting writer builds it at commit from what it holds in memory
(``Store.checkpoint(..., transfer=True)``, then ``writer.transfer``);
``Store.image_transfer`` builds a ``full`` one of any stored checkpoint
(its blobs and their delta bases, read from the packs).  The importing
writer (``CheckpointWriter.add_transfer``) treats it as untrusted: the wire
form is parsed here with every length bounded, and the import checks every
blob's checksum and decoded content hash before anything is committed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from . import validate
from .codec import CODEC_LZ4, CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE
from .errors import InvalidArgumentError

#: Codecs a transfer may carry (CODEC_FREED slots never travel).
TRANSFER_CODECS = (CODEC_RAW, CODEC_LZ4, CODEC_LZ4_DELTA)
#: Blobs in one transferred pack, and its bytes (the writer's packs hold at
#: most PACK_BYTES plus one chunk; an image transfer's, at most the same).
MAX_TRANSFER_PACK_BLOBS = validate.MAX_PACK_BLOBS
MAX_TRANSFER_PACK_BYTES = 64 << 20
_MAP_HEAD = struct.Struct("<I")
_PACK_HEAD = struct.Struct("<II")
_NO_HASH = bytes(16)


class TransferError(InvalidArgumentError):
    """A transfer that is malformed, lies about its contents, or does not fit
    this store; nothing was written."""


class MissingContentError(TransferError):
    """The transfer names a content (a page's, or a delta's base) that the
    importing store does not hold: it needs a full image first."""


@dataclass
class TransferPack:
    """One pack of a transfer: ``n`` blobs stored back to back in ``data``."""
    codecs: np.ndarray      # (n,) uint8
    bases: np.ndarray       # (n, 16) uint8: the delta base's content hash (zeros: none)
    hashes: np.ndarray      # (n, 16) uint8: content hash of each decoded blob
    ends: np.ndarray        # (n,) int64: end offset of each blob in data
    crcs: np.ndarray        # (n,) uint64: blob_crc of each blob's bytes
    data: bytes

    @property
    def n(self) -> int:
        return len(self.codecs)

    def to_bytes(self) -> bytes:
        n = self.n
        return b"".join([_PACK_HEAD.pack(n, len(self.data)),
                         np.asarray(self.codecs, np.uint8).tobytes(),
                         np.ascontiguousarray(self.bases, np.uint8).tobytes(),
                         np.ascontiguousarray(self.hashes, np.uint8).tobytes(),
                         np.asarray(self.ends).astype("<u4").tobytes(),
                         np.asarray(self.crcs).astype("<u8").tobytes(), self.data])

    @classmethod
    def from_bytes(cls, buf) -> "TransferPack":
        """Parse (and bound) the wire form of one pack."""
        mv = memoryview(buf)
        if len(mv) < _PACK_HEAD.size:
            raise TransferError("transfer pack: too short")
        n, size = _PACK_HEAD.unpack(mv[:_PACK_HEAD.size])
        if not 0 < n <= MAX_TRANSFER_PACK_BLOBS or size > MAX_TRANSFER_PACK_BYTES:
            raise TransferError(f"transfer pack: {n} blobs / {size} bytes out of bounds")
        pos = _PACK_HEAD.size
        if len(mv) != pos + n * (1 + 16 + 16 + 4 + 8) + size:
            raise TransferError("transfer pack: its length does not match its counts")

        def take(k):
            nonlocal pos
            part = mv[pos:pos + k]
            pos += k
            return part
        codecs = np.frombuffer(take(n), np.uint8).copy()
        bases = np.frombuffer(take(16 * n), np.uint8).reshape(n, 16).copy()
        hashes = np.frombuffer(take(16 * n), np.uint8).reshape(n, 16).copy()
        ends = np.frombuffer(take(4 * n), "<u4").astype(np.int64)
        crcs = np.frombuffer(take(8 * n), "<u8").astype(np.uint64)
        pack = cls(codecs, bases, hashes, ends, crcs, bytes(take(size)))
        pack.check()
        return pack

    def check(self) -> None:
        """The structure alone: codecs, offsets, blob sizes (TransferError)."""
        n = self.n
        if not 0 < n <= MAX_TRANSFER_PACK_BLOBS or len(self.data) > MAX_TRANSFER_PACK_BYTES:
            raise TransferError(f"transfer pack: {n} blobs / {len(self.data)} bytes out of bounds")
        for name, a, shape in (("bases", self.bases, (n, 16)), ("hashes", self.hashes, (n, 16)),
                               ("ends", self.ends, (n,)), ("crcs", self.crcs, (n,))):
            if np.shape(a) != shape:
                raise TransferError(f"transfer pack: {name} has shape {np.shape(a)}, not {shape}")
        if not np.isin(self.codecs, TRANSFER_CODECS).all():
            bad = int(self.codecs[~np.isin(self.codecs, TRANSFER_CODECS)][0])
            raise TransferError(f"transfer pack: unknown codec {bad}")
        ends = np.asarray(self.ends, np.int64)
        lens = np.diff(np.concatenate(([0], ends)))
        if (lens <= 0).any() or (lens > PAGE_SIZE).any() or int(ends[-1]) != len(self.data):
            raise TransferError("transfer pack: blob offsets are not increasing up to its size, "
                                "or a blob is larger than a page")
        if ((self.codecs == CODEC_RAW) & (lens != PAGE_SIZE)).any():
            raise TransferError("transfer pack: a raw blob is not one page long")
        has_base = self.bases.any(axis=1)
        if (has_base != (self.codecs == CODEC_LZ4_DELTA)).any():
            raise TransferError("transfer pack: a delta without a base, or a base without a delta")

    @property
    def starts(self) -> np.ndarray:
        e = np.asarray(self.ends, np.int64)
        return np.concatenate(([0], e[:-1]))


@dataclass
class Transfer:
    """What one checkpoint added (see the module docstring)."""
    pages: np.ndarray                  # (m,) int64, increasing
    hashes: np.ndarray                 # (m, 16) uint8; ZERO_HASH: a zero page
    packs: list = field(default_factory=list)    # TransferPack, in blob order
    digest: str | None = None          # the image digest (hex) after import
    parent_digest: str | None = None   # ... and of the image it applies to
    #: the map is the whole image (pages not in it are zero), not a change to the parent's
    full: bool = False

    @property
    def blob_count(self) -> int:
        return sum(p.n for p in self.packs)

    @property
    def stored_bytes(self) -> int:
        return sum(len(p.data) for p in self.packs)

    def map_bytes(self, lo: int = 0, hi: int | None = None) -> bytes:
        """The wire form of map entries ``lo``..``hi``."""
        pages, hashes = self.pages[lo:hi], self.hashes[lo:hi]
        return b"".join([_MAP_HEAD.pack(len(pages)), np.asarray(pages).astype("<u8").tobytes(),
                         np.ascontiguousarray(hashes, np.uint8).tobytes()])


def parse_map(buf, page_count: int) -> tuple[np.ndarray, np.ndarray]:
    """One wire chunk of a transfer's map -> (pages, hashes), bounded by
    ``page_count`` (TransferError)."""
    mv = memoryview(buf)
    if len(mv) < _MAP_HEAD.size:
        raise TransferError("transfer map: too short")
    (n,) = _MAP_HEAD.unpack(mv[:_MAP_HEAD.size])
    if n > page_count or len(mv) != _MAP_HEAD.size + 24 * n:
        raise TransferError("transfer map: its length does not match its count")
    pos = _MAP_HEAD.size
    pages = np.frombuffer(mv[pos:pos + 8 * n], "<u8")
    if n and (int(pages.max()) >= page_count):
        raise TransferError(f"transfer map: page {int(pages.max())} out of range "
                            f"(the image has {page_count} pages)")
    hashes = np.frombuffer(mv[pos + 8 * n:], np.uint8).reshape(n, 16).copy()
    return pages.astype(np.int64), hashes


def join_maps(parts: list[tuple[np.ndarray, np.ndarray]], page_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The map chunks of one transfer joined; pages must increase strictly."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 16), np.uint8)
    pages = np.concatenate([p for p, _ in parts])
    hashes = np.concatenate([h for _, h in parts])
    if len(pages) > page_count or (len(pages) > 1 and not (np.diff(pages) > 0).all()):
        raise TransferError("transfer map: pages not strictly increasing")
    return pages, hashes
