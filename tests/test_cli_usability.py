"""Issue 14 (the command line as a new user meets it) and the stored-escapes
item of issue 16, each through the real CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from cli_helpers import file_digest, ok, one_line_error, snapctl, spawn
from kvm_helpers import kvm, require_kvm

ROOT = Path(__file__).parents[1]
ESCAPES = "\x1b]0;pwned\x07\x1b[2J"


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """0..4 sync (4000 steps apart), then a branch 5, 6 from 2; 3 tagged with a long name."""
    require_kvm()
    store = tmp_path_factory.mktemp("branched") / "b.db"
    ok("run", "--mem", "8M", "--checkpoints", 4, "--every-steps", 4000, store=store)
    ok("restore", 2, "--checkpoints", 2, "--every-steps", 3000, store=store)
    ok("tag", 3, "a-rather-long-tag-name-" + "x" * 60, store=store)
    return store


# -- 1. list never cuts ids or values ----------------------------------------------------------

@kvm
def test_list_through_a_pipe_is_plain_aligned_text_with_every_value_whole(branched):
    r = ok("list", store=branched, env={"COLUMNS": "40"})
    assert "…" not in r.out and "─" not in r.out and "\x1b" not in r.out
    lines = r.out.splitlines()
    assert lines[0].split()[:4] == ["id", "parent", "step", "trigger"]
    assert [int(l.split()[0]) for l in lines[1:]] == list(range(7))
    assert "a-rather-long-tag-name-" + "x" * 60 in r.out
    listing = ok("list", "--json", store=branched).json()
    for line, c in zip(lines[1:], listing):
        assert line.split()[:3] == [str(c["id"]), str(c["parent"] if c["parent"] is not None else "-"), str(c["step"])]
        assert c["created"] in line and c["digest"] not in line


@kvm
@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_list_tsv_and_csv_parse_back_to_the_json(branched, fmt):
    text = ok("list", "--format", fmt, store=branched).out
    rows = list(csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ","))
    listing = ok("list", "--json", store=branched).json()
    assert rows[0][:4] == ["id", "parent", "step", "trigger"] and len(rows) == len(listing) + 1
    for row, c in zip(rows[1:], listing):
        assert int(row[0]) == c["id"] and int(row[2]) == c["step"] and row[4] == c["created"]
        assert row[-1] == ",".join(c["tags"])


@kvm
def test_list_on_a_narrow_terminal_drops_columns_but_never_cuts_an_id(branched):
    r = snapctl("list", store=branched, tty=True, env={"COLUMNS": "50", "LINES": "40"})
    assert r.code == 0, r.out
    assert "…" not in r.out
    lines = [l for l in r.out.replace("\r", "").splitlines() if l.strip()]
    ids = [l.split()[0] for l in lines[1:] if l.split()[0].isdigit()]
    assert ids == [str(i) for i in range(7)]
    assert all(len(l) <= 50 for l in lines if not l.startswith("(")), lines
    assert "too narrow for:" in r.out  # says what it dropped
    tagline = "".join(l.strip() for l in lines)
    assert "a-rather-long-tag-name-" + "x" * 60 in tagline.replace(" ", "")  # folded, not cut


@kvm
def test_list_tree_draws_the_branch(branched):
    lines = ok("list", "--tree", store=branched).out.splitlines()
    assert lines[0].startswith("0  base") and lines[2].startswith("2  sync")
    assert lines[3].startswith("├─ 3  sync") and lines[4].startswith("│  4  sync")
    assert lines[5].startswith("└─ 5  sync") and lines[6].startswith("   6  sync")


# -- 2. help ---------------------------------------------------------------------------------

def test_no_arguments_prints_the_normal_multi_line_help():
    r = snapctl()
    assert r.code == 2 and "error:" not in r.err
    assert r.err.startswith("Usage: snapctl") and "Commands:" in r.err and r.err.count("\n") > 15


def test_help_has_clean_metavars_and_dash_h():
    from snapctl.cli import command

    for name in [None, *command().commands]:
        args = ([name] if name else []) + ["-h"]
        r = ok(*args)
        assert r.out.startswith("Usage: snapctl"), r.out
        for bad in ("<str>", "<int>", "<float>", "[[", "{", "<list"):
            assert bad not in r.out, (name, bad, r.out)


def test_version_is_quick_to_ask_and_shell_completion_is_offered():
    assert ok("--version").out.startswith("snapctl ")
    assert "--install-completion" in ok("--help").out
    r = ok("--show-completion", env={"SHELL": "/bin/bash"})
    assert "complete" in r.out and "snapctl" in r.out


@kvm
def test_store_is_accepted_before_the_command(branched, tmp_path):
    assert ok("--store", branched, "list", "--json").json()[0]["id"] == 0
    # the command's own --store wins; $SNAPCTL_STORE is the fallback
    one_line_error(snapctl("--store", branched, "list", "--store", tmp_path / "none.db"), 1, "no store at")
    assert ok("list", "--json", env={"SNAPCTL_STORE": str(branched)}).json()[-1]["id"] == 6


# -- 3 and 7. replay says what it compared; unreachable targets are refused ----------------------

@kvm
def test_replay_of_an_async_target_says_registers_were_not_compared(tmp_path):
    store = tmp_path / "a.db"
    ok("run", "--mem", "8M", "--checkpoints", 3, "--interval", 20, store=store)
    # An async kick may land between a page write and the step count's store, so a
    # replay can legitimately differ by that one page: either way, it says what it compared.
    for ckpt in (1, 2):
        r = snapctl("replay", ckpt, store=store)
        assert "memory and registers" not in r.out
        if r.code == 0:
            assert "compared memory: identical; registers not compared" in r.out and r.err == ""
        else:
            assert r.code == 1 and "MISMATCH" in r.out and "compared memory)" in r.out
        d = snapctl("replay", ckpt, "--json", store=store)
        assert d.json()["compared"] == ["memory"] and d.json()["match"] is (d.code == 0)


@kvm
def test_replay_across_branches_is_refused_up_front_with_exit_2(branched):
    before = file_digest(branched)
    one_line_error(snapctl("replay", 5, "--to", 4, store=branched), 2, "not 5 or a descendant")
    one_line_error(snapctl("replay", 4, "--to", 3, store=branched), 2, "not 4 or a descendant")
    assert file_digest(branched) == before
    r = ok("replay", 2, "--to", 6, store=branched)
    assert "match" in r.out and "memory and registers: identical" in r.out


# -- 4. Ctrl-C -------------------------------------------------------------------------------

def _wait_for_checkpoints(store: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        r = snapctl("list", "--format", "tsv", store=store)
        if r.code == 0 and len(r.out.splitlines()) - 1 >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} checkpoints within {timeout} s")


def _interrupt(proc) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


@kvm
def test_ctrl_c_during_run_and_restore_keeps_and_reports_the_checkpoints(tmp_path):
    store = tmp_path / "i.db"
    p = spawn("run", "--mem", "8M", "--checkpoints", 100000, "--interval", 50, store=store)
    _wait_for_checkpoints(store, 3, p)
    code, out, err = _interrupt(p)
    ids = [c["id"] for c in ok("list", "--json", store=store).json()]
    assert code == 130 and out == ""
    assert err == f"interrupted: {len(ids)} checkpoints kept (last: {ids[-1]})\n"
    assert ok("verify", "--json", store=store).json()["ok"]

    p = spawn("restore", 1, "--checkpoints", 100000, "--every-steps", 3000, store=store)
    _wait_for_checkpoints(store, len(ids) + 2, p)
    code, out, err = _interrupt(p)
    after = [c["id"] for c in ok("list", "--json", store=store).json()]
    new = [i for i in after if i not in ids]
    assert code == 130 and err == f"interrupted: {len(new)} checkpoints kept (last: {new[-1]})\n"
    assert ok("verify", "--json", store=store).json()["ok"]
    assert all(c["parent"] == 1 for c in ok("list", "--json", store=store).json() if c["id"] == new[0])


# -- on-demand checkpoints: SIGUSR1 and --control --------------------------------------------------

@kvm
@pytest.mark.parametrize("mode", [["--interval", "400"], ["--every-steps", "2000000"]], ids=["async", "sync"])
def test_sigusr1_and_the_control_socket_take_a_checkpoint_now(tmp_path, mode):
    store, sock = tmp_path / "u.db", tmp_path / "ctl.sock"
    p = spawn("run", "--mem", "8M", "--checkpoints", 100000, *mode, "--control", sock, store=store)
    try:
        _wait_for_checkpoints(store, 1, p)
        p.send_signal(signal.SIGUSR1)
        _wait_for_checkpoints(store, 2, p)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(sock))
            s.sendall(b"checkpoint\nnonsense\n")
            f = s.makefile()
            assert f.readline() == "ok\n" and f.readline().startswith("error: unknown request")
        _wait_for_checkpoints(store, 3, p)
        code, _, err = _interrupt(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert code == 130 and "interrupted:" in err
    listing = ok("list", "--json", store=store).json()
    manual = [c for c in listing if c["trigger"] == "manual"]
    assert len(manual) >= 2 and all(c["parent"] == c["id"] - 1 for c in listing[1:])
    assert ok("verify", "--json", store=store).json()["ok"] and not sock.exists()
    # a manual checkpoint is a kick wherever the guest is, like an async one: memory is
    # compared (registers are not), and it may be one page write past its step count
    r = snapctl("replay", manual[0]["parent"], "--to", manual[0]["id"], "--json", store=store)
    d = r.json()
    assert d["compared"] == ["memory"] and d["match"] is (r.code == 0)
    assert d["match"] or (r.code == 1 and d["differing_page_count"] == 1), d


# -- 5 and 6. prune: preview, human text, the file shrinks; delete, vacuum, tags ------------------

@kvm
def test_prune_previews_then_shrinks_the_file(tmp_path):
    store = tmp_path / "p.db"
    ok("run", "--mem", "16M", "--guest", "fill", "--checkpoints", 8, "--every-steps", 3000, store=store)
    before_digest, size = file_digest(store), store.stat().st_size
    r = ok("prune", "--keep-last", 1, "--dry-run", store=store)
    assert "would remove 7 checkpoints: 1-7" in r.out and "dry run: nothing changed" in r.out
    assert "{" not in r.out and "dry_run" not in r.out
    assert file_digest(store) == before_digest
    r = ok("prune", "--keep-last", 1, store=store)
    m = re.search(r"store file: ([\d.]+) MiB -> ([\d.]+) (K|M)iB", r.out)
    assert "removed 7 checkpoints: 1-7" in r.out and m, r.out
    assert store.stat().st_size < size / 2
    assert ok("verify", store=store).out.startswith("ok: 2 checkpoints")


@kvm
def test_prune_on_a_terminal_asks_first(tmp_path):
    store = tmp_path / "q.db"
    ok("run", "--mem", "8M", "--checkpoints", 3, "--every-steps", 2000, store=store)
    before = file_digest(store)
    r = snapctl("prune", "--keep-last", 1, store=store, tty=True, stdin=b"n\n")
    assert r.code == 1 and "would remove 2 checkpoints" in r.out and "nothing removed (not confirmed)" in r.out
    assert file_digest(store) == before
    r = snapctl("prune", "--keep-last", 1, store=store, tty=True, stdin=b"y\n")
    assert r.code == 0 and "removed 2 checkpoints: 1, 2" in r.out
    assert [c["id"] for c in ok("list", "--json", store=store).json()] == [0, 3]


@kvm
def test_prune_without_vacuum_then_vacuum(tmp_path):
    store = tmp_path / "v.db"
    ok("run", "--mem", "16M", "--guest", "fill", "--checkpoints", 6, "--every-steps", 3000, store=store)
    r = ok("prune", "--keep-last", 1, "--no-vacuum", store=store)
    assert "`snapctl vacuum` gives it back" in r.out
    size = os.path.getsize(store)
    d = ok("vacuum", "--json", store=store).json()
    assert d["file_bytes"]["after"] < d["file_bytes"]["before"] and os.path.getsize(store) < size


@kvm
def test_delete_untag_and_rename_tag(tmp_path):
    store = tmp_path / "d.db"
    ok("run", "--mem", "8M", "--checkpoints", 4, "--every-steps", 2000, store=store)
    ok("tag", 2, "two", store=store)
    img3 = ok("read", 3, "0x200000", 8192, "--format", "raw", store=store).raw
    r = ok("delete", "two", store=store)
    assert "removed 1 checkpoint: 2" in r.out and "3 now branches from 1" in r.out and "two" in r.out
    assert ok("read", 3, "0x200000", 8192, "--format", "raw", store=store).raw == img3
    one_line_error(snapctl("show", "two", store=store), 1, "two")
    one_line_error(snapctl("delete", 0, store=store), 1, "base")
    ok("tag", 3, "old", store=store)
    assert "renamed tag old -> new (checkpoint 3)" in ok("rename-tag", "old", "new", store=store).out
    assert ok("show", "new", "--json", store=store).json()["id"] == 3
    ok("tag", 4, "other", store=store)
    one_line_error(snapctl("rename-tag", "new", "other", store=store), 1, "already names")
    assert ok("show", "new", "--json", store=store).json()["tags"] == ["new"]
    ok("untag", "new", store=store)
    one_line_error(snapctl("untag", "new", store=store), 1, "no checkpoint or tag named")
    one_line_error(snapctl("untag", "3", store=store), 2, "checkpoint id")
    assert ok("verify", "--json", store=store).json()["ok"]


@kvm
def test_verify_prints_human_text(branched):
    r = ok("verify", store=branched)
    assert r.out.startswith("ok: 7 checkpoints") and "{" not in r.out and "checked" in r.out


# -- 8. export to stdout, sparse files ---------------------------------------------------------

@kvm
def test_export_dash_is_stdout_and_files_are_sparse(tmp_path):
    store = tmp_path / "e.db"
    ok("run", "--mem", "64M", "--guest", "idle", "--checkpoints", 1, "--every-steps", 100, store=store)
    r = ok("export", 1, "-", store=store)
    assert len(r.raw) == 64 << 20 and r.err.startswith("wrote stdout")
    out = tmp_path / "img.raw"
    ok("export", 1, out, store=store)
    assert out.read_bytes() == r.raw and not (tmp_path / "-").exists()
    assert out.stat().st_blocks * 512 < (4 << 20), "a mostly-zero image should be mostly holes"
    assert out.stat().st_mode & 0o777 == 0o600
    r = snapctl("export", 1, "-", "--json", store=store)  # an error, as JSON since --json was given
    assert r.code == 2 and r.out == "" and "stdout" in json.loads(r.err)["error"]


@kvm
def test_export_refuses_a_terminal_and_shows_progress_on_one(branched, tmp_path):
    r = snapctl("export", 1, "-", store=branched, tty=True)
    assert r.code == 2 and "refusing to write a memory image to a terminal" in r.out
    r = snapctl("export", 1, tmp_path / "x.raw", store=branched, tty=True)
    assert r.code == 0 and "export 1" in r.out and "eta" in r.out  # the bar, drawn on stderr



@kvm
def test_verify_prune_and_vacuum_show_their_progress_on_a_terminal(branched, tmp_path):
    """The store reports (done, total) for verify and prune: a bar with a count and an ETA
    (vacuum cannot know its total: a spinner); nothing of it without a terminal."""
    store = tmp_path / "p.db"
    store.write_bytes(Path(branched).read_bytes())
    r = snapctl("verify", store=store, tty=True)
    assert r.code == 0 and "verifying" in r.out and "eta" in r.out and re.search(r"\d+/\d+", r.out), r.out
    r = snapctl("prune", "--keep-last", 1, "--yes", store=store, tty=True)
    assert r.code == 0 and "rewriting the kept checkpoints' maps" in r.out and "eta" in r.out, r.out
    r = snapctl("verify", store=store)
    assert r.code == 0 and "eta" not in r.err and "verifying" not in r.err

# -- 9. no blank line before errors --------------------------------------------------------------

@kvm
def test_run_errors_are_exactly_one_line(tmp_path, branched):
    one_line_error(snapctl("run", "--mem", "8192", store=tmp_path / "n.db"), 1, "no data area")
    one_line_error(snapctl("run", store=branched), 1, "already exists")


# -- escapes stored in a store never reach the terminal raw (issue 16) ------------------------------

@kvm
def test_stored_escapes_are_printed_escaped(tmp_path):
    store = tmp_path / "x.db"
    ok("run", "--mem", "8M", "--checkpoints", 2, "--every-steps", 2000, store=store)
    ok("tag", 1, "t" + ESCAPES, store=store)
    con = sqlite3.connect(store)  # the trigger column carries no check value (storage/store.py _infos)
    con.execute("UPDATE checkpoints SET trigger = ? WHERE id = 2", ("sync" + ESCAPES,))
    con.commit()
    con.close()
    for args in (["list"], ["list", "--tree"], ["list", "--format", "tsv"], ["show", 2], ["show", 1],
                 ["tag", 1, "u" + ESCAPES]):
        for r in (snapctl(*args, store=store), snapctl(*args, store=store, tty=True)):
            assert r.code == 0, (args, r.out, r.err)
            assert "\x1b" not in r.out + r.err and "\x07" not in r.out + r.err, (args, r.out)
            assert "\\x1b]0;pwned\\x07\\x1b[2J" in r.out, (args, r.out)
    listing = ok("list", "--json", store=store).json()  # JSON carries the real string
    assert listing[2]["trigger"] == "sync" + ESCAPES and "t" + ESCAPES in listing[1]["tags"]


# -- dirty rate ------------------------------------------------------------------------------

@kvm
def test_dirty_rate_per_vcpu_and_in_runs_summary(tmp_path):
    # each vCPU must show pages, but a loaded host may not run one in a short window:
    # measure longer until both have run (the window is not what is tested)
    for seconds in (0.5, 1, 2, 4, 8, 16, 32):
        d = ok("dirty-rate", "--seconds", seconds, "--mem", "16M", "--vcpus", 2, "--json").json()
        if len(d["vcpus"]) != 2 or all(v["pages_per_s"] > 0 for v in d["vcpus"]):
            break
    assert d["pages"] > 0 and d["samples"] >= 1 and d["from"] is None and len(d["vcpus"]) == 2
    assert d["pages_per_s"] == pytest.approx(d["pages"] / d["seconds"], rel=0.01)
    assert d["mib_per_s"] == pytest.approx(d["pages_per_s"] * 4096 / 2**20, rel=0.01)
    assert all(v["pages_per_s"] > 0 for v in d["vcpus"])
    # stamp's vCPUs write disjoint halves: their pages add up to the total
    assert sum(v["pages_per_s"] for v in d["vcpus"]) == pytest.approx(d["pages_per_s"], rel=0.01)
    text = ok("dirty-rate", "--seconds", "0.3", "--mem", "16M").out
    assert "pages/s" in text and "vcpu0" in text
    store = tmp_path / "r.db"
    s = ok("run", "--mem", "16M", "--checkpoints", 3, "--every-steps", 4000, "--json", store=store).json()
    assert s["dirty_rate"]["pages_per_s"] > 0 and s["dirty_rate"]["seconds"] > 0
    assert "dirty rate" in ok("restore", 1, "--checkpoints", 1, "--every-steps", 1000, store=store).out
    before = file_digest(store)
    assert ok("dirty-rate", "--from", 1, "--seconds", "0.3", "--json", store=store).json()["from"] == 1
    assert file_digest(store) == before  # measuring stores nothing
    one_line_error(snapctl("dirty-rate", "--seconds", "0"), 2, "--seconds")


# -- 11. bench shows the figure that missed ------------------------------------------------------

def test_bench_peers_rows_show_the_figures_behind_a_miss():
    from snapctl import bench

    res = {"peers": {"ratio": 30.0, "goal": ">= 20x ...", "met": False, "checks": [
        {"what": "bytes vs full_lz4", "figure": "30.0x fewer", "goal": ">= 20x", "met": True},
        {"what": "time vs sparse_raw", "figure": "12.5 ms vs 8.1 ms", "goal": "less", "met": False}]}}
    (row,) = bench.verdict_rows(res, figures=True)
    assert row[3] is False and "time vs sparse_raw 12.5 ms vs 8.1 ms (goal less): MISSED" in row[4]
    assert "bytes vs full_lz4 30.0x fewer (goal >= 20x)" in row[4] and "full_lz4 30.0x fewer (goal >= 20x): MISSED" not in row[4]


# -- 12. setup.py (examples/: tests/test_examples.py) -------------------------------------------------------------------

def test_setup_py_names_attributes_that_exist():
    import importlib

    text = (ROOT / "setup.py").read_text()
    names = re.findall(r"``(storage\.[\w.]+)(?:\(\))?``", text)
    assert names
    for name in names:
        mod, attr = name.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), attr), name
