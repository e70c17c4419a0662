"""snapctl.program.fs: the sandbox's path resolver, host-file snapshots and guest ABI encodings.

No KVM needed. The tree under test has a root with files, directories and
crafted symlinks, and beside it an OUTSIDE directory holding a secret that no
guest path may ever read. The property test draws random paths; on a failure
hypothesis prints the seed (rerun with ``--hypothesis-seed=N``) and a
``@reproduce_failure`` blob.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat as S
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from snapctl.program import fs
from snapctl.program.fs import (
    O_APPEND, O_CREAT, O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_PATH, O_TMPFILE_BIT, O_TRUNC, R_OK,
    STATX_BASIC_STATS, W_OK, X_OK, Sandbox, decode_listing, encode_listing, fake_stat_for, pack_dirents,
    pack_stat, pack_statx,
)

O_WRONLY, O_RDWR = 0o1, 0o2
O_TMPFILE = O_TMPFILE_BIT | O_DIRECTORY
SECRET = b"TOP-SECRET host data outside the root\n"
EXE_CONTENT = b"\x7fELF pretend program binary\n"
EXE_GUEST = b"/bin/prog"


@dataclass
class Tree:
    base: Path  # holds ROOT_DIR, OUTSIDE_DIR and the program binary
    root: Path
    outside: Path
    secret: Path
    exe: Path

    def sandbox(self, **kw) -> Sandbox:
        return Sandbox(str(self.root), str(self.exe), EXE_GUEST.decode(), **kw)


def build_tree(base: Path) -> Tree:
    root, outside = base / "ROOT_DIR", base / "OUTSIDE_DIR"
    for d in ("etc", "sub/deep/er", "bin", "dev", "proc", "empty"):
        (root / d).mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(SECRET)
    exe = base / "prog.bin"  # the program binary lives outside the root
    exe.write_bytes(EXE_CONTENT)
    (root / "etc/passwd").write_bytes(b"root:x:0:0:inside the root\n")
    (root / "sub/file").write_bytes(b"sub file\n")
    (root / "sub/deep/er/leaf").write_bytes(b"leaf\n")
    (root / "bin/prog").write_bytes(b"the in-root copy of the program\n")
    (root / "dev/other").write_bytes(b"a plain file in /dev\n")
    (root / "proc/cpuinfo").write_bytes(b"an on-disk /proc file the guest must not see\n")
    links = {
        "abs_secret": str(secret),  # absolute, pointing at the host secret
        "abs_outside_dir": str(outside),  # absolute, a directory outside
        "rel_secret": "../OUTSIDE_DIR/secret",  # relative, one level up from the root
        "up": "../../../../..",  # a relative chain of ..
        "sub/deep/up3": "../../../../../OUTSIDE_DIR",
        "passwd_link": "/etc/passwd",  # absolute, resolves inside the root
        "etc/host_passwd": "/etc/passwd",
        "loop1": "loop2", "loop2": "loop1", "self_loop": "self_loop",
        "dir_loop": "dir_loop/x",
        "chain0": "sub/file",
        "sub_link": "sub",
        "dotdot": "..",
        "proc_root": "/proc/self/root",
        "proc_exe_link": "/proc/self/exe",
        "dangling": "no/such/thing",
    }
    for i in range(1, 8):
        links[f"chain{i}"] = f"chain{i - 1}"
    for name, target in links.items():
        os.symlink(target, root / name)
    # A decoy at the in-root image of the secret's host path: "abs_secret" lands here.
    decoy = root / str(secret).lstrip("/")
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"decoy inside the root\n")
    return Tree(base, root, outside, secret, exe)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path)


@pytest.fixture
def sb(tree: Tree):
    with tree.sandbox() as sandbox:
        yield sandbox


def err(fn, *args, **kw) -> int:
    """The errno fn(*args, **kw) fails with (fails the test if it succeeds)."""
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    return info.value.errno


def snapshot(top: Path) -> dict[str, tuple]:
    """A recursive listing with types, sizes, mtimes and content hashes; never opens FIFOs or devices."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            extra: object = None
            if S.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif S.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, extra)
    return out


def inside(tree: Tree, guest_path: bytes, st: os.stat_result) -> bool:
    """Whether the canonical guest path names, under the root on the host, the object ``st`` describes."""
    hst = os.lstat(os.fsencode(tree.root) + guest_path)  # canonical: no symlink but perhaps the last (O_NOFOLLOW)
    return (hst.st_dev, hst.st_ino) == (st.st_dev, st.st_ino)


# ---- construction ---------------------------------------------------------------------------------------------

def test_construction_checks_root_and_program(tree: Tree):
    with pytest.raises(FileNotFoundError):
        Sandbox(str(tree.base / "missing"), str(tree.exe), "/bin/prog")
    with pytest.raises(NotADirectoryError):
        Sandbox(str(tree.root / "etc/passwd"), str(tree.exe), "/bin/prog")
    with pytest.raises(OSError) as info:
        Sandbox(str(tree.root), str(tree.root), "/bin/prog")
    assert info.value.errno == errno.EACCES
    with pytest.raises(ValueError):
        Sandbox(str(tree.root), str(tree.exe), "bin/prog")


def test_construction_fails_clearly_without_openat2(tree: Tree, monkeypatch):
    monkeypatch.setattr(fs, "_SYS_OPENAT2", 1 << 20)  # a syscall number no kernel has: ENOSYS
    with pytest.raises(OSError, match="openat2") as info:
        tree.sandbox()
    assert info.value.errno == errno.ENOSYS


def test_close_is_idempotent_and_final(tree: Tree):
    sandbox = tree.sandbox()
    sandbox.close()
    sandbox.close()
    assert err(sandbox.stat, b"/etc/passwd", cwd=b"/") == errno.EBADF


# ---- plain resolution -----------------------------------------------------------------------------------------

def test_reads_files_and_lists_directories(sb: Sandbox, tree: Tree):
    f = sb.open(b"/etc/passwd", cwd=b"/")
    assert (f.kind, f.guest_path, f.data) == ("file", b"/etc/passwd", b"root:x:0:0:inside the root\n")
    assert f.entries == [] and f.stat.st_ino == (tree.root / "etc/passwd").stat().st_ino
    d = sb.open(b"sub", cwd=b"/", flags=O_DIRECTORY)
    assert d.kind == "dir" and d.data == b"" and d.guest_path == b"/sub"
    names = [name for _, _, name in d.entries]
    assert names == sorted(names) == [b".", b"..", b"deep", b"file"]
    by_name = {name: (ino, t) for ino, t, name in d.entries}
    assert by_name[b"file"] == ((tree.root / "sub/file").stat().st_ino, 8)
    assert by_name[b"deep"][1] == 4 and by_name[b".."][0] == tree.root.stat().st_ino
    top = sb.open(b"/", cwd=b"/")
    top_by_name = {name: (ino, t) for ino, t, name in top.entries}
    assert top_by_name[b".."] == top_by_name[b"."] == (tree.root.stat().st_ino, 4)  # / is its own parent
    assert top_by_name[b"loop1"][1] == 10 and b"OUTSIDE_DIR" not in top_by_name


def test_relative_paths_cwd_and_dir_fds(sb: Sandbox):
    assert sb.open(b"file", cwd=b"/sub").data == b"sub file\n"
    assert sb.open(b"../../etc/passwd", cwd=b"/sub/deep").guest_path == b"/etc/passwd"
    assert sb.open(b"er/leaf", cwd=b"/", dir_path=b"/sub/deep").data == b"leaf\n"
    assert sb.open(b"/etc/passwd", cwd=b"/sub", dir_path=b"/sub/deep").guest_path == b"/etc/passwd"
    assert sb.open(b"exe", cwd=b"/", dir_path=b"/proc/self").data == EXE_CONTENT
    assert sb.realpath(b"sub_link/deep/../deep/er", cwd=b"/") == b"/sub/deep/er"
    assert sb.realpath(b".", cwd=b"/sub/deep/er") == b"/sub/deep/er"
    assert sb.realpath(b"dotdot", cwd=b"/") == b"/"
    assert sb.realpath(b"chain7", cwd=b"/") == b"/sub/file"
    assert err(sb.open, b"", cwd=b"/") == errno.ENOENT
    with pytest.raises(ValueError):
        sb.open(b"x", cwd=b"relative")


def test_dotdot_at_root_stays_at_root(sb: Sandbox, tree: Tree):
    for path in (b"/..", b"/../../..", b"..", b"../../../../../../../..", b"//..//.//..", b"/sub/../../.."):
        assert sb.realpath(path, cwd=b"/") == b"/"
        assert sb.stat(path, cwd=b"/").st_ino == tree.root.stat().st_ino
    assert sb.realpath(b"../../../../..", cwd=b"/sub/deep/er") == b"/"
    assert sb.open(b"../../../../../etc/passwd", cwd=b"/sub/deep").data == b"root:x:0:0:inside the root\n"


ESCAPES = [
    b"/abs_secret", b"/rel_secret", b"/up/OUTSIDE_DIR/secret", b"/abs_outside_dir/secret",
    b"/sub/deep/up3/secret", b"/../OUTSIDE_DIR/secret", b"../" * 40 + b"OUTSIDE_DIR/secret",
    b"/dotdot/OUTSIDE_DIR/secret", b"/dotdot/dotdot/dotdot/OUTSIDE_DIR/secret", b"/sub_link/../../OUTSIDE_DIR/secret",
    b"/proc/self/root/OUTSIDE_DIR/secret", b"/proc_root/OUTSIDE_DIR/secret", b"/proc/1/root/OUTSIDE_DIR/secret",
    b"/proc/self/cwd/../OUTSIDE_DIR/secret", b"/proc/self/fd/0", b"/dev/fd/0",
]


@pytest.mark.parametrize("path", ESCAPES, ids=lambda p: p.decode()[:50])
def test_escape_attempts_stay_inside(sb: Sandbox, tree: Tree, path: bytes):
    for target in (path, os.fsencode(tree.secret), os.fsencode(tree.outside) + b"/../OUTSIDE_DIR/secret"):
        try:
            opened = sb.open(target, cwd=b"/sub/deep")
        except OSError as e:
            assert e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)
            continue
        assert opened.data != SECRET and inside(tree, opened.guest_path, opened.stat)


def test_absolute_symlinks_and_host_paths_land_inside(sb: Sandbox, tree: Tree):
    assert sb.open(b"/abs_secret", cwd=b"/").data == b"decoy inside the root\n"
    assert sb.open(os.fsencode(tree.secret), cwd=b"/").data == b"decoy inside the root\n"
    assert sb.open(b"/passwd_link", cwd=b"/").data == b"root:x:0:0:inside the root\n"
    assert sb.realpath(b"/etc/host_passwd", cwd=b"/") == b"/etc/passwd"
    listing = sb.open(b"/abs_outside_dir", cwd=b"/")
    assert listing.guest_path == os.fsencode(tree.outside)  # the decoy directory's in-root image
    assert [n for _, _, n in listing.entries] == [b".", b"..", b"secret"]


def test_symlink_loops_are_eloop(sb: Sandbox, tree: Tree):
    for path in (b"/loop1", b"/self_loop", b"/dir_loop", b"/loop2/x", b"/sub/../loop1"):
        assert err(sb.open, path, cwd=b"/") == errno.ELOOP
        assert err(sb.stat, path, cwd=b"/") == errno.ELOOP
    target = "sub/file"
    for i in range(50):
        os.symlink(target, tree.root / f"long{i}")
        target = f"long{i}"
    assert err(sb.open, b"/long49", cwd=b"/") == errno.ELOOP
    assert sb.open(b"/long9", cwd=b"/").data == b"sub file\n"


def test_long_paths_are_enametoolong(sb: Sandbox):
    fits = b"./" * ((4095 - len(b"etc/passwd")) // 2) + b"etc/passwd"
    fits = b"/" * (4095 - len(fits)) + fits
    assert len(fits) == 4095 and sb.open(fits, cwd=b"/").data.startswith(b"root:")
    for path in (fits + b"/", b"/" + b"a/" * 2048, b"/" + b"x" * 256, b"/proc/" + b"x" * 256):
        assert err(sb.open, path, cwd=b"/") == errno.ENAMETOOLONG
        assert err(sb.stat, path, cwd=b"/") == errno.ENAMETOOLONG


# ---- flags and kinds ------------------------------------------------------------------------------------------

def test_open_flags(sb: Sandbox):
    assert err(sb.open, b"/etc/passwd", cwd=b"/", flags=O_DIRECTORY) == errno.ENOTDIR
    assert err(sb.open, b"/etc/passwd/", cwd=b"/") == errno.ENOTDIR
    assert err(sb.open, b"/etc/passwd/.", cwd=b"/") == errno.ENOTDIR
    assert err(sb.open, b"/passwd_link", cwd=b"/", flags=O_NOFOLLOW) == errno.ELOOP
    assert sb.open(b"/sub_link/file", cwd=b"/", flags=O_NOFOLLOW).data == b"sub file\n"  # only the last
    link = sb.open(b"/passwd_link", cwd=b"/", flags=O_PATH | O_NOFOLLOW)
    assert link.kind == "path" and S.S_ISLNK(link.stat.st_mode) and link.guest_path == b"/passwd_link"
    assert sb.open(b"/passwd_link", cwd=b"/", flags=O_PATH).guest_path == b"/etc/passwd"
    path_fd = sb.open(b"/etc", cwd=b"/", flags=O_PATH | O_DIRECTORY | O_WRONLY)
    assert (path_fd.kind, path_fd.data, path_fd.entries) == ("path", b"", [])
    assert err(sb.open, b"/missing", cwd=b"/") == errno.ENOENT
    assert err(sb.open, b"/dangling", cwd=b"/") == errno.ENOENT
    assert err(sb.open, b"/etc/passwd/x", cwd=b"/") == errno.ENOTDIR


def test_stat_and_lstat(sb: Sandbox, tree: Tree):
    assert sb.stat(b"/passwd_link", cwd=b"/").st_ino == (tree.root / "etc/passwd").stat().st_ino
    lst = sb.stat(b"/passwd_link", cwd=b"/", follow=False)
    assert S.S_ISLNK(lst.st_mode) and lst.st_ino == os.lstat(tree.root / "passwd_link").st_ino
    assert S.S_ISDIR(sb.stat(b"/sub_link/", cwd=b"/", follow=False).st_mode)  # a trailing slash follows
    assert err(sb.stat, b"/dangling", cwd=b"/") == errno.ENOENT
    assert S.S_ISLNK(sb.stat(b"/dangling", cwd=b"/", follow=False).st_mode)


def test_readlink(sb: Sandbox):
    assert sb.readlink(b"/passwd_link", cwd=b"/") == b"/etc/passwd"
    assert sb.readlink(b"up", cwd=b"/") == b"../../../../.."
    assert sb.readlink(b"/sub_link/deep/up3", cwd=b"/") == b"../../../../../OUTSIDE_DIR"
    assert err(sb.readlink, b"/etc/passwd", cwd=b"/") == errno.EINVAL
    assert err(sb.readlink, b"/etc", cwd=b"/") == errno.EINVAL
    assert err(sb.readlink, b"/missing", cwd=b"/") == errno.ENOENT
    assert err(sb.readlink, b"/dev/null", cwd=b"/") == errno.EINVAL


def test_access(sb: Sandbox):
    sb.access(b"/etc/passwd", 0, cwd=b"/")
    sb.access(b"/etc/passwd", R_OK, cwd=b"/")
    sb.access(b"/sub", R_OK | X_OK, cwd=b"/")
    assert err(sb.access, b"/etc/passwd", W_OK, cwd=b"/") == errno.EROFS
    assert err(sb.access, b"/sub", W_OK | R_OK, cwd=b"/") == errno.EROFS
    assert err(sb.access, b"/missing", W_OK, cwd=b"/") == errno.ENOENT
    assert err(sb.access, b"/etc/passwd", 8, cwd=b"/") == errno.EINVAL
    sb.access(b"/dev/null", R_OK | W_OK, cwd=b"/")
    assert err(sb.access, b"/dev/null", X_OK, cwd=b"/") == errno.EACCES
    sb.access(b"/proc/self/exe", R_OK, cwd=b"/")


def test_write_attempts_are_erofs_and_change_nothing(sb: Sandbox, tree: Tree):
    before, outside_before = snapshot(tree.root), snapshot(tree.outside)
    cases = [
        (b"/etc/passwd", O_WRONLY, errno.EROFS), (b"/etc/passwd", O_RDWR, errno.EROFS),
        (b"/etc/passwd", O_TRUNC, errno.EROFS), (b"/etc/passwd", O_APPEND, errno.EROFS),
        (b"/etc/passwd", O_CREAT, errno.EROFS), (b"/etc/passwd", O_WRONLY | O_CREAT | O_TRUNC, errno.EROFS),
        (b"/etc/passwd", O_CREAT | O_EXCL, errno.EEXIST), (b"/dangling", O_CREAT | O_EXCL, errno.EEXIST),
        (b"/passwd_link", O_RDWR, errno.EROFS), (b"/abs_secret", O_WRONLY | O_TRUNC, errno.EROFS),
        (b"/new_file", O_WRONLY | O_CREAT, errno.EROFS), (b"/sub/new", O_CREAT, errno.EROFS),
        (b"new", O_CREAT | O_EXCL | O_RDWR, errno.EROFS), (b"/dangling", O_CREAT | O_WRONLY, errno.EROFS),
        (b"/no/such/dir/new", O_CREAT | O_WRONLY, errno.ENOENT), (b"/etc/passwd/new", O_CREAT, errno.ENOTDIR),
        (b"/missing", O_WRONLY, errno.ENOENT), (b"/sub", O_WRONLY, errno.EISDIR), (b"/sub", O_CREAT, errno.EISDIR),
        (b"/sub", O_TRUNC, errno.EISDIR), (b"/sub", O_TMPFILE | O_RDWR, errno.EROFS),
        (b"/proc", O_RDWR, errno.EISDIR), (b"/proc/self/exe", O_WRONLY, errno.EROFS),
        (b"/proc/self/exe", O_CREAT | O_EXCL, errno.EEXIST), (b"/proc/new", O_CREAT, errno.EROFS),
        (b"/proc/x/new", O_CREAT, errno.ENOENT), (os.fsencode(tree.secret), O_WRONLY | O_TRUNC, errno.EROFS),
        (b"/rel_secret", O_WRONLY | O_CREAT, errno.EROFS),
    ]
    for path, flags, expected in cases:
        assert (path, flags, err(sb.open, path, cwd=b"/sub", flags=flags)) == (path, flags, expected)
    assert sb.open(b"/dev/null", cwd=b"/", flags=O_WRONLY | O_TRUNC | O_CREAT).kind == "null"
    assert sb.open(b"/dev/zero", cwd=b"/", flags=O_RDWR).kind == "zero"
    assert sb.open(b"/dev/urandom", cwd=b"/", flags=O_WRONLY).kind == "random"
    assert snapshot(tree.root) == before and snapshot(tree.outside) == outside_before
    assert tree.secret.read_bytes() == SECRET


def test_size_caps_are_efbig(tree: Tree):
    (tree.root / "ten").write_bytes(b"0123456789")
    (tree.root / "eleven").write_bytes(b"0123456789A")
    with tree.sandbox(max_file_bytes=10) as small:
        assert small.open(b"/ten", cwd=b"/").data == b"0123456789"
        assert err(small.open, b"/eleven", cwd=b"/") == errno.EFBIG
        assert err(small.open, b"/", cwd=b"/") == errno.EFBIG  # the listing is bigger than 10 bytes too
        assert small.open(b"/eleven", cwd=b"/", flags=O_PATH).kind == "path"
        assert small.stat(b"/eleven", cwd=b"/").st_size == 11


# ---- /proc and /dev -------------------------------------------------------------------------------------------

def test_proc_self_exe(sb: Sandbox, tree: Tree):
    assert sb.readlink(b"/proc/self/exe", cwd=b"/") == EXE_GUEST
    assert sb.readlink(b"exe", cwd=b"/proc/self") == EXE_GUEST
    exe = sb.open(b"/proc/self/exe", cwd=b"/")
    assert (exe.kind, exe.data, exe.guest_path) == ("file", EXE_CONTENT, EXE_GUEST)
    assert exe.stat.st_ino == tree.exe.stat().st_ino
    assert err(sb.open, b"/proc_exe_link", cwd=b"/") == errno.ENOENT  # a symlink into /proc finds the on-disk one
    assert sb.stat(b"/proc/self/exe", cwd=b"/").st_size == len(EXE_CONTENT)
    assert S.S_ISLNK(sb.stat(b"/proc/self/exe", cwd=b"/", follow=False).st_mode)
    assert sb.realpath(b"/proc/self/exe", cwd=b"/") == EXE_GUEST
    assert sb.realpath(b"/proc/./self/../self", cwd=b"/") == b"/proc/self"
    assert err(sb.open, b"/proc/self/exe", cwd=b"/", flags=O_NOFOLLOW) == errno.ELOOP
    assert sb.open(b"/proc/self/exe", cwd=b"/", flags=O_PATH | O_NOFOLLOW).kind == "path"
    assert err(sb.open, b"/proc/self/exe/", cwd=b"/") == errno.ENOTDIR
    assert err(sb.open, b"/proc/self/exe/..", cwd=b"/") == errno.ENOTDIR
    assert err(sb.open, b"/proc/self/exe", cwd=b"/", flags=O_DIRECTORY) == errno.ENOTDIR


def test_proc_self_exe_is_the_binary_opened_at_construction(sb: Sandbox, tree: Tree):
    replacement = tree.base / "new.bin"
    replacement.write_bytes(b"a different program\n")
    os.replace(replacement, tree.exe)  # like Linux: /proc/self/exe stays the binary that was started
    assert sb.open(b"/proc/self/exe", cwd=b"/").data == EXE_CONTENT


def test_rest_of_proc_is_enoent(sb: Sandbox):
    for path in (b"/proc/cpuinfo", b"/proc/self/fd/0", b"/proc/self/environ", b"/proc/1/status", b"/proc/self/root",
                 b"/proc/self/root/etc/passwd", b"/proc/thread-self", b"/proc/self/exe/x/.."):
        assert err(sb.open, path, cwd=b"/") in (errno.ENOENT, errno.ENOTDIR)
    assert err(sb.readlink, b"/proc/self", cwd=b"/") == errno.EINVAL
    proc = sb.open(b"/proc", cwd=b"/")
    assert [n for _, _, n in proc.entries] == [b".", b"..", b"self"]
    assert [n for _, _, n in sb.open(b"self", cwd=b"/proc").entries] == [b".", b"..", b"exe"]
    assert sb.realpath(b"/proc/..", cwd=b"/") == b"/" and sb.realpath(b"../etc", cwd=b"/proc/self/..") == b"/etc"


def test_with_host_root_never_reads_host_proc_or_sys(tmp_path: Path):
    os.symlink("/proc/self/status", tmp_path / "to_status")
    os.symlink("/proc", tmp_path / "to_proc")
    exe = tmp_path / "prog"
    exe.write_bytes(EXE_CONTENT)
    guest_tmp = os.fsencode(tmp_path)
    paths = [b"/proc/self/environ", b"/proc/1/cmdline", b"/proc/self/root/etc/hostname", b"/proc/mounts",
             guest_tmp + b"/to_status", guest_tmp + b"/to_proc/self/environ", guest_tmp + b"/to_proc",
             guest_tmp + b"/../../proc/version", b"/dev/stdin"]
    if os.path.ismount("/sys"):
        paths += [b"/sys", b"/sys/kernel"]
    with Sandbox("/", str(exe), "/bin/prog") as host:
        for path in paths:
            assert err(host.open, path, cwd=b"/") in (errno.ENOENT, errno.ELOOP)
            assert err(host.stat, path, cwd=b"/") in (errno.ENOENT, errno.ELOOP)
        assert err(host.stat, guest_tmp + b"/to_proc/self", cwd=b"/", follow=False) == errno.ENOENT
        assert host.open(b"/proc/self/exe", cwd=b"/").data == EXE_CONTENT
        assert host.realpath(guest_tmp, cwd=b"/") == os.fsencode(os.path.realpath(tmp_path))
        if os.path.exists("/dev/tty"):
            assert err(host.open, b"/dev/tty", cwd=b"/") == errno.EACCES
        if S.S_ISCHR(os.stat("/dev/null").st_mode):  # the host's own /dev/null maps to the virtual one
            os.symlink("/dev/null", tmp_path / "to_null")
            assert host.open(guest_tmp + b"/to_null", cwd=b"/", flags=O_WRONLY).kind == "null"


def test_virtual_devices(sb: Sandbox, tree: Tree):
    shutil.rmtree(tree.root / "dev")  # present whether or not the root has /dev
    expected = {b"null": ("null", 3), b"zero": ("zero", 5), b"random": ("random", 8), b"urandom": ("random", 9)}
    for name, (kind, minor) in expected.items():
        for path in (b"/dev/" + name, b"//dev/./" + name, b"/../dev/" + name, b"/proc/../dev/" + name):
            opened = sb.open(path, cwd=b"/")
            assert (opened.kind, opened.guest_path, opened.data, opened.entries) == (kind, b"/dev/" + name, b"", [])
            assert S.S_ISCHR(opened.stat.st_mode) and opened.stat.st_rdev == os.makedev(1, minor)
        assert sb.open(name, cwd=b"/dev").kind == kind
        assert sb.stat(b"/dev/" + name, cwd=b"/").st_rdev == os.makedev(1, minor)
        assert sb.realpath(b"/dev/" + name, cwd=b"/") == b"/dev/" + name
        assert err(sb.open, b"/dev/" + name + b"/", cwd=b"/") == errno.ENOTDIR
        assert err(sb.open, b"/dev/" + name, cwd=b"/", flags=O_DIRECTORY) == errno.ENOTDIR
        assert sb.open(b"/dev/" + name, cwd=b"/", flags=O_PATH).kind == "path"
    assert err(sb.open, b"/dev/other", cwd=b"/") == errno.ENOENT


def test_other_dev_entries_come_from_disk(sb: Sandbox):
    assert sb.open(b"/dev/other", cwd=b"/").data == b"a plain file in /dev\n"
    assert err(sb.open, b"/dev/tty", cwd=b"/") == errno.ENOENT


def test_fifos_and_sockets_never_block(sb: Sandbox, tree: Tree):
    os.mkfifo(tree.root / "fifo")
    os.symlink("fifo", tree.root / "fifo_link")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tree.root / "sock"))
        results: dict[bytes, object] = {}

        def attempt() -> None:
            for path in (b"/fifo", b"/fifo_link", b"/sock"):
                try:
                    results[path] = sb.open(path, cwd=b"/")
                except OSError as e:
                    results[path] = e.errno
            results[b"path"] = sb.open(b"/fifo", cwd=b"/", flags=O_PATH).kind
            results[b"stat"] = S.S_ISFIFO(sb.stat(b"/fifo", cwd=b"/").st_mode)
            try:
                sb.access(b"/fifo", R_OK, cwd=b"/")
            except OSError as e:
                results[b"access"] = e.errno

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(timeout=120)  # a generous guard against a hang, not a timing assertion
        assert not worker.is_alive(), "opening a FIFO under the root blocked"
    assert results == {b"/fifo": errno.ENXIO, b"/fifo_link": errno.ENXIO, b"/sock": errno.ENXIO,
                       b"path": "path", b"stat": True, b"access": errno.EACCES}


def test_device_nodes_on_disk(sb: Sandbox, tree: Tree):
    try:
        os.mknod(tree.root / "dev/mem", S.S_IFCHR | 0o600, os.makedev(1, 1))
        os.mknod(tree.root / "dev/my_null", S.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(tree.root / "dev/disk", S.S_IFBLK | 0o600, os.makedev(7, 0))
    except PermissionError:
        pytest.skip("creating device nodes needs CAP_MKNOD")
    os.symlink("/dev/my_null", tree.root / "etc/masked")
    assert err(sb.open, b"/dev/mem", cwd=b"/") == errno.EACCES  # never opened: no side effects
    assert err(sb.open, b"/dev/disk", cwd=b"/") == errno.EACCES
    assert S.S_ISCHR(sb.stat(b"/dev/mem", cwd=b"/").st_mode)
    masked = sb.open(b"/etc/masked", cwd=b"/", flags=O_WRONLY)
    assert (masked.kind, masked.guest_path) == ("null", b"/dev/null")


def test_concurrent_calls(sb: Sandbox):
    expected = {b"/etc/passwd": b"root:x:0:0:inside the root\n", b"/chain7": b"sub file\n",
                b"/proc/self/exe": EXE_CONTENT, b"sub/deep/er/leaf": b"leaf\n"}
    failures: list[object] = []

    def work() -> None:
        try:
            for _ in range(100):
                for path, data in expected.items():
                    assert sb.open(path, cwd=b"/").data == data
                assert sb.realpath(b"sub_link/deep", cwd=b"/") == b"/sub/deep"
                assert err(sb.open, b"/loop1", cwd=b"/") == errno.ELOOP
        except BaseException as e:  # report it from the main thread
            failures.append(e)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []


# ---- guest ABI encodings against a real C program -------------------------------------------------------------

C_PROBE = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FIELD(type, f) printf("field " #type " " #f " %zu %zu\n", offsetof(struct type, f), \
                              sizeof(((struct type *)0)->f))

static void hex(const char *tag, const void *p, size_t n) {
    const unsigned char *b = p;
    printf("%s ", tag);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    static struct stat st;
    static struct statx stx;
    static char buf[1 << 16];
    if (argc != 3) return 2;
    printf("size stat %zu\nsize statx %zu\n", sizeof(struct stat), sizeof(struct statx));
    FIELD(stat, st_dev); FIELD(stat, st_ino); FIELD(stat, st_nlink); FIELD(stat, st_mode); FIELD(stat, st_uid);
    FIELD(stat, st_gid); FIELD(stat, st_rdev); FIELD(stat, st_size); FIELD(stat, st_blksize);
    FIELD(stat, st_blocks); FIELD(stat, st_atim); FIELD(stat, st_mtim); FIELD(stat, st_ctim);
    FIELD(statx, stx_mask); FIELD(statx, stx_blksize); FIELD(statx, stx_nlink); FIELD(statx, stx_uid);
    FIELD(statx, stx_gid); FIELD(statx, stx_mode); FIELD(statx, stx_ino); FIELD(statx, stx_size);
    FIELD(statx, stx_blocks); FIELD(statx, stx_atime); FIELD(statx, stx_ctime); FIELD(statx, stx_mtime);
    FIELD(statx, stx_rdev_major); FIELD(statx, stx_rdev_minor); FIELD(statx, stx_dev_major);
    FIELD(statx, stx_dev_minor);
    FIELD(dirent64, d_ino); FIELD(dirent64, d_off); FIELD(dirent64, d_reclen); FIELD(dirent64, d_type);
    printf("field dirent64 d_name %zu 0\n", offsetof(struct dirent64, d_name));
    if (stat(argv[1], &st) != 0) return 1;
    hex("stat", &st, sizeof st);
    if (statx(AT_FDCWD, argv[1], 0, STATX_BASIC_STATS, &stx) != 0) return 1;
    hex("statx", &stx, sizeof stx);
    int fd = open(argv[2], O_RDONLY | O_DIRECTORY);
    long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
    if (fd < 0 || n <= 0) return 1;
    hex("dirents", buf, (size_t)n);
    return 0;
}
"""


@dataclass
class Probe:
    sizes: dict[str, int]
    fields: dict[tuple[str, str], tuple[int, int]]
    raw: dict[str, bytes]
    file: Path
    directory: Path


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Probe:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.c").write_text(C_PROBE)
    subprocess.run([gcc, "-static", "-O1", "-o", str(work / "probe"), str(work / "probe.c")], check=True,
                   capture_output=True, timeout=600)
    target = work / "target"
    target.write_bytes(b"x" * 5000)
    os.chmod(target, 0o640)
    os.utime(target, ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    directory = work / "dir"
    directory.mkdir()
    for length in range(1, 21):
        (directory / ("n" * length)).write_bytes(b"")
    os.symlink("t", directory / "lnk")
    (directory / "sub").mkdir()
    out = subprocess.run([str(work / "probe"), str(target), str(directory)], check=True, capture_output=True,
                         timeout=600).stdout.decode()
    sizes, fields, raw = {}, {}, {}
    for line in out.splitlines():
        words = line.split()
        if words[0] == "size":
            sizes[words[1]] = int(words[2])
        elif words[0] == "field":
            fields[(words[1], words[2])] = (int(words[3]), int(words[4]))
        else:
            raw[words[0]] = bytes.fromhex(words[1])
    return Probe(sizes, fields, raw, target, directory)


def test_pack_stat_matches_the_kernel(probe: Probe):
    assert probe.sizes["stat"] == 144
    packed = pack_stat(os.stat(probe.file))
    assert len(packed) == 144
    assert packed == probe.raw["stat"]  # byte for byte, padding included
    sample = os.stat_result((0o100644, 0x1111, 0x2222, 0x3333, 0x44, 0x55, 0x6666, 0, 0, 0, 0.0, 0.0, 0.0,
                             0x7777_000000001, 0x8888_000000002, 0x9999_000000003, 0xAAAA, 0xBBBB, 0xCCCC))
    packed = pack_stat(sample)
    values = {"st_dev": 0x2222, "st_ino": 0x1111, "st_nlink": 0x3333, "st_mode": 0o100644, "st_uid": 0x44,
              "st_gid": 0x55, "st_rdev": 0xCCCC, "st_size": 0x6666, "st_blksize": 0xAAAA, "st_blocks": 0xBBBB}
    for name, value in values.items():
        off, size = probe.fields[("stat", name)]
        assert int.from_bytes(packed[off:off + size], "little") == value, name
    for name, ns in (("st_atim", 0x7777_000000001), ("st_mtim", 0x8888_000000002), ("st_ctim", 0x9999_000000003)):
        off, size = probe.fields[("stat", name)]
        assert size == 16 and struct.unpack_from("<qq", packed, off) == divmod(ns, 10**9), name


def test_pack_statx_matches_the_kernel(probe: Probe):
    assert probe.sizes["statx"] == 256
    kernel = probe.raw["statx"]
    ours = pack_statx(os.stat(probe.file), STATX_BASIC_STATS)
    assert len(ours) == 256
    mask_off, _ = probe.fields[("statx", "stx_mask")]
    (kernel_mask,) = struct.unpack_from("<I", kernel, mask_off)
    assert struct.unpack_from("<I", ours, mask_off) == (STATX_BASIC_STATS,)
    assert kernel_mask & STATX_BASIC_STATS == STATX_BASIC_STATS
    for (struct_name, name), (off, size) in probe.fields.items():
        if struct_name == "statx" and name != "stx_mask":
            assert ours[off:off + size] == kernel[off:off + size], name
    assert err(pack_statx, os.stat(probe.file), 0x80000000) == errno.EINVAL
    assert pack_statx(os.stat(probe.file), 0) == ours  # the basic stats come back whatever was asked


def test_pack_dirents_matches_the_kernel(probe: Probe):
    for name, expected in (("d_ino", (0, 8)), ("d_off", (8, 8)), ("d_reclen", (16, 2)), ("d_type", (18, 1)),
                           ("d_name", (19, 0))):
        assert probe.fields[("dirent64", name)] == expected
    kernel = probe.raw["dirents"]
    records = {}
    off = 0
    while off < len(kernel):
        ino, _, reclen, d_type = struct.unpack_from("<QqHB", kernel, off)
        name = kernel[off + 19:off + reclen].split(b"\0", 1)[0]
        records[name] = (ino, d_type, kernel[off:off + reclen])
        off += reclen
    assert len(records) == 20 + 4
    with Sandbox(str(probe.directory), str(probe.file), "/prog") as sandbox:
        listing = sandbox.open(b"/", cwd=b"/").entries
    assert {n for _, _, n in listing} == set(records)
    for index, (ino, d_type, name) in enumerate(listing):
        if name == b"..":
            continue  # the sandbox root is its own parent
        ours, _ = pack_dirents(listing, index, 4096)
        one = ours[:struct.unpack_from("<H", ours, 16)[0]]
        theirs = records[name][2]
        assert (ino, d_type) == records[name][:2]
        assert len(one) % 8 == 0 and one[:8] + one[16:] == theirs[:8] + theirs[16:], name
        assert struct.unpack_from("<q", one, 8)[0] == index + 1  # d_off: the next entry's index


# ---- encodings without the kernel -----------------------------------------------------------------------------

def test_pack_dirents_paging():
    entries = [(i + 1, 8, b"f" * (i % 13 + 1)) for i in range(40)]
    whole, end = pack_dirents(entries, 0, 1 << 20)
    assert end == 40
    for bufsize in (40, 48, 64, 100, 1000):
        pages, index = [], 0
        while index < len(entries):
            chunk, index = pack_dirents(entries, index, bufsize)
            assert 0 < len(chunk) <= bufsize
            pages.append(chunk)
        assert b"".join(pages) == whole
    assert pack_dirents(entries, 40, 10) == (b"", 40)
    assert err(pack_dirents, entries, 0, 23) == errno.EINVAL
    assert err(pack_dirents, [(1, 8, b"x" * 30)], 0, 48) == errno.EINVAL
    assert err(pack_dirents, [(1, 8, b"x" * 29)], 0, 55) == errno.EINVAL  # 19 + 29 + NUL = 49: 56 aligned
    assert pack_dirents([(1, 8, b"x" * 28)], 0, 48)[1] == 1  # 19 + 28 + NUL = 48 exactly


listings = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255),
                              st.binary(min_size=1, max_size=300)), max_size=20)


@given(listings)
def test_listing_encoding_round_trips(entries):
    data = encode_listing(entries)
    assert decode_listing(data) == entries and encode_listing(decode_listing(data)) == data


def test_listing_decoding_rejects_garbage():
    data = encode_listing([(1, 4, b"."), (2, 8, b"file")])
    for bad in (b"", b"nope", data[:-1], data + b"x", data[:12]):
        with pytest.raises(ValueError):
            decode_listing(bad)


def test_fake_stats():
    for kind, rdev in (("null", (1, 3)), ("zero", (1, 5)), ("random", (1, 9))):
        st_ = fake_stat_for(kind)
        assert S.S_ISCHR(st_.st_mode) and (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == rdev
        assert st_.st_mode & 0o777 == 0o666 and len(pack_stat(st_)) == 144
    pipe = fake_stat_for("pipe")
    assert S.S_ISFIFO(pipe.st_mode) and pipe.st_size == 0 and len(pack_statx(pipe, STATX_BASIC_STATS)) == 256
    with pytest.raises(ValueError):
        fake_stat_for("tty")


# ---- property: no path ever leaves the root -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixed_tree(tmp_path_factory) -> Tree:
    return build_tree(tmp_path_factory.mktemp("prop"))


COMPONENTS = [b"..", b".", b"", b"etc", b"passwd", b"sub", b"deep", b"er", b"leaf", b"file", b"proc", b"self",
              b"exe", b"root", b"cwd", b"fd", b"0", b"1", b"dev", b"null", b"other", b"OUTSIDE_DIR", b"ROOT_DIR",
              b"secret", b"abs_secret", b"abs_outside_dir", b"rel_secret", b"up", b"up3", b"passwd_link",
              b"host_passwd", b"loop1", b"self_loop", b"dir_loop", b"chain7", b"sub_link", b"dotdot", b"proc_root",
              b"proc_exe_link", b"dangling", b"tmp", b"pytest-of-root"]
FLAGS = [0, O_NOFOLLOW, O_PATH, O_PATH | O_NOFOLLOW, O_DIRECTORY, O_WRONLY, O_CREAT | O_RDWR]
VIRTUAL_PATHS = {b"/proc", b"/proc/self", b"/proc/self/exe", EXE_GUEST, b"/dev/null", b"/dev/zero",
                 b"/dev/random", b"/dev/urandom"}
ALLOWED_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EROFS, errno.EISDIR, errno.EEXIST}


@settings(max_examples=500, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=14), absolute=st.booleans(),
       cwd=st.sampled_from([b"/", b"/sub", b"/sub/deep/er", b"/etc", b"/proc/self"]),
       dir_path=st.sampled_from([None, b"/sub/deep", b"/proc"]), flags=st.sampled_from(FLAGS))
def test_random_paths_never_leave_the_root(fixed_tree: Tree, parts, absolute, cwd, dir_path, flags):
    tree = fixed_tree
    path = (b"/" if absolute else b"") + b"/".join(parts)
    outside = {(s.st_dev, s.st_ino) for s in map(os.stat, (tree.base, tree.outside, tree.secret, tree.base.parent))}
    in_root_files = {p.read_bytes() for p in tree.root.rglob("*") if p.is_file() and not p.is_symlink()}
    with tree.sandbox() as sandbox:
        try:
            opened = sandbox.open(path, cwd=cwd, dir_path=dir_path, flags=flags)
        except OSError as e:
            assert e.errno in ALLOWED_ERRNOS, (path, e)
        else:
            assert opened.data != SECRET
            assert (opened.stat.st_dev, opened.stat.st_ino) not in outside
            assert b"ROOT_DIR" not in {n for _, _, n in opened.entries}
            if opened.kind == "file":
                assert opened.data in in_root_files | {EXE_CONTENT}
            assert opened.guest_path.startswith(b"/")
            if opened.guest_path not in VIRTUAL_PATHS:
                assert inside(tree, opened.guest_path, opened.stat)
        for follow in (True, False):
            try:
                st_ = sandbox.stat(path, cwd=cwd, dir_path=dir_path, follow=follow)
            except OSError as e:
                assert e.errno in ALLOWED_ERRNOS, (path, e)
            else:
                assert (st_.st_dev, st_.st_ino) not in outside
        try:
            real = sandbox.realpath(path, cwd=cwd, dir_path=dir_path)
        except OSError as e:
            assert e.errno in ALLOWED_ERRNOS, (path, e)
        else:
            assert real.startswith(b"/") and b"/../" not in real + b"/" and b"/./" not in real + b"/"
            if real not in VIRTUAL_PATHS:
                assert inside(tree, real, sandbox.stat(path, cwd=cwd, dir_path=dir_path))
