"""`snapctl run --program`: a user's unmodified x86-64 Linux program as the guest, end to end.

Every expectation comes from outside snapctl: the same binary run natively
on the host (busybox applets, C programs, /usr/bin/python3), the host's own
hash tools, the host clock, Python's errno table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("program_helpers")   # before its import: it is also a plugin (fixtures)

from cli_helpers import ok, snapctl  # noqa: E402
from program_helpers import (  # noqa: E402
    checkpoints,
    compile_c,
    native,
    output,
    program_stderr,
    run_program,
    show,
)

pytest_plugins = ("program_helpers",)     # the cc and busybox fixtures

pytestmark = pytest.mark.kvm


def _input_text(seed: int, lines: int = 400) -> bytes:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    out = []
    for i in range(lines):
        out.append(f"{rng.choice(words)} {rng.randrange(-500, 5000)} {rng.choice(words)}{i % 7}")
    return ("\n".join(out) + "\n").encode()


@pytest.fixture
def text_root(tmp_path: Path):
    """A --root directory holding input.txt (random words and numbers; the seed is printed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input.txt random seed {seed}")
    root = tmp_path / "root"
    root.mkdir()
    (root / "input.txt").write_bytes(_input_text(seed))
    return root


# -- 1. busybox applets ----------------------------------------------------------------------

#: applet argv (before the file name), expected native exit status
APPLETS = {
    "awk": (["awk", '{ s += $2; n[$1]++; print NR ": " $3 " " $2 * 3 } END { print "sum", s; for (k in n) c++; print c }'], 0),
    "sha256sum": (["sha256sum"], 0),
    "gzip": (["gzip", "-c", "-9"], 0),
    "sort": (["sort", "-k2,2n", "-k1,1"], 0),
    "sed": (["sed", "-e", "s/a/A/g", "-e", "3d", "-e", "/eta/s/[0-9]\\+/<&>/"], 0),
    "grep": (["grep", "-n", "theta"], 0),
    "grep-nomatch": (["grep", "no-such-word-anywhere"], 1),
    "wc": (["wc"], 0),
    "md5sum": (["md5sum"], 0),
    "od": (["od", "-A", "d", "-t", "x1"], 0),
}


@pytest.mark.kvm
@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("applet", sorted(APPLETS))
def test_busybox_applet_output_matches_native(busybox, text_root, tmp_path, applet, source):
    args, want_code = APPLETS[applet]
    if source == "file":
        args = [*args, "input.txt"]      # relative: the guest's cwd is its /, the native one's is the root dir
        stdin = None
    else:
        stdin = text_root / "input.txt"
    nat = native([busybox, *args], cwd=text_root, stdin=stdin or None)
    assert nat.code == want_code, f"native busybox {args} exited {nat.code}: {nat.err!r}"
    r = run_program(busybox, *args, root=text_root, stdin=stdin, mem="64M", store=tmp_path / "s.db")
    assert r.code == nat.code, f"guest exited {r.code}, native {nat.code}; stderr: {r.err}"
    assert r.raw == nat.out, f"{applet} ({source}): guest stdout differs from the native run"
    assert program_stderr(r.err) == nat.err.decode()
    data = (text_root / "input.txt").read_bytes()
    name = "input.txt" if source == "file" else "-"
    if applet == "sha256sum":      # and against the host's own hash
        assert r.raw == f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode()
    if applet == "md5sum":
        assert r.raw == f"{hashlib.md5(data).hexdigest()}  {name}\n".encode()
    if applet == "gzip":
        import gzip
        assert gzip.decompress(r.raw) == data
    if applet == "wc":
        assert r.raw.split()[:3] == [str(x).encode() for x in (data.count(b"\n"), len(data.split()), len(data))]


# -- 2. C programs ---------------------------------------------------------------------------

ARGV_ENV_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
extern char **environ;
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=<%s>\n", i, argv[i]);
    const char *a = getenv("A"), *b = getenv("SNAP_B");
    printf("A=<%s> SNAP_B=<%s>\n", a ? a : "(unset)", b ? b : "(unset)");
    int n = 0;
    for (char **e = environ; *e; e++) n++;
    printf("environ has %d entries\n", n);
    long s = 0;
    for (int i = 0; i < 100000; i++) s += (long)i * i % 7919;
    printf("sum=%ld\n", s);
    return argc == 4 ? 7 : 3;
}
"""


@pytest.mark.kvm
@pytest.mark.parametrize("pie", [False, True], ids=["static", "static-pie"])
def test_c_program_output_exit_argv_env_match_native(cc, tmp_path, pie):
    prog = cc("argv_env", ARGV_ENV_C, pie=pie)
    args = ["one", "two words", "--three=3"]
    env = {"A": "B", "SNAP_B": "x=y z"}
    nat = native([prog, *args], env=env)
    assert nat.code == 3 + 4 * (len(args) == 3)
    r = run_program(prog, *args, env=env, root=prog.parent, store=tmp_path / "s.db")
    assert r.code == nat.code == 7, r.err
    assert r.raw == nat.out
    assert b"A=<B> SNAP_B=<x=y z>" in r.raw and b"environ has 2 entries" in r.raw


CLOCK_RANDOM_C = r"""
#include <stdio.h>
#include <time.h>
#include <sys/random.h>
int main(void) {
    struct timespec rt, m1, m2;
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &m1);
    unsigned char buf[64];
    ssize_t n = getrandom(buf, sizeof buf, 0);
    int nonzero = 0;
    for (int i = 0; i < 64; i++) nonzero += buf[i] != 0;
    clock_gettime(CLOCK_MONOTONIC, &m2);
    long long d = (m2.tv_sec - m1.tv_sec) * 1000000000LL + (m2.tv_nsec - m1.tv_nsec);
    printf("realtime %lld.%09ld\n", (long long)rt.tv_sec, rt.tv_nsec);
    printf("getrandom %zd nonzero %d\n", n, nonzero);
    printf("monotonic_delta_nonnegative %d\n", d >= 0);
    printf("random ");
    for (int i = 0; i < 64; i++) printf("%02x", buf[i]);
    printf("\n");
    return 0;
}
"""


@pytest.mark.kvm
def test_c_program_clock_and_getrandom(cc, tmp_path):
    prog = cc("clock_random", CLOCK_RANDOM_C)
    before = time.time()
    r = run_program(prog, root=prog.parent, store=tmp_path / "s.db")
    after = time.time()
    assert r.code == 0, r.err
    lines = dict(ln.split(" ", 1) for ln in r.out.splitlines())
    t = float(lines["realtime"])
    assert before - 2 <= t <= after + 2, f"guest CLOCK_REALTIME {t} outside the host's [{before}, {after}]"
    n, _, nz = lines["getrandom"].split()
    assert n == "64" and int(nz) > 32    # 64 random bytes: P(more than half zero) is negligible
    assert lines["monotonic_delta_nonnegative"] == "1"
    r2 = run_program(prog, root=prog.parent, store=tmp_path / "s2.db")
    assert r2.code == 0
    assert dict(ln.split(" ", 1) for ln in r2.out.splitlines())["random"] != lines["random"]


MEMORY_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
static unsigned long long fold(const unsigned char *p, size_t n) {
    unsigned long long h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i += 61) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}
int main(void) {
    size_t big = 64u << 20;
    unsigned char *m = malloc(big);
    if (!m) { printf("malloc failed\n"); return 1; }
    for (size_t i = 0; i < big; i++) m[i] = (unsigned char)(i * 2654435761u >> 13);
    printf("malloc64 %llu\n", fold(m, big));
    free(m);
    size_t len = 1u << 20;
    unsigned char *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) { printf("mmap failed %d\n", errno); return 1; }
    printf("fresh_zero %d\n", a[0] == 0 && a[len - 1] == 0 && a[len / 2] == 0);
    for (size_t i = 0; i < len; i++) a[i] = (unsigned char)(i % 251);
    printf("mprotect %d\n", mprotect(a, len, PROT_READ));
    printf("mmap %llu\n", fold(a, len));
    printf("munmap_half %d\n", munmap(a + len / 2, len / 2));
    printf("first_half %llu\n", fold(a, len / 2));
    printf("munmap %d\n", munmap(a, len / 2));
    unsigned char *b = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(b, 0x5a, 3 * 4096);
    b = mremap(b, 3 * 4096, 64 * 4096, MREMAP_MAYMOVE);
    printf("mremap_kept %d %d\n", b != MAP_FAILED && b[3 * 4096 - 1] == 0x5a, b != MAP_FAILED && b[63 * 4096] == 0);
    return 0;
}
"""


@pytest.mark.kvm
def test_c_program_malloc_64mib_and_mmap_family_match_native(cc, tmp_path):
    prog = cc("memory", MEMORY_C)
    nat = native([prog])
    assert nat.code == 0, nat.out
    r = run_program(prog, root=prog.parent, store=tmp_path / "s.db")
    assert r.code == 0, r.err
    assert r.raw == nat.out


STDERR_C = r"""
#include <stdio.h>
#include <unistd.h>
#include <string.h>
int main(void) {
    for (int i = 0; i < 50; i++) {
        char b[64];
        int n = snprintf(b, sizeof b, "out %d\n", i);
        write(1, b, n);
        n = snprintf(b, sizeof b, "err %d %s\n", i, i % 2 ? "odd" : "even");
        write(2, b, n);
    }
    fprintf(stderr, "bytes \x01\x02\xff\n");
    return 0;
}
"""


@pytest.mark.kvm
def test_c_program_stderr_passes_through_separately(cc, tmp_path):
    prog = cc("stderr", STDERR_C)
    nat = native([prog])
    assert nat.code == 0
    store = tmp_path / "s.db"
    r = run_program(prog, root=prog.parent, store=store)
    assert r.code == 0, r.err
    assert r.raw == nat.out                                 # only the program's stdout on stdout
    assert b"err" not in r.raw
    # the program's stderr comes first, byte for byte; snapctl's own lines come after it
    last = checkpoints(store)[-1]["id"]
    assert output(store, last, stderr=True) == nat.err
    assert output(store, last) == nat.out
    assert program_stderr(r.err).encode(errors="replace") == nat.err.decode(errors="replace").encode(errors="replace")


# -- 3. a dynamically linked interpreter from the host ---------------------------------------

@pytest.mark.kvm
def test_python3_with_root_slash_prints_what_native_prints(tmp_path):
    py = "/usr/bin/python3"
    assert os.path.exists(py), f"{py} is missing"
    code = ("import hashlib, json; print(sum(i * i for i in range(10000)));"
            "print(hashlib.sha256(b'snapctl program guest').hexdigest());"
            "print(json.dumps({'k': [1, 2.5, None, 'x']}, sort_keys=True))")
    nat = native([py, "-c", code])
    assert nat.code == 0, nat.err
    r = run_program(py, "-c", code, root="/", store=tmp_path / "s.db")
    assert r.code == 0, r.err
    assert r.raw == nat.out


@pytest.mark.kvm
def test_python3_restores_and_replays_from_the_middle(tmp_path):
    """A dynamically linked program (ld.so, libc, libpython mapped from files the store
    snapshotted) continues from a middle checkpoint exactly as the native run goes on."""
    py = "/usr/bin/python3"
    code = ("import hashlib\n"
            "for i in range(30): print(i, hashlib.md5(str(i).encode()).hexdigest(), flush=True)\n"
            "raise SystemExit(9)")
    nat = native([py, "-c", code])
    assert nat.code == 9 and nat.out.count(b"\n") == 30, nat.err
    store = tmp_path / "s.db"
    r = run_program(py, "-c", code, root="/", store=store, opts=("--every-syscalls", "100"))
    assert r.code == 9 and r.raw == nat.out, r.err
    sync = [c["id"] for c in checkpoints(store) if c["trigger"] == "sync"]
    assert len(sync) >= 4, sync
    rng = random.Random(seed := int.from_bytes(os.urandom(4), "little"))
    print(f"checkpoint choice seed {seed}")
    c = rng.choice(sync[len(sync) // 2:])
    rest = snapctl("restore", c, "--store", store)
    assert rest.code == 9, rest.err
    assert output(store, c) + rest.raw == nat.out
    rep = snapctl("replay", c, "--store", store)
    assert rep.code == 0 and ": match" in rep.out, rep.out + rep.err


# -- 4. faults -------------------------------------------------------------------------------

FAULT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) int crash_here(volatile int *p) { return *p; }
int main(int argc, char **argv) {
    printf("before the fault\n");
    fflush(stdout);
    if (!strcmp(argv[1], "null")) return crash_here(0);
    if (!strcmp(argv[1], "trap")) __builtin_trap();
    if (!strcmp(argv[1], "abort")) abort();
    return 0;
}
"""

#: mode -> (signal number, name)
FAULTS = {"null": (11, "SIGSEGV"), "trap": (4, "SIGILL"), "abort": (6, "SIGABRT")}


@pytest.mark.kvm
@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_fault_ends_the_program_with_128_plus_signal(cc, tmp_path, mode):
    sig, name = FAULTS[mode]
    prog = cc("fault", FAULT_C)
    nat = native([prog, mode])
    assert nat.code == -sig, f"native run ended with {nat.code}"
    store = tmp_path / "s.db"
    r = run_program(prog, mode, root=prog.parent, store=store, opts=("--every-syscalls", "3"))
    assert r.code == 128 + sig, f"expected exit {128 + sig}, got {r.code}: {r.err}"
    assert r.raw == nat.out == b"before the fault\n"
    assert "Traceback" not in r.err
    if mode != "abort":
        mentions = [ln for ln in r.err.splitlines() if name in ln]
        assert len(mentions) == 1, f"expected one line naming {name}: {r.err}"
        if mode == "null":
            assert "0x0" in mentions[0] and "crash_here" in mentions[0], mentions[0]
    ok("verify", store=store)
    last = checkpoints(store)[-1]
    assert last["trigger"] == "exit"
    info = show(store, last["id"])["program"]
    assert info["exited"] is True
    assert info["exit_status"] == 128 + sig and info["signal"] == sig
    if mode == "null":
        # from the last checkpoint before the fault: a restore faults the same way, a replay matches
        before = [c for c in checkpoints(store) if c["trigger"] == "sync"][-1]["id"]
        rest = snapctl("restore", before, "--store", store)
        assert rest.code == 139 and rest.raw == nat.out[len(output(store, before)):], rest.err
        assert [ln for ln in rest.err.splitlines() if name in ln] == mentions
        rep = snapctl("replay", before, "--to", last["id"], "--store", store)
        assert rep.code == 0 and ": match" in rep.out, rep.out + rep.err


# -- 5. unsupported system calls -------------------------------------------------------------

FORK_C = r"""
#include <stdio.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
int main(void) {
    errno = 0;
    pid_t p = fork();
    int e = errno;
    printf("fork returned %d errno %d\n", (int)p, e);
    printf("still running after fork: %s\n", p == 0 ? "child?!" : "parent");
    return 0;
}
"""


def _json_tail(err: str) -> dict:
    start = err.find("{\n") if err.startswith("{") else err.rfind("\n{\n") + 1
    assert start >= 0 and err[start] == "{", f"no JSON summary on stderr: {err}"
    return json.loads(err[start:])


@pytest.mark.kvm
def test_fork_is_enosys_and_listed_as_unimplemented(cc, tmp_path):
    prog = cc("fork", FORK_C)
    r = run_program(prog, root=prog.parent, store=tmp_path / "s.db", opts=("--json",))
    assert r.code == 0, r.err
    assert r.out == f"fork returned -1 errno {errno.ENOSYS}\nstill running after fork: parent\n"
    summary = _json_tail(r.err)
    unimpl = summary["unimplemented_syscalls"]
    assert {"fork", "clone"} & set(unimpl), unimpl
    assert summary["exit_status"] == 0 and summary["running"] is False
    assert r.out.strip()[0] != "{"      # the summary went to stderr, not stdout


# -- 12. command-line errors -----------------------------------------------------------------

def _one_error_line(r) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert "Traceback" not in r.err, r.err
    assert len(lines) == 1 and lines[0].startswith("error:"), f"expected one error line, got:\n{r.err}"
    return lines[0]


@pytest.mark.kvm
def test_run_nonexistent_program_is_one_error_line_and_no_store(tmp_path):
    store = tmp_path / "s.db"
    r = run_program("/nonexistent/prog", store=store)
    assert r.code == 1
    assert "/nonexistent/prog" in _one_error_line(r)
    assert not store.exists()


@pytest.mark.kvm
def test_run_non_elf_program_is_one_error_line(tmp_path):
    store = tmp_path / "s.db"
    r = run_program("/etc/passwd", store=store)
    assert r.code == 1, r.err
    _one_error_line(r)
    assert not store.exists()


@pytest.mark.kvm
def test_dynamic_program_without_its_loader_says_use_root_slash(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    prog = compile_c(d, "dyn", "#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n", static=False)
    store = tmp_path / "s.db"
    r = run_program(prog, store=store)     # default --root: snapctl's cwd, which has no /lib64/ld-linux*
    assert r.code == 1, r.err
    line = _one_error_line(r)
    assert "--root /" in line, line


@pytest.mark.kvm
def test_every_syscalls_zero_is_a_usage_error(cc, tmp_path):
    prog = cc("argv_env", ARGV_ENV_C)
    store = tmp_path / "s.db"
    r = run_program(prog, store=store, root=prog.parent, opts=("--every-syscalls", "0"))
    assert r.code == 2, r.err
    assert "--every-syscalls" in r.err
    assert not store.exists()


@pytest.mark.kvm
def test_output_of_a_builtin_guest_store_is_one_line(tmp_path):
    store = tmp_path / "b.db"
    ok("run", "--guest", "stamp", "--mem", "16M", "--checkpoints", "1", store=store)
    r = snapctl("output", "0", store=store)
    assert r.code == 1
    assert r.raw == b""
    _one_error_line(r)



@pytest.mark.kvm
def test_mem_too_small_for_the_program_is_one_error_line(busybox, tmp_path):
    """8 MiB of guest RAM cannot hold the program's 8 MiB stack: a clear error, not a traceback."""
    store = tmp_path / "s.db"
    r = run_program(busybox, "true", root=tmp_path, mem="8M", store=store)
    assert r.code == 1, r.err
    line = _one_error_line(r)
    assert any(w in line.lower() for w in ("--mem", "ram", "memory")), line
