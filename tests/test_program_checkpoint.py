"""Checkpoints of a program guest: schedules, restore, replay, time travel.

The reference for every assertion is outside the code under test: a native
run of the same binary (full stdout/stderr/exit status), the program's own
printed values, gdb, and hand-made edits of the store for the negative replay.
Random choices print their seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("program_helpers")   # before its import: it is also a plugin (fixtures)

from cli_helpers import ok, snapctl  # noqa: E402
from program_helpers import (  # noqa: E402
    checkpoints,
    native,
    output,
    program_stderr,
    read_state,
    run_program,
    seeded,
    show,
    stored_output,
    tamper_state,
)

pytest_plugins = ("program_helpers",)     # the cc and busybox fixtures

pytestmark = pytest.mark.kvm

PROGRESS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    unsigned long long h = 1469598103934665603ULL;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < 1000; j++) h = (h ^ (unsigned)(i * 31 + j)) * 1099511628211ULL;
        char b[96];
        int len = snprintf(b, sizeof b, "line %d %016llx\n", i, h);
        write(1, b, len);
        if (i % 7 == 3) {
            len = snprintf(b, sizeof b, "tick %d\n", i);
            write(2, b, len);
        }
    }
    return 5;
}
"""


def _ids(cks, trigger=None):
    return [c["id"] for c in cks if trigger is None or c["trigger"] == trigger]


def _restore(store: Path, ckpt, *extra):
    return snapctl("restore", ckpt, *extra, "--store", store)


# -- 6. schedules ----------------------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("every", [1, 5])
def test_every_syscalls_checkpoints_at_multiples_and_exit(cc, tmp_path, every):
    prog = cc("progress", PROGRESS_C)
    nat = native([prog, "12"])
    store = tmp_path / "s.db"
    r = run_program(prog, "12", root=prog.parent, mem="64M", store=store, opts=("--every-syscalls", str(every)))
    assert r.code == nat.code == 5, r.err
    assert r.raw == nat.out
    cks = checkpoints(store, cli=True)
    assert [{k: c[k] for k in ("id", "parent", "step", "trigger")} for c in cks] == checkpoints(store)
    assert cks[0]["id"] == 0 and cks[0]["trigger"] == "base" and cks[0]["step"] == 0 and cks[0]["parent"] is None
    assert cks[-1]["trigger"] == "exit"
    total = cks[-1]["step"]                                  # the exit: every system call made
    middle = cks[1:-1]
    assert all(c["trigger"] == "sync" for c in middle)
    # the model: one checkpoint after every `every`-th system call, the last one before exit_group
    assert [c["step"] for c in middle] == list(range(every, total, every))
    assert [c["parent"] for c in cks[1:]] == [c["id"] for c in cks[:-1]]
    # show agrees with list, and its program view counts the same system calls
    mid = middle[len(middle) // 2]
    s = show(store, mid["id"])
    assert s["step"] == mid["step"] == s["program"]["syscalls"] and s["program"]["exited"] is False
    # checkpoint 0 holds the program before its first instruction: rip is the ELF entry point
    if every == 1:
        hdr = prog.read_bytes()[:64]
        assert hdr[:4] == b"\x7fELF" and struct.unpack_from("<H", hdr, 16)[0] == 2    # ET_EXEC: no load bias
        base = show(store, 0)
        assert int(base["vcpus"][0]["rip"], 16) == struct.unpack_from("<Q", hdr, 24)[0]
        assert base["program"]["syscalls"] == 0 and base["program"]["output_bytes"] == {"stdout": 0, "stderr": 0}


@pytest.mark.kvm
def test_checkpoints_limit_stops_early_and_the_store_resumes(cc, tmp_path):
    prog = cc("progress", PROGRESS_C)
    nat = native([prog, "30"])
    store = tmp_path / "s.db"
    r = run_program(prog, "30", root=prog.parent, mem="64M", store=store,
                    opts=("--every-syscalls", "4", "--checkpoints", "3"))
    assert r.code == 0, r.err
    assert nat.out.startswith(r.raw) and len(r.raw) < len(nat.out)
    cks = checkpoints(store)
    assert [c["trigger"] for c in cks] == ["base", "sync", "sync", "sync"]
    assert [c["step"] for c in cks] == [0, 4, 8, 12]
    assert show(store, 3)["program"]["exited"] is False
    ok("verify", store=store)
    # --steps: exactly 5 more system calls, one checkpoint, still resumable
    part = _restore(store, 3, "--steps", "5")
    assert part.code == 0, part.err
    new = [c for c in checkpoints(store) if c["parent"] == 3]
    assert len(new) == 1 and new[0]["step"] == 12 + 5, new
    assert nat.out.startswith(output(store, 3) + part.raw)
    rest = _restore(store, new[0]["id"])
    assert rest.code == nat.code == 5, rest.err
    assert output(store, new[0]["id"]) + rest.raw == nat.out
    assert output(store, 3) + part.raw + rest.raw == nat.out
    assert stored_output(store, 3, stderr=True) + (program_stderr(part.err) + program_stderr(rest.err)).encode() == nat.err


# -- 7. restore == the uninterrupted run -----------------------------------------------------

def _check_restores(store: Path, nat, cands: list[int], rng, k: int = 2, replay_branch: bool = False) -> None:
    """Restore ``k`` random checkpoints of ``cands``: what the program had written by then
    (``output``) followed by what the restore writes is the native run's, and so is the exit
    status. The first one is restored twice: the same bytes both times."""
    picks = sorted(rng.sample(cands, min(k, len(cands))))
    print(f"restoring from checkpoints {picks}")
    results = {}
    for c in picks:
        before_out, before_err = output(store, c), stored_output(store, c, stderr=True)
        r = _restore(store, c)
        assert r.code == nat.code, f"restore {c}: exit {r.code}, native {nat.code}: {r.err}"
        assert before_out + r.raw == nat.out, f"restore {c}: output {c} + restore stdout != native stdout"
        assert before_err + program_stderr(r.err).encode() == nat.err, f"restore {c}: stderr differs"
        results[c] = r
        if c == picks[0]:   # the restore's exit checkpoint: its output is the whole run's, along the branch
            end = checkpoints(store)[-1]
            assert end["trigger"] == "exit"
            assert output(store, end["id"]) == nat.out
            if replay_branch:   # the restore's branch replays like the original recording
                rep = _replay(store, c, end["id"])
                assert rep.code == 0 and ": match" in rep.out, rep.out + rep.err
    again, first = _restore(store, picks[0]), results[picks[0]]
    assert (again.code, again.raw, program_stderr(again.err)) == (first.code, first.raw, program_stderr(first.err))


@pytest.mark.kvm
def test_restore_busybox_sort_from_middle_checkpoints_equals_native(busybox, tmp_path):
    rng = seeded("sort input and checkpoints")
    root = tmp_path / "root"
    root.mkdir()
    lines = [f"{rng.randrange(10**6):06d} {rng.choice(['x', 'yy', 'zzz'])}{i}" for i in range(3000)]
    (root / "data.txt").write_text("\n".join(lines) + "\n")           # ~40 KB
    args = ["sort", "-r", "data.txt"]
    nat = native([busybox, *args], cwd=root)
    assert nat.code == 0
    store = tmp_path / "s.db"
    r = run_program(busybox, *args, root=root, mem="64M", store=store, opts=("--every-syscalls", "2"))
    assert r.code == 0 and r.raw == nat.out, r.err
    cks = checkpoints(store)
    sync = _ids(cks, "sync")
    assert len(sync) >= 5, cks
    _check_restores(store, nat, sync[1:], rng)


@pytest.mark.kvm
def test_restore_busybox_awk_many_lines_equals_native(busybox, tmp_path):
    rng = seeded("awk checkpoints")
    root = tmp_path / "root"
    root.mkdir()
    args = ["awk", 'BEGIN { for (i = 0; i < 1000; i++) { s = s + i * i % 97; print i, s, substr("abcdefghij", i % 10 + 1) } }']
    nat = native([busybox, *args], cwd=root)
    assert nat.code == 0 and len(nat.out) > 8000
    store = tmp_path / "s.db"
    r = run_program(busybox, *args, root=root, mem="64M", store=store, opts=("--every-syscalls", "50"))
    assert r.code == 0 and r.raw == nat.out, r.err
    sync = _ids(checkpoints(store), "sync")
    assert len(sync) >= 8, sync      # busybox awk writes each line: a thousand system calls
    # checkpoints in the middle of the output: awk's start-up takes the first few system calls
    _check_restores(store, nat, sync[len(sync) // 3: -1], rng)


@pytest.mark.kvm
def test_restore_c_program_from_middle_checkpoints_equals_native(cc, tmp_path):
    rng = seeded("C checkpoints")
    prog = cc("progress", PROGRESS_C)
    nat = native([prog, "40"])
    assert nat.code == 5 and nat.err
    store = tmp_path / "s.db"
    r = run_program(prog, "40", root=prog.parent, mem="64M", store=store, opts=("--every-syscalls", "3"))
    assert r.code == 5 and r.raw == nat.out, r.err
    sync = _ids(checkpoints(store), "sync")
    _check_restores(store, nat, sync[len(sync) // 5:], rng, k=3, replay_branch=True)


@pytest.mark.kvm
def test_lazy_restore_of_a_program_equals_native_and_eager(cc, tmp_path):
    """restore --lazy of a program guest: its memory is served through userfaultfd while it
    runs (the driver's reads of system call arguments are faults too); its output after the
    checkpoint is the native run's and the eager restore's, and the branch replays lazily."""
    from storage.lazy import probe

    if probe():
        pytest.skip(f"lazy restore unavailable here: {probe()}")
    rng = seeded("lazy program checkpoint")
    prog = cc("progress", PROGRESS_C)
    nat = native([prog, "40"])
    store = tmp_path / "s.db"
    r = run_program(prog, "40", root=prog.parent, mem="64M", store=store, opts=("--every-syscalls", "3"))
    assert r.code == 5 and r.raw == nat.out, r.err
    sync = _ids(checkpoints(store), "sync")
    c = rng.choice(sync[len(sync) // 4: -1])
    print(f"restoring checkpoint {c} lazily")
    before_out, before_err = output(store, c), stored_output(store, c, stderr=True)
    lazy = _restore(store, c, "--lazy")
    eager = _restore(store, c)
    for res in (lazy, eager):
        assert res.code == nat.code, res.err
        assert before_out + res.raw == nat.out
        assert before_err + program_stderr(res.err).encode() == nat.err
    lazy_json = snapctl("restore", c, "--lazy", "--json", "--store", store)
    assert lazy_json.code == nat.code, lazy_json.err
    ends = [k for k in checkpoints(store) if k["trigger"] == "exit"]
    assert len(ends) >= 3 and all(output(store, k["id"]) == nat.out for k in ends)
    rep = snapctl("replay", c, "--lazy", "--to", ends[-1]["id"], "--store", store)
    assert rep.code == 0 and ": match" in rep.out, rep.out + rep.err


STDIN_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    unsigned char buf[300];
    unsigned long long h = 1469598103934665603ULL, total = 0;
    ssize_t n;
    int chunks = 0;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < n; i++) h = (h ^ buf[i]) * 1099511628211ULL;
        total += n;
        char line[96];
        int len = snprintf(line, sizeof line, "chunk %d %zd %016llx\n", chunks++, n, h);
        write(1, line, len);
    }
    printf("total %llu\n", total);
    return chunks % 100;
}
"""


@pytest.mark.kvm
def test_restore_continues_reading_stdin_where_the_checkpoint_was(cc, tmp_path):
    rng = seeded("stdin data and checkpoint")
    prog = cc("stdin_reader", STDIN_C)
    data = tmp_path / "input.bin"
    data.write_bytes(bytes(rng.randrange(256) for _ in range(30000)))
    nat = native([prog], stdin=data)
    assert b"total 30000\n" in nat.out
    store = tmp_path / "s.db"
    r = run_program(prog, root=prog.parent, stdin=data, mem="64M", store=store, opts=("--every-syscalls", "16"))
    assert r.code == nat.code and r.raw == nat.out, r.err
    sync = _ids(checkpoints(store), "sync")
    c = rng.choice(sync[2:-1])
    print(f"restoring {c} of {sync}")
    rest = _restore(store, c)
    assert rest.code == nat.code, rest.err
    assert output(store, c) + rest.raw == nat.out


# -- 8. replay -------------------------------------------------------------------------------

WORLD_C = r"""
#include <stdio.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>
int main(void) {
    int fd = open("/data.bin", O_RDONLY);
    int ur = open("/dev/urandom", O_RDONLY), null = open("/dev/null", O_WRONLY);
    if (fd < 0 || ur < 0 || null < 0) { perror("open"); return 1; }
    for (int i = 0; i < 8; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        unsigned char r[8], d[64], u[4];
        getrandom(r, sizeof r, 0);
        ssize_t n = read(fd, d, sizeof d);
        unsigned s = 0;
        for (ssize_t j = 0; j < n; j++) s = s * 33 + d[j];
        ssize_t un = read(ur, u, sizeof u), wn = write(null, d, 16);
        printf("%d clock %lld.%09ld random %02x%02x%02x%02x%02x%02x%02x%02x file %zd %08x urandom %zd %02x%02x%02x%02x "
               "null %zd\n", i, (long long)ts.tv_sec, ts.tv_nsec, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], n, s,
               un, u[0], u[1], u[2], u[3], wn);
        fflush(stdout);
    }
    close(fd);
    return 0;
}
"""


@pytest.fixture(scope="module")
def world_run(cc, tmp_path_factory):
    """WORLD_C run with a checkpoint after every system call: (store, checkpoints, stdout).
    Shared by the tests below, which only add branches or copy the store."""
    tmp_path = tmp_path_factory.mktemp("world")
    prog = cc("world", WORLD_C)
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(700)
    (root / "data.bin").write_bytes(data)
    store = tmp_path / "s.db"
    r = run_program(prog, root=root, mem="64M", store=store, opts=("--every-syscalls", "1"))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 8
    for i, line in enumerate(lines):      # the file's bytes, hashed the program's way
        chunk = data[64 * i:64 * i + 64]
        h = 0
        for byte in chunk:
            h = (h * 33 + byte) & 0xFFFFFFFF
        assert f" file {len(chunk)} {h:08x} urandom 4 " in line and line.endswith(" null 16"), line
    return store, checkpoints(store), r.raw


def _replay(store, a, b=None):
    args = ["replay", a] + (["--to", b] if b is not None else [])
    return snapctl(*args, "--store", store)


@pytest.mark.kvm
def test_replay_of_clock_random_and_file_reads_matches(world_run):
    store, cks, _ = world_run
    rng = seeded("replay picks")
    sync = _ids(cks, "sync")
    # every checkpoint whose interval consumed an outside-world result, plus random others
    with_log = [c for c in sync[1:] if _has_state(store, c, "stream/log")]
    assert len(with_log) >= 16, "expected clock_gettime and getrandom results in the log"
    picks = sorted(set(rng.sample(with_log, 3)))
    print(f"replaying {picks}")
    parent = {c["id"]: c["parent"] for c in cks}
    for c in picks:
        r = _replay(store, parent[c], c)
        assert r.code == 0, f"replay {parent[c]} -> {c}: {r.out} {r.err}"
        assert ": match" in r.out and "memory (every page)" in r.out
    # across several intervals, and to the exit
    a, b = sorted(rng.sample(sync[1:], 2))
    r = _replay(store, a, b)
    assert r.code == 0 and ": match" in r.out, r.out + r.err
    r = _replay(store, sync[1], cks[-1]["id"])
    assert r.code == 0 and "exit target" in r.out and ": match" in r.out, r.out + r.err
    r = _replay(store, sync[-1])                            # the next one is the exit
    assert r.code == 0 and "exit target" in r.out, r.out + r.err


def _has_state(store, ckpt, name):
    import sqlite3
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT 1 FROM states WHERE ckpt = ? AND name = ?", (ckpt, name)).fetchone() is not None


@pytest.mark.kvm
def test_replay_detects_a_changed_recorded_clock_value(world_run, tmp_path):
    store, cks, _ = world_run
    # find a checkpoint whose interval consumed a clock_gettime result (system call 228)
    target = None
    for c in _ids(cks, "sync")[1:]:
        if _has_state(store, c, "stream/log"):
            entries = [json.loads(line) for line in read_state(store, c, "stream/log").splitlines()]
            if any(e[1] == 228 for e in entries):
                target, log = c, entries
                break
    assert target is not None, "no clock_gettime in any recorded log"
    parent = {c["id"]: c["parent"] for c in cks}[target]
    assert _replay(store, parent, target).code == 0
    copy = tmp_path / "tampered.db"
    shutil.copyfile(store, copy)
    for e in log:
        if e[1] == 228:
            e[2]["ns"] += 1_000_000_007          # one second and a bit later
    blob = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in log)
    tamper_state(copy, target, "stream/log", blob)
    ok("verify", store=copy)                              # still a valid store ...
    # ... whose recording no longer reproduces: the program prints the clock and keeps it in memory
    later = cks[-1]["id"]
    for a, b in ((parent, target), (parent, later)):
        r = _replay(copy, a, b)
        assert r.code == 1, f"replay {a} -> {b} of the tampered store: exit {r.code}\n{r.out}{r.err}"
        assert "MISMATCH" in r.out
    assert _replay(store, parent, later).code == 0        # the original is untouched


APIC_C = r"""
#include <stdio.h>
#include <cpuid.h>
#include <unistd.h>
int main(void) {
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    printf("apic %u\n", b >> 24);
    fflush(stdout);
    for (int i = 0; i < 3; i++) write(1, "tick\n", 5);
    return 0;
}
"""


def _pinned(cpus: set[int]):
    """Run the next CLI calls with this affinity (the child inherits it); restores ours after."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)
    return cm()


@pytest.mark.kvm
def test_restore_and_replay_from_base_see_the_recorded_cpus_cpuid(cc, tmp_path):
    """Checkpoint 0 is before the program's first instruction, and libc's start-up runs CPUID,
    which this platform answers from the host CPU (docs/programs.md: leaf 1 carries the APIC
    id). Recorded on the *last* CPU we may use (not where an unpinned thread would usually
    start), a restore or replay from checkpoint 0 with every CPU available must still see
    what the recording saw: the program prints its APIC id, and glibc keeps leaf 1 in memory."""
    prog = cc("apic", APIC_C)
    cpus = sorted(os.sched_getaffinity(0))
    rec = cpus[-1]
    print(f"recording on CPU {rec} of {cpus}")
    store = tmp_path / "s.db"
    with _pinned({rec}):
        r = run_program(prog, root=prog.parent, mem="64M", store=store, opts=("--every-syscalls", "2"))
    assert r.code == 0 and r.out.startswith("apic ") and r.out.endswith("tick\n" * 3), r.err
    first_sync = _ids(checkpoints(store), "sync")[0]
    for attempt in range(2):
        rest = _restore(store, 0)
        assert rest.code == 0 and rest.raw == r.raw, f"restore 0 (attempt {attempt}): {rest.out!r} {rest.err}"
        rep = _replay(store, 0, first_sync)
        assert rep.code == 0, f"replay 0 -> {first_sync} (attempt {attempt}):\n{rep.out}{rep.err}"
    if len(cpus) > 1:
        # where the recorded CPU is not available, the replay says so (a mismatch is then possible)
        with _pinned({cpus[0]}):
            rep = _replay(store, 0, first_sync)
        assert rep.code in (0, 1), rep.err
        assert f"CPU {rec}" in rep.err and "cpuid" in rep.err, rep.err


# -- 9. interval checkpoints: async kicks ----------------------------------------------------

SPIN_C = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
volatile unsigned long long sink;
int main(void) {
    struct timespec ms = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 12; i++) {
        char b[32];
        write(1, b, snprintf(b, sizeof b, "before %d\n", i));
        nanosleep(&ms, 0);
    }
    unsigned long long x = 1;
    for (unsigned long i = 0; i < 700000000UL; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    sink = x;
    printf("after %llu\n", x);
    fflush(stdout);
    for (int i = 0; i < 5; i++) {
        char b[32];
        write(1, b, snprintf(b, sizeof b, "tail %d\n", i));
        nanosleep(&ms, 0);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def spin_run(cc, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("spin")
    prog = cc("spin", SPIN_C)
    nat = native([prog])
    store = tmp_path / "s.db"
    r = run_program(prog, root=prog.parent, mem="64M", store=store, opts=("--interval", "40"))
    assert r.code == 0, r.err
    assert r.raw == nat.out
    cks = checkpoints(store)
    print("triggers:", [(c["id"], c["step"], c["trigger"]) for c in cks])
    return store, cks


@pytest.mark.kvm
def test_interval_kicks_compute_and_replay_says_what_it_compared(spin_run):
    store, cks = spin_run
    by_id = {c["id"]: c for c in cks}
    asyncs = [c for c in cks if c["trigger"] == "async"]
    assert asyncs, "a second of computation without system calls under --interval 40 made no async checkpoint"
    first = asyncs[0]
    assert by_id[first["parent"]]["trigger"] in ("sync", "base")
    r = _replay(store, first["parent"], first["id"])
    assert r.code == 0, r.out + r.err
    assert "async target" in r.out and ": match" in r.out
    note = r.err.lower()
    assert "memory" in note and "not compared" in note, f"the note should say memory was not compared: {r.err}"
    assert "memory (every page)" not in r.out
    syncs = [c for c in cks if c["trigger"] == "sync" and by_id[c["parent"]]["trigger"] == "sync"]
    assert syncs, "no sync checkpoint between system calls"
    for c in syncs[:2] + syncs[-1:]:
        r = _replay(store, c["parent"], c["id"])
        assert r.code == 0 and ": match" in r.out and "memory (every page)" in r.out, r.out + r.err


@pytest.mark.kvm
def test_replay_between_two_async_checkpoints_matches(spin_run):
    """Two kicks in the same stretch of computation: nothing outside-world happened between them,
    so a replay from the first to the second has nothing to disagree about."""
    store, cks = spin_run
    by_id = {c["id"]: c for c in cks}
    pairs = [(by_id[c["parent"]], c) for c in cks if c["trigger"] == "async" and by_id[c["parent"]]["trigger"] == "async"]
    assert pairs, "expected consecutive async checkpoints during a second of computation"
    a, b = pairs[0]
    r = _replay(store, a["id"], b["id"])
    assert r.code == 0, f"replay {a['id']} -> {b['id']} (both async, step {a['step']}/{b['step']}):\n{r.out}{r.err}"


# -- 10. time travel: read, history, core ----------------------------------------------------

COUNTER_C = r"""
#include <stdio.h>
#include <unistd.h>
/* counter alone on its page: history of its page is history of counter */
__attribute__((aligned(4096))) int counter;
__attribute__((aligned(4096))) int fence;
__attribute__((noinline)) void step(int i) {
    counter += 3 + i % 4;
    char b[32];
    int n = snprintf(b, sizeof b, "%d\n", counter);
    write(1, b, n);
}
__attribute__((noinline)) void work(int n) {
    for (int i = 0; i < n; i++) step(i);
}
int main(void) {
    work(16);
    fence = 1;
    return 0;
}
"""


def _nm(prog) -> list[tuple[int, str]]:
    p = subprocess.run(["nm", "-n", str(prog)], capture_output=True, text=True, check=True)
    out = []
    for ln in p.stdout.splitlines():
        parts = ln.split()
        if len(parts) == 3:
            out.append((int(parts[0], 16), parts[2]))
    return out


@pytest.mark.kvm
@pytest.mark.parametrize("pie", [False, True], ids=["static", "static-pie"])
def test_read_history_and_core_follow_the_counter(cc, tmp_path, pie):
    """A static-pie program is loaded at a bias: symbols must be relocated the way the
    loader placed it (gdb, reading the core, is the independent judge)."""
    rng = seeded("time travel")
    prog = cc("counter", COUNTER_C, pie=pie)
    syms = _nm(prog)
    addr = {n: a for a, n in syms}["counter"]
    page = addr & ~0xFFF
    assert not [n for a, n in syms if page <= a < page + 4096 and n != "counter"], "counter shares its page"
    nat = native([prog])
    store = tmp_path / "s.db"
    r = run_program(prog, root=prog.parent, mem="64M", store=store, opts=("--every-syscalls", "1"))
    assert r.code == 0 and r.raw == nat.out, r.err
    cks = checkpoints(store)
    # the model: the counter at checkpoint k is the last value printed by then (0 before any)
    outs = {c["id"]: stored_output(store, c["id"]) for c in cks}
    model = {k: int(o.split()[-1]) if o else 0 for k, o in outs.items()}
    for k in rng.sample(sorted(outs), 1):                   # the model's source, through the CLI too
        assert output(store, k) == outs[k]
    # read: the value at randomly chosen checkpoints
    for k in sorted(rng.sample(sorted(model), 2)) + [cks[-1]["id"]]:
        got = ok("read", k, "counter", "--format", "raw", store=store).raw
        assert len(got) == 4 and int.from_bytes(got, "little") == model[k], f"checkpoint {k}"
    # history: checkpoint 0, then exactly the checkpoints whose counter differs from the parent's
    parent = {c["id"]: c["parent"] for c in cks}
    want = [0] + [c["id"] for c in cks[1:] if model[c["id"]] != model[parent[c["id"]]]]
    h = ok("history", "counter", "--json", store=store).json()
    va = int(h["va"], 0) if isinstance(h["va"], str) else h["va"]
    assert va & 0xFFF == 0 and (va == page if not pie else (va - page) % 0x1000 == 0)
    assert h["checkpoints"] == want and [v["checkpoint"] for v in h["versions"]] == want
    # core + gdb: inside step(), called from work(), from main(), with the counter's value
    inside = [k for k, o in outs.items() if o and len(o) < len(nat.out)]
    k = rng.choice(inside)
    core = tmp_path / f"core.{k}"
    ok("core", k, core, store=store)
    g = subprocess.run(["/usr/bin/gdb", "-nx", "-batch", "-ex", "bt", "-ex", "p counter", str(prog), str(core)],
                       capture_output=True, text=True, timeout=120)
    frames = [m.group(1) for m in re.finditer(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", g.stdout, re.M)]
    assert "step" in frames and "work" in frames and "main" in frames, g.stdout + g.stderr
    assert frames.index("step") < frames.index("work") < frames.index("main"), frames
    assert re.search(rf"^\$1 = {model[k]}$", g.stdout, re.M), f"checkpoint {k}: want counter {model[k]}\n{g.stdout}"
    if pie:     # the page history names is where gdb finds counter in the core
        g2 = subprocess.run(["/usr/bin/gdb", "-nx", "-batch", "-ex", "p/x &counter", str(prog), str(core)],
                            capture_output=True, text=True, timeout=120)
        m = re.search(r"^\$1 = (?:\([^)]*\) )?(0x[0-9a-f]+)", g2.stdout, re.M)
        assert m and int(m.group(1), 16) & ~0xFFF == va, g2.stdout + g2.stderr
