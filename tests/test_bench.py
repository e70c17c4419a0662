"""`snapctl bench`: the figures it reports are consistent with each other and
its verdicts follow from them (the speeds themselves are not asserted here:
these machines are noisy; docs/benchmarks.md holds the measured runs)."""

from __future__ import annotations

import pytest

from cli_helpers import ok, snapctl
from kvm_helpers import kvm
from snapctl import bench


@pytest.mark.parametrize("ratio, goal, met", [
    (1.2, "<= 1.3", True), (1.31, "<= 1.3", False), (0.6, ">= 0.6", True), (0.59, ">= 0.6", False),
    (35.0, ">= 20x fewer bytes", True), (3.0, ">= 50/s (ratio against 50)", False),
    (0.2, "report (tracked / untracked)", None)])
def test_goal_verdicts(ratio, goal, met):
    assert bench.meets(ratio, goal) is met


def test_verdict_rows_split_restore_goals_and_scale_the_rate():
    res = {"restore": {"ratio": 1.2, "goal": "<= 1.3", "ratio_vs_decompress": 3.5,
                       "goal_vs_decompress": "<= 2"},
           "checkpoint_rate": {"ratio": 4.7, "goal": ">= 50/s (ratio against 50)"},
           "guest_slowdown": {"ratio": 0.2, "goal": "report (tracked / untracked)"},
           "pause_curve": [{"dirty_pages": 1}]}
    for r in res.values():
        if isinstance(r, dict):
            bench.add_verdicts(r)
    assert bench.verdict_rows(res) == [
        ("restore", 1.2, "<= 1.3", True), ("restore vs decompression", 3.5, "<= 2", False),
        ("checkpoint_rate", 4.7, ">= 50/s (ratio against 50)", True),
        ("guest_slowdown", 0.2, "report (tracked / untracked)", None)]


@kvm
def test_bench_json_figures_agree_with_their_ratios():
    d = ok("bench", "--quick", "--only", "checkpoint_rate", "--only", "write_throughput", "--json",
           timeout=300).json()
    assert set(d) == {"checkpoint_rate", "write_throughput"}
    rate = d["checkpoint_rate"]
    assert rate["checkpoints"] > 0 and rate["per_s"] == pytest.approx(rate["checkpoints"] / rate["seconds"], rel=0.02)
    assert rate["ratio"] == pytest.approx(rate["per_s"] / 50, rel=0.01)
    assert rate["met"] is (rate["per_s"] >= 50)
    w = d["write_throughput"]
    assert w["pages"] > 1000 and len(w["pipeline_mb_s_runs"]) == w["repeats"] == 3
    assert w["pipeline_mb_s"] == pytest.approx(max(w["pipeline_mb_s_runs"]), rel=0.01)
    assert w["ratio"] == pytest.approx(w["pipeline_mb_s"] / w["lz4_mb_s"], rel=0.01)
    assert w["met"] is (w["ratio"] >= 0.6)
    assert w["page_loops"].startswith(("C", "pure Python"))


def test_bench_rejects_an_unknown_benchmark_in_one_line():
    r = snapctl("bench", "--only", "nonsense")
    assert r.code != 0 and "nonsense" in r.err and "Traceback" not in r.err


def test_lazy_restore_goals_get_their_own_verdict_rows():
    r = {"ratio": 1.1, "goal": "<= 1.3", "lazy_start_ratio": 0.03, "lazy_start_goal": "<= 0.05",
         "lazy_full_ratio": 1.5, "lazy_full_goal": "<= 1.2", "lazy_scaling_ratio": 1.2,
         "lazy_scaling_goal": "<= 1.3"}
    bench.add_verdicts(r)
    assert (r["lazy_start_met"], r["lazy_full_met"], r["lazy_scaling_met"]) == (True, False, True)
    assert bench.verdict_rows({"restore": r})[1:] == [
        ("restore: lazy start vs eager", 0.03, "<= 0.05", True),
        ("restore: lazy all pages vs eager", 1.5, "<= 1.2", False),
        ("restore: lazy start, big vs small guest", 1.2, "<= 1.3", True)]
