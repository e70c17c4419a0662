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
from itertools import repeat

import numpy as np

from . import pageloops, validate
from .codec import (CODEC_LZ4, CODEC_LZ4_DELTA, CODEC_RAW, PAGE_SIZE, ZERO_HASH, lz4_compress,
                    lz4_decompress, xxh3_64)
from .errors import InvalidArgumentError

#: Codecs a transfer may carry (CODEC_FREED slots never travel).
TRANSFER_CODECS = (CODEC_RAW, CODEC_LZ4, CODEC_LZ4_DELTA)
#: Blobs in one transferred pack, and its bytes (the writer's packs hold at
#: most PACK_BYTES plus one chunk; an image transfer's, at most the same).
MAX_TRANSFER_PACK_BLOBS = validate.MAX_PACK_BLOBS
MAX_TRANSFER_PACK_BYTES = 64 << 20
_MAP_HEAD = struct.Struct("<III")     # entries, explicit hashes, compressed size
_PACK_HEAD = struct.Struct("<III")    # blobs, data bytes, deltas
_VALID = np.zeros(256, bool)
_VALID[list(TRANSFER_CODECS)] = True


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
    #: ``crcs`` were computed from ``data`` here (a parsed wire form), not claimed by a peer
    crcs_from_data: bool = False

    @property
    def n(self) -> int:
        return len(self.codecs)

    def to_bytes(self) -> bytes:
        """The wire form: counts, codecs, blob lengths (u16), content hashes, the
        delta blobs' base hashes (deltas only), the bytes.  No checksums: the
        receiver takes them from the bytes it got (and checks every decoded
        content against its hash, which a damaged blob cannot pass)."""
        n = self.n
        d = np.asarray(self.codecs) == CODEC_LZ4_DELTA
        lens = np.diff(np.concatenate(([0], np.asarray(self.ends, np.int64))))
        return b"".join([_PACK_HEAD.pack(n, len(self.data), int(d.sum())),
                         np.asarray(self.codecs, np.uint8).tobytes(),
                         (lens - 1).astype("<u2").tobytes(),
                         np.ascontiguousarray(self.hashes, np.uint8).tobytes(),
                         np.ascontiguousarray(np.asarray(self.bases)[d], np.uint8).tobytes(), self.data])

    @classmethod
    def from_bytes(cls, buf) -> "TransferPack":
        """Parse (and bound) the wire form of one pack; its checksums are taken
        from the bytes received (in C when storage.pageloops is loaded)."""
        mv = memoryview(buf).cast("B")
        if len(mv) < _PACK_HEAD.size:
            raise TransferError("transfer pack: too short")
        n, size, nd = _PACK_HEAD.unpack_from(mv)
        if not 0 < n <= MAX_TRANSFER_PACK_BLOBS or size > MAX_TRANSFER_PACK_BYTES or nd > n:
            raise TransferError(f"transfer pack: {n} blobs / {size} bytes out of bounds")
        pos = _PACK_HEAD.size
        if len(mv) != pos + n * (1 + 2 + 16) + 16 * nd + size:
            raise TransferError("transfer pack: its length does not match its counts")
        # What check() holds a pack to, from the wire form: every count and
        # length is bounded above; codecs, blob sizes and delta bases here.
        codecs = np.frombuffer(mv, np.uint8, n, pos).copy()
        pos += n
        if not _VALID[codecs].all():
            raise TransferError(f"transfer pack: unknown codec {codecs[~_VALID[codecs]][0]}")
        lens = np.frombuffer(mv, "<u2", n, pos).astype(np.int64)
        lens += 1                                         # 1..65536: never 0
        pos += 2 * n
        ends = np.cumsum(lens)
        if int(ends[-1]) != size:
            raise TransferError("transfer pack: blob lengths do not add up to its size")
        if lens.max() > PAGE_SIZE or ((codecs == CODEC_RAW) & (lens != PAGE_SIZE)).any():
            raise TransferError("transfer pack: a blob is larger than a page, or a raw blob is not "
                                "one page long")
        hashes = np.frombuffer(mv, np.uint8, 16 * n, pos).reshape(n, 16).copy()
        pos += 16 * n
        d = codecs == CODEC_LZ4_DELTA
        bases = np.zeros((n, 16), np.uint8)
        if nd:
            if int(np.count_nonzero(d)) != nd:
                raise TransferError("transfer pack: its delta count does not match its codecs")
            got = np.frombuffer(mv, np.uint8, 16 * nd, pos).reshape(nd, 16)
            if not got.any(axis=1).all():
                raise TransferError("transfer pack: a delta without a base, or a base without a delta")
            bases[d] = got
            pos += 16 * nd
        elif d.any():
            raise TransferError("transfer pack: its delta count does not match its codecs")
        data = bytes(mv[pos:pos + size])
        if pageloops.native("read"):
            crcs = pageloops.crcs(data, ends)
        else:
            dv = memoryview(data)
            crcs = np.fromiter(map(xxh3_64, [dv[a:b] for a, b in zip((ends - lens).tolist(), ends.tolist())]),
                               np.uint64, n)
        pack = cls(codecs, bases, hashes, ends, crcs, data, crcs_from_data=True)
        for a in (codecs, bases, hashes, ends, crcs):
            a.flags.writeable = False
        pack._parsed = (codecs, bases, hashes, ends, crcs, data)
        return pack

    def parsed_intact(self) -> bool:
        """Whether this pack is, unchanged, what :meth:`from_bytes` parsed and
        checked (its arrays read-only since): :meth:`check` need not run again."""
        got = getattr(self, "_parsed", None)
        return (got is not None and got[0] is self.codecs and got[1] is self.bases
                and got[2] is self.hashes and got[3] is self.ends and got[4] is self.crcs
                and got[5] is self.data and self.crcs_from_data)

    def check(self) -> None:
        """The structure alone: codecs, offsets, blob sizes (TransferError)."""
        n = self.n
        if not 0 < n <= MAX_TRANSFER_PACK_BLOBS or len(self.data) > MAX_TRANSFER_PACK_BYTES:
            raise TransferError(f"transfer pack: {n} blobs / {len(self.data)} bytes out of bounds")
        for name, a, shape in (("bases", self.bases, (n, 16)), ("hashes", self.hashes, (n, 16)),
                               ("ends", self.ends, (n,)), ("crcs", self.crcs, (n,))):
            if np.shape(a) != shape:
                raise TransferError(f"transfer pack: {name} has shape {np.shape(a)}, not {shape}")
        codecs = np.asarray(self.codecs)
        if codecs.dtype != np.uint8 or not _VALID[codecs].all():
            bad = codecs[~_VALID[codecs.astype(np.uint8)]] if codecs.dtype == np.uint8 else codecs
            raise TransferError(f"transfer pack: unknown codec {bad[0] if len(bad) else codecs.dtype}")
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
    #: on the exporting side only (never on the wire): the exporter's own blob ids --
    #: "map" (per map entry, 0: zero page), "new" (the blobs of ``packs``), "bases" (their
    #: delta bases) -- for a caller that tracks which of its blobs a peer holds
    #: (``Store.transfer_blobs`` adds those it lacks)
    local: dict | None = None

    @property
    def blob_count(self) -> int:
        return sum(p.n for p in self.packs)

    @property
    def stored_bytes(self) -> int:
        return sum(len(p.data) for p in self.packs)

    def map_bytes(self, lo: int = 0, hi: int | None = None) -> bytes:
        """The wire form of map entries ``lo``..``hi``: a page whose content is a
        blob of this transfer names it by its index (the common case: 4 bytes
        that compress to almost nothing), a zero page says so, any other
        content goes as its 16-byte hash.  Page numbers and indexes travel as
        differences, LZ4-compressed."""
        pages = np.asarray(self.pages[lo:hi], np.int64)
        keys = np.ascontiguousarray(self.hashes[lo:hi], np.uint8).view("V16").ravel().tolist()
        own = self._blob_index()
        refs = np.fromiter(map(own.get, keys, repeat(-2)), np.int64, len(keys))
        zero = np.flatnonzero(refs == -2)
        if len(zero):
            z = np.array([keys[k] == ZERO_HASH for k in zero.tolist()], bool)
            refs[zero[z]] = -1
        explicit = np.flatnonzero(refs == -2)
        body = np.concatenate((np.diff(pages, prepend=0), np.diff(refs + 2, prepend=0))).astype("<u4")
        comp = lz4_compress(body.tobytes(), store_size=False)
        return b"".join([_MAP_HEAD.pack(len(pages), len(explicit), len(comp)), comp,
                         np.ascontiguousarray(np.asarray(self.hashes)[lo:hi][explicit],
                                              np.uint8).tobytes()])

    def _blob_index(self) -> dict:
        own = getattr(self, "_own", None)
        if own is None:
            keys = (np.concatenate([p.hashes for p in self.packs]).view("V16").ravel().tolist()
                    if self.packs else [])
            own = {}
            for i, h in enumerate(keys):
                own.setdefault(h, i)
            self._own = own
        return own


def map_entries(buf) -> int:
    """The entry count a wire map chunk claims (its header only: a receiver bounds the
    running total before it decompresses anything)."""
    if len(buf) < _MAP_HEAD.size:
        raise TransferError("transfer map: too short")
    return _MAP_HEAD.unpack(memoryview(buf)[:_MAP_HEAD.size])[0]


def pack_blobs(buf) -> int:
    """The blob count a wire pack claims (its header only, as :func:`map_entries`)."""
    if len(buf) < _PACK_HEAD.size:
        raise TransferError("transfer pack: too short")
    return _PACK_HEAD.unpack(memoryview(buf)[:_PACK_HEAD.size])[0]


def parse_map(buf, page_count: int, packs: list) -> tuple[np.ndarray, np.ndarray]:
    """One wire chunk of a transfer's map -> (pages, hashes), bounded by
    ``page_count``; blob indexes name blobs of ``packs`` (the transfer's,
    parsed first).  TransferError when anything is off."""
    mv = memoryview(buf)
    if len(mv) < _MAP_HEAD.size:
        raise TransferError("transfer map: too short")
    n, nh, clen = _MAP_HEAD.unpack(mv[:_MAP_HEAD.size])
    if n > page_count or nh > n or len(mv) != _MAP_HEAD.size + clen + 16 * nh:
        raise TransferError("transfer map: its length does not match its counts")
    pos = _MAP_HEAD.size
    try:
        raw = lz4_decompress(mv[pos:pos + clen], uncompressed_size=8 * n) if n else b""
    except Exception:  # lz4.block.LZ4BlockError is a ValueError too
        raise TransferError("transfer map: corrupt compressed data") from None
    if len(raw) != 8 * n:
        raise TransferError("transfer map: wrong decompressed size")
    if not n:
        return np.zeros(0, np.int64), np.zeros((0, 16), np.uint8)
    # page numbers and blob indexes (+2), each as running sums (uint32: they may wrap)
    sums = np.cumsum(np.frombuffer(raw, "<u4").reshape(2, n), axis=1, dtype=np.uint32).astype(np.int64)
    pages, refs = sums[0], sums[1] - 2              # refs >= -2 by construction
    if int(pages.max()) >= page_count:
        raise TransferError(f"transfer map: page {int(pages.max())} out of range "
                            f"(the image has {page_count} pages)")
    nblobs = sum(p.n for p in packs)
    lo, hi = int(refs.min()), int(refs.max())
    if hi >= nblobs:
        raise TransferError("transfer map: an entry names no blob of the transfer")
    allh = (packs[0].hashes if len(packs) == 1 else np.concatenate([p.hashes for p in packs])) \
        if nblobs else None
    if lo >= 0:                                      # every entry names a blob of the transfer
        if nh:
            raise TransferError("transfer map: an entry names no blob of the transfer")
        return pages, np.asarray(allh)[refs]
    explicit = refs == -2
    if int(np.count_nonzero(explicit)) != nh:
        raise TransferError("transfer map: an entry names no blob of the transfer")
    hashes = np.empty((n, 16), np.uint8)
    hashes[explicit] = np.frombuffer(mv[pos + clen:], np.uint8).reshape(nh, 16)
    hashes[refs == -1] = np.frombuffer(ZERO_HASH, np.uint8)
    own = refs >= 0
    if own.any():
        hashes[own] = np.asarray(allh)[refs[own]]
    return pages, hashes


def join_maps(parts: list[tuple[np.ndarray, np.ndarray]], page_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The map chunks of one transfer joined; pages must increase strictly."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 16), np.uint8)
    if len(parts) == 1:
        pages, hashes = parts[0]
    else:
        pages = np.concatenate([p for p, _ in parts])
        hashes = np.concatenate([h for _, h in parts])
    if len(pages) > page_count or (len(pages) > 1 and not (pages[1:] > pages[:-1]).all()):
        raise TransferError("transfer map: pages not strictly increasing")
    return pages, hashes
