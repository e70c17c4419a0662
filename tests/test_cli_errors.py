"""Bad input through the CLI: one line naming the problem, exit 1 (2 for usage
errors), no traceback, and no file created or changed."""

from __future__ import annotations

import sqlite3

import pytest

from cli_helpers import file_digest, ok, one_line_error, snapctl
from kvm_helpers import kvm, require_kvm


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    require_kvm()
    store = tmp_path_factory.mktemp("good") / "good.db"
    ok("run", "--mem", "8M", "--checkpoints", 2, "--every-steps", 1000, store=store)
    return store


RUN_CASES = [
    (["--mem", "0"], 2, "--mem"), (["--mem", "12Q"], 2, "not a size"), (["--mem", "8192"], 1, "no data area"),
    (["--mem", "3000001"], 1, "multiple of the 4096"), (["--mem", "100G"], 1, "larger than"),
    (["--guest", "nope"], 1, "unknown guest 'nope'"), (["--vcpus", "0"], 1, "vcpu count"),
    (["--vcpus", "100000"], 1, "vcpu count"), (["--ring-entries", "1000"], 1, "power of two"),
    (["--ring-entries", "64"], 1, "below the kernel minimum"), (["--ring-entries", "1048576"], 1, "above the kernel maximum"),
    (["--tracking", "magic"], 2, "ring or bitmap"), (["--interval", "-5"], 2, "--interval"),
    (["--checkpoints", "-1"], 2, "--checkpoints"), (["--every-steps", "0"], 2, "--every-steps"),
    (["--interval", "5", "--every-steps", "5"], 2, "not both"), (["--seed", "0"], 1, "seed"),
    (["--param", "hot_pages"], 2, "name=value"), (["--guest", "hotset", "--param", "hot_percent=0"], 1, "hot_percent"),
    (["--steps-per-yield", "0"], 1, "steps per yield"),
]


@kvm
@pytest.mark.parametrize("args, code, needle", RUN_CASES, ids=[" ".join(a) for a, _, _ in RUN_CASES])
def test_run_refuses_bad_values_and_creates_nothing(tmp_path, args, code, needle):
    store = tmp_path / "new.db"
    r = snapctl("run", *args, store=store)
    one_line_error(r, code, needle)
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_no_kvm_device_is_one_line_and_creates_nothing(tmp_path):
    store = tmp_path / "new.db"
    r = snapctl("run", store=store, env={"SNAPCTL_KVM": str(tmp_path / "kvm")})
    one_line_error(r, 1, "does not exist", "no kvm")
    assert not store.exists()


@kvm
def test_run_refuses_an_existing_store(good_store):
    before = file_digest(good_store)
    one_line_error(snapctl("run", store=good_store), 1, "already exists")
    assert file_digest(good_store) == before


@kvm
@pytest.mark.parametrize("args, code, needle", [
    (["show", "99"], 1, "no checkpoint 99"), (["show", "nosuchtag"], 1, "nosuchtag"),
    (["show", "-1"], 2, "no such option"), (["read", "1", "0x7fffff00", "16"], 1, "past the end"),
    (["read", "1", "zz"], 2, "not a size"), (["read", "1", "0", "10G"], 1, "past the end"),
    (["read", "1", "0", "4", "--format", "pdf"], 2, "hex or raw"), (["diff", "0", "42"], 1, "42"),
    (["history", "0x10000000"], 1, "beyond the end"), (["replay", "7"], 1, "no checkpoint 7"),
    (["restore", "99", "--checkpoints", "1"], 1, "no checkpoint 99"), (["tag", "1", "123"], 1, "digits"),
    (["prune"], 2, "exactly one"), (["prune", "--keep-last", "0"], 2, "--keep-last"),
    (["export", "1", "/nonexistent-dir/x.raw"], 1, "does not exist"), (["export", "1", "x", "--format", "qcow2"], 2, "raw"),
])
def test_bad_ids_and_ranges_do_not_change_the_store(good_store, args, code, needle):
    before = file_digest(good_store)
    one_line_error(snapctl(*args, store=good_store), code, needle)
    assert file_digest(good_store) == before


@kvm
def test_export_never_overwrites_or_follows_a_symlink_without_force(good_store, tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.raw"
    link.symlink_to(target)
    for path in (target, link):
        one_line_error(snapctl("export", 1, path, store=good_store), 1, "already exists", "--force")
    assert target.read_bytes() == b"keep me"
    ok("export", 1, link, "--force", store=good_store)
    assert target.read_bytes() == b"keep me" and not link.is_symlink()  # replaced, not written through
    assert link.stat().st_mode & 0o777 == 0o600 and link.stat().st_size == 8 << 20


@pytest.mark.parametrize("content", [b"", b"hello, not a database\n", "sqlite"])
def test_foreign_files_are_refused_and_untouched(tmp_path, content):
    path = tmp_path / "foreign.db"
    if content == "sqlite":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    for cmd in (["list"], ["show", "0"], ["verify"], ["tag", "0", "x"], ["prune", "--keep-last", "1"]):
        r = snapctl(*cmd, store=path)
        one_line_error(r, 1)
        assert "store" in r.err.lower() or "database" in r.err.lower()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db"]


def test_missing_store_and_directory(tmp_path):
    one_line_error(snapctl("list", store=tmp_path / "none.db"), 1, "no store at")
    one_line_error(snapctl("list", store=tmp_path), 1, "is a directory")
    one_line_error(snapctl("list", store=tmp_path / "no" / "dir.db"), 1, "no store at")


def test_usage_errors_exit_2():
    one_line_error(snapctl("frobnicate"), 2, "no such command")
    one_line_error(snapctl("show"), 2, "missing argument")


def test_another_package_named_storage_is_one_line_not_a_traceback(tmp_path):
    """`storage` is a generic top-level name (docs/architecture.md): when another
    installed package of that name shadows snapctl's store, commands say so."""
    from pathlib import Path
    shadow = tmp_path / "shadow" / "storage"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("something_else = 1\n")
    env = {"PYTHONPATH": f"{shadow.parent}:{Path(__file__).resolve().parents[1]}"}
    r = snapctl("run", "--checkpoints", 1, store=tmp_path / "new.db", env=env, cwd=tmp_path)
    one_line_error(r, 1, "snapctl is not installed whole")
    assert str(shadow) in r.err and not (tmp_path / "new.db").exists()
    (tmp_path / "s.db").write_bytes(b"not looked at")
    for args in (("list",), ("verify",), ("prune", "--keep-last", 1, "--yes")):
        r = snapctl(*args, store=tmp_path / "s.db", env=env, cwd=tmp_path)
        one_line_error(r, 1, "snapctl is not installed whole")
        assert str(shadow) in r.err and (tmp_path / "s.db").read_bytes() == b"not looked at"
