"""The standby's side: receive checkpoints, commit each in one transaction, keep the
latest image warm in a guest RAM mapping, and fail over when the primary is lost.

One session at a time. Before a session is established (the primary's START
verified), a peer that sends anything wrong -- garbage, a truncated frame, a
wrong MAC, nothing at all within the timeout -- is refused with one log line
and the standby listens again; nothing is allocated beyond the 64 KiB
handshake limit and nothing is written to the store. Once a session holds a
complete checkpoint, losing it (reset, EOF, a bad frame, no heartbeat within
``failover_timeout``) means failover.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field


from storage import Store
from storage.transfer import (Transfer, TransferError, TransferPack, join_maps, map_entries, pack_blobs,
                              parse_map)

from ..checkpoint.captures import vcpu_state_name
from ..checkpoint.schedule import Schedule
from ..checkpoint.session import Checkpointer
from ..machine import Machine, MachineConfig, VcpuState
from ..kvm.constants import DEFAULT_KVM_PATH
from ..machine.memory import GuestMemory
from . import protocol as P
from .primary import write_all

DEFAULT_FAILOVER_MS = 500.0
EXIT_NO_CHECKPOINT = 3


#: Payload bytes the reader thread may read ahead of the checkpoint being committed: two
#: of the largest frames (a hostile peer's 64 frames of 64 MiB would otherwise be held).
QUEUED_BYTES = 2 * P.STATE_LIMIT


def log(msg: str) -> None:
    print(f"standby: {msg}", file=sys.stderr, flush=True)


@dataclass
class Latest:
    """The newest complete checkpoint of this session."""

    local: int
    primary: int
    meta: dict
    vcpus: list[bytes]


@dataclass
class StandbyResult:
    outcome: str                      #: "finished", "failover", "no-checkpoint"
    exit_status: int
    received: list[int] = field(default_factory=list)    #: the standby's ids, in order
    primary_ids: list[int] = field(default_factory=list)
    summary: dict = field(default_factory=dict)           #: the primary's FINISH summary
    failover_ms: float | None = None
    resumed_from: int | None = None
    refused: int = 0
    run: dict | None = None

    def as_dict(self) -> dict:
        return {"outcome": self.outcome, "exit_status": self.exit_status, "checkpoints": self.received,
                "primary_checkpoints": self.primary_ids, "count": len(self.received),
                "failover_ms": self.failover_ms, "resumed_from": self.resumed_from,
                "refused_peers": self.refused, "primary_summary": self.summary, "run": self.run}


class Standby:
    def __init__(self, listen: str, store_path: str, *, token: bytes | None = None,
                 failover_timeout_ms: float = DEFAULT_FAILOVER_MS, kvm_path: str = DEFAULT_KVM_PATH,
                 max_sessions: int = 1000):
        self.host, self.port = P.parse_addr(listen)
        self.store_path = store_path
        self.token = token
        self.timeout = failover_timeout_ms / 1e3
        if not self.timeout > 0:
            raise ValueError(f"--failover-timeout must be > 0 ms, got {failover_timeout_ms}")
        self.kvm_path = kvm_path
        self.max_sessions = max_sessions
        self.store: Store | None = None
        self.warm: GuestMemory | None = None
        self.config: dict | None = None
        self.start: dict = {}
        self.latest: Latest | None = None
        self.released: int | None = None      # primary id whose output the primary released
        self.result = StandbyResult("no-checkpoint", EXIT_NO_CHECKPOINT)
        self._local_of: dict[int, int] = {}
        self.sock: socket.socket | None = None
        self._warm_ckpt: int | None = None     # the local checkpoint warm memory holds
        self._refusing = False
        self._q: queue.Queue = queue.Queue(maxsize=64)
        self._room = threading.Condition()
        self._queued = 0          # payload bytes in self._q

    # -- serving --------------------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(4)
        self.sock = s
        return s.getsockname()[:2]

    def serve(self) -> StandbyResult:
        """Accept primaries until one session ends (finished or failed over)."""
        if self.sock is None:
            self.bind()
        try:
            for _ in range(self.max_sessions):
                conn, peer = self.sock.accept()
                outcome = self._session(conn, f"{peer[0]}:{peer[1]}")
                if outcome is not None:
                    return outcome
            return self.result
        finally:
            self.sock.close()
            if self.store is not None:
                self.store.close()
            if self.warm is not None:
                self.warm.close()

    def _session(self, conn: socket.socket, peer: str) -> StandbyResult | None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.timeout)
        chan = P.Channel(conn, self.token, b"S")
        nonce = P.new_nonce()
        try:
            chan.send(P.HELLO, P.encode_json({"nonce": nonce.hex(), "heartbeat_ms": self.timeout * 1e3 / 5,
                                              "auth": self.token is not None}))
            chan.nonce = nonce
            _, payload = chan.recv((P.START,))
            start = P.decode_json(payload, "start")
            if "release_for" in start:
                raise P.ProtocolError("a release channel, but no session is open")
            self._open(start)
            rel = None
            if start.get("release_channel"):
                key = os.urandom(16).hex()
                chan.send(P.SESSION, P.encode_json({"key": key}))
                rel = self._attach_releaser(key)
        except (OSError, P.ProtocolError, ValueError, KeyError, TypeError) as e:
            self.result.refused += 1
            log(f"refused peer {peer}: {e}")
            chan.close()
            return None
        self.start = start
        self.latest = None
        self.released = None
        log(f"primary {peer} connected ({start.get('kind', 'run')} of {self.config.get('guest')}, "
            f"{self.config['mem_size'] >> 20} MiB)")
        chan.limit = P.STATE_LIMIT
        self._refusing = False
        t_lost = None
        self._q = queue.Queue(maxsize=64)
        self._queued = 0
        self._lost_at = None
        reader = threading.Thread(target=self._reader, args=(chan, self._q), name="standby-reader", daemon=True)
        reader.start()
        try:
            self._receive(chan)
            chan.close()
            if rel is not None:
                rel[0].close()
            return self.result
        except (OSError, P.ProtocolError, ValueError, KeyError, TypeError) as e:
            t_lost = self._lost_at or time.perf_counter()
            reason = "no heartbeat within the failover timeout" if isinstance(e, socket.timeout) else str(e)
            reader.join(self.timeout)
            chan.close()
            if rel is not None:
                # The primary's output releaser carries out what the primary told it before
                # dying (write, then `released`) and closes its channel: only then is it
                # certain which output went out. (Its host gone too: at most the timeout.)
                rel[1].join(self.timeout)
                rel[0].close()
        if self.latest is None:
            log(f"primary {peer} lost before any complete checkpoint ({reason}); listening again")
            return None
        log(f"primary lost: {reason}")
        return self.failover(t_lost)

    def _open(self, start: dict) -> None:
        cfg = start.get("config")
        if not isinstance(cfg, dict):
            raise P.ProtocolError("start: no machine configuration")
        mc = MachineConfig.from_dict(cfg)
        mc.validate()
        if self.store is None:
            if os.path.lexists(self.store_path):
                st = Store.open(self.store_path)
                if st.config != cfg:
                    st.close()
                    raise ValueError(f"{self.store_path} holds another machine's checkpoints")
            else:
                st = Store.create(self.store_path, cfg)
            self.store, self.config = st, cfg
        elif self.config != cfg:
            raise ValueError("a different machine than this standby's store holds")
        if self.warm is None:
            self.warm = GuestMemory(mc.mem_size)
            cks = self.store.checkpoints()
            if cks:   # the image a re-sync is a child of
                self.store.materialize(cks[-1].id, self.warm.pages, out_is_zero=True)
                self._warm_ckpt = cks[-1].id
            else:
                self._warm_ckpt = None

    def _attach_releaser(self, key: str) -> tuple[P.Channel, threading.Thread]:
        """Accept the primary's output releaser (its START names ``key``) on the listening
        socket; anyone else meanwhile is refused with one log line."""
        deadline = time.monotonic() + max(self.timeout, 5.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise P.ProtocolError("the primary's output releaser did not connect")
            self.sock.settimeout(left)
            try:
                conn, peer = self.sock.accept()
            finally:
                self.sock.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(min(left, self.timeout * 4))
            ch = P.Channel(conn, self.token, b"S")
            nonce = P.new_nonce()
            try:
                ch.send(P.HELLO, P.encode_json({"nonce": nonce.hex(), "auth": self.token is not None}))
                ch.nonce = nonce
                _, payload = ch.recv((P.START,))
                if P.decode_json(payload, "start").get("release_for") != key:
                    raise P.ProtocolError("not this session's output releaser")
                ch.send(P.SESSION, P.encode_json({"key": key}))
            except (OSError, P.ProtocolError) as e:
                self.result.refused += 1
                log(f"refused peer {peer[0]}:{peer[1]}: {e}")
                ch.close()
                continue
            conn.settimeout(None)   # releases come when checkpoints are acknowledged, not on a beat
            t = threading.Thread(target=self._release_reader, args=(ch,), name="standby-releases", daemon=True)
            t.start()
            return ch, t

    def _release_reader(self, ch: P.Channel) -> None:
        """`released` frames from the output releaser, until it closes its channel."""
        try:
            while True:
                _, payload = ch.recv((P.RELEASED,))
                self._released(payload)
        except (OSError, P.ProtocolError, ValueError):
            return

    def _reader(self, chan: P.Channel, q: queue.Queue) -> None:
        """Drain the socket as frames arrive (failure detection is the time of the error)."""
        while True:
            try:
                ftype, payload = chan.recv((P.HEARTBEAT, P.CKPT, P.MAP, P.PACK, P.END, P.FINISH))
                if ftype == P.HEARTBEAT:
                    continue
            except BaseException as e:   # noqa: BLE001 - handed to the receiving thread
                self._lost_at = time.perf_counter()   # detection: failover time counts from here
                q.put((None, e))
                return
            with self._room:   # frames read ahead are bounded in bytes too, not only in count
                while self._queued and self._queued + len(payload) > QUEUED_BYTES:
                    self._room.wait()
                self._queued += len(payload)
            q.put((ftype, payload))
            if ftype == P.FINISH:
                return

    def _next(self, expect: tuple[int, ...]) -> tuple[int, bytearray]:
        ftype, payload = self._q.get()
        if ftype is None:
            raise payload
        with self._room:
            self._queued -= len(payload)
            self._room.notify()
        if ftype not in expect:
            raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} frame")
        return ftype, payload

    def receive(self, frames: queue.Queue, chan) -> None:
        """The receiving side of a session over frames already read -- ``(type, payload)``
        items of ``frames``, as the reader thread queues them (a test or a recorded
        stream puts them there) -- acknowledging on ``chan`` (``send(type, payload)``);
        the store, ``config`` and ``warm`` memory set up as a session's start does."""
        self._q = frames
        self._receive(chan)

    def _receive(self, chan: P.Channel) -> None:
        st = self.store
        npages = st.page_count
        while True:
            ftype, payload = self._next((P.CKPT, P.FINISH))
            if ftype == P.FINISH:
                self.result.outcome, self.result.exit_status = "finished", 0
                self.result.summary = P.decode_json(payload, "finish")
                return
            meta, states = P.decode_checkpoint(payload)
            pid, full = meta.get("id"), bool(meta.get("full"))
            steps = meta.get("steps")
            if (not isinstance(pid, int) or not isinstance(steps, list) or not steps
                    or not all(isinstance(x, int) for x in steps) or not isinstance(meta.get("index"), int)
                    or meta.get("trigger") not in ("base", "sync", "async", "exit")):
                raise P.ProtocolError("checkpoint frame: malformed metadata")
            if full:
                parent = self._warm_ckpt   # a re-sync: a child of what the store (and warm memory) holds
            elif self._refusing:
                # an increment on top of one this standby refused: it cannot apply either
                self._skip_checkpoint()
                chan.send(P.ACK, P.encode_json({"id": pid, "need_full": True, "reason": "waiting for a full image"}))
                continue
            else:
                if self.latest is None or meta.get("parent") != self.latest.primary:
                    raise P.ProtocolError("checkpoint frame: its parent is not the last checkpoint received")
                parent = self.latest.local
            vcpus = [states.get(vcpu_state_name(i)) for i in range(len(steps))]
            if any(v is None for v in vcpus):
                raise P.ProtocolError("checkpoint frame: vCPU state missing")
            local_meta = {"step": steps[0], "steps": steps, "trigger": meta["trigger"], "replica_of": pid}
            try:
                transfer = self._read_transfer(meta, npages, full)
                with st.checkpoint(parent=parent, meta=local_meta) as w:   # one transaction; rolled back on error
                    pages, rows = w.add_transfer(transfer)
                    for name, blob in states.items():
                        w.add_state(name, blob)
                    w.set_stats({"replica_of": pid, "pages_received": int(pages.size),
                                 "blobs_received": transfer.blob_count})
            except TransferError as e:
                # nothing stored; the primary sends a full image next (and holds the output)
                log(f"refused checkpoint {pid} from the primary: {e}")
                self._refusing = True
                chan.send(P.ACK, P.encode_json({"id": pid, "need_full": True, "reason": str(e)[:200]}))
                continue
            self._refusing = False
            # warm memory: now exactly the image of this checkpoint (the pages the import
            # decoded -- and checked against their hashes -- once, for the store and for here)
            mem = self.warm.pages
            if full:
                mem[:] = 0
            mem[pages] = rows
            self._warm_ckpt = w.id
            self._local_of[pid] = w.id
            self.latest = Latest(w.id, pid, meta, vcpus)
            if meta.get("released_before"):
                self.released = pid
            self.result.received.append(w.id)
            self.result.primary_ids.append(pid)
            chan.send(P.ACK, P.encode_json({"id": pid}))

    def _read_transfer(self, meta: dict, npages: int, full: bool) -> Transfer:
        """The MAP and PACK frames up to END, as a Transfer -- counts and bytes bounded by
        the guest's size before anything is kept (TransferError otherwise, every frame of
        the checkpoint read)."""
        nmap, npacks = meta.get("map"), meta.get("packs")
        max_blobs = 2 * npages + 256
        bad = None
        if (not isinstance(nmap, int) or not isinstance(npacks, int) or not 0 <= nmap <= npages
                or not 0 <= npacks <= max_blobs):
            bad = f"map of {nmap!r} entries / {npacks!r} packs out of bounds for {npages} pages"
        maps, packs, map_bytes, nbytes, entries, blobs = [], [], 0, 0, 0, 0
        while True:
            ftype, payload = self._next((P.MAP, P.PACK, P.END))
            if ftype == P.END:
                break
            if bad is not None:
                continue   # read (and drop) the rest of this checkpoint
            try:
                # counts bounded by their headers as frames arrive, before anything is
                # decompressed or parsed: a chunk's entries compress ~255:1, a tiny blob
                # costs ~20 wire bytes, so bytes alone do not bound what parsing would hold
                if ftype == P.MAP:   # after the packs: its entries name their blobs
                    map_bytes += len(payload)
                    entries += map_entries(payload)
                    if map_bytes > 32 * npages + (1 << 16) or entries > nmap:
                        raise TransferError("more map entries (or bytes) than announced")
                    maps.append(payload)
                else:
                    nbytes += len(payload)
                    blobs += pack_blobs(payload)
                    if len(packs) >= npacks or nbytes > max_blobs * (P.PAGE + 64) or blobs > max_blobs:
                        raise TransferError("more packs, blobs or bytes than announced or than the guest can need")
                    packs.append(TransferPack.from_bytes(payload))
            except TransferError as e:
                bad, maps, packs = str(e), [], []
        if bad is not None:
            raise TransferError(f"transfer: {bad}")
        pages, hashes = join_maps([parse_map(m, npages, packs) for m in maps], npages)
        if len(pages) != nmap or len(packs) != npacks:
            raise TransferError(f"transfer: {len(pages)} map entries / {len(packs)} packs, "
                                f"{nmap} / {npacks} announced")
        digest, pdigest = meta.get("digest"), meta.get("parent_digest")
        if not isinstance(digest, str):   # the image is checked against it at commit: required
            raise TransferError("transfer: the checkpoint frame names no image digest")
        return Transfer(pages, hashes, packs, digest, pdigest if isinstance(pdigest, str) else None, full=full)

    def _skip_checkpoint(self) -> None:
        while self._next((P.MAP, P.PACK, P.END))[0] != P.END:
            pass

    def _released(self, payload) -> None:
        rid = P.decode_json(payload, "released").get("id")
        if not isinstance(rid, int) or rid not in self._local_of:
            raise P.ProtocolError("released: unknown checkpoint")
        self.released = rid

    # -- failover -------------------------------------------------------------------------------
    def failover(self, t_lost: float) -> StandbyResult:
        r = self.result
        lt = self.latest
        cfg = MachineConfig.from_dict(self.config)
        vcpus = [VcpuState.from_bytes(b) for b in lt.vcpus]
        r.outcome, r.resumed_from, r.exit_status = "failover", lt.local, 0
        sched = self.start.get("schedule") or {}
        index = int(lt.meta.get("index", 0))
        warm, self.warm = self.warm, None

        def started(m: Machine):
            orig = m.start

            def start():
                orig()
                r.failover_ms = round((time.perf_counter() - t_lost) * 1e3, 2)
                # one write(): the resumed program's stderr writes go to the same fd from now on
                sys.stderr.flush()
                os.write(2, f"failover: resumed from checkpoint {lt.local} in {r.failover_ms:.1f} ms\n".encode())
            m.start = start

        if cfg.guest == "program":
            return self._failover_program(cfg, warm, vcpus, sched, index, started)
        count = sched.get("count", 0) or 0
        if sched.get("stop_after") is not None:
            count = 0 if index >= 1 else 1
        remaining = max(0, int(count) - index)
        with Machine(cfg, kvm_path=self.kvm_path, boot=False, memory=warm) as m:
            m.restore_state(None, vcpus)
            if remaining == 0:
                r.failover_ms = round((time.perf_counter() - t_lost) * 1e3, 2)
                print(f"failover: checkpoint {lt.local} ended the schedule; nothing left to run "
                      f"({r.failover_ms:.1f} ms)", file=sys.stderr, flush=True)
                return r
            started(m)
            cp = Checkpointer(m, self.store, lt.local)
            if sched.get("stop_after") is not None:
                s = Schedule(count=1, stop_after=int(sched["stop_after"]))
            else:
                s = Schedule(count=remaining, every_steps=sched.get("every_steps"),
                             interval_ms=sched.get("interval_ms"))
            summary = cp.run(s)
            r.run = summary.as_dict()
        return r

    def _failover_program(self, cfg, warm, vcpus, sched, index, started) -> StandbyResult:
        from ..checkpoint.program import (ProgramSchedule, continue_program, file_loader, program_spec,
                                          program_state)
        from ..program import STDERR, STDOUT, ProgramGuest
        r, lt, st = self.result, self.latest, self.store
        # Output commit: what the primary never released, the standby writes now, from its store.
        path = st.path(lt.local)
        released_local = self._local_of.get(self.released) if self.released is not None else None
        start_at = path.index(released_local) + 1 if released_local in path else \
            path.index(self.result.received[0]) if self.result.received[0] in path else len(path)
        log(f"output: the primary released through checkpoint {released_local}; writing the unreleased "
            f"output of checkpoints {path[start_at] if start_at < len(path) else '-'}..{lt.local}")
        for c in path[start_at:]:
            names = st.state_names(c)
            for name, fd in ((STDOUT, 1), (STDERR, 2)):
                if name in names:
                    write_all(fd, st.state(c, name))
        spec = program_spec(st)
        state = program_state(st, lt.local)
        if state.get("exited"):
            warm.close()
            ex = state["exited"]
            r.failover_ms = 0.0
            print(f"failover: the program had exited by checkpoint {lt.local}; nothing left to run",
                  file=sys.stderr, flush=True)
            r.exit_status = int(ex.get("status") or 0)
            return r
        count = sched.get("count")
        if sched.get("stop_after") is not None:
            s = ProgramSchedule(count=1, stop_after=int(sched["stop_after"])) if index < 1 else None
        else:
            left = None if count is None else int(count) - index
            s = None if left is not None and left <= 0 else ProgramSchedule(
                count=left, every_syscalls=sched.get("every_syscalls"), interval_ms=sched.get("interval_ms"))
        if s is None:
            warm.close()
            r.failover_ms = 0.0
            print(f"failover: checkpoint {lt.local} ended the schedule; nothing left to run",
                  file=sys.stderr, flush=True)
            return r
        stdin = (os.fdopen(os.dup(0), "rb", buffering=0) if spec.stdin is None else open(spec.stdin, "rb"))
        try:
            if spec.stdin is not None:
                stdin.seek(int(state.get("stdin_pos", 0)))
            driver = ProgramGuest.resuming(spec, state, file_loader(st, path), live_output=True, stdin=stdin)
            with Machine(cfg, kvm_path=self.kvm_path, boot=False, driver=driver, memory=warm) as m:
                m.restore_state(None, vcpus)
                started(m)
                res = continue_program(m, st, lt.local, driver, s)
            d = res.as_dict()
            r.run = d
            r.exit_status = 0 if d["running"] else int(d["exit_status"] or 0)
        finally:
            stdin.close()
        return r


def summary_line(res: StandbyResult) -> str:
    d = res.as_dict()
    if res.outcome == "finished":
        return (f"standby: primary finished; {d['count']} checkpoints replicated "
                f"({d['checkpoints'][0] if d['checkpoints'] else '-'}..{d['checkpoints'][-1] if d['checkpoints'] else '-'})")
    if res.outcome == "failover":
        return (f"standby: failed over from checkpoint {res.resumed_from}; the run ended with status "
                f"{res.exit_status}")
    return "standby: no checkpoint was received"


def as_json(res: StandbyResult) -> str:
    return json.dumps(res.as_dict(), indent=2, default=str)
