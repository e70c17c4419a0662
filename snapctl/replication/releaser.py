"""The output releaser: a small process of its own that writes a program's held output and
tells the standby so, as one step that a crash of the primary cannot split.

Why a process: output commit needs "these bytes are on the primary's stdout" and "the
standby knows it" to happen together. Done by the primary itself they are two system
calls (``write`` to stdout, ``send`` to the standby), and a ``kill -9`` between them left
the standby unsure whether the bytes went out: it wrote them a second time. The releaser
holds the output (the *gate*), owns the primary's stdout/stderr for the program and its
own small connection to the standby (the *release channel*, bound to the session by a key
the standby handed out). The primary only forwards the program's bytes and, per
acknowledged checkpoint, "release up to N". When the primary dies, the releaser reads what
the primary had already told it up to the end of the pipe, carries it out (write, then
``released`` N), discards the rest (never acknowledged: the standby writes it), closes its
channel and exits; the standby waits for that channel to close before it decides which
output is still to be written. So a primary killed at any moment yields its output + the
standby's = the run's output exactly. (Power loss of the whole primary host kills the
releaser too: then the last release can still be repeated; see docs/replication.md.)

The pipe from the primary carries commands (``CMD`` header, then a payload):
``DATA`` fd bytes, ``RELEASE`` id upto-stdout upto-stderr, ``SESSION`` (connect the release
channel: JSON host, port, key, token), ``OPEN`` (no standby any more: write everything and
pass later bytes straight through), ``CLOSE`` (write everything, exit). End of file
without ``CLOSE``: the primary is gone (or stopped with ``--replicate-required``): discard
what is held. The releaser answers each ``SESSION`` with one byte on its back pipe
(``1`` connected, ``0`` not).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

CMD = struct.Struct("!BBqQQ")   # op, fd, checkpoint id, a, b
DATA, RELEASE, SESSION, OPEN, CLOSE = range(1, 6)
CONNECT_TIMEOUT = 5.0


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a reader that went away ends it quietly)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[n:]


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class OutputGate:
    """Holds a program's stdout/stderr bytes in write order until released up to a
    per-stream byte count (the cumulative size of the acknowledged checkpoints' streams)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[int, bytes]] = []
        self.written = {1: 0, 2: 0}     # bytes the program wrote so far (held or released)
        self.released = {1: 0, 2: 0}
        self.passthrough = False

    def write(self, fd: int, data: bytes) -> None:
        with self._lock:
            self.written[fd] += len(data)
            if self.passthrough and not self._held:
                write_all(fd, data)
                self.released[fd] += len(data)
            else:
                self._held.append((fd, data))

    def release(self, upto: dict[int, int] | None) -> None:
        """Write held bytes while each stream stays within ``upto`` (None: everything);
        consecutive bytes of one stream go out in one write()."""
        with self._lock:
            run_fd, run = None, []
            while self._held:
                fd, data = self._held[0]
                room = len(data) if upto is None else upto[fd] - self.released[fd]
                if room <= 0:
                    break
                part = data[:room]
                if fd != run_fd and run:
                    write_all(run_fd, b"".join(run))
                    run = []
                run_fd = fd
                run.append(part)
                self.released[fd] += len(part)
                if len(part) == len(data):
                    self._held.pop(0)
                else:
                    self._held[0] = (fd, data[len(part):])
                    break
            if run:
                write_all(run_fd, b"".join(run))

    def open(self) -> None:
        """No more replication: release everything, pass future bytes straight through."""
        self.release(None)
        self.passthrough = True


class Releaser:
    """The primary's handle on the releaser process (same interface as OutputGate's
    write/release/open, plus session/close/abort)."""

    def __init__(self) -> None:
        r, self._w = os.pipe()
        self._back, bw = os.pipe()
        os.set_inheritable(r, True)
        os.set_inheritable(bw, True)
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "snapctl.replication.releaser", str(r), str(bw)],
                                     pass_fds=(r, bw), stdin=subprocess.DEVNULL, env=env)
        os.close(r)
        os.close(bw)
        self._lock = threading.Lock()
        self.written = {1: 0, 2: 0}
        self.closed = False

    def _cmd(self, op: int, fd: int = 0, ckpt: int = 0, a: int = 0, b: int = 0, payload: bytes = b"") -> None:
        with self._lock:
            if self.closed:
                return
            try:
                _write_fully(self._w, CMD.pack(op, fd, ckpt, a, b) + payload)
            except BrokenPipeError:
                self.closed = True
                print("snapctl: the output releaser is gone: the program's output from here is not written "
                      "(the checkpoints still hold it)", file=sys.stderr, flush=True)

    def write(self, fd: int, data: bytes) -> None:
        self.written[fd] += len(data)
        self._cmd(DATA, fd, 0, len(data), 0, data)

    def release(self, upto: dict[int, int] | None, ckpt: int | None = None) -> None:
        if upto is None:
            self._cmd(OPEN)
        else:
            self._cmd(RELEASE, 0, ckpt if ckpt is not None else -1, upto[1], upto[2])

    def open(self) -> None:
        self._cmd(OPEN)

    def session(self, host: str, port: int, token: bytes | None, key: str) -> bool:
        """Connect the release channel to the standby's session ``key``; True once it is."""
        body = json.dumps({"host": host, "port": port, "key": key,
                           "token": token.hex() if token is not None else None}).encode()
        self._cmd(SESSION, 0, 0, len(body), 0, body)
        try:
            return os.read(self._back, 1) == b"1"
        except OSError:
            return False

    def close(self) -> None:
        """Write everything held, wait for the releaser to finish."""
        self._cmd(CLOSE)
        self._end()

    def abort(self) -> None:
        """Stop without releasing what is held (--replicate-required lost its standby)."""
        self._end()

    def _end(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self._w)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            os.close(self._back)
        except OSError:
            pass


# -- the releaser process ---------------------------------------------------------------------

def _read(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _connect(spec: dict):
    from . import protocol as P
    sock = socket.create_connection((spec["host"], spec["port"]), timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tok = bytes.fromhex(spec["token"]) if spec.get("token") else None
    chan = P.Channel(sock, tok, b"P")
    _, payload = chan.recv((P.HELLO,))
    nonce = bytes.fromhex(str(P.decode_json(payload, "hello").get("nonce", "")))
    if len(nonce) != P.NONCE_SIZE:
        raise P.ProtocolError("hello: bad nonce")
    chan.nonce = nonce
    chan.send(P.START, P.encode_json({"release_for": spec["key"]}))
    _, payload = chan.recv((P.SESSION,))   # the standby attached it to the session
    sock.settimeout(CONNECT_TIMEOUT)
    return chan


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the primary decides; EOF ends us
    rfd, back = int(argv[0]), int(argv[1])
    from . import protocol as P   # now, while the primary boots its machine: not at the first connect
    gate = OutputGate()
    chan = None

    def drop() -> None:
        nonlocal chan
        if chan is not None:
            chan.close()
            chan = None

    while True:
        head = _read(rfd, CMD.size)
        if head is None:
            break   # the primary is gone: what is still held was never acknowledged
        op, fd, ckpt, a, b = CMD.unpack(head)
        if op == DATA:
            data = _read(rfd, a)
            if data is None:
                break
            gate.write(fd, data)
        elif op == RELEASE:
            gate.release({1: a, 2: b})
            if chan is not None:
                try:
                    chan.send(P.RELEASED, P.encode_json({"id": ckpt}))
                except OSError:
                    drop()
        elif op == SESSION:
            body = _read(rfd, a)
            if body is None:
                break
            drop()
            try:
                chan = _connect(json.loads(body))
                gate.passthrough = False
                os.write(back, b"1")
            except (OSError, ValueError, P.ProtocolError) as e:
                print(f"snapctl: output releaser: {e}", file=sys.stderr, flush=True)
                chan = None
                os.write(back, b"0")
        elif op == OPEN:
            gate.open()
            drop()
        elif op == CLOSE:
            gate.release(None)
            break
    drop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
