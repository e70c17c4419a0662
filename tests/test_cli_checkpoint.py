"""Checkpoint and restore end to end, through the CLI, against the stamp model."""

from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import export_image, ok, snapctl, stamp_data, stamp_model
from kvm_helpers import kvm

MEM = 16 << 20
SEED = 9


def _steps(store, ckpt) -> list[int]:
    return ok("show", ckpt, "--json", store=store).json()["steps"]


@kvm
def test_sync_checkpoints_with_a_filling_ring_equal_the_model(tmp_path):
    store = tmp_path / "s.db"
    # 256 entries (192 before ring-full) against ~3000 pages per checkpoint: the ring fills many times
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 6, "--every-steps", 4000, "--ring-entries", 256,
       "--json", store=store)
    listing = ok("list", "--json", store=store).json()
    assert [c["id"] for c in listing] == list(range(7))
    assert [c["parent"] for c in listing] == [None, 0, 1, 2, 3, 4, 5]
    assert [c["trigger"] for c in listing] == ["base"] + ["sync"] * 6
    for c in listing:
        step = _steps(store, c["id"])[0]
        assert step == 4000 * c["id"]
        img = export_image(store, c["id"], tmp_path)
        assert img.size == MEM
        assert np.array_equal(stamp_data(img, MEM, 1, 0), stamp_model(MEM, 1, 0, SEED, step)), c["id"]
    show = ok("show", 3, "--json", store=store).json()
    assert show["stats"]["dirty_pages"] > 192 and "pause_ms" in show["stats"]
    assert int(show["vcpus"][0]["rip"], 16) >= 0x100000 and show["vcpus"][0]["rbx"] == hex(12000)


@kvm
def test_async_checkpoints_equal_the_model_at_step_or_step_plus_one(tmp_path):
    """An async kick can land between the guest's page store and its step store:
    then memory already holds step+1's page write while the mailbox says step."""
    store = tmp_path / "a.db"
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 8, "--interval", 3, "--ring-entries", 1024,
       store=store)
    listing = ok("list", "--json", store=store).json()
    assert [c["trigger"] for c in listing[1:]] == ["async"] * 8
    for c in listing:
        step = c["step"]
        data = stamp_data(export_image(store, c["id"], tmp_path), MEM, 1, 0)
        if np.array_equal(data, stamp_model(MEM, 1, 0, SEED, step)):
            continue
        assert np.array_equal(data, stamp_model(MEM, 1, 0, SEED, step + 1)), f"checkpoint {c['id']} at step {step}"
    assert listing[-1]["step"] > listing[1]["step"] > 0


@kvm
def test_restore_branches_and_leaves_the_original_lineage_alone(tmp_path):
    store = tmp_path / "r.db"
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 4, "--every-steps", 5000, store=store)
    before = {c["id"]: c["digest"] for c in ok("list", "--json", store=store).json()}
    images_before = {k: export_image(store, k, tmp_path) for k in (2, 4)}
    r = ok("restore", 2, "--checkpoints", 3, "--every-steps", 3000, "--json", store=store).json()
    assert r["checkpoints"] == [5, 6, 7] and r["restored_from"] == 2
    listing = {c["id"]: c for c in ok("list", "--json", store=store).json()}
    assert [listing[k]["parent"] for k in (5, 6, 7)] == [2, 5, 6]
    for k in (5, 6, 7):
        step = listing[k]["step"]
        assert step == 10000 + 3000 * (k - 4)
        img = export_image(store, k, tmp_path)
        assert np.array_equal(stamp_data(img, MEM, 1, 0), stamp_model(MEM, 1, 0, SEED, step)), k
    assert {k: listing[k]["digest"] for k in before} == before
    for k, img in images_before.items():
        assert np.array_equal(export_image(store, k, tmp_path), img)
    # --steps: exactly N more steps, then one checkpoint; ids continue across branches
    r = ok("restore", 6, "--steps", 1234, "--json", store=store).json()
    assert r["checkpoints"] == [8]
    assert ok("show", 8, "--json", store=store).json()["step"] == 16000 + 1234
    img = export_image(store, 8, tmp_path)
    assert np.array_equal(stamp_data(img, MEM, 1, 0), stamp_model(MEM, 1, 0, SEED, 17234))


@kvm
def test_replay_matches_sync_and_reports_unreachable_targets(tmp_path):
    store = tmp_path / "p.db"
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 3, "--every-steps", 6000, store=store)
    r = snapctl("replay", 1, "--json", store=store)
    assert r.code == 0, r.err
    d = r.json()
    assert d["match"] and d["to"] == 2 and d["steps"] == [12000] and d["differing_page_count"] == 0
    assert d["compared"] == ["memory", "registers"]
    ok("tag", 3, "last", store=store)
    assert ok("replay", 0, "--to", "last", "--json", store=store).json()["match"]
    bad = snapctl("replay", 3, "--to", 1, store=store)  # refused up front: 1 is not after 3
    assert bad.code == 2 and "not 3 or a descendant" in bad.err and bad.out == ""
    bad = snapctl("replay", 3, store=store)  # the last checkpoint has no next
    assert bad.code == 1 and "no later checkpoint" in bad.err


@kvm
def test_ring_and_bitmap_tracking_give_identical_images(tmp_path):
    stores = {}
    for mode in ("ring", "bitmap"):
        stores[mode] = tmp_path / f"{mode}.db"
        ok("run", "--mem", "16M", "--guest", "random", "--checkpoints", 4, "--every-steps", 3000,
           "--tracking", mode, "--ring-entries", 512, store=stores[mode])
    ring = ok("list", "--json", store=stores["ring"]).json()
    bitmap = ok("list", "--json", store=stores["bitmap"]).json()
    assert [c["digest"] for c in ring] == [c["digest"] for c in bitmap]
    assert [c["stats"]["dirty_pages"] for c in ring] == [c["stats"]["dirty_pages"] for c in bitmap]
    for k in range(5):
        assert np.array_equal(export_image(stores["ring"], k, tmp_path), export_image(stores["bitmap"], k, tmp_path))


@kvm
def test_two_vcpus(tmp_path):
    store = tmp_path / "v.db"
    ok("run", "--mem", "16M", "--vcpus", 2, "--seed", SEED, "--checkpoints", 3, "--every-steps", 2000,
       "--ring-entries", 256, store=store)
    for c in ok("list", "--json", store=store).json():
        steps = c["steps"]
        assert len(steps) == 2
        img = export_image(store, c["id"], tmp_path)
        for i in range(2):
            assert np.array_equal(stamp_data(img, MEM, 2, i), stamp_model(MEM, 2, i, SEED, steps[i])), (c["id"], i)
    ok("restore", 2, "--checkpoints", 1, "--every-steps", 2000, store=store)
    c = ok("show", 4, "--json", store=store).json()
    img = export_image(store, 4, tmp_path)
    for i in range(2):
        assert np.array_equal(stamp_data(img, MEM, 2, i), stamp_model(MEM, 2, i, SEED, c["steps"][i]))
    assert ok("replay", 2, "--to", 4, "--json", store=store).json()["match"]


@kvm
def test_read_diff_history_agree_with_the_model(tmp_path):
    store = tmp_path / "i.db"
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 2, "--every-steps", 3000, store=store)
    m1, m2 = stamp_model(MEM, 1, 0, SEED, 3000), stamp_model(MEM, 1, 0, SEED, 6000)
    changed = np.flatnonzero((m1 != m2).any(axis=1))
    p = int(changed[0])
    gpa = (2 << 20) + p * 4096
    raw = snapctl("read", 2, hex(gpa), 8, "--format", "raw", store=store).raw
    assert raw == m2[p, :8].tobytes()
    hexd = ok("read", 1, hex(gpa), 16, store=store).out
    assert hexd.startswith(f"{gpa:012x}") and m1[p, :8].tobytes().hex(" ") in hexd
    diff = [int(a, 16) for a in ok("diff", 1, 2, "--json", store=store).json()["pages"]]
    data_diff = sorted(a for a in diff if a >= (2 << 20))
    assert data_diff == [(2 << 20) + int(q) * 4096 for q in changed]
    hist = ok("history", hex(gpa + 100), "--json", store=store).json()
    ids = [h["checkpoint"] for h in hist["versions"]]
    assert 2 in ids and ids == hist["checkpoints"] and hist["page"] == hex(gpa)


@kvm
def test_demo_runs_end_to_end(tmp_path):
    d = ok("demo", "--json", "--store", tmp_path / "demo.db", timeout=120).json()
    assert d["run"]["count"] == 21 and d["branch"]["count"] == 5
    assert d["replay"]["match"] and d["verify"]["ok"]
