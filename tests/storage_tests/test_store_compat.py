"""A store written by an earlier version still opens, verifies, lists,
reads and restores (issue 15: the store was split into modules without a
format change).  data/store-v2.snap.gz was written by
data/make_store_fixture.sh before the split; data/store-v2.json holds what
that version reported about it."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from storage_helpers import PAGE, _ROOT, image_digest
from storage import SCHEMA_VERSION, Store

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FACTS = json.load(open(os.path.join(DATA, "store-v2.json")))


def unpack(tmp_path) -> str:
    path = str(tmp_path / "old.snap")
    with gzip.open(os.path.join(DATA, "store-v2.snap.gz")) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def check(path: str) -> None:
    """Everything the old version recorded, read back by this one."""
    assert FACTS["schema_version"] == SCHEMA_VERSION
    with Store.open(path, readonly=True) as st:
        rep = st.verify()
        assert rep.ok, rep.problems
        infos = st.checkpoints()
        assert [c.id for c in infos] == [c["id"] for c in FACTS["checkpoints"]]
        assert st.resolve("middle") == 2
        for info, want in zip(infos, FACTS["checkpoints"]):
            assert (info.parent, info.tags, info.trigger, info.step, info.digest) == \
                (want["parent"], want["tags"], want["trigger"], want["step"], want["digest"])
            assert st.digest(info.id) == want["digest"]
            img = np.zeros(st.page_count * PAGE, np.uint8)
            st.materialize(info.id, img)
            assert hashlib.sha256(img).hexdigest() == want["image_sha256"], info.id
            assert image_digest(img.reshape(-1, PAGE)) == want["digest"], info.id
            with contextlib.closing(st.image_chunks(info.id, 1000)) as chunks:
                whole = b"".join(np.where(nz[:, None], pages, 0).tobytes() for _, pages, nz in chunks)
            assert hashlib.sha256(whole).hexdigest() == want["image_sha256"]
            assert st.read(info.id, 0x1000, 64) == bytes(img[0x1000:0x1040])
            assert {n: hashlib.sha256(st.state(info.id, n)).hexdigest()
                    for n in st.state_names(info.id)} == want["states"]


def test_old_store_reads_back(tmp_path):
    check(unpack(tmp_path))


def test_old_store_reads_back_pure_python(tmp_path):
    """The same under SNAPCTL_PURE_PYTHON=1 (the Python loops only), in a
    child process since the switch is read once at start."""
    path = unpack(tmp_path)
    env = dict(os.environ, SNAPCTL_PURE_PYTHON="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), _ROOT]))
    code = ("import sys, test_store_compat as t; t.check(sys.argv[1]);"
            "from storage import pageloops; assert not pageloops.NATIVE")
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=300)


def _cli(path, *args, json_out=True):
    # The one CLI runner (tests/), imported here: the pure-Python child above
    # imports this module without tests/ on its path.
    from cli_helpers import ok
    r = ok(*args, *(["--json"] if json_out else []), store=path)
    return r.json() if json_out else r.out


def test_old_store_through_the_cli(tmp_path):
    """list and show report the old store's checkpoints with the digests the
    old version showed (compared as values: the JSON's shape is the CLI's
    to evolve; what it says about the store may not change)."""
    path = unpack(tmp_path)
    listed = json.dumps(_cli(path, "list"))
    for ckpt, shown in FACTS["show"].items():
        now = _cli(path, "show", ckpt)
        assert shown["digest"] in json.dumps(now) and shown["digest"] in listed, ckpt
        for key in ("id", "parent", "step", "trigger", "tags", "children", "stats"):
            if key in now:
                assert now[key] == shown[key], (ckpt, key)


@pytest.mark.kvm
def test_old_store_restores_and_replays(tmp_path):
    """A KVM restore from the old store re-executes to the next old
    checkpoint with identical memory and registers (replay exits 0 only
    then), and a new branch written into the old file verifies."""
    path = unpack(tmp_path)
    _cli(path, "replay", "2", "--to", "3", json_out=False)
    _cli(path, "restore", "6", "--steps", "1000", json_out=False)
    with Store.open(path, readonly=True) as st:
        assert st.verify().ok
        new = [c for c in st.checkpoints() if c.id not in {f["id"] for f in FACTS["checkpoints"]}]
        assert len(new) == 1 and new[0].parent == 6


@pytest.mark.kvm
def test_old_store_restores_lazily(tmp_path):
    """The same through the lazy-restore handler (storage/native/lazyfault.c),
    the second reader of the row formats: it parses the old store's maps,
    pack metadata and check values itself (docs/store-format.md)."""
    path = unpack(tmp_path)
    if os.environ.get("SNAPCTL_PURE_PYTHON", "") not in ("", "0"):
        # without the C extension there is no handler: --lazy says so, the store is untouched
        from cli_helpers import one_line_error, snapctl
        before = open(path, "rb").read()
        one_line_error(snapctl("restore", "6", "--lazy", store=path), 1, "lazy restore needs the C extension")
        assert open(path, "rb").read() == before
        return
    _cli(path, "replay", "2", "--lazy", "--to", "3", json_out=False)
    lazy = _cli(path, "restore", "6", "--lazy", "--steps", "1000")["lazy"]
    assert lazy["done"] and lazy["error"] == 0 and lazy["populated"] > 0, lazy
    with Store.open(path, readonly=True) as st:
        assert st.verify().ok
        new = [c for c in st.checkpoints() if c.id not in {f["id"] for f in FACTS["checkpoints"]}]
        assert len(new) == 1 and new[0].parent == 6


def test_new_stores_have_the_old_tables_word_for_word(tmp_path):
    """The tables this code creates are the ones the old store holds, to the
    character (SQLite keeps the CREATE text in the file)."""
    import sqlite3
    old = sqlite3.connect(unpack(tmp_path))
    new_path = str(tmp_path / "new.snap")
    Store.create(new_path, {"mem_size": 16 * PAGE}).close()
    new = sqlite3.connect(new_path)
    query = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert old.execute(query).fetchall() == new.execute(query).fetchall()
    old.close()
    new.close()
