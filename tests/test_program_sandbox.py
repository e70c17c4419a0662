"""The program sandbox, through real programs: --root confinement, a read-only host,
bad pointers and memory limits.

The model is chroot semantics on a read-only mount (``..`` stops at the root,
absolute symlinks restart at it, writes fail with EROFS), Linux's own errno
table, and native runs of the same binary where the host allows it. The host
must never change: a listing with hashes of the root and of the directory
beside it is compared before and after.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.register_assert_rewrite("program_helpers")   # before its import: it is also a plugin (fixtures)

from program_helpers import native, program_stderr, run_program, tree_digest  # noqa: E402

pytest_plugins = ("program_helpers",)     # the cc fixture

pytestmark = pytest.mark.kvm

PROBE_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>

/* one line per attempt: "NAME ok LEN HEX" or "NAME err ERRNO" */
static void report_fd(const char *name, int fd, int e) {
    if (fd < 0) { printf("%s err %d\n", name, e); return; }
    unsigned char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    printf("%s ok %zd ", name, n);
    for (ssize_t i = 0; i < n && i < 64; i++) printf("%02x", buf[i]);
    printf("\n");
    close(fd);
}
static void try_open(const char *name, const char *path, int flags) {
    errno = 0;
    int fd = open(path, flags, 0644);
    int e = errno;
    report_fd(name, fd, e);
}
static void result(const char *name, int r) {
    int e = errno;
    if (r < 0) printf("%s err %d\n", name, e); else printf("%s ok %d\n", name, r);
}
int main(void) {
    try_open("etc_passwd", "/etc/passwd", O_RDONLY);
    try_open("dotdot_passwd", "../../../../etc/passwd", O_RDONLY);
    try_open("deep_dotdot_passwd", "/sub/../../../../../etc/passwd", O_RDONLY);
    try_open("abs_link", "/abs_link", O_RDONLY);
    try_open("rel_link", "/sub/rel_link", O_RDONLY);
    try_open("abs_secret_link", "/abs_secret", O_RDONLY);
    try_open("proc_root_passwd", "/proc/self/root/etc/passwd", O_RDONLY);
    try_open("proc_exe", "/proc/self/exe", O_RDONLY);
    char l[512];
    errno = 0;
    ssize_t n = readlink("/proc/self/exe", l, sizeof l - 1);
    l[n > 0 ? n : 0] = 0;
    printf("readlink_exe %zd %s\n", n, l);
    try_open("create", "/newfile", O_WRONLY | O_CREAT);
    try_open("create_in_sub", "/sub/newfile", O_WRONLY | O_CREAT | O_TRUNC);
    try_open("write_existing", "/hello.txt", O_WRONLY);
    try_open("rdwr_trunc", "/hello.txt", O_RDWR | O_TRUNC);
    try_open("write_through_link", "/abs_link", O_WRONLY | O_APPEND);
    try_open("write_secret_via_dotdot", "../outside/secret", O_WRONLY);
    errno = 0; result("unlink", unlink("/hello.txt"));
    errno = 0; result("unlink_link", unlink("/sub/rel_link"));
    errno = 0; result("mkdir", mkdir("/newdir", 0755));
    errno = 0; result("rmdir", rmdir("/sub"));
    errno = 0; result("rename", rename("/hello.txt", "/moved.txt"));
    errno = 0; result("symlink", symlink("/etc/passwd", "/newlink"));
    errno = 0; result("chmod", chmod("/hello.txt", 0777));
    errno = 0; result("truncate", truncate("/hello.txt", 0));
    errno = 0; result("link", link("/hello.txt", "/hardlink"));
    try_open("hello_after", "/hello.txt", O_RDONLY);
    return 0;
}
"""


def _hex(b: bytes) -> str:
    return b[:64].hex()


@pytest.fixture
def jail(tmp_path: Path, cc):
    """tmp/jail/R (the root, with the program in R/bin) beside tmp/jail/outside/secret."""
    base = tmp_path / "jail"
    R, outside = base / "R", base / "outside"
    for d in (R / "bin", R / "sub", R / "etc", outside):
        d.mkdir(parents=True)
    secret = b"SECRET-" + os.urandom(12).hex().encode() + b"\n"
    (outside / "secret").write_bytes(secret)
    (R / "etc" / "passwd").write_bytes(b"guest:x:1:1:not the host's passwd:/:/bin/false\n")
    (R / "hello.txt").write_bytes(b"hello from inside the root\n")
    (R / "abs_link").symlink_to("/etc/passwd")
    (R / "sub" / "rel_link").symlink_to("../../outside/secret")      # on the host: base/outside/secret
    (R / "abs_secret").symlink_to(outside / "secret")                 # absolute host path
    assert (R / "sub" / "rel_link").read_bytes() == secret             # the links do reach it on the host
    prog = R / "bin" / "probe"
    shutil.copyfile(cc("probe", PROBE_C), prog)
    prog.chmod(0o755)
    return base, R, outside, secret, prog


def _parse(out: str) -> dict[str, list[str]]:
    res = {}
    for line in out.splitlines():
        name, *rest = line.split(" ")
        res[name] = rest
    return res


@pytest.mark.kvm
def test_root_confines_paths_and_the_host_never_changes(jail, tmp_path):
    base, R, _outside, secret, prog = jail
    host_passwd = Path("/etc/passwd").read_bytes()
    before = tree_digest(base)
    passwd_digest = hashlib.sha256(host_passwd).hexdigest()
    store = tmp_path / "s.db"
    r = run_program(prog, root=R, mem="64M", store=store)
    assert r.code == 0, r.err
    got = _parse(r.out)
    fake = (R / "etc" / "passwd").read_bytes()
    ENOENT, EROFS = str(errno.ENOENT), str(errno.EROFS)
    # inside the root, /etc/passwd is the root's own; `..` stops at the root; absolute links restart there
    for name in ("etc_passwd", "dotdot_passwd", "deep_dotdot_passwd", "abs_link"):
        assert got[name] == ["ok", str(len(fake)), _hex(fake)], (name, got[name])
    # links that lead out of the root on the host lead nowhere inside it; the host's /proc is not reachable
    for name in ("rel_link", "abs_secret_link", "proc_root_passwd"):
        assert got[name] == ["err", ENOENT], (name, got[name])
    exe = prog.read_bytes()
    assert got["proc_exe"][:2] == ["ok", str(min(len(exe), 4096))] and got["proc_exe"][2] == _hex(exe)
    assert got["readlink_exe"] == [str(len("/bin/probe")), "/bin/probe"]   # its path as the guest sees it
    for name in ("create", "create_in_sub", "write_existing", "rdwr_trunc", "write_through_link",
                 "unlink", "unlink_link", "mkdir", "rmdir", "rename", "symlink", "chmod", "truncate", "link"):
        assert got[name][0] == "err", (name, got[name])
    for name in ("create", "create_in_sub", "write_existing", "rdwr_trunc", "unlink", "mkdir"):
        assert got[name] == ["err", EROFS], (name, got[name])
    assert got["write_secret_via_dotdot"][0] == "err"
    hello = (R / "hello.txt").read_bytes()
    assert got["hello_after"] == ["ok", str(len(hello)), _hex(hello)]
    # the host is as it was, and nothing secret got out
    assert tree_digest(base) == before
    assert Path("/etc/passwd").read_bytes() == host_passwd
    for blob in (r.raw, r.err.encode()):
        assert secret.strip() not in blob and secret.strip().hex().encode() not in blob
        assert host_passwd[:32] not in blob and host_passwd[:32].hex().encode() not in blob
    # and the store snapshotted no file from outside the root
    with sqlite3.connect(store) as conn:
        rows = list(conn.execute("SELECT name, data FROM states"))
    stored = {n.rsplit("/", 1)[-1] for n, _ in rows if "file/" in n}    # file contents, by sha256
    assert passwd_digest not in stored
    assert hashlib.sha256(secret).hexdigest() not in stored
    assert hashlib.sha256(fake).hexdigest() in stored                    # what it did read is recorded
    assert not any(secret.strip() in bytes(d) for _, d in rows)


BADPTR_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    ssize_t w; int e;
    errno = 0; w = write(1, (void *)1, 10); e = errno;
    printf("write_bad %zd %d\n", w, e); fflush(stdout);
    errno = 0; w = write(1, (void *)0xffff800000000000ULL, 4); e = errno;
    printf("write_kernel_half %zd %d\n", w, e); fflush(stdout);
    char *ro = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int fd = open(argv[1], O_RDONLY);
    errno = 0; w = read(fd, ro, 5); e = errno;
    printf("read_into_readonly %zd %d first %d\n", w, e, ro[0]);
    char *gone = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(gone, 8192);
    errno = 0; w = read(fd, gone, 5); e = errno;
    printf("read_into_unmapped %zd %d\n", w, e);
    errno = 0; int r = open((const char *)8, O_RDONLY); e = errno;
    printf("open_bad_path %d %d\n", r, e);
    errno = 0; r = stat(argv[1], (struct stat *)ro); e = errno;
    printf("stat_into_readonly %d %d\n", r, e);
    errno = 0; w = read(fd, ro + 4094, 5); e = errno;
    printf("read_straddling %zd %d\n", w, e);
    printf("still alive\n");
    return 3;
}
"""


@pytest.mark.kvm
def test_bad_pointers_are_efault_like_native_and_the_program_continues(cc, tmp_path):
    prog = cc("badptr", BADPTR_C)
    root = tmp_path / "root"
    root.mkdir()
    (root / "data.txt").write_bytes(b"0123456789abcdef\n")
    nat = native([prog, "data.txt"], cwd=root)
    assert nat.code == 3 and b"still alive" in nat.out, nat.out
    r = run_program(prog, "data.txt", root=root, mem="64M", store=tmp_path / "s.db")
    assert r.code == 3, r.err
    assert r.raw == nat.out
    assert f"write_bad -1 {errno.EFAULT}\n" in r.out
    assert f"read_into_readonly -1 {errno.EFAULT} first 0\n" in r.out


HOG_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <sys/mman.h>
int main(void) {
    int e;
    errno = 0; void *b = sbrk(1L << 30); e = errno;
    printf("sbrk_1g %s %d\n", b == (void *)-1 ? "fail" : "ok", e);
    errno = 0; void *m = mmap(0, 1L << 31, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); e = errno;
    printf("mmap_2g %s %d\n", m == MAP_FAILED ? "fail" : "ok", e);
    errno = 0; m = mmap(0, 256L << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0); e = errno;
    printf("mmap_256m_populate %s %d\n", m == MAP_FAILED ? "fail" : "ok", e);
    errno = 0; void *p = malloc(1L << 30); e = errno;
    printf("malloc_1g %s %d\n", p ? "ok" : "null", e);
    /* what does fit still works, after the refusals */
    size_t small = 8 << 20;
    unsigned char *s = malloc(small);
    if (!s) { printf("malloc_8m null\n"); return 1; }
    memset(s, 7, small);
    unsigned long sum = 0;
    for (size_t i = 0; i < small; i += 4096) sum += s[i];
    printf("malloc_8m ok %lu\n", sum);
    printf("still alive\n");
    return 0;
}
"""


@pytest.mark.kvm
def test_memory_beyond_mem_is_enomem_not_a_crash(cc, tmp_path):
    prog = cc("hog", HOG_C)
    r = run_program(prog, root=prog.parent, mem="64M", store=tmp_path / "s.db")
    assert r.code == 0, f"exit {r.code}: {r.err}"
    got = _parse(r.out)
    ENOMEM = str(errno.ENOMEM)
    assert got["sbrk_1g"] == ["fail", ENOMEM]
    assert got["mmap_2g"] == ["fail", ENOMEM]
    assert got["mmap_256m_populate"] == ["fail", ENOMEM]
    assert got["malloc_1g"] == ["null", ENOMEM]
    assert got["malloc_8m"] == ["ok", str(7 * (8 << 20) // 4096)]
    assert r.out.endswith("still alive\n")
    assert "Traceback" not in r.err and not program_stderr(r.err).strip()
