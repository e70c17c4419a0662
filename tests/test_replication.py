"""Replication end to end, primary and standby on two hosts (network namespaces + veth).

What matters most: for a program guest, the primary's output + the standby's
output after a failover = the uninterrupted run's output, no byte lost or
repeated, whenever the primary is killed (kill -9 at random moments: the
seed is printed). Also: the standby's store holds the primary's checkpoints
with the same image digests and passes `verify`; a lost standby costs the
primary one warning line (or stops it with --replicate-required); a standby
restarted mid-run is re-synced from a full checkpoint; a cut link mid-run
fails over to the standby's last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from cli_helpers import ok
from test_cli_json import validate
from storage import Store
from program_helpers import cc, native  # noqa: F401  (cc: fixture)
from replication_helpers import hosts, wait_for  # noqa: F401  (hosts: fixture)

pytestmark = pytest.mark.kvm

PORT = 47120
TIMEOUT = 240

COUNTER = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    int spin = argc > 2 ? atoi(argv[2]) : 20000;   /* work per line */
    for (int i = 0; i < n; i++) {
        printf("line %d %08x\n", i, i * 2654435761u);
        fflush(stdout);
        if (i % 50 == 0) { fprintf(stderr, "err %d\n", i); }
        volatile unsigned long x = 0;
        for (int k = 0; k < spin; k++) x += k;
    }
    return 7;
}
"""


def digests(store: Path) -> dict[int, str]:
    with Store.open(str(store), readonly=True) as st:
        return {c.id: c.digest for c in st.checkpoints()}


def verify(store: Path) -> None:
    with Store.open(str(store), readonly=True) as st:
        rep = st.verify()
    assert not rep.problems, f"{store}: {rep.problems[:5]}"


def program_err(text: bytes) -> bytes:
    """The program's own stderr lines (snapctl's and the standby's are theirs)."""
    return b"".join(line for line in text.splitlines(keepends=True) if line.startswith(b"err "))


def start_standby(h, tmp: Path, name: str, *extra) -> tuple:
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    p = h.spawn(h.b, ["standby", "--listen", f"{h.b_addr}:{PORT}", "--store", tmp / f"{name}.snap", *extra],
                out, err)
    wait_for(err, "listening on")
    return p, out, err


def token(tmp: Path) -> Path:
    t = tmp / "token"
    t.write_bytes(os.urandom(24).hex().encode())
    t.chmod(0o600)
    return t


def test_run_replicates_every_checkpoint(hosts, tmp_path):
    h = hosts
    tok = token(tmp_path)
    sb, sb_out, sb_err = start_standby(h, tmp_path, "standby", "--token-file", tok, "--json")
    pr = h.spawn(h.a, ["run", "--guest", "stamp", "--checkpoints", "8", "--every-steps", "20000",
                       "--store", tmp_path / "primary.snap", "--replicate", f"{h.b_addr}:{PORT}",
                       "--token-file", tok], tmp_path / "p.out", tmp_path / "p.err")
    assert pr.wait(TIMEOUT) == 0, (tmp_path / "p.err").read_text()
    assert sb.wait(TIMEOUT) == 0, sb_err.read_text()
    err = sb_err.read_text()
    summary = json.loads(err[err.index("{"):])
    validate("standby", summary)          # the documented schema (snapctl/schemas/cli.json)
    assert summary["outcome"] == "finished" and summary["count"] == 9
    want = digests(tmp_path / "primary.snap")
    assert digests(tmp_path / "standby.snap") == want and len(want) == 9
    for s in ("primary", "standby"):
        ok("verify", store=tmp_path / f"{s}.snap")


def test_wrong_token_is_refused_and_the_primary_goes_on(hosts, tmp_path):
    h = hosts
    sb, _, sb_err = start_standby(h, tmp_path, "standby", "--token-file", token(tmp_path))
    other = tmp_path / "other"
    other.write_text("a-different-token-of-enough-length")
    pr = h.spawn(h.a, ["run", "--guest", "stamp", "--checkpoints", "3", "--every-steps", "20000",
                       "--store", tmp_path / "primary.snap", "--replicate", f"{h.b_addr}:{PORT}",
                       "--token-file", other], tmp_path / "p.out", tmp_path / "p.err")
    assert pr.wait(TIMEOUT) == 0
    perr = (tmp_path / "p.err").read_text()
    assert perr.count("replication lost") == 1 and "authentication failed" in perr, perr
    wait_for(sb_err, "refused peer")   # the primary hung up on it: the standby's HELLO did not verify
    assert sb.poll() is None   # still waiting for its real primary
    assert not (tmp_path / "standby.snap").exists()


def _program_trial(h, tmp: Path, exe: Path, n: int, kill_at: int | None, tag: str, want_out: bytes,
                   want_err: bytes) -> str:
    sb, sb_out, sb_err = start_standby(h, tmp, f"standby-{tag}", "--failover-timeout", "1500")
    p_out, p_err = tmp / f"p-{tag}.out", tmp / f"p-{tag}.err"
    pr = h.spawn(h.a, ["run", "--program", exe, "--every-syscalls", "40", "--store", tmp / f"primary-{tag}.snap",
                       "--replicate", f"{h.b_addr}:{PORT}", "--", str(n)], p_out, p_err)
    if kill_at is not None:
        # a moment inside the run: once the released output reaches line ``kill_at``
        wait_for(p_out, f"line {int(kill_at)} ", timeout=TIMEOUT)
        pr.send_signal(signal.SIGKILL)
    code = pr.wait(TIMEOUT)
    sb_code = sb.wait(TIMEOUT)
    log = sb_err.read_text(errors="replace")
    outcome = "failover" if "failover:" in log else "finished"
    assert sb_code == (7 if outcome == "failover" else 0), log
    if kill_at is None:
        assert code == 7
    p_bytes, s_bytes = p_out.read_bytes(), sb_out.read_bytes()
    got_err = program_err(p_err.read_bytes()) + program_err(sb_err.read_bytes())
    # exact: no byte lost, none repeated, whatever the kill moment (docs/replication.md, output commit)
    assert p_bytes + s_bytes == want_out, (
        f"{tag}: stdout differs: primary {len(p_bytes)} + standby {len(s_bytes)} bytes, want {len(want_out)}"
        f" (primary's a prefix: {want_out.startswith(p_bytes)}, standby's a suffix: {want_out.endswith(s_bytes)}); {log}")
    assert got_err == want_err, f"{tag}: stderr differs; {log}"
    verify(tmp / f"standby-{tag}.snap")
    verify(tmp / f"primary-{tag}.snap")
    pd, sd = digests(tmp / f"primary-{tag}.snap"), digests(tmp / f"standby-{tag}.snap")
    common = [c for c in pd if c in sd and c <= max(pd)]
    if outcome == "finished":
        assert pd == sd
    else:   # the standby has the primary's checkpoints up to the failover point, then its own
        resumed = int(log.split("resumed from checkpoint ")[1].split()[0]) if "resumed from" in log else max(sd)
        assert resumed in pd and all(pd[c] == sd[c] for c in common if c <= resumed), log
    return outcome


def test_program_output_commit_kill_primary_at_random_moments(hosts, tmp_path, cc):
    """kill -9 the primary at 20 random moments: primary's + standby's output is the
    uninterrupted run's, every time -- no byte lost, repeated or reordered."""
    exe = cc("counter", COUNTER)
    n = 1500
    nat = native([exe, str(n)])
    assert nat.code == 7
    seed = int(os.environ.get("SNAPCTL_TEST_SEED", random.randrange(1 << 30)))
    print(f"replication kill seed: {seed} (SNAPCTL_TEST_SEED={seed} repeats it)")
    rng = random.Random(seed)
    outcomes = []
    for i in range(20):
        kill_at = rng.randrange(0, n - 300)   # output is released per acknowledged checkpoint
        print(f"trial {i}: kill -9 once the primary has printed line {kill_at}")
        outcomes.append(_program_trial(hosts, tmp_path, exe, n, kill_at, str(i), nat.out, nat.err))
    print("outcomes:", outcomes)
    # a kill after the program's exit is a fair trial too, but most must land mid-run
    assert outcomes.count("failover") >= 10, outcomes


def test_program_uninterrupted_output_is_exact(hosts, tmp_path, cc):
    exe = cc("counter", COUNTER)
    nat = native([exe, "300"])
    assert _program_trial(hosts, tmp_path, exe, 300, None, "whole", nat.out, nat.err) == "finished"


def test_kill_standby_primary_goes_on_or_stops_when_required(hosts, tmp_path, cc):
    h = hosts
    exe = cc("counter", COUNTER)
    # ~ms of work a line, so the program is surely still running when the standby dies (with
    # 20000 it could finish, every checkpoint acknowledged, between "line 50" and the kill)
    args = ["600", "10000000"]
    nat = native([exe, *args])
    for required in (False, True):
        tag = "req" if required else "opt"
        sb, _, _ = start_standby(h, tmp_path, f"standby-{tag}")
        p_out, p_err = tmp_path / f"p-{tag}.out", tmp_path / f"p-{tag}.err"
        pr = h.spawn(h.a, ["run", "--program", exe, "--every-syscalls", "40", "--store",
                           tmp_path / f"primary-{tag}.snap", "--replicate", f"{h.b_addr}:{PORT}",
                           *(["--replicate-required"] if required else []), "--", *args], p_out, p_err)
        wait_for(p_out, "line 50", timeout=TIMEOUT)
        sb.send_signal(signal.SIGKILL)
        sb.wait(30)
        code = pr.wait(TIMEOUT)
        err = p_err.read_text(errors="replace")
        assert err.count("replication lost") == 1, err
        if required:
            assert code == 4, err
            out = p_out.read_bytes()
            assert nat.out.startswith(out) and len(out) < len(nat.out)   # only acknowledged output
        else:
            assert code == 7, err
            assert p_out.read_bytes() == nat.out
        ok("verify", store=tmp_path / f"primary-{tag}.snap")


def test_restarted_standby_resyncs_from_a_full_checkpoint(hosts, tmp_path):
    h = hosts
    sb1, _, _ = start_standby(h, tmp_path, "standby")
    pr = h.spawn(h.a, ["run", "--guest", "stamp", "--checkpoints", "60", "--interval", "100",
                       "--store", tmp_path / "primary.snap", "--replicate", f"{h.b_addr}:{PORT}"],
                 tmp_path / "p.out", tmp_path / "p.err")
    wait_for(tmp_path / "standby.err", "connected")
    time.sleep(1.5)
    sb1.send_signal(signal.SIGKILL)
    sb1.wait(30)
    sb2 = h.spawn(h.b, ["standby", "--listen", f"{h.b_addr}:{PORT}", "--store", tmp_path / "standby.snap",
                        "--json"], tmp_path / "sb2.out", tmp_path / "sb2.err")
    assert pr.wait(TIMEOUT) == 0, (tmp_path / "p.err").read_text()
    assert sb2.wait(TIMEOUT) == 0, (tmp_path / "sb2.err").read_text()
    perr = (tmp_path / "p.err").read_text()
    assert "re-syncing" in perr, perr
    ok("verify", store=tmp_path / "standby.snap")
    pd = digests(tmp_path / "primary.snap")
    sd = list(ok("list", "--json", store=tmp_path / "standby.snap").json())
    last = max(pd)
    # the standby's newest checkpoint is the primary's last, with the same image
    assert sd[-1]["digest"] == pd[last]
    assert json.loads((tmp_path / "sb2.err").read_text()[(tmp_path / "sb2.err").read_text().index("{"):])[
        "primary_checkpoints"][-1] == last


def test_cut_link_mid_run_fails_over(hosts, tmp_path):
    """Cut the veth link while checkpoints of ~2000 dirty pages are in flight: the standby
    rolls back the partial one and resumes from its last complete checkpoint."""
    h = hosts
    seed = int(os.environ.get("SNAPCTL_TEST_SEED", random.randrange(1 << 30)))
    delay = random.Random(seed).uniform(0.2, 1.5)
    print(f"cut-link seed {seed}: cut {delay:.3f} s after the standby connected")
    sb, _, sb_err = start_standby(h, tmp_path, "standby")
    pr = h.spawn(h.a, ["run", "--guest", "fill", "--mem", "64M", "--checkpoints", "40", "--interval", "50",
                       "--store", tmp_path / "primary.snap", "--replicate", f"{h.b_addr}:{PORT}"],
                 tmp_path / "p.out", tmp_path / "p.err")
    wait_for(sb_err, "connected", timeout=TIMEOUT)
    time.sleep(delay)
    h.cut()
    assert sb.wait(TIMEOUT) == 0, sb_err.read_text()
    assert pr.wait(TIMEOUT) == 0, (tmp_path / "p.err").read_text()
    log = sb_err.read_text()
    assert "failover: resumed from checkpoint" in log or "nothing left to run" in log, log
    assert "replication lost" in (tmp_path / "p.err").read_text()
    ok("verify", store=tmp_path / "standby.snap")
    ok("verify", store=tmp_path / "primary.snap")
    pd, sd = digests(tmp_path / "primary.snap"), digests(tmp_path / "standby.snap")
    resumed = int(log.split("checkpoint ")[1].split()[0]) if "resumed from" in log else max(sd)
    assert all(sd[c] == pd[c] for c in range(resumed + 1)), log
    assert len(sd) == 41   # its own checkpoints complete the schedule


def test_restore_replicates_and_the_standby_finishes_the_schedule(hosts, tmp_path):
    """`restore ID --replicate`: the standby starts from a full copy of the first new
    checkpoint; the primary killed after a few, the standby takes the rest of the schedule."""
    h = hosts
    ok("run", "--guest", "stamp", "--checkpoints", "4", "--every-steps", "20000", store=tmp_path / "primary.snap")
    sb, _, sb_err = start_standby(h, tmp_path, "standby", "--json")
    pr = h.spawn(h.a, ["restore", "2", "--checkpoints", "60", "--every-steps", "20000",
                       "--store", tmp_path / "primary.snap", "--replicate", f"{h.b_addr}:{PORT}"],
                 tmp_path / "p.out", tmp_path / "p.err")
    wait_for(sb_err, "connected", timeout=TIMEOUT)
    end = time.monotonic() + TIMEOUT
    while len(digests(tmp_path / "primary.snap")) < 5 + 5 and time.monotonic() < end:
        time.sleep(0.1)
    pr.send_signal(signal.SIGKILL)
    pr.wait(30)
    assert sb.wait(TIMEOUT) == 0, sb_err.read_text()
    log = sb_err.read_text()
    res = json.loads(log[log.index("{"):])
    assert res["outcome"] == "failover", log
    verify(tmp_path / "standby.snap")
    pd = digests(tmp_path / "primary.snap")
    with Store.open(str(tmp_path / "standby.snap"), readonly=True) as st:
        cks = st.checkpoints()
        replicated = [c for c in cks if "replica_of" in c.meta]
        assert replicated and all(c.digest == pd[c.meta["replica_of"]] for c in replicated)
        # the primary took the first ones, the standby the rest of the 60
        assert res["run"]["count"] == 60 - len(replicated)
        assert len(cks) == 60


def test_program_standby_restarted_then_primary_killed_output_is_exact(hosts, tmp_path, cc):
    """The releaser follows a re-sync: standby 1 killed mid-run (the primary writes the held
    output and goes on), standby 2 started (re-synced from a full checkpoint, the releaser
    attaches to the new session), then the primary killed: primary's + standby 2's output
    is still the run's, exactly."""
    h = hosts
    exe = cc("counter", COUNTER)
    n = 12000   # long enough for a standby to be restarted mid-run
    nat = native([exe, str(n)])
    sb1, _, _ = start_standby(h, tmp_path, "standby1")
    p_out, p_err = tmp_path / "p.out", tmp_path / "p.err"
    pr = h.spawn(h.a, ["run", "--program", exe, "--every-syscalls", "40", "--store", tmp_path / "primary.snap",
                       "--replicate", f"{h.b_addr}:{PORT}", "--", str(n)], p_out, p_err)
    wait_for(p_out, "line 100 ", timeout=TIMEOUT)
    sb1.send_signal(signal.SIGKILL)
    sb1.wait(30)
    sb2, sb2_out, sb2_err = start_standby(h, tmp_path, "standby2", "--failover-timeout", "1500")
    wait_for(p_err, "re-syncing", timeout=TIMEOUT)
    text = p_out.read_text()
    last = int(text.strip().splitlines()[-1].split()[1])
    wait_for(p_out, f"line {last + 100} ", timeout=TIMEOUT)
    pr.send_signal(signal.SIGKILL)
    pr.wait(30)
    assert sb2.wait(TIMEOUT) == 7, sb2_err.read_text()
    log = sb2_err.read_text(errors="replace")
    assert "failover: resumed from checkpoint" in log, log
    assert p_out.read_bytes() + sb2_out.read_bytes() == nat.out, log
    assert program_err(p_err.read_bytes()) + program_err(sb2_err.read_bytes()) == nat.err, log
    verify(tmp_path / "standby2.snap")
