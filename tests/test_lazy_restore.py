"""Lazy restore (`restore --lazy`, `replay --lazy`, ``load_machine(lazy=True)``).

Guest RAM is served through userfaultfd by the C handler in
storage/native/lazyfault.c. What is checked here, against the `stamp` model
and against eager restores of the same checkpoint:

* branch checkpoints taken after a lazy restore equal those after an eager
  one, byte for byte (equal digests), and the model;
* faults raised by KVM for the vCPU (no background fill: every page the guest
  touches comes from a fault) are served, and the guest computes exactly;
* a Python thread that holds the GIL and touches unpopulated pages (the
  dirty-page gather, a checkpoint right after the start, a read of all of
  RAM) is served: a handler needing the GIL would deadlock there;
* a damaged page stops the VM with one ``error:`` line naming the checkpoint,
  the page and the blob; the guest never runs on it;
* SIGKILL at random moments of a lazy restore leaves the store intact;
* without userfaultfd, ``--lazy`` says so in one line and exits 1.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import time
from subprocess import DEVNULL

import numpy as np
import pytest

from cli_helpers import export_image, ok, one_line_error, snapctl, spawn, stamp_data, stamp_model
from kvm_helpers import kvm
from rel_helpers import open_ro, scaled, seed_for, sigkill, wait_for

MEM = 16 << 20
SEED = 9
EVERY = 4000

lazy_ok = pytest.mark.skipif(bool(__import__("storage.lazy", fromlist=["probe"]).probe()),
                             reason="userfaultfd or the C extension is not available here")


@pytest.fixture(scope="module")
def stamp_store(tmp_path_factory):
    """stamp on 16 MiB: base + 4 sync checkpoints, EVERY steps apart."""
    store = tmp_path_factory.mktemp("lazy") / "s.db"
    ok("run", "--mem", "16M", "--seed", SEED, "--checkpoints", 4, "--every-steps", EVERY, store=store)
    return store


def _listing(store) -> dict:
    return {c["id"]: c for c in ok("list", "--json", store=store).json()}


@kvm
@lazy_ok
def test_lazy_branches_equal_eager_branches_and_the_model(stamp_store, tmp_path):
    store = tmp_path / "b.db"
    shutil.copy(stamp_store, store)
    lazy = ok("restore", 2, "--lazy", "--checkpoints", 3, "--every-steps", 3000, "--json", store=store).json()
    eager = ok("restore", 2, "--checkpoints", 3, "--every-steps", 3000, "--json", store=store).json()
    assert lazy["checkpoints"] == [5, 6, 7] and eager["checkpoints"] == [8, 9, 10]
    st = lazy["lazy"]
    assert st["error"] == 0 and st["populated"] == MEM // 4096
    assert st["faults"] + st["background_pages"] >= st["populated"] - 512
    listing = _listing(store)
    for a, b in zip(lazy["checkpoints"], eager["checkpoints"]):
        assert listing[a]["step"] == listing[b]["step"] == 2 * EVERY + 3000 * (a - 4)
        assert listing[a]["digest"] == listing[b]["digest"], (a, b)
        img = export_image(store, a, tmp_path)
        assert np.array_equal(stamp_data(img, MEM, 1, 0), stamp_model(MEM, 1, 0, SEED, listing[a]["step"])), a
    # replay --lazy re-executes 2 -> 3 and matches memory and registers
    r = ok("replay", 2, "--lazy", "--json", store=store).json()
    assert r["match"] and r["to"] == 3 and r["steps"] == [3 * EVERY]
    # --steps after a lazy restore: exactly N more steps, then one checkpoint
    r = ok("restore", 4, "--lazy", "--steps", 1234, "--json", store=store).json()
    (k,) = r["checkpoints"]
    img = export_image(store, k, tmp_path)
    assert np.array_equal(stamp_data(img, MEM, 1, 0), stamp_model(MEM, 1, 0, SEED, 4 * EVERY + 1234))


def _lazy_machine(st, ckpt, *, background: bool, system_first: bool = True):
    """load_machine(lazy=True), optionally without the background fill (every page from a fault)
    and without filling the system area first (page tables, code, mailbox from faults too)."""
    from snapctl.checkpoint.captures import vcpu_state_name
    from snapctl.machine import VcpuState
    from snapctl.checkpoint.lazy import serve_lazily
    from snapctl.machine import Machine, MachineConfig

    cfg = MachineConfig.from_dict(st.config)
    states = [VcpuState.from_bytes(st.state(ckpt, vcpu_state_name(i))) for i in range(cfg.vcpus)]
    m = Machine(cfg, boot=False)
    try:
        serve_lazily(st, ckpt, m, background=background, system_first=system_first)
        m.restore_state(None, states)
    except BaseException:
        m.close()
        raise
    return m


@kvm
@lazy_ok
@pytest.mark.parametrize("system_first", [True, False], ids=["system-area-first", "all-from-faults"])
def test_kvm_initiated_faults_are_served_and_the_guest_computes_exactly(stamp_store, system_first):
    """The vCPU's accesses reach guest RAM through KVM (get_user_pages on the host mapping):
    data pages always fault; with ``system_first=False`` so do the page tables KVM walks, the
    GDT, the code it fetches and the mailbox the VMM's Python thread reads (m.steps())."""
    from storage import Store

    with Store.open(str(stamp_store), readonly=True) as st, \
            _lazy_machine(st, 1, background=False, system_first=system_first) as m:
        m.pause_at_step(EVERY + 5000)
        m.start()
        m.wait_parked(timeout=120)
        s = m.lazy.stats()
        # only the system area (if any) was filled up front; everything else came from a fault
        assert s["background_pages"] == (512 if system_first else 0)
        assert s["faults"] > 1000 and not s["done"]
        assert m.steps() == [EVERY + 5000]
        data = m.memory.pages.copy()               # the rest faults in from this (GIL-holding) thread
        assert np.array_equal(data[512:], stamp_model(MEM, 1, 0, SEED, EVERY + 5000))
        assert m.lazy.stats()["populated"] == MEM // 4096


@kvm
@lazy_ok
def test_placed_pages_are_not_dirty_and_guest_writes_are(stamp_store):
    """Placing a page (UFFDIO_COPY) is neither a guest write (the ring never sees it) nor a
    VMM write (it does not go through GuestMemory.write); the guest's writes after it are logged."""
    from guest_models import Model, vcpu_seed
    from storage import Store

    with Store.open(str(stamp_store), readonly=True) as st, _lazy_machine(st, 1, background=True) as m:
        m.lazy.wait(120)
        assert m.lazy.stats()["populated"] == MEM // 4096
        assert m.collect_dirty().size == 0                 # every page placed, none dirty
        m.pause_at_step(EVERY + 1000)                      # the next yield (every 1000 steps)
        m.start()
        m.wait_parked(timeout=120)
        assert m.steps() == [EVERY + 1000]
        dirty = set(m.collect_dirty().tolist())
    model = Model("stamp", vcpu_seed(SEED, 0), (MEM >> 12) - 512)
    model.run_to(EVERY + 1000)
    written = {512 + p for p in model.pages_written(EVERY, EVERY + 1000)}
    assert written <= dirty and all(p < 512 for p in dirty - written), sorted(dirty - written)[:8]


@kvm
@lazy_ok
def test_a_checkpoint_right_after_a_lazy_start_is_exact(stamp_store, tmp_path):
    """The checkpoint's gather, the mailbox reads and a full read of RAM run on Python threads
    that hold the GIL while they fault; the GIL-free handler serves them."""
    from snapctl.checkpoint.captures import capture, commit
    from storage import Store

    store = tmp_path / "c.db"
    shutil.copy(stamp_store, store)
    with Store.open(str(store)) as st:
        for trial in range(3):
            # trial 1: the system area lazily too, so even the mailbox the capture reads
            # (m.steps(), on this GIL-holding thread) arrives through a fault
            with _lazy_machine(st, 3, background=trial == 2, system_first=trial != 1) as m:
                m.start()
                cap = capture(m, "async")               # at once: most of RAM is not populated yet
                k, _ = commit(st, 3, cap)
                time.sleep(0.02)
                cap2 = capture(m, "async", resume=False)
                k2, _ = commit(st, k, cap2)
                live = m.memory.pages.copy()           # faults in every page still missing
            for ck, step in ((k, cap.steps[0]), (k2, cap2.steps[0])):
                img = np.empty((st.page_count, 4096), np.uint8)
                st.materialize(ck, img)
                got = stamp_data(img.reshape(-1), MEM, 1, 0)
                # an async kick can land between the page store and the step store
                assert any(np.array_equal(got, stamp_model(MEM, 1, 0, SEED, s)) for s in (step, step + 1)), \
                    (trial, ck, step)
            assert np.array_equal(live, img), trial    # nothing ran after the last capture


def _damage_a_blob(path, ckpt: int) -> tuple[int, int]:
    """Flip a byte inside a raw blob (a `fill` page: 4096 random bytes, unique in the file)
    that checkpoint ``ckpt`` stored and its map names. Returns (blob, page)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    pages, blobs = (np.frombuffer(x, "<i8") for x in
                    con.execute("SELECT pages, blobs FROM maps WHERE ckpt = ?", (ckpt,)).fetchone())
    page_of = dict(zip(blobs.tolist(), pages.tolist()))
    found = None
    for first, ends, codecs, data in con.execute(
            "SELECT p.first, p.ends, p.codecs, d.data FROM packs p JOIN pack_data d ON d.id = p.id "
            "WHERE p.ckpt = ?", (ckpt,)):
        e = np.frombuffer(ends, "<u4").tolist()
        for i, end in enumerate(e):
            start = e[i - 1] if i else 0
            if codecs[i] == 0 and first + i in page_of and page_of[first + i] > 600:
                found = (first + i, page_of[first + i], bytes(data[start:end]))
                break
        if found:
            break
    con.close()
    assert found, "no raw blob in the checkpoint"
    blob, page, raw = found
    with open(path, "r+b") as f:
        whole = f.read()
        off = whole.find(raw)
        assert off >= 0 and whole.find(raw, off + 1) < 0
        f.seek(off + 100)
        f.write(bytes([whole[off + 100] ^ 0x40]))
    return blob, page


@pytest.fixture(scope="module")
def fill_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("lazyfill") / "f.db"
    ok("run", "--guest", "fill", "--mem", "16M", "--seed", 3, "--checkpoints", 2, "--every-steps", 1500,
       store=store)
    return store


@pytest.fixture
def damaged(fill_store, tmp_path):
    """A copy of ``fill_store`` with one page of checkpoint 2 damaged: (store, blob, page)."""
    store = tmp_path / "d.db"
    shutil.copy(fill_store, store)
    return (store, *_damage_a_blob(store, 2))


@kvm
@lazy_ok
def test_a_damaged_page_stops_the_vm_with_one_error_line(damaged):
    store, blob, page = damaged
    before = len(ok("list", "--json", store=store).json())
    r = snapctl("restore", 2, "--lazy", "--checkpoints", 50, "--every-steps", 1500, store=store)
    line = one_line_error(r, 1, "checkpoint 2", f"page {page}", f"blob {blob}")
    assert "lazy restore" in line
    # whatever was committed before the stop is exact: the damaged page was never populated,
    # so never dirty; every new checkpoint still names the old (damaged) blob for it
    with open_ro(store) as st:
        for c in st.checkpoints()[before:]:
            assert page not in st.diff(2, c.id).tolist()
    # replay --lazy stops the same way; an eager restore refuses before the guest starts
    one_line_error(snapctl("replay", 2, "--lazy", "--to", 2, store=store), 1, f"page {page}", f"blob {blob}")
    n = len(ok("list", "--json", store=store).json())
    one_line_error(snapctl("restore", 2, "--steps", 100, store=store), 1, "checkpoint 2", f"page {page}",
                   f"blob {blob}")
    assert len(ok("list", "--json", store=store).json()) == n


@kvm
@lazy_ok
def test_a_vcpu_touching_a_damaged_page_never_runs_on_it(damaged):
    from snapctl.checkpoint.restoring import lazy_errors
    from storage import CorruptionError, Store

    store, blob, page = damaged
    with Store.open(str(store), readonly=True) as st, _lazy_machine(st, 2, background=False) as m:
        m.pause_at_step(10 ** 9)
        m.start()
        # the vCPU's EFAULT on the page (or the watcher's stop) ends the run; the page is the cause
        with pytest.raises(CorruptionError) as exc, lazy_errors(m):
            m.wait_parked(timeout=120)
        assert exc.value.page == page and exc.value.blob == blob and exc.value.checkpoint == 2
        assert f"page {page}" in str(exc.value)
        s = m.lazy.stats()
        assert s["error_page"] == page and s["populated"] < MEM // 4096


@kvm
@lazy_ok
def test_sigkill_during_a_lazy_restore_leaves_the_store_intact(stamp_store, tmp_path):
    rng = random.Random(seed_for("lazy sigkill", random.randrange(1 << 30)))
    store = tmp_path / "k.db"
    shutil.copy(stamp_store, store)
    for t in range(scaled(5)):
        with open_ro(store) as st:
            last = max(c.id for c in st.checkpoints())
        proc = spawn("restore", last, "--lazy", "--checkpoints", 1000, "--every-steps", 1500, store=store,
                     stdout=DEVNULL)
        wait_for(lambda: False, rng.uniform(0.0, 1.5))
        sigkill(proc)
        with open_ro(store) as st:
            rep = st.verify()
            assert rep.ok, (t, rep.problems)
            cks = st.checkpoints()
            for c in cks:
                if c.id > last or c.id == 0:
                    img = np.empty((st.page_count, 4096), np.uint8)
                    st.materialize(c.id, img)
                    assert np.array_equal(stamp_data(img.reshape(-1), MEM, 1, 0),
                                          stamp_model(MEM, 1, 0, SEED, c.step)), \
                        (t, c.id)
    # and it keeps working, lazily
    r = ok("restore", last, "--lazy", "--steps", 500, "--json", store=store).json()
    assert len(r["checkpoints"]) == 1


@kvm
def test_without_userfaultfd_lazy_says_so_and_eager_still_works(stamp_store, tmp_path):
    store = tmp_path / "n.db"
    shutil.copy(stamp_store, store)
    env = {"SNAPCTL_NO_USERFAULTFD": "1"}
    for args in (("restore", 1, "--lazy", "--steps", 100), ("replay", 1, "--lazy")):
        r = snapctl(*args, store=store, env=env)
        one_line_error(r, 1, "userfaultfd")
    assert len(ok("list", "--json", store=store).json()) == 5      # nothing was written
    # eager restore without userfaultfd decodes into the mapping instead: the same checkpoint
    r = snapctl("restore", 1, "--steps", 100, "--json", store=store, env=env)
    assert r.code == 0 and r.json()["checkpoints"] == [5]
    assert ok("restore", 1, "--steps", 100, "--json", store=store).json()["checkpoints"] == [6]
    listing = _listing(store)
    assert listing[5]["digest"] == listing[6]["digest"] and listing[5]["step"] == EVERY + 100


def _craft(path, how: str) -> None:
    """Damage checkpoint 2 of a copy of the fill store in ways only the handler's own reads of
    the maps and packs can see (the Python side reads neither before the guest starts)."""
    from storage.codec import check63

    con = sqlite3.connect(str(path))
    with con:
        if how == "map":             # a page map that fails its check value
            con.execute("UPDATE maps SET chk = (chk + 1) % 9223372036854775807 WHERE ckpt = 2")
        elif how == "digest":        # a map that passes its check value but names another valid blob
            pages, blobs = (np.frombuffer(x, "<i8").copy() for x in
                            con.execute("SELECT pages, blobs FROM maps WHERE ckpt = 2").fetchone())
            i = next(i for i in range(len(blobs)) if blobs[i] and pages[i] > 600)
            j = next(j for j in range(i + 1, len(blobs)) if blobs[j] and blobs[j] != blobs[i])
            blobs[i], blobs[j] = blobs[j], blobs[i]
            chk = check63(np.array([2], "<i8").tobytes(), pages.tobytes(), blobs.tobytes())
            con.execute("UPDATE maps SET blobs = ?, chk = ? WHERE ckpt = 2", (blobs.tobytes(), chk))
        elif how == "pack":          # a pack whose metadata fail their check value
            con.execute("UPDATE packs SET mchk = (mchk + 1) % 9223372036854775807 WHERE ckpt = 2")
    con.close()


@kvm
@lazy_ok
@pytest.mark.parametrize("how,needle", [("map", "the page map of checkpoint 2 is damaged"),
                                        ("digest", "do not match the checkpoint's digest"),
                                        ("pack", "damaged metadata")])
def test_a_damaged_map_digest_or_pack_is_one_error_line_lazy_or_eager(fill_store, tmp_path, how, needle):
    store = tmp_path / "c.db"
    shutil.copy(fill_store, store)
    _craft(store, how)
    n = len(ok("list", "--json", store=store).json())
    for lazy in (("--lazy",), ()):
        r = snapctl("restore", 2, *lazy, "--checkpoints", 3, "--every-steps", 1500, store=store)
        one_line_error(r, 1, "checkpoint 2", needle)
    one_line_error(snapctl("replay", 2, "--lazy", "--to", 2, store=store), 1, "checkpoint 2", needle)
    if how != "digest":      # (a crafted consistent map may be run on for a moment before the digest check)
        assert len(ok("list", "--json", store=store).json()) == n


_TOUCH = r"""
import sys, threading
from storage import Store, lazy
from snapctl.checkpoint.lazy import serve_lazily
from snapctl.machine import Machine, MachineConfig

path, page, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if how.endswith("json"):
    lazy.report_as_json()
with Store.open(path, readonly=True) as st:
    m = Machine(MachineConfig.from_dict(st.config), boot=False)
    serve_lazily(st, 2, m, background=False)        # every page outside the system area from a fault
    read = lambda: print(int(m.memory.pages[page].sum()), flush=True)
    if how.startswith("thread"):                    # a VMM thread, holding the GIL while it reads
        t = threading.Thread(target=read)
        t.start()
        t.join()
    else:
        read()
    print("survived", flush=True)
"""


@kvm
@lazy_ok
@pytest.mark.parametrize("how", ["main", "thread", "thread-json"])
def test_a_host_thread_reading_a_damaged_page_is_one_error_line_not_a_crash(damaged, tmp_path, how):
    """A Python thread (GIL held) that reads a page that fails its checks: the page is PROT_NONE
    (no vCPU may run on it), so the thread would die of SIGSEGV or, left waiting, hang the VMM;
    the process writes one error line naming checkpoint, page and blob and exits 1 instead."""
    import json
    import subprocess
    import sys

    from cli_helpers import cli_env

    store, blob, page = damaged
    script = tmp_path / "touch.py"
    script.write_text(_TOUCH)
    for flags in ((), ("-X", "faulthandler")):      # with Python's own SIGSEGV handler installed too
        p = subprocess.run([sys.executable, *flags, str(script), str(store), str(page), how], capture_output=True,
                           timeout=120, env=cli_env())
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 1, (p.returncode, err[-2000:])
        assert b"survived" not in p.stdout and "Traceback" not in err and "Fatal Python" not in err, err
        (line,) = err.splitlines()
        if how.endswith("json"):
            d = json.loads(line)
            assert d["exit_code"] == 1
            line = "error: " + d["error"]
        for needle in ("error: checkpoint 2", f"page {page}", f"blob {blob}"):
            assert needle in line, (needle, line)


@lazy_ok
def test_the_handlers_function_table_is_by_name():
    """lz_create's table is built from the names lz_fn(i) gives, each slot the address of
    the function the C side calls by that name (a reordering on either side cannot mismatch)."""
    import ctypes

    from storage import lazy, pageloops
    from storage._pagecodec import ffi

    lib = pageloops.library()
    table = lazy.fn_table(lib)
    names = [ffi.string(lib.lz_fn(i)).decode() for i in range(len(table))]
    assert lib.lz_fn(len(table)) == ffi.NULL and lib.lz_fn(-1) == ffi.NULL
    assert len(set(names)) == len(names) == 19
    import _sqlite3
    sq = ctypes.CDLL(_sqlite3.__file__)         # the libsqlite3 Python's sqlite3 module uses
    for n, a in zip(names, table):
        want = (ctypes.cast(getattr(sq, n), ctypes.c_void_p).value if n.startswith("sqlite3_")
                else pageloops.functions()[n])
        assert want == int(a), n


@lazy_ok
@pytest.mark.parametrize("recent_max", [0, 300, 1 << 16])
def test_a_fill_with_or_without_the_recent_pages_pass_is_the_checkpoint(tmp_path, recent_max):
    """The background fill -- the newest checkpoints' pages one by one first (up to
    ``recent_max``), then 4096-page chunks, those the newest checkpoints changed most
    first -- places exactly checkpoint k, and its digest adds up (over 3 chunks and a
    partial one, the changes concentrated in the third, so the order is not page order)."""
    import mmap

    from storage import Store
    from storage.lazy import LazyImage

    rng = np.random.default_rng(seed_for("lazy-fill-order", 13))
    n = 3 * 4096 + 77
    cfg = {"mem_size": n * 4096, "vcpus": 1, "name": "t", "ram": [{"gpa": 0, "size": n * 4096, "slot": 0}]}
    img = np.zeros((n, 4096), np.uint8)
    img[::3, :64] = rng.integers(1, 256, (len(img[::3]), 64), dtype=np.uint8)
    with Store.create(str(tmp_path / "f.db"), cfg, synchronous="OFF") as st:
        with st.checkpoint(parent=None, meta={"step": 0, "trigger": "base"}) as w:
            w.add_pages(np.arange(n), img)
        parent = w.id
        for k in range(5):
            pages = np.unique(np.concatenate([rng.integers(2 * 4096, 3 * 4096, 600),
                                              rng.integers(0, n, 20)]))
            img[pages, 64:128] = rng.integers(0, 256, (len(pages), 64), dtype=np.uint8)
            with st.checkpoint(parent=parent, meta={"step": k + 1, "trigger": "t"}) as w:
                w.add_pages(pages, img[pages])
            parent = w.id
        mem = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        got = np.frombuffer(mem, np.uint8).reshape(n, 4096)
        lz = LazyImage(st, parent, got.ctypes.data, n, recent=4, recent_max=recent_max)
        try:
            lz.start()
            lz.wait(120)
            s = lz.stats()
        finally:
            lz.close()
        assert s["populated"] == n and s["done"] and not s["error"], s
        assert np.array_equal(got, img)
        del got
        mem.close()


def test_a_page_index_of_another_checkpoint_is_refused(tmp_path):
    """LazyImage takes a page index read beforehand (load_machine reads it while the VM is
    built): one of another checkpoint is an error, never served as this one."""
    from storage import Store
    from storage.errors import InvalidArgumentError
    from storage.lazy import LazyImage
    with Store.create(str(tmp_path / "s.snap"), {"mem_size": 64 * 4096}) as st:
        for parent in (None, 0):
            with st.checkpoint(parent) as w:
                w.add_pages([1], np.full((1, 4096), 7 if parent is None else 9, np.uint8))
        with pytest.raises(InvalidArgumentError, match="page index of checkpoint 0 given for checkpoint 1"):
            LazyImage(st, 1, 0, st.page_count, index=st.page_index(0))


@pytest.mark.parametrize("column, value", [("first", "'x12'"), ("n", "1.5"), ("n", "x'00'"), ("first", "-3")])
def test_the_page_index_leaves_out_a_pack_row_with_a_damaged_directory_entry(tmp_path, column, value):
    """The pack directory a lazy restore serves from (read as one row of text): a pack whose
    id, first blob or count is not an in-range integer is left out -- its blobs are then
    missing, as a damaged pack's are -- and the others are all there, in order."""
    from storage import Store
    path = str(tmp_path / "s.snap")
    with Store.create(path, {"mem_size": 64 * 4096}) as st:
        for k, parent in enumerate((None, 0, 1)):
            with st.checkpoint(parent) as w:
                w.add_pages([k + 1], np.full((1, 4096), k + 7, np.uint8))
        whole = st.page_index(2).packs.copy()
    assert whole.shape == (3, 3) and (np.diff(whole[1]) > 0).all()
    victim = int(whole[0, 1])
    con = sqlite3.connect(path)
    con.execute(f"UPDATE packs SET {column} = {value} WHERE id = {victim}")
    con.commit()
    con.close()
    with Store.open(path, readonly=True) as st:
        got = st.page_index(2).packs
    assert got.tolist() == np.delete(whole, 1, axis=1).tolist()
