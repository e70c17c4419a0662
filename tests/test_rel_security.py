"""Security: stores, their SQLite sidecars and exports are mode 0600 whatever the
umask (guest memory can hold secrets); `export` never overwrites a file or
writes through a symlink without --force, and with --force replaces, never
writes through."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from cli_helpers import ok, one_line_error, snapctl
from kvm_helpers import kvm, require_kvm
from rel_helpers import open_ro, image, tree_state


def _modes(d) -> dict:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in d.iterdir() if not p.is_symlink()}


@kvm
def test_every_file_is_0600_under_umask_0(tmp_path):
    store = tmp_path / "s.db"
    r = snapctl("run", "--mem", "8M", "--checkpoints", 2, "--every-steps", 1000, store=store, umask=0)
    assert r.code == 0, r.err
    assert _modes(tmp_path) and set(_modes(tmp_path).values()) == {0o600}, _modes(tmp_path)
    # every later command, read-only or writing, under umask 0: still nothing but 0600
    for args in (["list"], ["verify"], ["tag", 1, "x"], ["restore", 1, "--steps", 100],
                 ["export", 2, tmp_path / "img.raw"], ["read", 1, 0, 16], ["prune", "--keep-last", 1]):
        r = snapctl(*args, store=store, umask=0)
        assert r.code == 0, (args, r.err)
        assert set(_modes(tmp_path).values()) == {0o600}, (args, _modes(tmp_path))
    assert (tmp_path / "img.raw").stat().st_size == 8 << 20


def test_the_store_api_creates_0600_under_umask_0(tmp_path):
    from storage import Store

    old = os.umask(0)
    try:
        with Store.create(str(tmp_path / "api.db"), {"mem_size": 16 * 4096}) as st:
            with st.checkpoint(None, {"step": 0}) as w:
                w.add_pages(np.arange(16), np.full((16, 4096), 7, np.uint8))
            assert set(_modes(tmp_path).values()) == {0o600}, _modes(tmp_path)
    finally:
        os.umask(old)
    assert set(_modes(tmp_path).values()) == {0o600}, _modes(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    require_kvm()
    s = tmp_path_factory.mktemp("sec") / "s.db"
    ok("run", "--mem", "8M", "--checkpoints", 1, "--every-steps", 1000, store=s)
    return s


@kvm
def test_export_refuses_a_dangling_symlink_and_creates_no_target(store, tmp_path):
    link = tmp_path / "out.raw"
    link.symlink_to(tmp_path / "target.raw")
    before = tree_state(tmp_path)
    one_line_error(snapctl("export", 1, link, store=store), 1, "already exists", "--force")
    assert tree_state(tmp_path) == before and not (tmp_path / "target.raw").exists()


@kvm
def test_export_refuses_a_fifo_and_a_directory_without_force(store, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    before = tree_state(tmp_path)
    one_line_error(snapctl("export", 1, fifo, store=store, timeout=30), 1, "already exists")
    one_line_error(snapctl("export", 1, tmp_path / "dir", store=store), 1)
    one_line_error(snapctl("export", 1, tmp_path / "dir", "--force", store=store), 1, "directory")
    assert tree_state(tmp_path) == before


@kvm
def test_export_force_replaces_a_hard_link_without_writing_through_it(store, tmp_path):
    other = tmp_path / "other"
    other.write_bytes(b"do not touch")
    out = tmp_path / "out.raw"
    os.link(other, out)
    ok("export", 1, out, "--force", store=store)
    assert other.read_bytes() == b"do not touch"
    assert out.stat().st_size == 8 << 20 and stat.S_IMODE(out.stat().st_mode) == 0o600
    with open_ro(store) as st:
        assert np.array_equal(np.fromfile(out, np.uint8).reshape(-1, 4096), image(st, 1))


@kvm
def test_a_failed_forced_export_keeps_the_old_file_and_leaves_no_temp_file(store, tmp_path):
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous export")
    before = tree_state(tmp_path)
    one_line_error(snapctl("export", 99, out, "--force", store=store), 1, "no checkpoint 99")
    assert tree_state(tmp_path) == before
