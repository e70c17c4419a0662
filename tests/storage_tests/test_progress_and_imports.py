"""Store operations that take long report progress (issue 14), and opening a
store to list it imports none of the page machinery (issue 14's start-up)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from storage_helpers import PAGE, _ROOT, random_pages


def _store_with_chain(make_store, n=64, steps=6):
    st = make_store(n)
    rng = np.random.default_rng(11)
    with st.checkpoint(None, {"step": 0}) as w:
        w.add_pages(np.arange(n), random_pages(rng, n))
    parent = w.id
    for k in range(steps):
        pages = np.unique(rng.integers(0, n, 16))
        with st.checkpoint(parent, {"step": k + 1}) as w:
            w.add_pages(pages, random_pages(rng, len(pages)))
        parent = w.id
    return st


def _check_calls(calls):
    assert calls, "no progress reported"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    last_done, last_total = calls[-1]
    assert last_done == last_total
    for d, t in calls:
        assert t is None or 0 <= d <= t


def test_verify_prune_vacuum_report_progress(make_store):
    st = _store_with_chain(make_store)
    calls: list = []
    assert st.verify(progress=lambda d, t: calls.append((d, t))).ok
    _check_calls(calls)
    assert calls[-1][1] == len(st.checkpoints()) + st.verify().checked["packs"]

    calls = []
    rep = st.prune(keep_last=2, progress=lambda d, t: calls.append((d, t)))
    assert rep.removed
    _check_calls(calls)

    calls = []
    st.vacuum(progress=lambda d, t: calls.append((d, t)))
    _check_calls(calls)
    assert st.verify().ok


def test_listing_a_store_imports_no_page_machinery(make_store, store_path):
    """`snapctl list`'s path: open, checkpoints, resolve, get -- without
    numpy, the codecs' C loops or the writer (they load on first use)."""
    _store_with_chain(make_store).close()
    code = ("import sys; from storage import Store\n"
            "st = Store.open(sys.argv[1], readonly=True)\n"
            "cks = st.checkpoints(); st.get(cks[-1].id); st.resolve(str(cks[0].id)); st.close()\n"
            "heavy = [m for m in ('numpy', 'storage.pageloops', 'storage.packs', 'storage.writer',"
            " 'storage._pagecodec', 'cffi', 'sqlite_utils') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code, store_path], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=_ROOT))


def test_the_page_size_is_defined_once():
    import storage
    from storage import codec
    assert storage.PAGE_SIZE == codec.PAGE_SIZE == PAGE
