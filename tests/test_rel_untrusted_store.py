"""Opening a store you did not make (issue 16): a corpus of crafted stores --
schema tricks, forged values with their check values recomputed, memory and
disk bombs -- and a fuzzer over stored rows and values. Every command runs
on every store in a subprocess under a memory limit and a timeout: it exits 0
or with exactly one ``error:`` line, never a traceback, a signal or a hang,
and the commands that only read leave the store's bytes as they were.

The fuzzer runs $SNAPCTL_FUZZ_SECONDS (default 40 s in CI); every trial
prints its seed, and ``SNAPCTL_FUZZ_SEED=N`` replays one."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import numpy as np
import pytest

from cli_helpers import ok, one_line_error, snapctl, snapctl_many, spawn
from kvm_helpers import kvm, require_kvm
from rel_helpers import scaled
from untrusted_helpers import (MEMORY_LIMIT, READERS, TIMEOUT, WRITERS, check_all_commands, copy_store, data_state,
                               env_seconds, problem, recompute_checks, run_limited, sql)

pytestmark = kvm

MEM = 8 << 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real store: checkpoints 0..3 (a chain), a tag."""
    require_kvm()
    d = tmp_path_factory.mktemp("untrusted")
    store = d / "base.db"
    ok("run", "--mem", "8M", "--checkpoints", 3, "--every-steps", 3000, store=store)
    ok("tag", 1, "t1", store=store)
    sql(store)                       # self-contained: no -wal
    return store


def _python(store: Path, code: str) -> None:
    """Forge with the store's own Python API or raw bytes (``st``/``conn`` in scope)."""
    subprocess.run([sys.executable, "-c", "import sys, sqlite3, struct, json\n"
                    "import numpy as np\nfrom storage import Store\nfrom storage.codec import content_hash\n"
                    f"path = {str(store)!r}\n" + code], check=True, env=dict(os.environ))
    sql(store)


def _state_rewrite(fn_src: str) -> str:
    """Python that rewrites every vcpu/0 state with ``fn(data) -> data`` and its hash."""
    return (f"{fn_src}\nconn = sqlite3.connect(path, isolation_level=None)\n"
            "for c, d in conn.execute(\"SELECT ckpt, data FROM states WHERE name = 'vcpu/0'\").fetchall():\n"
            "    d2 = fn(d)\n"
            "    conn.execute(\"UPDATE states SET data = ?, hash = ? WHERE ckpt = ? AND name = 'vcpu/0'\",\n"
            "                 (d2, content_hash(d2), c))\n"
            "conn.close()\n")


CFG = "UPDATE meta SET value = json_set(value, '$.{k}', {v}) WHERE key = 'config'"
DEEP = "[" * 100_000 + "]" * 100_000

#: id -> (statements or python, recompute check values)
CASES = {
    # -- schema tricks: the store's own SQL must never run --------------------------------------
    "meta-view-recursive-cte": ["ALTER TABLE meta RENAME TO meta0",
                                "CREATE VIEW meta AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r)"
                                " SELECT 'k' || i AS key, 'v' AS value FROM r"],
    "checkpoints-view-recursive-cte": ["ALTER TABLE checkpoints RENAME TO c0",
                                       "CREATE VIEW checkpoints AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
                                       "SELECT i + 1 FROM r) SELECT c0.* FROM c0, r"],
    "pack-data-view-zeroblob": ["ALTER TABLE pack_data RENAME TO pd0",
                                "CREATE VIEW pack_data AS SELECT id, zeroblob(900000000) AS data FROM pd0"],
    "trigger-deletes-page-data": ["CREATE TRIGGER t AFTER INSERT ON tags BEGIN DELETE FROM pack_data; END"],
    "expression-index": ["CREATE INDEX ix ON packs(abs(first))"],
    "generated-column": ["ALTER TABLE tags ADD COLUMN g INTEGER GENERATED ALWAYS AS (length(name)) VIRTUAL"],
    "check-constraint": ["ALTER TABLE tags RENAME TO t0",
                         "CREATE TABLE tags (name TEXT PRIMARY KEY, ckpt INTEGER NOT NULL "
                         "CHECK (length(zeroblob(100000000)) > 0))",
                         "INSERT INTO tags SELECT * FROM t0", "DROP TABLE t0"],
    "extra-table": ["CREATE TABLE evil (x)"],
    # -- loops over stored values ------------------------------------------------------------------
    "parent-cycle": ["UPDATE checkpoints SET parent = 2 WHERE id = 1"],
    "root-is-its-own-parent": ["UPDATE checkpoints SET parent = 0 WHERE id = 0"],
    "parent-99": ["UPDATE checkpoints SET parent = 99 WHERE id = 2"],
    "tag-names-99": ["INSERT INTO tags VALUES ('ghost', 99)"],
    "vcpus-10-12": [CFG.format(k="vcpus", v=10**12)],
    # -- memory and disk bombs ---------------------------------------------------------------------
    ("packs-first-2-27", True): ["UPDATE packs SET first = 134217728 WHERE id = (SELECT max(id) FROM packs)"],
    "mem-size-1-TiB": [CFG.format(k="mem_size", v=1 << 40)],
    "mem-size-2-70": ["UPDATE meta SET value = replace(value, '\"mem_size\": 8388608', "
                      "'\"mem_size\": 1180591620717411303424') WHERE key = 'config'"],
    # -- values of the wrong type or range ------------------------------------------------------------
    ("packs-first-real", True): ["UPDATE packs SET first = first + 0.5 WHERE id = 1"],
    ("packs-n-text", True): ["UPDATE packs SET n = 'abc' WHERE id = 1"],
    ("delta-base-2-62", True): ["UPDATE packs SET bases = X'0000000000000040' || substr(bases, 9) WHERE id = 1"],
    "created-1e300": ["UPDATE checkpoints SET created = 1e300 WHERE id = 1"],
    "created-text": ["UPDATE checkpoints SET created = 'yesterday' WHERE id = 1"],
    "step-text": ["UPDATE checkpoints SET step = 'abc' WHERE id = 1"],
    "step-null": ["UPDATE checkpoints SET step = NULL WHERE id = 1"],
    "meta-json-list": ["UPDATE checkpoints SET meta = '[1, 2]' WHERE id = 1"],
    "stats-json-list": ["UPDATE checkpoints SET stats = '[1, 2]' WHERE id = 1"],
    "stats-value-text": ["UPDATE checkpoints SET stats = json_set(stats, '$.stored_bytes', 'many')"],
    "meta-steps-text": ["UPDATE checkpoints SET meta = json_set(meta, '$.steps', 'x')"],
    "meta-steps-behind": ["UPDATE checkpoints SET meta = json_set(meta, '$.steps', json('[1]')) WHERE id = 2"],
    "meta-100000-deep": ["UPDATE checkpoints SET meta = '" + DEEP + "' WHERE id = 1"],
    "config-guest-list": [CFG.format(k="guest", v="json('[\"stamp\"]')")],
    "config-vcpus-text": [CFG.format(k="vcpus", v="'1'")],
    "config-seed-text": [CFG.format(k="seed", v="'abc'")],
    "config-tracking-none": [CFG.format(k="tracking", v="'none'")],
    "config-json-list": ["UPDATE meta SET value = '[1]' WHERE key = 'config'"],
    "next-checkpoint-id-text": ["UPDATE meta SET value = 'x' WHERE key = 'next_checkpoint_id'"],
    "digest-short": ["UPDATE checkpoints SET digest = X'00' WHERE id = 2"],
    "refs-n-text": ["UPDATE refs SET n = 'x'"],
    ("maps-n-text", True): ["UPDATE maps SET n = 'x' WHERE ckpt = 1"],
    "tag-name-blob": ["UPDATE tags SET name = X'00ff'"],
    "vcpu-state-truncated": _state_rewrite("def fn(d): return d[:100]"),
    "vcpu-state-odd-msrs": _state_rewrite(
        "from snapctl.machine.state import VcpuState\n"
        "def fn(d):\n"
        "    i = d.index(b'\\x04msrs')\n"
        "    n, = struct.unpack_from('<I', d, i + 5)\n"
        "    return d[:i + 5] + struct.pack('<I', n - 5) + d[i + 9:i + 9 + n - 5] + d[i + 9 + n:]"),
    "vcpu-state-huge-field-count": _state_rewrite(
        "def fn(d): return d[:12] + struct.pack('<I', 2**31) + d[16:]"),
}


def _apply(store: Path, case) -> None:
    if isinstance(case, str):
        _python(store, case)
    else:
        sql(store, *case)


def _case(name: str):
    return next(c for k, c in CASES.items() if k == name or (isinstance(k, tuple) and k[0] == name))


def test_crafted_stores_every_command_exits_cleanly(base, tmp_path):
    """Every case of CASES through every command of READERS and WRITERS (in
    one batch of forked CLI processes: most of a fresh interpreter's time is
    importing numpy)."""
    stores, jobs, owner = {}, [], []
    for key, case in CASES.items():
        name, recompute = key if isinstance(key, tuple) else (key, False)
        d = tmp_path / name
        d.mkdir()
        store = stores[name] = copy_store(base, d / "crafted.db")
        _apply(store, case)
        if recompute:
            recompute_checks(store)
        for i, cmd in enumerate(READERS):
            jobs.append(([a.format(out=d / f"out-{i}.raw") for a in cmd], store))
            owner.append(name)
        for i, cmd in enumerate(WRITERS):
            jobs.append((list(cmd), copy_store(store, d / f"w{i}.db")))
            owner.append(name)
    before = {n: data_state(s) for n, s in stores.items()}
    results = snapctl_many(jobs, memory_limit=MEMORY_LIMIT, timeout=TIMEOUT)
    for name, r in sorted(zip(owner, results), key=lambda x: -x[1]["secs"])[:5]:
        print(f"slowest: {r['secs']} s {name}: {' '.join(r['args'][:-2])}")
    found = [f"{name}: {' '.join(r['args'][:-2])}: {p}"
             for name, r in zip(owner, results) if (p := problem(r))]
    found += [f"{n}: a read-only command changed the store" for n, s in stores.items()
              if data_state(s) != before[n]]
    assert not found, "\n".join(found)


def test_schema_tricks_are_refused_with_one_line(base, tmp_path):
    """A view, trigger or foreign index is refused before anything reads the store."""
    for i, key in enumerate(("meta-view-recursive-cte", "pack-data-view-zeroblob", "trigger-deletes-page-data",
                             "expression-index", "check-constraint")):
        store = copy_store(base, tmp_path / f"s{i}.db")
        _apply(store, _case(key))
        before = data_state(store)
        for cmd in (("list",), ("tag", "1", "x")):
            r = snapctl(*cmd, store=store, timeout=60)
            one_line_error(r, 1, "not a snapctl store")
        assert data_state(store) == before, key


def test_a_trigger_cannot_destroy_page_data_through_tag(base, tmp_path):
    store = copy_store(base, tmp_path / "t.db")
    _apply(store, CASES["trigger-deletes-page-data"])
    snapctl("tag", 2, "x", store=store, timeout=60)
    n = sqlite3.connect(store).execute("SELECT count(*) FROM pack_data").fetchone()[0]
    assert n > 0


def test_replay_names_a_forged_target_steps(base, tmp_path):
    """replay's reachability check reads meta.steps through checked_info: a text in the
    target alone (the source is fine) was a TypeError traceback."""
    store = copy_store(base, tmp_path / "s.db")
    sql(store, "UPDATE checkpoints SET meta = json_set(meta, '$.steps', json('[\"x\"]')) WHERE id = 2")
    one_line_error(snapctl("replay", 1, "--to", 2, store=store, timeout=60), 1, "meta.steps")


def test_forged_loops_are_named(base, tmp_path):
    for key, needle in (("parent-cycle", "parent"), ("root-is-its-own-parent", "parent"),
                        ("parent-99", "parent 99"), ("tag-names-99", "unknown checkpoint 99")):
        store = copy_store(base, tmp_path / f"{key}.db")
        _apply(store, _case(key))
        one_line_error(snapctl("prune", "--keep-last", 1, store=store, timeout=60), 1, needle)
        r = snapctl("verify", store=store, timeout=60)
        assert r.code == 1 and needle.split()[0] in r.out, (key, r.out, r.err)


def test_wrong_values_name_the_field(base, tmp_path):
    for key, cmd, needle in (("created-text", ("list",), "checkpoints.created"),
                             ("packs-first-real", ("export", 2, "{out}"), "packs.first"),
                             ("meta-100000-deep", ("list",), "checkpoints.meta"),
                             ("config-seed-text", ("restore", 2, "--steps", 1), "seed"),
                             ("mem-size-2-70", ("list",), "mem_size"),
                             ("vcpus-10-12", ("show", 1), "vcpus"),
                             ("vcpu-state-huge-field-count", ("show", 1), "fields")):
        store = copy_store(base, tmp_path / f"{key}.db")
        _apply(store, _case(key))
        if key == "packs-first-real":
            recompute_checks(store)
        args = [str(a).format(out=tmp_path / "out.raw") for a in cmd]
        one_line_error(snapctl(*args, store=store, timeout=60), 1, needle)


def test_a_forged_self_consistent_mailbox_is_refused_by_restore(base, tmp_path):
    """The mailbox page rewritten through the store's own API (so every check
    value and the digest are right) with a step count that is not the recorded
    one: `restore --steps 1` spun forever at 100 % CPU."""
    store = copy_store(base, tmp_path / "mb.db")
    _python(store, """
st = Store.open(path)
info = st.get(2)
img = np.empty((st.page_count, 4096), np.uint8)
st.materialize(2, img)
page = img[0x50].copy()
page.view(np.uint64)[40 // 8] = 5
with st.checkpoint(2, dict(info.meta)) as w:
    w.add_pages(np.array([0x50]), page[None])
    for n in st.state_names(2):
        w.add_state(n, st.state(2, n))
st.close()
""")
    r = run_limited(["restore", "4", "--steps", "1"], store, timeout=60)
    assert problem(r) is None, r
    assert r["code"] == 1 and "mailbox" in r["err"], r


def test_poisoned_dedup_is_never_referenced(base, tmp_path):
    """A blob whose declared hash is that of a page the guest writes next,
    holding other bytes: the checkpoint written after a restore must not
    reference it (it did; export of that checkpoint then failed)."""
    longer = tmp_path / "longer.db"
    ok("run", "--mem", "8M", "--checkpoints", 4, "--every-steps", 3000, store=longer)
    from storage import Store
    with Store.open(str(longer), readonly=True) as st:
        a, b = np.empty((2, st.page_count, 4096), np.uint8)
        st.materialize(2, a)
        st.materialize(3, b)
    page = int(next(p for p in np.flatnonzero((a != b).any(axis=1)) if p >= 512))
    future = b[page]
    store = copy_store(base, tmp_path / "poison.db")
    # a branch from 1 storing garbage on a page nothing will read, then its
    # pack's hash forged to the future content's (check values recomputed)
    _python(store, f"""
from storage.codec import content_hash
future = bytes.fromhex({future.tobytes().hex()!r})
st = Store.open(path)
garbage = np.frombuffer(np.random.default_rng(5).bytes(4096), np.uint8)
with st.checkpoint(1, {{"step": 3000, "steps": [3000], "trigger": "sync"}}) as w:
    w.add_pages(np.array([600]), garbage[None].copy())
    for n in st.state_names(1):
        w.add_state(n, st.state(1, n))
st.close()
conn = sqlite3.connect(path, isolation_level=None)
pid, = conn.execute("SELECT max(id) FROM packs").fetchone()
conn.execute("UPDATE packs SET hashes = ? WHERE id = ?", (content_hash(future), pid))
conn.close()
""")
    recompute_checks(store)
    ok("restore", 2, "--steps", 3000, store=store)
    new = max(c["id"] for c in ok("list", "--json", store=store).json())
    out = tmp_path / "new.raw"
    ok("export", new, out, store=store)
    got = np.fromfile(out, np.uint8).reshape(-1, 4096)
    assert got[page].tobytes() == future.tobytes()
    assert (got[512:] == b[512:]).all()       # the data area (the mailbox holds --steps' stop step)


def test_a_small_store_claiming_a_large_memory_exports_sparsely(base, tmp_path):
    store = copy_store(base, tmp_path / "big.db")
    sql(store, CFG.format(k="mem_size", v=1 << 30))
    out = tmp_path / "big.raw"
    ok("export", 2, out, store=store)
    st = out.stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 64 << 20, st.st_blocks


def test_diff_compares_contents_not_blob_ids(base, tmp_path):
    """Two blob ids holding one content: a pack of the base copied under new
    blob ids, and checkpoint 2's map pointing pages it inherits unchanged
    from checkpoint 1 at the copies (same hashes: the digests still hold).
    diff 1 2 must not list those pages (it compared ids)."""
    store = copy_store(base, tmp_path / "dup.db")
    _python(store, """
from storage.codec import check63
from storage.packs import pack_meta_check
conn = sqlite3.connect(path, isolation_level=None)
# checkpoint 1's image as blob ids: the base's map with checkpoint 1's on top
img1 = np.zeros(Store.open(path, readonly=True).page_count, np.int64)
for c in (0, 1):
    pg, bl = conn.execute("SELECT pages, blobs FROM maps WHERE ckpt = ?", (c,)).fetchone()
    img1[np.frombuffer(pg, '<i8')] = np.frombuffer(bl, '<i8')
pid, ckpt, first, n, codecs, bases, hashes, ends, crcs, mchk, size, crc = conn.execute(
    "SELECT * FROM packs WHERE ckpt = 0 ORDER BY id LIMIT 1").fetchone()
new_pid = conn.execute("SELECT max(id) + 1 FROM packs").fetchone()[0]
new_first = conn.execute("SELECT max(first + n) FROM packs").fetchone()[0]
conn.execute("INSERT INTO packs VALUES (?, 2, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (new_pid, new_first, n, codecs, bases, hashes, ends, crcs,
              pack_meta_check(new_pid, new_first, n, codecs, bases, hashes, ends, crcs), size, crc))
conn.execute("INSERT INTO pack_data SELECT ?, data FROM pack_data WHERE id = ?", (new_pid, pid))
conn.execute("INSERT INTO refs VALUES (?, 1)", (new_pid,))
pages, blobs = conn.execute("SELECT pages, blobs FROM maps WHERE ckpt = 2").fetchone()
p2, b2 = np.frombuffer(pages, '<i8'), np.frombuffer(blobs, '<i8')
same = np.flatnonzero((img1 >= first) & (img1 < first + n) & (img1 > 0))
same = same[~np.isin(same, p2)]
assert len(same), "no inherited page of the base pack"
p = np.concatenate([p2, same])
b = np.concatenate([b2, img1[same] + (new_first - first)])
o = np.argsort(p)
pb, bb = p[o].astype('<i8').tobytes(), b[o].astype('<i8').tobytes()
conn.execute("UPDATE maps SET n = ?, pages = ?, blobs = ?, chk = ? WHERE ckpt = 2",
             (len(p), pb, bb, check63(struct.pack('<q', 2), pb, bb)))
conn.close()
""")
    want = ok("diff", 1, 2, "--json", store=base).json()["pages"]
    assert ok("diff", 1, 2, "--json", store=store).json()["pages"] == want


# -- the fuzzer ------------------------------------------------------------------------------------

_TABLES = {"meta": ["value"], "checkpoints": ["parent", "created", "trigger", "step", "meta", "stats", "digest"],
           "tags": ["name", "ckpt"], "states": ["hash", "data"],
           "packs": ["ckpt", "first", "n", "codecs", "bases", "hashes", "ends", "crcs", "size", "crc"],
           "pack_data": ["data"], "refs": ["n"], "maps": ["n", "pages", "blobs"]}


def _value(rng: random.Random, old):
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**62, -(2**63), 2**63 - 1, 99, 4095])
    if kind == 2:
        return rng.choice([2.5, 1e300, -0.0, 1e-300, float(2**53)])
    if kind == 3:
        return rng.choice(["", "abc", "[]", "{}", "[1,2]", '{"a": [[[1]]]}', "yesterday", "9" * 30, "[" * 5000])
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 7, 8, 16, 100]))
    if isinstance(old, bytes) and old:
        b = bytearray(old)
        if kind == 5:
            return bytes(b[:rng.randrange(len(b))])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if isinstance(old, int) and not isinstance(old, bool):
        return old + rng.choice([-1, 1, 1 << 20, -(1 << 40), 1 << 62])
    if isinstance(old, str):
        if old.startswith("{"):
            try:
                d = json.loads(old)
                k = rng.choice(sorted(d)) if d else "x"
                d[k] = rng.choice([None, "x", [1], {"a": 1}, -1, 2**64, 1e300, True])
                return json.dumps(d)
            except ValueError:
                pass
        return old[:rng.randrange(len(old) + 1)]
    return rng.choice([None, 0, "x", b"x"])


def _mutate(store: Path, rng: random.Random) -> list[str]:
    conn = sqlite3.connect(store, isolation_level=None)
    done = []
    try:
        for _ in range(rng.randint(1, 3)):
            table = rng.choice(sorted(_TABLES))
            col = rng.choice(_TABLES[table])
            rows = conn.execute(f"SELECT rowid, {col} FROM {table}").fetchall()
            if not rows:
                continue
            rowid, old = rng.choice(rows)
            new = _value(rng, old)
            try:
                conn.execute(f"UPDATE {table} SET {col} = ? WHERE rowid = ?", (new, rowid))
            except (sqlite3.Error, OverflowError):   # NOT NULL, UNIQUE, beyond 64 bits: SQLite keeps none
                continue
            done.append(f"{table}.{col}[{rowid}] = {new!r:.40}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    if rng.random() < 0.5:
        recompute_checks(store)
        done.append("check values recomputed")
    return done


_FUZZ_CMDS = [("list",), ("show", "1"), ("verify",), ("diff", "0", "3"), ("read", "2", "0x200000", "32"),
              ("history", "0x200000"), ("export", "2", "{out}"), ("replay", "2"), ("tag", "1", "fz"),
              ("prune", "--keep-last", "1"), ("restore", "2", "--steps", "1")]


def test_fuzz_stored_rows_and_values(base, tmp_path):
    """Random forged values in random rows and columns, each store through
    a few random commands, for $SNAPCTL_FUZZ_SECONDS (default 40)."""
    seconds = env_seconds("SNAPCTL_FUZZ_SECONDS", 40)
    fixed = os.environ.get("SNAPCTL_FUZZ_SEED")
    seeds = [int(fixed)] if fixed else None
    deadline = time.monotonic() + seconds
    trials, failures = 0, []
    while (seeds and trials < len(seeds)) or (not seeds and (time.monotonic() < deadline or trials < scaled(2))):
        seed = seeds[trials] if seeds else random.SystemRandom().randrange(2**32)
        rng = random.Random(seed)
        print(f"fuzz trial {trials}: seed {seed}")
        store = copy_store(base, tmp_path / f"fz{trials % 4}.db")
        what = _mutate(store, rng)
        cmds = rng.sample(_FUZZ_CMDS, 3)
        readers = [c for c in cmds if c[0] in ("list", "show", "verify", "diff", "read", "history", "export",
                                                "replay")]
        writers = [c for c in cmds if c not in readers]
        found = check_all_commands(store, tmp_path, readers, writers)
        if found:
            failures.append(f"seed {seed} ({'; '.join(what)}): " + " | ".join(found))
            print(failures[-1])
        trials += 1
    print(f"fuzz: {trials} trials, {len(failures)} failures")
    assert not failures, "\n".join(failures)


# -- the other items ---------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size at tmp_path/mnt (root only; skips elsewhere)."""
    mounted = []

    def mount(size: str) -> Path:
        m = tmp_path / f"mnt{len(mounted)}"
        m.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(m)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(m)
        return m

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_a_second_writer_process_is_refused_and_a_new_store_is_never_replaced_while_its_creator_lives(tmp_path):
    """Two `run`s on one path lost a whole run: the second found the first's
    new store without a checkpoint yet and replaced it. The creator holds the
    store's writer lock from creation; replacing waits for its death."""
    from snapctl.checkpoint.session import StoreExistsError, prepare_new_store  # noqa: F401
    from storage import Store, StoreBusyError

    path = tmp_path / "s.db"
    child = subprocess.Popen([sys.executable, "-c", "import sys\nfrom storage import Store\n"
                              f"st = Store.create({str(path)!r}, {{'mem_size': 1 << 20}})\n"
                              "print('ready', flush=True)\nsys.stdin.read()\nst.close()\n"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert child.stdout.readline().strip() == b"ready"
        with pytest.raises(StoreBusyError, match="in use"):
            prepare_new_store(str(path))
        with Store.open(str(path)) as st:
            assert st.checkpoints() == []                       # readers are welcome
            with pytest.raises(StoreBusyError, match="in use"):
                st.tag(0, "x")
        r = snapctl("run", "--mem", "8M", "--checkpoints", 1, store=path, timeout=120)
        one_line_error(r, 1, "in use")
    finally:
        child.communicate(b"", timeout=60)
    assert path.exists()
    prepare_new_store(str(path))                                # its creator is gone: replaced
    assert not path.exists()


def test_two_runs_on_one_store_path_never_both_succeed(tmp_path):
    """The issue's reproduction: run B starts while run A writes (or has
    written) the store: B exits with one line, A keeps every checkpoint."""
    from rel_helpers import wait_for
    path = tmp_path / "s.db"
    a = spawn("run", "--seed", 1, "--checkpoints", 6, "--every-steps", 3000, store=path, stdout=DEVNULL)
    assert wait_for(lambda: path.exists(), 60)
    b = snapctl("run", "--seed", 7, "--checkpoints", 3, "--every-steps", 3000, store=path, timeout=120)
    assert a.wait(timeout=120) == 0, a.stderr.read()
    one_line_error(b, 1)
    ids = [c["id"] for c in ok("list", "--json", store=path).json()]
    assert ids == list(range(7)), ids


def test_export_onto_a_full_filesystem_is_one_line_and_leaves_nothing(base, tmpfs):
    m = tmpfs("1m")
    r = snapctl("export", 2, m / "out.raw", store=base, timeout=120)
    one_line_error(r, 1, "no space left")
    assert os.listdir(m) == []


def test_export_never_overwrites_the_store_or_its_sidecars(base, tmp_path):
    store = copy_store(base, tmp_path / "mix.db")
    before = data_state(store)
    for target in (store, Path(str(store) + "-wal"), Path(str(store) + "-shm")):
        one_line_error(snapctl("export", 2, target, "--force", store=store, timeout=60), 1, "store")
    link = tmp_path / "hard.db"
    os.link(store, link)
    one_line_error(snapctl("export", 2, link, "--force", store=store, timeout=60), 1, "store")
    assert data_state(store) == before


def test_a_store_on_a_read_only_mount_is_read_and_left_alone(base, tmpfs):
    m = tmpfs("64m")
    store = copy_store(base, m / "ro.db")
    subprocess.run(["mount", "-o", "remount,ro", str(m)], check=True)
    for cmd in (("list",), ("verify",), ("show", 1), ("diff", 0, 2), ("read", 1, "0x200000", 16)):
        ok(*cmd, store=store, timeout=60)
    out = m.parent / "ro-export.raw"
    ok("export", 2, out, store=store, timeout=60)
    one_line_error(snapctl("tag", 1, "x", store=store, timeout=60), 1, "read-only")
    assert sorted(os.listdir(m)) == ["ro.db"]


def test_run_on_a_tiny_filesystem_is_one_line(tmpfs):
    m = tmpfs("1200k")
    r = snapctl("run", "--mem", "8M", "--checkpoints", 2, store=m / "s.db", timeout=120)
    one_line_error(r, 1)
    assert not [n for n in os.listdir(m) if n.startswith(".snapctl-creating")]


def test_long_store_names_work_or_are_one_line_naming_the_store(tmp_path):
    for n in (233, 236, 237, 251, 252, 255):
        path = tmp_path / ("s" * (n - 3) + ".db")
        r = snapctl("run", "--mem", "8M", "--checkpoints", 0, store=path, timeout=120)
        if n <= 251:
            assert r.code == 0, (n, r.err)
            ok("list", store=path)
        else:
            line = one_line_error(r, 1, "too long")
            assert "creating" not in line
        assert not [x for x in os.listdir(tmp_path) if x.startswith(".snapctl-creating")]


def test_a_guest_that_never_holds_answers_ctrl_c(tmp_path):
    """A restored guest that never reaches its hold point (here: one that never
    yields) must still stop on SIGINT with one line, never hang."""
    import signal
    store = tmp_path / "never.db"
    ok("run", "--mem", "8M", "--checkpoints", 0, "--steps-per-yield", 1 << 62, store=store)
    p = spawn("restore", "0", "--checkpoints", "1", "--every-steps", "10", "--json", store=store, stdout=DEVNULL,
              sigint_default=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=8)                  # the guest runs on: it never yields
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1].decode()
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err, err
