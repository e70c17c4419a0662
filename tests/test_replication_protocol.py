"""The replication channel against garbage, truncated, oversized, replayed and forged frames.

No KVM: a standby refuses hostile peers before anything reaches its store or
its guest memory, and the framing is checked on socket pairs."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from snapctl.replication import protocol as P
from storage_tests.storage_helpers import seed_for
from snapctl.replication.standby import Standby

TOKEN = b"0123456789abcdef-test-token"


def pair(token=TOKEN):
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(5)
    return P.Channel(a, token, b"P"), P.Channel(b, token, b"S")


def test_roundtrip_and_sequence():
    p, s = pair()
    p.nonce = s.nonce = b"n" * 16
    p.send(P.HEARTBEAT)
    p.send(P.ACK, b'{"id": 3}')
    assert s.recv() == (P.HEARTBEAT, bytearray())
    assert s.recv((P.ACK,)) == (P.ACK, bytearray(b'{"id": 3}'))


def test_wrong_token_is_refused():
    a, b = socket.socketpair()
    p, s = P.Channel(a, b"x" * 20, b"P"), P.Channel(b, TOKEN, b"S")
    p.send(P.HEARTBEAT)
    with pytest.raises(P.AuthError):
        s.recv()


def test_missing_token_is_refused():
    a, b = socket.socketpair()
    b.settimeout(2)
    p, s = P.Channel(a, None, b"P"), P.Channel(b, TOKEN, b"S")
    for _ in range(3):   # the receiver reads the next headers as the first frame's MAC
        p.send(P.HEARTBEAT)
    with pytest.raises(P.AuthError):
        s.recv()


def test_reflected_frame_is_refused():
    """A frame the standby sent, played back to it, does not verify (the MAC binds the direction)."""
    a, b = socket.socketpair()
    s1, s2 = P.Channel(a, TOKEN, b"S"), P.Channel(b, TOKEN, b"S")
    s1.send(P.ACK, b'{"id": 1}')
    with pytest.raises(P.AuthError):
        s2.recv()


def test_replayed_frame_is_refused():
    a, b = socket.socketpair()
    p, s = P.Channel(a, TOKEN, b"P"), P.Channel(b, TOKEN, b"S")
    p.send(P.HEARTBEAT)
    s.recv()
    raw = P.HEADER.pack(P.MAGIC, P.VERSION, P.HEARTBEAT, 0, 0, 0)
    a.sendall(raw + p._mac(b"P", raw, b""))   # frame 0 again, correctly signed
    with pytest.raises(P.ProtocolError, match="sequence"):
        s.recv()


def test_garbage_and_truncation():
    a, b = socket.socketpair()
    s = P.Channel(b, TOKEN, b"S")
    b.settimeout(10)
    a.sendall(b"GET / HTTP/1.1\r\nHost: standby\r\n\r\n")
    with pytest.raises(P.ProtocolError, match="magic"):
        s.recv()
    a, b = socket.socketpair()
    s = P.Channel(b, TOKEN, b"S")
    a.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, P.CKPT, 0, 0, 100) + b"x" * 10)
    a.close()
    with pytest.raises(P.PeerClosed):
        s.recv()


def test_length_is_checked_before_reading():
    a, b = socket.socketpair()
    s = P.Channel(b, TOKEN, b"S")
    a.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, P.CKPT, 0, 0, 0xFFFFFFFF))
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        s.recv()


def test_a_refused_transfer_is_acknowledged_as_refused_and_stores_nothing(tmp_path, capfd):
    """A hostile (authenticated) primary's checkpoint frames: a wrong content hash, damaged
    bytes, an unknown base hash, an oversize count -- each refused with one log line and a
    need_full acknowledgement, nothing stored; an honest one after them goes in."""
    from storage import Store
    from storage.transfer import TransferPack
    from snapctl.replication.standby import Standby
    from snapctl.checkpoint.captures import vcpu_state_name
    cfg = {"mem_size": 16 * P.PAGE, "vcpus": 1, "name": "t", "ram": [{"gpa": 0, "size": 16 * P.PAGE, "slot": 0}]}
    rng = np.random.default_rng(seed_for("refused-transfer", 5))
    img = rng.integers(0, 4, (16, P.PAGE), dtype=np.uint8)
    src = Store.create(str(tmp_path / "src.snap"), cfg, synchronous="OFF")
    with src.checkpoint(None, transfer=True) as w0:
        w0.add_pages(np.arange(16), img)
    img2 = img.copy()
    img2[:8, :32] ^= 1
    with src.checkpoint(w0.id, transfer=True) as w1:
        w1.add_pages(np.arange(8), img2[:8])
    base, inc = w0.transfer, w1.transfer
    assert (inc.packs[0].codecs == 2).any()

    sb = Standby("127.0.0.1:0", str(tmp_path / "sb.snap"), token=None)
    sb.store = Store.create(sb.store_path, cfg, synchronous="OFF")
    sb.config = cfg
    sb.warm = type("W", (), {"pages": np.zeros((16, P.PAGE), np.uint8)})()
    import queue
    q = queue.Queue()
    sent = []

    class Chan:
        def send(self, ftype, payload=b""):
            sent.append(P.decode_json(payload, "ack"))

    def frames(pid, t, full, parent, packs=None, meta_extra=None):
        meta = {"id": pid, "parent": parent, "trigger": "base" if full else "sync", "steps": [pid],
                "step": pid, "index": pid, "digest": t.digest, "parent_digest": t.parent_digest,
                "full": full, "map": len(t.pages), "packs": len(t.packs), **(meta_extra or {})}
        q.put((P.CKPT, P.encode_checkpoint(meta, {vcpu_state_name(0): b"v"})))
        for p in (packs if packs is not None else t.packs):
            q.put((P.PACK, p.to_bytes()))
        q.put((P.MAP, t.map_bytes()))
        q.put((P.END, b""))

    frames(0, base, True, None)
    p = inc.packs[0]
    h = p.hashes.copy()
    h[0, 0] ^= 1
    b = p.bases.copy()
    d = int(np.flatnonzero(p.codecs == 2)[0])
    b[d] = 7
    bad = {"hash": [TransferPack(p.codecs, p.bases, h, p.ends, p.crcs, p.data)],
           # the wire carries no checksums (the receiver takes them from the bytes): damaged
           # bytes are caught when they do not decode to their content hash
           "bytes": [TransferPack(p.codecs, p.bases, p.hashes, p.ends, p.crcs,
                                  bytes([p.data[0] ^ 0xFF]) + p.data[1:])],
           "base": [TransferPack(p.codecs, b, p.hashes, p.ends, p.crcs, p.data)]}
    for k, packs in bad.items():
        frames(1, inc, False, 0, packs)
        frames(0, base, True, None, meta_extra={"trigger": "sync"})   # the full image it asks for
    frames(1, inc, False, 0, meta_extra={"packs": 10**9})   # an oversize count
    frames(0, base, True, None, meta_extra={"trigger": "sync"})
    # more blobs than the image can need, in announced packs: refused from the packs' headers as
    # they arrive (tiny blobs cost ~20 wire bytes: a byte bound alone let ~400x pages through)
    frames(1, inc, False, 0, packs=inc.packs * 40, meta_extra={"packs": 40})
    frames(0, base, True, None, meta_extra={"trigger": "sync"})
    # map chunks claiming more entries than announced: refused from their headers, before
    # any is decompressed (a chunk of zero-page entries compresses ~255:1)
    q.put((P.CKPT, P.encode_checkpoint(
        {"id": 1, "parent": 0, "trigger": "sync", "steps": [1], "step": 1, "index": 1, "digest": inc.digest,
         "parent_digest": inc.parent_digest, "full": False, "map": len(inc.pages), "packs": len(inc.packs)},
        {vcpu_state_name(0): b"v"})))
    for p_ in inc.packs:
        q.put((P.PACK, p_.to_bytes()))
    for _ in range(3):
        q.put((P.MAP, inc.map_bytes()))
    q.put((P.END, b""))
    frames(0, base, True, None, meta_extra={"trigger": "sync"})
    frames(1, inc, False, 0)
    q.put((P.FINISH, P.encode_json({})))
    sb.receive(q, Chan())
    refused = [a for a in sent if a.get("need_full")]
    assert len(refused) == 6 and all(a["id"] == 1 for a in refused)
    assert sent[-1] == {"id": 1}
    err = capfd.readouterr().err
    assert err.count("refused checkpoint 1") == 6, err
    for needle in ("content hash", "not in this store", "out of bounds", "more packs, blobs or bytes",
                   "more map entries"):
        assert needle in err
    # only what was acknowledged is stored: 6 fulls (digest of the base) and the increment
    cks = sb.store.checkpoints()
    assert len(cks) == 8 and sb.store.digest(cks[-1].id) == w1.digest
    assert not sb.store.verify().problems
    assert (sb.warm.pages == img2).all()
    sb.store.close()
    src.close()


def test_checkpoint_frame_validation():
    blob = P.encode_checkpoint({"id": 1}, {"vcpu/0": b"abc", "machine": b"{}"})
    meta, states = P.decode_checkpoint(blob)
    assert meta == {"id": 1} and states == {"vcpu/0": b"abc", "machine": b"{}"}
    for bad in (blob[:-1], blob + b"x", b"\x00\x00\x00\x05{}", b"\xff\xff\xff\xff",
                b"\xff\xff\xff\xff" + blob[4:]):
        with pytest.raises(P.ProtocolError):
            P.decode_checkpoint(bad)
    import lz4.block
    for inner in (b"\x00\x00\x00\x05{}", b"\x00\x00\x00\x02{}" + b"junk", b"\x00\x00\x00\x02[]"):
        with pytest.raises(P.ProtocolError):
            P.decode_checkpoint(P.STATE_HEAD.pack(len(inner)) + lz4.block.compress(inner, store_size=False))


def _standby(tmp_path, sessions: int, token=TOKEN):
    sb = Standby("127.0.0.1:0", str(tmp_path / "standby.snap"), token=token, failover_timeout_ms=1000,
                 max_sessions=sessions)
    host, port = sb.bind()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", sb.serve()), daemon=True)
    t.start()
    return sb, (host, port), t, box


def _hello_nonce(c) -> bytes:
    """Read the standby's HELLO without checking its MAC (a peer without the token)."""
    head = b""
    while len(head) < P.HEADER.size:
        head += c.recv(P.HEADER.size - len(head))
    n = P.HEADER.unpack(head)[5]
    body = b""
    while len(body) < n + P.MAC_SIZE:
        body += c.recv(n + P.MAC_SIZE - len(body))
    return bytes.fromhex(P.decode_json(body[:n], "hello")["nonce"])


def _connect(addr):
    return socket.create_connection(addr, timeout=10)


def test_standby_refuses_hostile_peers_and_writes_nothing(tmp_path, capfd):
    """Garbage, a truncated frame, an oversized length, a wrong token, a peer that says
    nothing, and a legitimate session's frames replayed into a new session: each is
    refused with one log line, and no store file is ever created."""
    sb, addr, t, box = _standby(tmp_path, sessions=7)
    start = P.encode_json({"kind": "run", "schedule": {"count": 1},
                           "config": {"guest": "stamp", "mem_size": 64 << 20, "vcpus": 1}})
    # 1 garbage
    c = _connect(addr); c.recv(4096); c.sendall(b"\x00" * 64); c.close()
    # 2 truncated
    c = _connect(addr); c.recv(4096); c.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, P.START, 0, 0, 50) + b"{"); c.close()
    # 3 oversized length
    c = _connect(addr); c.recv(4096); c.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, P.START, 0, 0, 1 << 30)); c.close()
    # 4 wrong token
    c = _connect(addr)
    ch = P.Channel(c, b"w" * 32, b"P")
    ch.nonce = _hello_nonce(c)
    ch.send(P.START, start)
    c.close()
    # 5 silent peer (the failover timeout)
    c = _connect(addr); c.recv(4096)
    # 6 no token at all
    c2 = _connect(addr)
    ch = P.Channel(c2, None, b"P")
    _hello_nonce(c2)
    ch.send(P.START, start)
    c2.close()
    c.close()
    # 7 a legitimate START recorded in one session, replayed verbatim in another
    rec = P.Channel(socket.socket(), TOKEN, b"P")
    rec.nonce = b"\x01" * 16   # the nonce of the session it was recorded in
    header = P.HEADER.pack(P.MAGIC, P.VERSION, P.START, 0, 0, len(start))
    recorded = header + start + rec._mac(b"P", header, start)
    c = _connect(addr); c.recv(4096); c.sendall(recorded); c.close()
    t.join(60)
    assert not t.is_alive()
    res = box["res"]
    assert res.refused == 7 and res.received == []
    assert not (tmp_path / "standby.snap").exists()
    err = capfd.readouterr().err
    refusals = [line for line in err.splitlines() if "refused peer" in line]
    assert len(refusals) == 7, err
    assert sum("authentication failed" in line for line in refusals) >= 2, err   # wrong token, replayed START


def test_bench_rows_show_the_four_replication_goals():
    from snapctl.bench import verdict_rows
    r = {"replication": {"guest": "random 64 MiB",
                         "checkpoint_rate": {"per_s": 75.0, "goal": ">= 100/s", "met": False},
                         "pause_ratio": {"ratio": 1.1, "goal": "<= 1.2x", "met": True},
                         "failover_ms": {"ms": 6.4, "goal": "<= 50 ms", "met": True},
                         "wire_ratio": {"ratio": 0.4, "goal": "<= 1.1x", "met": True}}}
    rows = verdict_rows(r)
    assert [row[0] for row in rows] == ["replication checkpoint_rate", "replication pause_ratio",
                                        "replication failover_ms", "replication wire_ratio"]
    assert rows[0][1:] == (75.0, ">= 100/s", False) and rows[2][1] == 6.4
    # the table `snapctl bench` prints has a figure column: every row has one
    r["replication"]["pause_ratio"].update(pause_ms_median_replicated=0.77, pause_ms_median_plain=0.7)
    rows = verdict_rows(r, figures=True)
    assert [len(row) for row in rows] == [5] * 4
    assert rows[1] == ("replication pause_ratio", 1.1, "<= 1.2x", True, "0.77 vs 0.7 ms")


def test_bench_prints_the_replication_goals_and_the_veth_figures(monkeypatch):
    """`snapctl bench --only replication` without --json: the table of the four goals and a
    line with the veth pair's figures (the table once failed on these rows: no figure column)."""
    from typer.testing import CliRunner

    from snapctl import bench
    from snapctl.cli import app
    sub = {"checkpoint_rate": {"per_s": 150.0, "goal": ">= 100/s", "met": True},
           "pause_ratio": {"ratio": 1.1, "pause_ms_median_replicated": 0.77, "pause_ms_median_plain": 0.7,
                           "goal": "<= 1.2x", "met": True},
           "failover_ms": {"ms": 4.0, "goal": "<= 50 ms", "met": True},
           "wire_ratio": {"ratio": 0.81, "goal": "<= 1.1x", "met": True}}
    veth = {"link": "veth pair", **{k: {kk: vv for kk, vv in v.items() if kk != "met"} for k, v in sub.items()}}
    veth["pause_ratio"]["ratio"] = 1.15
    monkeypatch.setattr(bench, "run_all", lambda quick, only, progress=None: {
        "replication": {"guest": "random 64 MiB", **sub, "veth": veth}})
    res = CliRunner().invoke(app, ["bench", "--only", "replication"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    row = next(line for line in lines if line.startswith("replication pause_ratio"))
    assert row.split()[2:5] == ["1.1", "<=", "1.2x"] and row.endswith("0.77 vs 0.7 ms")
    assert sum(line.startswith("replication ") and line.split()[-1] in ("yes", "ms") for line in lines) >= 4
    veth_line = next(line for line in lines if line.startswith("replication veth"))
    assert "pause_ratio=1.15" in veth_line and "checkpoint_rate=150.0" in veth_line


PRIMARY_CFG = {"mem_size": 16 * P.PAGE, "vcpus": 1, "name": "t", "guest": "random",
               "ram": [{"gpa": 0, "size": 16 * P.PAGE, "slot": 0}]}


def _committed_run(path: str, n: int, seed: int) -> list:
    """``n`` checkpoints committed to a new store at ``path`` (the base, then one page
    changed each), each checkpoint ``i`` with the output ``out{i};``: [(id, digest,
    capture-like object)] for ``Replicator.after_commit``."""
    import types
    from storage import Store
    rng = np.random.default_rng(seed_for("primary-run", seed))
    img = rng.integers(0, 4, (16, P.PAGE), dtype=np.uint8)
    caps, parent = [], None
    with Store.create(path, PRIMARY_CFG, synchronous="OFF") as st:
        for i in range(n):
            if i:
                img[i % 16, :8] ^= 1
            states = {"vcpu/0": b"v", "stream/stdout": f"out{i};".encode()}
            with st.checkpoint(parent, {"step": i}, transfer=True) as w:
                w.add_pages(np.arange(16) if i == 0 else [i % 16], img if i == 0 else img[[i % 16]])
                for k, v in states.items():
                    w.add_state(k, v)
            parent = w.id
            caps.append((w.id, w.digest, types.SimpleNamespace(
                trigger="base" if i == 0 else "sync", steps=[i], states={"stream/stdout": states["stream/stdout"]},
                transfer=w.transfer, named_states=lambda s=states: dict(s))))
    return caps


def _fake_standby(answer, *, heartbeat_ms: float = 1000, beats: list | None = None
                  ) -> tuple[int, list, threading.Thread]:
    """A standby that reads whole checkpoints and lets ``answer(meta)`` return the ack
    payloads to send (dicts; several go out in one write, as one segment): (port, the
    (meta, states) received, its thread). ``beats`` collects the times heartbeats arrived."""
    srv = socket.create_server(("127.0.0.1", 0))
    got: list = []

    def run():
        conn, _ = srv.accept()
        ch = P.Channel(conn, None, b"S")
        ch.send(P.HELLO, P.encode_json({"nonce": (b"n" * 16).hex(), "heartbeat_ms": heartbeat_ms}))
        ch.nonce = b"n" * 16
        ch.limit = P.STATE_LIMIT
        ch.recv((P.START,))
        try:
            while True:
                ftype, payload = ch.recv()
                if ftype == P.FINISH:
                    break
                if ftype == P.HEARTBEAT and beats is not None:
                    beats.append(time.monotonic())
                if ftype != P.CKPT:
                    continue
                meta, states = P.decode_checkpoint(payload)
                while ch.recv()[0] != P.END:
                    pass
                got.append((meta, states))
                ch.send_all([(P.ACK, P.encode_json(ack)) for ack in answer(meta)])
        except (P.ProtocolError, OSError):     # the primary dropped the connection
            pass
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv.getsockname()[1], got, t


def _replicator(port: int, path: str, count: int):
    """A primary's replicator to the fake standby on ``port`` for the store at ``path``."""
    from snapctl.replication.primary import Replicator
    return Replicator(f"127.0.0.1:{port}", token=None, required=False, store_path=path,
                      start={"kind": "run", "config": PRIMARY_CFG, "schedule": {"count": count}})


def _wait_for(cond) -> None:
    deadline = time.monotonic() + 60
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_refused_checkpoint_makes_the_primary_send_a_full_image_with_the_output_since(tmp_path, capfd):
    """The primary's side of a refusal: nothing it covered is released, the next checkpoint
    goes full, and its output states hold the output of every checkpoint since the last
    acknowledged one (what a failover after it must write)."""
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 5, 7)
    ids = [c[0] for c in caps]
    # checkpoint 2: "cannot import"
    port, got, t = _fake_standby(lambda m: [{"id": m["id"], **({"need_full": True} if m["id"] == ids[2] else {})}])
    rep = _replicator(port, path, 4)
    for ckpt, digest, cap in caps:
        rep.after_commit(ckpt, cap, {"digest": digest})
        if ckpt == ids[3]:        # let the refusal of 2 and the ack of 3 be taken in
            _wait_for(lambda: rep.awaiting_full() and rep.acked == ids[3])
    rep.finish({})
    t.join(10)
    kinds = [(m["id"], m["full"]) for m, _ in got]
    assert kinds == [(ids[0], True), (ids[1], False), (ids[2], False), (ids[3], False), (ids[4], True)], kinds
    last_meta, last_states = got[-1]
    assert last_meta["released_before"] is False
    assert last_states["stream/stdout"] == b"out2;out3;out4;"      # since checkpoint 1, the last acknowledged
    assert rep.acked == ids[4]
    assert "refused checkpoint" in capfd.readouterr().err


def test_a_late_refusal_of_a_checkpoint_before_the_full_image_starts_no_second_resync(tmp_path, capfd):
    """A standby that refused checkpoint 2 refuses 3 too (it was in flight); if that refusal
    arrives after the full image 4 was sent, it is answered already: 5 goes as an increment
    carrying only its own output (a second re-sync would carry 2..4's output again, which
    4's acknowledgement released: a failover after it would write that output twice)."""
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 6, 8)
    ids = [c[0] for c in caps]

    sent_full = threading.Event()

    def answer(meta):
        pid = meta["id"]
        if pid == ids[2]:
            return [{"id": pid, "need_full": True, "reason": "test"}]
        if pid == ids[3]:
            return []                               # its refusal goes after the full image arrives
        if pid == ids[4]:                           # ... once the primary is done sending that image
            sent_full.wait(60)
            return [{"id": ids[3], "need_full": True, "reason": "test"}, {"id": pid}]
        return [{"id": pid}]

    port, got, t = _fake_standby(answer)
    rep = _replicator(port, path, 5)
    for ckpt, digest, cap in caps:
        rep.after_commit(ckpt, cap, {"digest": digest})
        if ckpt == ids[3]:
            _wait_for(rep.awaiting_full)                 # the refusal of 2 is in: 4 goes full
        if ckpt == ids[4]:
            sent_full.set()
            _wait_for(lambda: rep.acked == ids[4])       # ... and the late refusal of 3 before its ack
    rep.finish({})
    t.join(10)
    kinds = [(m["id"], m["full"]) for m, _ in got]
    assert kinds == [(ids[0], True), (ids[1], False), (ids[2], False), (ids[3], False), (ids[4], True),
                     (ids[5], False)], kinds
    assert got[4][1]["stream/stdout"] == b"out2;out3;out4;"     # the full image: since 1, the last acked
    assert got[5][1]["stream/stdout"] == b"out5;"               # not 2..5 again
    assert rep.acked == ids[5]


def test_the_replicator_waits_out_the_checkpointers_pauses(tmp_path, monkeypatch):
    """While the checkpointer's pause window is closed (a capture has the guest paused),
    the sender builds and sends nothing and an arrived acknowledgement is not taken in;
    both go on once it opens."""
    from snapctl.checkpoint.captures import PauseWindow
    monkeypatch.setattr(PauseWindow, "LONGEST", 600.0)   # the test's own stalls must not end a wait
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 3, 9)
    ids = [c[0] for c in caps]
    go = threading.Event()

    def answer(meta):
        if meta["id"] == ids[2]:
            go.wait(60)            # acknowledged once the test has closed the window
        return [{"id": meta["id"]}]

    port, got, t = _fake_standby(answer)
    rep = _replicator(port, path, 2)
    window = PauseWindow()
    rep.follow(window)
    rep.after_commit(*caps[0][::2], {"digest": caps[0][1]})      # the base: sent from this thread
    _wait_for(lambda: rep.acked == ids[0])
    assert rep.acked == ids[0]
    with window.closed():
        assert not window.is_open()
        rep.after_commit(ids[1], caps[1][2], {"digest": caps[1][1]})   # queued for the sender
        time.sleep(0.3)                                               # a sender that ignored the window
        assert [m["id"] for m, _ in got] == [ids[0]]                  # would have sent it by now
        assert rep.acked == ids[0]
    _wait_for(lambda: rep.acked == ids[1])
    assert [m["id"] for m, _ in got] == ids[:2] and rep.acked == ids[1]
    # an ack that arrives while the window is closed waits for it to open
    rep.after_commit(ids[2], caps[2][2], {"digest": caps[2][1]})
    _wait_for(lambda: len(got) == 3)
    with window.closed():
        go.set()
        time.sleep(0.3)                      # an ack reader that ignored the window would have it
        assert rep.acked == ids[1]
    _wait_for(lambda: rep.acked == ids[2])
    assert rep.acked == ids[2] and window.is_open()
    rep.finish({})
    t.join(10)


def test_a_pause_window_opens_again_however_the_capture_ends():
    from snapctl.checkpoint.captures import PauseWindow
    w = PauseWindow()
    assert w.is_open()
    with pytest.raises(RuntimeError):
        with w.closed():
            assert not w.is_open()
            raise RuntimeError("capture failed")
    assert w.is_open()
    w.wait()    # returns at once while open


def test_a_readable_wait_is_not_woken_in_a_pause():
    """Data that arrives while the window is closed wakes a ``readable`` waiter only once
    it opens (the ack reader then takes no GIL from the pause)."""
    from snapctl.checkpoint.captures import PauseWindow
    srv = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    srv.close()
    w = PauseWindow()
    r = w.readable(a.fileno())
    late = None
    try:
        assert not r.wait(0)
        with w.closed():
            b.send(b"x")
            assert not r.wait(0.2)
            late = w.readable(a.fileno())      # made while closed: armed when it opens
            assert not late.wait(0.1)
        assert r.wait(5) and late.wait(5)
        assert a.recv(1) == b"x"
        assert not r.wait(0)
        with w.closed():
            a.shutdown(socket.SHUT_RDWR)       # Channel.close(): wakes the reader even in a pause
            assert r.wait(5)
    finally:
        w.forget(r)
        if late is not None:
            w.forget(late)
        a.close()
        b.close()


def test_the_ack_reader_waits_through_quiet_spells_and_gives_up_after_the_ack_timeout(tmp_path, monkeypatch, capfd):
    """With the pause window followed, the ack reader's idle spells (no frame for the
    socket timeout) neither end the session while acknowledgements are merely slow nor
    keep it alive once none came for the ack timeout."""
    from snapctl.checkpoint.captures import PauseWindow
    from snapctl.replication import primary
    monkeypatch.setattr(primary, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(primary, "ACK_TIMEOUT", 60.0)
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 3, 10)
    ids = [c[0] for c in caps]
    slow = threading.Event()

    def answer(meta):
        if meta["id"] == ids[1]:
            slow.wait(0.7)              # idle spells (0.2 s each), under the ack timeout
        if meta["id"] == ids[2]:
            return []                   # never acknowledged
        return [{"id": meta["id"]}]

    port, got, t = _fake_standby(answer)
    rep = _replicator(port, path, 2)
    rep.follow(PauseWindow())
    for ckpt, digest, cap in caps[:2]:
        rep.after_commit(ckpt, cap, {"digest": digest})
    _wait_for(lambda: rep.acked == ids[1])
    assert rep.acked == ids[1] and rep.lost_reason is None
    monkeypatch.setattr(primary, "ACK_TIMEOUT", 1.0)
    rep.after_commit(ids[2], caps[2][2], {"digest": caps[2][1]})
    err = []

    def warned() -> bool:     # the warning is printed just after lost_reason is set
        err.append(capfd.readouterr().err)
        return "continuing without a standby" in "".join(err)
    _wait_for(warned)
    assert "no acknowledgement" in (rep.lost_reason or "")
    assert "continuing without a standby" in "".join(err)
    rep.finish({})


def test_acks_that_arrive_together_are_all_taken_in(tmp_path):
    """Two acknowledgements in one segment: the reader, waiting for its socket through the
    pause window, takes both (the second must not wait in a read buffer for more data)."""
    from snapctl.checkpoint.captures import PauseWindow
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 3, 12)
    ids = [c[0] for c in caps]

    def answer(meta):
        if meta["id"] == ids[1]:
            return []                                     # held back ...
        if meta["id"] == ids[2]:
            return [{"id": ids[1]}, {"id": ids[2]}]       # ... and sent with the next one
        return [{"id": meta["id"]}]

    port, got, t = _fake_standby(answer)
    rep = _replicator(port, path, 2)
    rep.follow(PauseWindow())
    for ckpt, digest, cap in caps:
        rep.after_commit(ckpt, cap, {"digest": digest})
    _wait_for(lambda: rep.acked == ids[2])
    assert rep.acked == ids[2] and rep.lost_reason is None
    rep.finish({})
    t.join(10)


def test_heartbeats_go_out_through_a_long_pause(tmp_path, monkeypatch):
    """A capture longer than the standby's failover timeout must not look like a lost
    primary: the heartbeat does not wait for the pause window."""
    from snapctl.checkpoint.captures import PauseWindow
    monkeypatch.setattr(PauseWindow, "LONGEST", 600.0)   # a waiting heartbeat would wait it out
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 1, 13)
    beats: list = []
    port, got, t = _fake_standby(lambda m: [{"id": m["id"]}], heartbeat_ms=50, beats=beats)
    rep = _replicator(port, path, 0)
    window = PauseWindow()
    rep.follow(window)
    rep.after_commit(caps[0][0], caps[0][2], {"digest": caps[0][1]})
    _wait_for(lambda: rep.acked == caps[0][0])
    with window.closed():
        t0 = time.monotonic()
        _wait_for(lambda: any(b > t0 for b in beats))
        assert any(b > t0 for b in beats)
    rep.finish({})
    t.join(10)


def test_the_ack_reader_ends_with_its_connection(tmp_path):
    """Dropping the connection (as a dying primary does) ends its ack reader and frees its
    wait, window followed or not: no thread or epoll set outlives the connection."""
    from snapctl.checkpoint.captures import PauseWindow
    path = str(tmp_path / "p.snap")
    caps = _committed_run(path, 1, 14)
    port, got, t = _fake_standby(lambda m: [{"id": m["id"]}])
    rep = _replicator(port, path, 0)
    window = PauseWindow()
    rep.follow(window)
    rep.after_commit(caps[0][0], caps[0][2], {"digest": caps[0][1]})
    _wait_for(lambda: rep.acked == caps[0][0])

    def readers():
        return [th for th in threading.enumerate() if th.name == "replication-acks"]
    assert len(readers()) == 1
    rep.abandon()
    _wait_for(lambda: not readers())
    assert not readers()
    t.join(10)


class _Capture:
    def __init__(self):
        self.out = bytearray()

    def sendall(self, data):
        self.out += data


def _frames(chan, frames):
    """The wire bytes of ``frames`` [(type, payload)] as ``chan`` would send them."""
    chan.sock, real = _Capture(), chan.sock
    try:
        chan.send_all(frames)
        return bytes(chan.sock.out)
    finally:
        chan.sock = real


def _sender_and_receiver(token=TOKEN):
    a, b = socket.socketpair()
    b.settimeout(5)
    p, s = P.Channel(a, token, b"P"), P.Channel(b, token, b"S")
    p.nonce = s.nonce = b"n" * 16
    s.limit = P.STATE_LIMIT                            # a session's (after the handshake)
    return a, p, s


@pytest.mark.parametrize("token", [TOKEN, None])
def test_buffered_recv_takes_several_frames_from_one_segment(token):
    a, p, s = _sender_and_receiver(token)
    frames = [(P.HEARTBEAT, b""), (P.ACK, b'{"id": 1}'), (P.MAP, b"m" * 3000),
              (P.PACK, b"p" * (P.RECV_BUFFER + 12345)), (P.END, b""), (P.ACK, b'{"id": 2}')]
    a.sendall(_frames(p, frames))                      # all of it at once
    assert [s.recv() for _ in frames] == [(t, bytearray(x)) for t, x in frames]


@pytest.mark.parametrize("token", [TOKEN, None])
def test_buffered_recv_joins_frames_split_across_segments(token):
    """Frames cut at every kind of place (in the header, payload, MAC), with pauses
    between the pieces: the receiver waits for the rest."""
    rng = np.random.default_rng(seed_for("protocol-split", 41))
    a, p, s = _sender_and_receiver(token)
    frames = [(P.ACK, bytes(rng.integers(0, 256, int(k), dtype=np.uint8)))
              for k in rng.integers(0, 3 * P.RECV_BUFFER, 12)] + [(P.HEARTBEAT, b"")] * 5
    wire = _frames(p, frames)
    cuts = sorted(set(rng.integers(1, len(wire), 60).tolist()) | {1, 2, 19, 20, 21})

    def send():
        last = 0
        for c in cuts + [len(wire)]:
            a.sendall(wire[last:c])
            last = c
            time.sleep(0.001)
    t = threading.Thread(target=send)
    t.start()
    try:
        assert [s.recv() for _ in frames] == [(t_, bytearray(x)) for t_, x in frames]
    finally:
        t.join()


def test_buffered_recv_refuses_a_too_long_frame_before_its_payload_arrives():
    """The limit is checked on the header alone: no payload was sent, and recv does not
    wait for one (it would time out) nor allocate it."""
    a, p, s = _sender_and_receiver()
    s.limit = 1000
    a.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, P.PACK, 0, 0, 1001))
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):   # not socket.timeout
        s.recv()


@pytest.mark.parametrize("size, cut", [(100, 5), (100, P.HEADER.size), (100, P.HEADER.size + 50),
                                       (100, P.HEADER.size + 100 + 10),
                                       (3 * P.RECV_BUFFER, 2 * P.RECV_BUFFER)])
def test_buffered_recv_a_truncated_frame_is_a_closed_peer(size, cut):
    a, p, s = _sender_and_receiver()
    wire = _frames(p, [(P.ACK, b"x" * size)])

    def send():                                        # (more than a socket buffer holds)
        a.sendall(wire[:cut])
        a.close()
    t = threading.Thread(target=send)
    t.start()
    try:
        with pytest.raises(P.PeerClosed, match="mid-frame"):
            s.recv()
    finally:
        t.join()


def test_buffered_recv_timeouts_say_whether_a_frame_was_cut():
    """A timeout with nothing of a frame received leaves the channel usable
    (between_frames: the primary's ack reader waits again); one in the middle of a
    frame says so."""
    a, p, s = _sender_and_receiver()
    s.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        s.recv()
    assert s.between_frames
    wire = _frames(p, [(P.ACK, b'{"id": 1}'), (P.ACK, b'{"id": 2}')])
    first = len(wire) // 2
    a.sendall(wire[:first - 3])                       # frame 1 whole but its last 3 bytes
    with pytest.raises(socket.timeout):
        s.recv()
    assert not s.between_frames
    s2_a, p2, s2 = _sender_and_receiver()
    s2_a.sendall(wire)
    s2.sock.settimeout(0.05)
    assert s2.recv() == (P.ACK, bytearray(b'{"id": 1}'))
    assert s2.recv() == (P.ACK, bytearray(b'{"id": 2}'))
    with pytest.raises(socket.timeout):
        s2.recv()
    assert s2.between_frames
