"""The replication channel: authenticated, length-bounded frames over one TCP connection.

A frame is a 20-byte header, the payload, and (with a token) a 32-byte MAC::

    magic "SNRP" | version u8 | type u8 | flags u16 | seq u64 | length u32   (network order)

- ``length`` is checked against the receiver's current limit *before* the
  payload is read (frames are read through a fixed :data:`RECV_BUFFER`, so at
  most that much of what follows a header is read ahead, into that buffer):
  a peer cannot make the receiver allocate more than the limit (64 KiB until the handshake is done, then :data:`STATE_LIMIT`); the
  checkpoint inside (MAP and PACK frames, storage.transfer's wire form) is
  bounded again by the guest's size before it is imported.
- ``seq`` starts at 0 in each direction and must go up by exactly one: a
  replayed, dropped or reordered frame ends the session.
- With a token, the MAC is HMAC-SHA256(token, direction || session nonce ||
  header || payload). The session nonce is 16 random bytes the standby picks
  and sends first, so a frame recorded in one session is worthless in
  another, and a frame of one direction cannot be reflected back.
  Comparison is constant-time (``hmac.compare_digest``).

Anything wrong (bad magic, version, type, length, seq or MAC, a short read)
raises :class:`ProtocolError` and the connection is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading

import lz4.block

from ..kvm.constants import PAGE_SIZE

MAGIC = b"SNRP"
#: 2: checkpoints travel as the primary's encoded packs (MAP + PACK frames), not as pages
VERSION = 2
HEADER = struct.Struct("!4sBBHQI")
MAC_SIZE = 32
NONCE_SIZE = 16
PAGE = PAGE_SIZE

#: frame types
HELLO, START, CKPT, MAP, END, ACK, HEARTBEAT, RELEASED, FINISH, REFUSED, SESSION, PACK = range(1, 13)
NAMES = {HELLO: "hello", START: "start", CKPT: "checkpoint", MAP: "map", END: "end", ACK: "ack",
         HEARTBEAT: "heartbeat", RELEASED: "released", FINISH: "finish", REFUSED: "refused",
         SESSION: "session", PACK: "pack"}

#: before the handshake completes, no frame may be larger than this
HANDSHAKE_LIMIT = 64 << 10
#: bytes each side reads ahead of the frame it parses: headers, MACs and small frames
#: arrive together in one recv (a larger payload is read straight into its own buffer)
RECV_BUFFER = 64 << 10
#: page map entries per MAP frame (storage.transfer's wire form: LZ4 of the page and blob-index
#: differences, and a 16-byte content hash for an entry naming no blob of the transfer)
MAP_CHUNK = 1 << 16
#: a checkpoint's JSON header + states (vCPU state, program state, output, files) per frame,
#: and the largest PACK frame (the writer's packs hold ~1 MiB; storage.transfer bounds each)
STATE_LIMIT = 64 << 20


class ProtocolError(Exception):
    """The peer sent something this side will not accept; the connection is dropped."""


class AuthError(ProtocolError):
    """A frame's MAC did not verify (wrong or missing token)."""


class PeerClosed(ProtocolError):
    """The connection ended (EOF or reset)."""


def load_token(path: str | None) -> bytes | None:
    """The shared secret from ``--token-file`` (surrounding whitespace stripped; at least 16 bytes)."""
    if path is None:
        return None
    with open(path, "rb") as f:
        tok = f.read(4096).strip()
    if len(tok) < 16:
        raise ValueError(f"--token-file {path}: the token must be at least 16 bytes")
    return tok


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"expected HOST:PORT, got {text!r}") from None
    if not 0 <= p < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host.strip("[]"), p


class Channel:
    """One side of a connection. ``side`` is b"P" (primary) or b"S" (standby): the MAC of a
    frame binds the direction it travels in."""

    def __init__(self, sock: socket.socket, token: bytes | None, side: bytes):
        self.sock = sock
        self.token = token
        self.side = side
        self.peer = b"S" if side == b"P" else b"P"
        self.nonce = b""
        self.limit = HANDSHAKE_LIMIT
        self._send_seq = 0
        self._recv_seq = 0
        #: held by send(); reentrant, so a caller can do something *and* send before any other
        #: frame goes out (the output gate: write the output, then say so, with nothing between)
        self.lock = threading.RLock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.between_frames = True
        #: received bytes not yet taken: _rbuf[_rlo:_rhi] (see recv)
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rlo = self._rhi = 0
        self._frame_start = True

    def _mac(self, direction: bytes, header: bytes, payload) -> bytes:
        h = hmac.new(self.token, direction + self.nonce + header, hashlib.sha256)
        h.update(payload)
        return h.digest()

    def send(self, ftype: int, payload: bytes | memoryview = b"") -> None:
        with self.lock:
            header = HEADER.pack(MAGIC, VERSION, ftype, 0, self._send_seq, len(payload))
            parts = [header, payload]
            if self.token is not None:
                parts.append(self._mac(self.side, header, payload))
            self.sock.sendall(b"".join(parts) if len(payload) < 65536 else header)
            if len(payload) >= 65536:
                self.sock.sendall(payload)
                if self.token is not None:
                    self.sock.sendall(parts[2])
            self._send_seq += 1
            self.bytes_sent += len(header) + len(payload) + (MAC_SIZE if self.token is not None else 0)

    def send_all(self, frames) -> None:
        """Frames [(type, payload)] (any iterable, consumed lazily) in order, ~1 MiB per
        ``sendall``: one checkpoint of a few hundred pages is one system call (one release
        of the GIL, not five). The lock is taken per batch, so heartbeats still go out
        between the batches of a large full image."""
        batch: list = []
        size = 0
        for frame in frames:
            batch.append(frame)
            size += len(frame[1])
            if size >= 1 << 20:
                self._send_batch(batch)
                batch, size = [], 0
        if batch:
            self._send_batch(batch)

    def _send_batch(self, batch) -> None:
        with self.lock:
            parts: list = []
            for ftype, payload in batch:
                header = HEADER.pack(MAGIC, VERSION, ftype, 0, self._send_seq, len(payload))
                parts += [header, payload]
                if self.token is not None:
                    parts.append(self._mac(self.side, header, payload))
                self._send_seq += 1
                self.bytes_sent += len(header) + len(payload) + (MAC_SIZE if self.token is not None else 0)
            self.sock.sendall(b"".join(parts))

    def _fill(self, n: int) -> None:
        """Until at least ``n`` (<= RECV_BUFFER) unread bytes are in the receive buffer:
        each ``recv_into`` takes whatever has arrived, up to the buffer's free space
        (the next frames' headers and small payloads with this one's)."""
        buf, lo, hi = self._rbuf, self._rlo, self._rhi
        if hi - lo >= n:
            return
        if lo == hi:
            lo = hi = 0
        elif len(buf) - lo < n:                  # too little room left behind them: to the front
            buf[:hi - lo] = buf[lo:hi]
            lo, hi = 0, hi - lo
        self._rlo = lo
        view = self._rview
        try:
            while hi - lo < n:
                try:
                    k = self.sock.recv_into(view[hi:])
                except ConnectionError as e:
                    raise PeerClosed(f"connection lost ({e.__class__.__name__})") from None
                if k == 0:
                    raise PeerClosed("connection closed" if self._frame_start and hi == lo
                                     else "connection closed mid-frame")
                hi += k
        finally:
            self._rhi = hi

    def _take(self, n: int) -> bytearray:
        """The next ``n`` bytes of the stream (a payload whose length was checked)."""
        if n <= len(self._rbuf):
            self._fill(n)
            lo = self._rlo
            self._rlo = lo + n
            return bytearray(self._rview[lo:lo + n])
        # larger than the buffer: what is buffered, then the rest straight into the payload
        out = bytearray(n)
        view = memoryview(out)
        got = self._rhi - self._rlo
        view[:got] = self._rview[self._rlo:self._rhi]
        self._rlo = self._rhi = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except ConnectionError as e:
                raise PeerClosed(f"connection lost ({e.__class__.__name__})") from None
            if k == 0:
                raise PeerClosed("connection closed mid-frame")
            got += k
        return out

    def pending(self) -> bool:
        """Whether bytes of the next frame were already read from the socket (a wait for
        the socket to become readable must not block then)."""
        return self._rhi > self._rlo

    def recv(self, expect: tuple[int, ...] | None = None) -> tuple[int, bytearray]:
        """The next frame (type, payload). Raises ProtocolError on anything unexpected;
        ``socket.timeout`` if nothing arrives within the socket's timeout (then
        ``between_frames`` says whether no byte of a frame had arrived: only then may
        ``recv`` be called again; a frame cut in the middle leaves the channel unusable).

        Reads are buffered (RECV_BUFFER): one ``recv_into`` usually brings a frame's
        header with its MAC and the small frames after it.  A payload is only read --
        and its buffer only allocated -- once its header passed every check, the length
        against ``limit`` among them."""
        self._frame_start = True
        try:
            self._fill(HEADER.size)
        finally:
            self.between_frames = self._rhi == self._rlo
        self._frame_start = False
        lo = self._rlo
        header = bytes(self._rview[lo:lo + HEADER.size])
        self._rlo = lo + HEADER.size
        magic, ver, ftype, flags, seq, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError("not a snapctl replication peer (bad magic)")
        if ver != VERSION:
            raise ProtocolError(f"replication protocol version {ver}, this side speaks {VERSION}")
        if ftype not in NAMES or flags:
            raise ProtocolError(f"unknown frame type {ftype}")
        if length > self.limit:
            raise ProtocolError(f"{NAMES[ftype]} frame of {length} bytes exceeds the limit of {self.limit}")
        if seq != self._recv_seq:
            raise ProtocolError(f"frame sequence {seq}, expected {self._recv_seq} (replayed or lost frame)")
        payload = self._take(length)
        self.bytes_received += HEADER.size + length
        if self.token is not None:
            self._fill(MAC_SIZE)
            lo = self._rlo
            mac = bytes(self._rview[lo:lo + MAC_SIZE])
            self._rlo = lo + MAC_SIZE
            self.bytes_received += MAC_SIZE
            if not hmac.compare_digest(mac, self._mac(self.peer, header, payload)):
                raise AuthError("frame authentication failed (wrong or missing --token-file)")
        self._recv_seq += 1
        if expect is not None and ftype not in expect:
            raise ProtocolError(f"unexpected {NAMES[ftype]} frame (expected {'/'.join(NAMES[e] for e in expect)})")
        return ftype, payload

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# -- payloads -----------------------------------------------------------------------------------

def encode_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(payload, what: str) -> dict:
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{what}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: not an object")
    return obj


STATE_HEAD = struct.Struct("!I")


def encode_checkpoint(meta: dict, states: dict[str, bytes]) -> bytes:
    """CKPT payload: u32 uncompressed size + LZ4 of [u32 length + JSON (meta and the state
    names and sizes) + the state blobs] (vCPU state repeats itself: CPUID, MSR lists)."""
    names = sorted(states)
    head = encode_json({"meta": meta, "states": [[n, len(states[n])] for n in names]})
    raw = b"".join([STATE_HEAD.pack(len(head)), head] + [bytes(states[n]) for n in names])
    return STATE_HEAD.pack(len(raw)) + lz4.block.compress(raw, store_size=False)


def decode_checkpoint(payload) -> tuple[dict, dict[str, bytes]]:
    mv = memoryview(payload)
    if len(mv) < STATE_HEAD.size:
        raise ProtocolError("checkpoint frame too short")
    (size,) = STATE_HEAD.unpack(mv[:STATE_HEAD.size])
    if size > STATE_LIMIT:   # checked before anything is allocated
        raise ProtocolError(f"checkpoint frame: {size} bytes of state exceed the limit of {STATE_LIMIT}")
    try:
        raw = lz4.block.decompress(mv[STATE_HEAD.size:], uncompressed_size=size)
    except lz4.block.LZ4BlockError:
        raise ProtocolError("checkpoint frame: corrupt compressed data") from None
    if len(raw) != size:
        raise ProtocolError("checkpoint frame: wrong decompressed size")
    return _decode_states(raw)


def _decode_states(payload) -> tuple[dict, dict[str, bytes]]:
    mv = memoryview(payload)
    if len(mv) < STATE_HEAD.size:
        raise ProtocolError("checkpoint frame too short")
    (n,) = STATE_HEAD.unpack(mv[:STATE_HEAD.size])
    if n > len(mv) - STATE_HEAD.size:
        raise ProtocolError("checkpoint frame: header runs past the frame")
    head = decode_json(mv[STATE_HEAD.size:STATE_HEAD.size + n], "checkpoint frame")
    meta, listing = head.get("meta"), head.get("states")
    if not isinstance(meta, dict) or not isinstance(listing, list):
        raise ProtocolError("checkpoint frame: malformed header")
    pos = STATE_HEAD.size + n
    states: dict[str, bytes] = {}
    for item in listing:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or item[1] < 0 or not item[0] or len(item[0]) > 512):
            raise ProtocolError("checkpoint frame: malformed state entry")
        name, size = item
        if pos + size > len(mv) or name in states:
            raise ProtocolError("checkpoint frame: states run past the frame")
        states[name] = bytes(mv[pos:pos + size])
        pos += size
    if pos != len(mv):
        raise ProtocolError("checkpoint frame: trailing bytes")
    return meta, states


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)
