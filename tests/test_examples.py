"""Every file in examples/ runs, as a user would run it, and says what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_helpers import cli_env, cli_shim
from kvm_helpers import kvm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: every example, and the test below that runs it
COVERED = {"colo_periodic.py": "test_colo_example_runs_and_refuses_its_store_the_second_time",
           "time_travel.sh": "test_time_travel_walkthrough_runs",
           "program_time_travel.sh": "test_program_time_travel_walkthrough_runs"}


def test_every_example_is_run_by_a_test():
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_file()) == sorted(COVERED)
    assert all(name in globals() for name in COVERED.values())


@kvm
def test_colo_example_runs_and_refuses_its_store_the_second_time(tmp_path):
    env = cli_env({"PYTHONPATH": str(ROOT)})
    argv = [sys.executable, str(EXAMPLES / "colo_periodic.py"), str(tmp_path / "colo.db"), "0.3"]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0 and "verify: ok" in first.stdout, first.stderr
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 1 and second.stderr.count("\n") == 1 and "already exists" in second.stderr
    assert "Traceback" not in second.stderr


@kvm
def test_time_travel_walkthrough_runs(tmp_path):
    env = dict(cli_shim(tmp_path / "bin"), SNAPCTL_STORE=str(tmp_path / "tt.db"))
    r = subprocess.run(["bash", str(EXAMPLES / "time_travel.sh")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "last changed in checkpoint" in r.stdout and "match" in r.stdout and "Traceback" not in r.stderr


@kvm
def test_program_time_travel_walkthrough_runs(tmp_path):
    """Needs gcc (static glibc) and gdb, as the program tests do."""
    env = dict(cli_shim(tmp_path / "bin"), TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", str(EXAMPLES / "program_time_travel.sh")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert "balance first negative at checkpoint" in out, out[-2000:]
    assert "day 5: balance -" in out                     # the program's own output, from `snapctl output`
    assert "$1 = -50" in out and "in day (d=5)" in out   # gdb read the core
    assert "match" in out                                # the replay of the bad step
