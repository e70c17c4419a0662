"""Hostile input through the CLI, beyond tests/test_cli_errors.py: each case gives
one line naming the problem, exit 1 (an error) or 2 (a usage error), no
traceback, and no file created or changed (the store, its directory, OUT)."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct

import pytest

from cli_helpers import ok, one_line_error, snapctl
from kvm_helpers import kvm, require_kvm
from rel_helpers import tree_state
from storage import SCHEMA_VERSION


def _stable(state: dict) -> dict:
    """The store's data: the main file and a non-empty -wal. SQLite itself creates and removes the
    shared-memory index (-shm) and an empty -wal as connections open and close."""
    return {k: v for k, v in state.items()
            if not k.endswith("-shm") and not (k.endswith("-wal") and len(v) > 1 and v[1] == 0)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    require_kvm()
    d = tmp_path_factory.mktemp("hostile")
    store = d / "good.db"
    ok("run", "--mem", "8M", "--checkpoints", 2, "--every-steps", 1000, store=store)
    ok("tag", 1, "t1", store=store)
    ok("list", store=store)  # readers leave -wal/-shm: create them before the cases run
    return store


# -- `run` with bad values: nothing may be created --------------------------------------------------
RUN_CASES = [
    (["--mem", "4097"], 1, "multiple"), (["--mem", "2M"], 1, "no data"), (["--mem", "-1"], 2, "--mem"),
    (["--mem", "1.5G"], 2, "not a size"), (["--mem", ""], 2, "not a size"), (["--mem", "1T"], 2, "not a size"),
    (["--mem", "0x"], 2, "not a size"), (["--vcpus", "-1"], 1, "vcpu count"), (["--vcpus", "abc"], 2, "--vcpus"),
    (["--vcpus", "2", "--mem", str((2 << 20) + 4096)], 1, "no data pages"),
    (["--ring-entries", "0"], 1, "ring"), (["--ring-entries", "255"], 1, "power of two"),
    (["--ring-entries", "-256"], 2, "--ring-entries"), (["--ring-entries", "0x100000000"], 1, "maximum"),
    (["--interval", "0"], 2, "--interval"), (["--interval", "nan"], 2, "--interval"),
    (["--interval", "abc"], 2, "--interval"), (["--every-steps", "-5"], 2, "--every-steps"),
    (["--every-steps", "1e3"], 2, "not a size"), (["--checkpoints", "abc"], 2, "--checkpoints"),
    (["--seed", "-1"], 2, "--seed"), (["--seed", str(1 << 64)], 1, "seed"), (["--seed", "abc"], 2, "not a size"),
    (["--guest", ""], 1, "unknown guest"), (["--guest", "STAMP"], 1, "unknown guest"),
    (["--guest", "../stamp"], 1, "unknown guest"), (["--tracking", ""], 2, "ring or bitmap"),
    (["--tracking", "RING"], 2, "ring or bitmap"), (["--param", "=5"], 2, "name=value"),
    (["--param", "hot_pages=abc"], 2, "not an integer"), (["--steps-per-yield", "-1"], 2, "--steps-per-yield"),
]


@kvm
@pytest.mark.parametrize("args, code, needle", RUN_CASES, ids=[" ".join(a) or "empty" for a, _, _ in RUN_CASES])
def test_run_refuses_hostile_values_and_creates_nothing(tmp_path, args, code, needle):
    r = snapctl("run", *args, store=tmp_path / "new.db", timeout=60)
    one_line_error(r, code, needle)
    assert list(tmp_path.iterdir()) == []


@kvm
def test_run_into_a_missing_directory_creates_nothing(tmp_path):
    one_line_error(snapctl("run", "--mem", "8M", store=tmp_path / "no" / "such" / "x.db"), 1, "does not exist")
    assert list(tmp_path.iterdir()) == []


@kvm
@pytest.mark.parametrize("target", ["/dev/zero", "dangling"])
def test_run_refuses_a_symlinked_store_path(tmp_path, target):
    link = tmp_path / "s.db"
    link.symlink_to(target if target.startswith("/") else tmp_path / "nowhere")
    before = tree_state(tmp_path)
    one_line_error(snapctl("run", "--mem", "8M", store=link), 1, "already exists")
    assert tree_state(tmp_path) == before


@kvm
@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_run_refuses_an_infinite_interval(tmp_path, value):
    """Regression guard (fixed in c7d490f): used to create the store, then die with an OverflowError."""
    r = snapctl("run", "--mem", "8M", "--checkpoints", 1, "--interval", value, store=tmp_path / "new.db", timeout=60)
    one_line_error(r, 2, "--interval")
    assert list(tmp_path.iterdir()) == []


# -- hostile store files -------------------------------------------------------------------------------

def _sqlite(path, *, app_id=None, user_version=None, wal=False, tables=("CREATE TABLE t (x)",)):
    con = sqlite3.connect(path)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    for t in tables:
        con.execute(t)
    if app_id is not None:
        con.execute(f"PRAGMA application_id={app_id}")
    if user_version is not None:
        con.execute(f"PRAGMA user_version={user_version}")
    con.commit()
    if wal:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.unlink(f"{path}{suffix}")


def _schema(path, good, version):
    shutil.copy(good, path)
    with open(path, "r+b") as f:  # user_version (offset 60), as another snapctl would write
        f.seek(60)
        f.write(struct.pack(">I", version))


def _make(kind, path, good):
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dev-null":
        path.symlink_to("/dev/null")
    elif kind == "magic-only":
        path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 34)
    elif kind == "wal-sqlite-of-another-program":
        _sqlite(path, wal=True)
    elif kind == "marker-without-version":
        _sqlite(path, app_id=0x534E4150)
    elif kind == "marker-without-meta":
        _sqlite(path, app_id=0x534E4150, user_version=SCHEMA_VERSION)
    elif kind == "newer-schema":
        _schema(path, good, SCHEMA_VERSION + 1)
    elif kind == "older-schema":
        _schema(path, good, SCHEMA_VERSION - 1)
    elif kind == "random-bytes":
        seed = int(os.environ.get("SNAPCTL_TEST_SEED", random.randrange(1 << 30)))
        print(f"random-bytes seed {seed} (SNAPCTL_TEST_SEED={seed} repeats it)")
        path.write_bytes(random.Random(seed).randbytes(40000))


STORE_FILES = [("dev-zero", "not a regular file"), ("dev-null", "not a regular file"),
               ("magic-only", "not an sqlite database"), ("wal-sqlite-of-another-program", "snapctl marker"),
               ("marker-without-version", "schema version"), ("marker-without-meta", "not a snapctl store"),
               ("newer-schema", "newer"), ("older-schema", "older"),
               ("random-bytes", "not an sqlite database")]


@kvm
@pytest.mark.parametrize("kind, needle", STORE_FILES, ids=[k for k, _ in STORE_FILES])
def test_hostile_store_files_are_refused_and_untouched(tmp_path, good, kind, needle):
    path = tmp_path / "s.db"
    _make(kind, path, good)
    before = tree_state(tmp_path)
    for args in (["list"], ["tag", "0", "x"], ["export", "0", tmp_path / "out.raw"]):
        one_line_error(snapctl(*args, store=path, timeout=30), 1, needle)
    assert tree_state(tmp_path) == before


@kvm
def test_a_fifo_as_store_is_refused_at_once(tmp_path):
    """Regression guard (fixed in c7d490f): check_header() used to block in open() forever."""
    fifo = tmp_path / "s.db"
    os.mkfifo(fifo)
    import subprocess
    try:
        r = snapctl("list", store=fifo, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("`snapctl list --store FIFO` hung")
    one_line_error(r, 1)


# -- bad ids, addresses and numbers against a good store -------------------------------------------------
GOOD_CASES = [
    (["read", "1", "--store", "STORE", "--", "-5"], 2, "non-negative"), (["read", "1", "0x7ffff0", "0x20"], 1, "past the end"),
    (["read", "1", "99999999999999999999999"], 1, "past the end"), (["read", "1", "0", "--store", "STORE", "--", "-1"], 2, "non-negative"),
    (["read", "1", "0x", "4"], 2, "not a size"), (["read", "1", "0", "4.5"], 2, "not a size"),
    (["read", "nosuchtag", "0"], 1, "nosuchtag"), (["export", "nosuchtag", "OUT"], 1, "nosuchtag"),
    (["export", "99", "OUT"], 1, "no checkpoint 99"), (["export", "1", "OUT", "--format", ""], 2, "raw"),
    (["diff", "t1", "nosuch"], 1, "nosuch"), (["tag", "99", "x"], 1, "no checkpoint 99"),
    (["tag", "1", ""], 1, "tag name"), (["tag", "1", " sp"], 1, "tag name"), (["tag", "0", "t1"], 1, "already names"),
    (["prune", "--keep", "99"], 1, "no checkpoint 99"), (["prune", "--keep-last", "-3"], 2, "--keep-last"),
    (["prune", "--keep-last", "abc"], 2, "--keep-last"), (["restore", "1", "--checkpoints", "-1"], 2, "--checkpoints"),
    (["restore", "1", "--steps", "0"], 2, "--steps"), (["restore", "1", "--steps", "-5"], 2, "--steps"),
    (["restore", "1", "--every-steps", "5", "--interval", "5"], 2, "not both"),
    (["restore", "nosuchtag"], 1, "nosuchtag"), (["replay", "0", "--to", "nosuch"], 1, "nosuch"),
    (["history", "--store", "STORE", "--", "-4096"], 2, "non-negative"), (["history", "0xffffffffffffffffffff"], 1, "beyond the end"),
    (["show", "1.5"], 1, "1.5"), (["show", "99999999999999999999999"], 1, "no checkpoint"),
]


@kvm
@pytest.mark.parametrize("args, code, needle", GOOD_CASES, ids=[" ".join(a) for a, _, _ in GOOD_CASES])
def test_bad_ids_addresses_and_numbers_change_nothing(good, tmp_path, args, code, needle):
    out = tmp_path / "out.raw"
    args = [out if a == "OUT" else good if a == "STORE" else a for a in args]
    before = _stable(tree_state(good.parent))
    one_line_error(snapctl(*args, store=None if good in args else good, timeout=60), code, needle)
    assert _stable(tree_state(good.parent)) == before
    assert not out.exists() and list(tmp_path.iterdir()) == []
