"""The primary's side: send every committed checkpoint to the standby, hold a program's
output until the checkpoint covering it is acknowledged (Remus' output commit).

Hooked after each commit (``Checkpointer(replica=...)`` calls ``after_commit``): it
runs on the checkpoint writer thread while the guest runs on; a sender thread frames
and sends, acknowledgements arrive on a reader thread, heartbeats go out on their own
thread. The sender and the reader wait out the checkpointer's captures (its
``PauseWindow``) before each step, so replication adds next to nothing to the pause --
not even a contended GIL. A lost standby costs one warning line: held output is
released and the run goes on without replication (``required``: it stops
instead, exit status 4, output not covered by an acknowledged checkpoint is
never released).
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import sys
import threading
import time


import numpy as np

from storage import Store
from storage.transfer import Transfer

from ..checkpoint.captures import PauseWindow

from . import protocol as P
from .releaser import OutputGate, Releaser, write_all  # noqa: F401  (write_all: the standby's)

#: a program's output states (a re-sync after a refused checkpoint joins them up)
STREAMS = ("stream/stdout", "stream/stderr")
#: unacknowledged checkpoints in flight before the writer waits
WINDOW = 8
EXIT_REPLICATION_LOST = 4
CONNECT_TIMEOUT = 2.0
ACK_TIMEOUT = 10.0
RECONNECT_EVERY = 1.0
SOCKET_TIMEOUT = 2.0


def _warn(msg: str) -> None:
    print(f"snapctl: {msg}", file=sys.stderr, flush=True)


class Replicator:
    """Replicates one run (or restore) to a standby at ``addr``.

    ``start`` describes the run (config, schedule, kind) for the standby's failover;
    ``store_path`` is read for full re-syncs (a restored checkpoint, a standby that
    came back). Thread-safe against the writer, reader and heartbeat threads."""

    def __init__(self, addr: str, *, token: bytes | None, required: bool, store_path: str, start: dict):
        self.host, self.port = P.parse_addr(addr)
        self.addr = addr
        self.token = token
        self.required = required
        self.store_path = store_path
        self.start_info = start
        self.gate: Releaser | None = None
        self.chan: P.Channel | None = None
        self._cond = threading.Condition()
        self._inflight: dict[int, dict] = {}   # primary id -> output boundary {1: n, 2: n}
        self.acked: int | None = None
        self.sent = 0
        self.wire_bytes = 0
        self.lost_reason: str | None = None
        self._last_attempt = 0.0
        self._stream_totals = {1: 0, 2: 0}
        self._need_full = True
        self._last_full = -1      # the last checkpoint sent as a full image
        self._index = 0            # scheduled checkpoints taken in this run (base/restore point: 0)
        self._gen = 0              # connection generation
        self.hb_interval = 0.1
        self._closing = False
        self._ro: Store | None = None
        self._last_sent: int | None = None
        self._attempts = 0
        #: the last checkpoint the standby acknowledged in this connection (None: none yet)
        self._standby_has: int | None = None
        #: the standby refused an increment (it lacks a content it names): the next full
        #: image also carries the output of the checkpoints it never stored
        self._resync_after: int | None = None
        self._refused = False
        #: by this store's blob id: held by the standby (sent in this connection since its
        #: full image): a checkpoint naming a blob it lacks ships that blob too
        self._held = np.zeros(0, bool)
        #: increments waiting for the sender thread (sending, off the writer thread)
        self._jobs: queue.Queue = queue.Queue()
        self._sender: threading.Thread | None = None
        #: the checkpointer's pauses, waited out by every thread of this replicator
        self._window: PauseWindow | None = None

    def follow(self, window: PauseWindow) -> None:
        """Wait out the pauses of the checkpointer this replicates (``window`` is closed
        while it captures): the sender and the acknowledgement reader hold off until
        the capture is over, so they take neither the GIL nor a CPU from it. The
        heartbeat does not: a pause longer than the standby's failover timeout (a
        capture of gigabytes of dirty pages) would otherwise look like a lost primary."""
        self._window = window

    def _aside(self) -> None:
        if self._window is not None:
            self._window.wait()

    def _aside_each(self, frames):
        """``frames``, each one built and handed on only while the guest is not paused."""
        it = iter(frames)
        while True:
            self._aside()
            frame = next(it, None)
            if frame is None:
                return
            yield frame

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> bool:
        """Connect and handshake; False (with a one-line warning) if the standby is not there."""
        self._last_attempt = time.monotonic()
        self._attempts += 1
        if "config" not in self.start_info:
            self.start_info["config"] = self._store().config
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan = P.Channel(sock, self.token, b"P")
            _, payload = chan.recv((P.HELLO,))
            hello = P.decode_json(payload, "hello")
            nonce = bytes.fromhex(str(hello.get("nonce", "")))
            if len(nonce) != P.NONCE_SIZE:
                raise P.ProtocolError("hello: bad nonce")
            chan.nonce = nonce
            self.hb_interval = max(0.01, min(1.0, float(hello.get("heartbeat_ms", 100)) / 1e3))
            chan.send(P.START, P.encode_json({**self.start_info, "release_channel": self.gate is not None}))
            if self.gate is not None:
                # the standby hands out a key for the releaser's own connection and waits for it
                _, payload = chan.recv((P.SESSION,))
                key = str(P.decode_json(payload, "session").get("key", ""))
                if not self.gate.session(self.host, self.port, self.token, key):
                    raise P.ProtocolError("the output releaser could not attach to the session")
            sock.settimeout(SOCKET_TIMEOUT)   # a send stuck this long (link cut): the standby is lost
        except (OSError, P.ProtocolError, ValueError) as e:
            self._lose(f"standby {self.addr} not reachable ({e})", connected=False)
            return False
        with self._cond:
            self.chan = chan
            self._gen += 1
            gen = self._gen
            self._need_full = True
            self._inflight.clear()
            self._standby_has = None
            self._refused = False
            self._held = np.zeros(0, bool)
            self.lost_reason = None
        threading.Thread(target=self._reader, args=(chan, gen), name="replication-acks", daemon=True).start()
        threading.Thread(target=self._heartbeat, args=(chan, gen), name="replication-heartbeat",
                         daemon=True).start()
        return True

    def _lose(self, reason: str, *, connected: bool = True, gen: int | None = None) -> None:
        with self._cond:
            if gen is not None and gen != self._gen:
                return
            if self._closing and connected and not self._inflight:
                return   # the end of a finished run: the standby closed after our FINISH
            was = self.chan
            self.chan = None
            self._gen += 1
            first = self.lost_reason is None
            self.lost_reason = reason
            self._inflight.clear()
            self._cond.notify_all()
        if was is not None:
            was.close()
        if self.required:
            _warn(f"replication lost: {reason}; stopping (--replicate-required)")
            if self.gate is not None:
                self.gate.abort()   # what it was told to release is out; the rest never will be
            os._exit(EXIT_REPLICATION_LOST)
        if first:
            _warn(f"replication lost: {reason}; continuing without a standby")
        if self.gate is not None:
            self.gate.open()

    def _reader(self, chan: P.Channel, gen: int) -> None:
        waited = 0.0
        watch = None
        try:
            # an ack arriving in a pause does not wake this thread (which would take the GIL
            # from the pause to find the window closed): it is read once the guest runs
            watch = self._window.readable(chan.sock.fileno()) if self._window is not None else None
            while True:
                idle = watch is not None and not chan.pending() and not watch.wait(SOCKET_TIMEOUT)
                try:
                    if not idle:
                        _, payload = chan.recv((P.ACK,))
                except socket.timeout:
                    if not chan.between_frames:
                        raise P.ProtocolError("timed out in the middle of a frame") from None
                    idle = True
                if idle:      # nothing for SOCKET_TIMEOUT
                    with self._cond:
                        if gen != self._gen:    # this connection was dropped meanwhile
                            return
                        busy = bool(self._inflight)
                    waited = waited + SOCKET_TIMEOUT if busy else 0.0
                    if waited >= ACK_TIMEOUT:
                        raise P.ProtocolError(f"no acknowledgement for {ACK_TIMEOUT:.0f} s") from None
                    continue
                waited = 0.0
                self._aside()
                ack = P.decode_json(payload, "ack")
                ckpt = int(ack.get("id", -1))
                with self._cond:
                    if gen != self._gen:
                        return
                    bound = self._inflight.pop(ckpt, None)
                    if bound is None:
                        raise P.ProtocolError(f"ack for checkpoint {ckpt}, which is not in flight")
                    for k in [k for k in self._inflight if k < ckpt]:   # acks are in order
                        self._inflight.pop(k)
                    if ack.get("need_full") and ckpt < self._last_full:
                        # a refusal of an increment sent before the full image that already
                        # answers it (in flight when the first refusal arrived): setting up
                        # another re-sync would re-send output that image's ack released
                        continue
                    if ack.get("need_full"):
                        # not stored (the standby lacks a content it names): nothing it covers
                        # is released; the next checkpoint goes as a full image
                        if not self._refused:
                            _warn(f"replication: standby {self.addr} refused checkpoint {ckpt} "
                                  f"({str(ack.get('reason', ''))[:200]}); sending a full image next")
                        self._refused = True
                        self._need_full = True
                        if self._resync_after is None:
                            self._resync_after = self._standby_has if self._standby_has is not None else -1
                        self._cond.notify_all()
                        continue
                    self.acked = ckpt
                    self._standby_has = ckpt
                    self._cond.notify_all()
                if self.gate is not None and bound:
                    # the releaser writes the output and tells the standby (its own channel):
                    # one step that this process dying cannot split
                    self.gate.release(bound, ckpt)
        except (OSError, P.ProtocolError, ValueError) as e:
            self._lose(f"standby {self.addr}: {e}", gen=gen)
        finally:
            if watch is not None:
                self._window.forget(watch)

    def _heartbeat(self, chan: P.Channel, gen: int) -> None:
        while True:
            time.sleep(self.hb_interval)     # not held by a pause: a long one must not
            if gen != self._gen:                # look like a lost primary to the standby
                return
            try:
                chan.send(P.HEARTBEAT)
            except OSError as e:
                self._lose(f"standby {self.addr}: {e}", gen=gen)
                return

    # -- hooks ----------------------------------------------------------------------------------
    def awaiting_full(self) -> bool:
        """Whether the next checkpoint goes to the standby as a full image (a new or
        returning standby, or one that refused a checkpoint)."""
        with self._cond:
            return self._need_full

    def bind_output(self, output) -> None:
        """Route a program's live output through the releaser process (released on acks)."""
        self.gate = Releaser()   # holds from the start; opened if the standby is lost
        output.sink = self.gate.write

    def after_commit(self, ckpt: int, cap, stats: dict) -> None:
        """Send checkpoint ``ckpt`` (just committed by the writer thread) to the standby."""
        for fd, name in ((1, "stream/stdout"), (2, "stream/stderr")):
            self._stream_totals[fd] += len(cap.states.get(name, b""))
        index = self._index
        if cap.trigger != "base":
            self._index += 1
            index = self._index
        if self.chan is None:
            first = self._attempts == 0
            if not first and (self._closing or self.required
                              or time.monotonic() - self._last_attempt < RECONNECT_EVERY):
                return
            if not self.connect():
                return
            if not first:
                _warn(f"replication: standby {self.addr} connected again; re-syncing from checkpoint {ckpt}")
        with self._cond:
            chan, gen, full = self.chan, self._gen, self._need_full
            if chan is None:
                return
            deadline = time.monotonic() + ACK_TIMEOUT
            while len(self._inflight) >= WINDOW and gen == self._gen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if gen != self._gen:
                return
            if len(self._inflight) >= WINDOW:
                stuck = True
            else:
                stuck = False
                # the bytes this checkpoint covers: everything up to its streams' end
                self._inflight[ckpt] = dict(self._stream_totals) if self.gate is not None else {}
        if stuck:
            self._lose(f"standby {self.addr} acknowledged nothing for {ACK_TIMEOUT:.0f} s", gen=gen)
            return
        with self._cond:
            gap_after, self._resync_after = (self._resync_after, None) if full else (None, None)
            if full:
                self._last_full = ckpt   # refusals of checkpoints before it are answered by it
        meta = {"id": ckpt, "parent": None if full else self._last_sent, "trigger": cap.trigger,
                "steps": [int(x) for x in cap.steps], "step": int(cap.steps[0]), "index": index,
                "digest": stats.get("digest"), "full": full,
                # a re-sync's own output went out while there was no standby to cover it
                # (not after a refused checkpoint: that output is still held)
                "released_before": full and cap.trigger != "base" and gap_after is None}
        self._last_sent = ckpt
        if full:
            # a full image (the base's pages are live guest memory; a re-sync reads the
            # store): sent from here, once what is queued has gone
            self._jobs.join()
            try:
                n = self._send_full(chan, ckpt, cap, meta, gap_after)
            except Exception as e:   # noqa: BLE001 - the link, or a store it cannot read: replication
                self._lose(f"standby {self.addr}: {e}", gen=gen)   # is lost (one line), the run goes on
                return
            with self._cond:
                if gen == self._gen:
                    self._need_full = False
                    self._refused = False
            self.sent += 1
            self.wire_bytes += n
            return
        # An increment: what the writer stored, as it encoded it (the capture's transfer: held
        # in memory, nothing to copy or encode); the sender thread sends it while this thread
        # commits the next checkpoint.
        job = (chan, gen, meta, cap.named_states(), cap.transfer)
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="replication-sender", daemon=True)
            self._sender.start()
        self._jobs.put(job)

    def _send_loop(self) -> None:
        while True:
            chan, gen, meta, states, transfer = self._jobs.get()
            try:
                if gen != self._gen:
                    continue
                try:
                    n = self._send_transfer(chan, meta, states, transfer)
                except Exception as e:   # noqa: BLE001 - as in after_commit: never a dead sender
                    self._lose(f"standby {self.addr}: {e}", gen=gen)   # thread the next full image waits for
                    continue
                self.sent += 1
                self.wire_bytes += n
            finally:
                self._jobs.task_done()

    def _store(self) -> Store:
        if self._ro is None:
            self._ro = Store.open(self.store_path, readonly=True)
        return self._ro

    def _send_full(self, chan: P.Channel, ckpt: int, cap, meta: dict, gap_after: int | None) -> int:
        """The whole image of ``ckpt``: the base's own transfer (every page it stored), else
        the store's image transfer (its blobs and their delta bases, as stored). After a
        refused increment (``gap_after``: the last checkpoint the standby holds, -1: none),
        its output states carry the output of every checkpoint since, which the standby
        never stored (a failover replays it from there)."""
        if cap.trigger == "base" and cap.transfer is not None:
            return self._send_transfer(chan, meta, cap.named_states(), cap.transfer)
        st = self._store()
        st_states = {n: st.state(ckpt, n) for n in st.state_names(ckpt)}
        path = st.path(ckpt)
        for c in path[:-1]:   # files a failover may need, first opened earlier
            for n in st.state_names(c):
                if n.startswith("inherited/") and n not in st_states:
                    st_states[n] = st.state(c, n)
        if gap_after is not None:
            since = path[path.index(gap_after) + 1:] if gap_after in path else path
            for name in STREAMS:
                parts = [st.state(c, name) for c in since if name in st.state_names(c)]
                if parts:
                    st_states[name] = b"".join(parts)
        return self._send_transfer(chan, meta, st_states, st.image_transfer(ckpt))

    def _complete(self, t):
        """``t`` plus the stored blobs it names (its pages' contents and its deltas' bases)
        that the standby does not hold -- none for a standby that has had every checkpoint
        since the run's base; after a re-sync, a page going back to a content of a
        checkpoint the standby never received (a restore replaying its old run). And note
        what the standby will hold."""
        loc = t.local
        if loc is None:
            return t
        if t.full:
            self._held = np.zeros(0, bool)
        named = np.concatenate((loc["map"][loc["map"] > 0], loc["bases"]))
        held = self._held
        top = int(max(named.max(initial=0), loc["new"].max(initial=0))) + 1
        if top > len(held):
            grown = np.zeros(max(top, 2 * len(held)), bool)
            grown[:len(held)] = held
            self._held = held = grown
        held[loc["new"]] = True
        lack = np.unique(named[~held[named]])
        if not len(lack):
            return t
        extra = self._store().transfer_blobs(lack)
        held[lack] = True
        return Transfer(t.pages, t.hashes, extra + list(t.packs), t.digest, t.parent_digest, t.full)

    def _send_transfer(self, chan: P.Channel, meta: dict, states: dict, t) -> int:
        """One checkpoint: CKPT (meta, states, the transfer's counts and digests), one PACK
        frame per pack as the primary's writer encoded it, its page map in MAP frames (whose
        entries name those packs' blobs), END."""
        self._aside()
        t = self._complete(t)
        before = chan.bytes_sent
        meta = dict(meta, map=len(t.pages), packs=len(t.packs), parent_digest=t.parent_digest,
                    digest=meta.get("digest") or t.digest)
        chan.send_all(self._aside_each(itertools.chain(
            [(P.CKPT, P.encode_checkpoint(meta, states))],
            ((P.PACK, pack.to_bytes()) for pack in t.packs),
            ((P.MAP, t.map_bytes(lo, lo + P.MAP_CHUNK)) for lo in range(0, len(t.pages), P.MAP_CHUNK)),
            [(P.END, b"")])))
        return chan.bytes_sent - before

    def finish(self, summary: dict) -> None:
        """The run is over: wait until every checkpoint is acknowledged (or the standby is
        lost), release the rest of the output, tell the standby, close."""
        self._closing = True
        with self._cond:
            stopping = self.required and self.lost_reason is not None
        if stopping:   # the reader thread is stopping the run (exit 4): release nothing more
            if self.gate is not None:
                self.gate.abort()
            os._exit(EXIT_REPLICATION_LOST)
        if self._sender is not None:
            self._jobs.join()   # everything queued is sent (or dropped with a lost standby)
        with self._cond:
            deadline = time.monotonic() + ACK_TIMEOUT
            while self._inflight and self.chan is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            chan, pending = self.chan, bool(self._inflight)
        if chan is not None and pending:
            self._closing = False
            self._lose(f"standby {self.addr} did not acknowledge the last checkpoint")
        if self.gate is not None:
            self.gate.close()   # everything is acknowledged (or no standby is left): all out
        if chan is not None and not pending:
            try:
                chan.send(P.FINISH, P.encode_json(summary))
                chan.sock.settimeout(ACK_TIMEOUT)
                chan.sock.shutdown(socket.SHUT_WR)
                while chan.sock.recv(4096):   # until the standby closes: it has the summary
                    pass
            except OSError:
                pass
            with self._cond:
                self._gen += 1
                self.chan = None
            chan.close()
        if self._ro is not None:
            self._ro.close()

    def abandon(self) -> None:
        """Drop the connection without a word: what the standby sees when this process dies
        (the benchmark's failover, tests)."""
        self._closing = True
        with self._cond:
            chan, self.chan = self.chan, None
            self._gen += 1
        if chan is not None:
            chan.close()
        if self.gate is not None:
            self.gate.open()

    def stats(self) -> dict:
        return {"standby": self.addr, "checkpoints_sent": self.sent, "last_acknowledged": self.acked,
                "wire_bytes": self.wire_bytes, "lost": self.lost_reason}

