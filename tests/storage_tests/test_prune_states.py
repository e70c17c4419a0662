"""Prune keeps what kept checkpoints' descendants need: ``stream/`` states of removed
checkpoints are put in front of the nearest kept descendant's, ``inherited/`` ones copied."""

from __future__ import annotations

import numpy as np

from storage import Store

from storage_helpers import PAGE


def _chain(store: Store, parent, states_per_ckpt):
    ids = []
    for i, states in enumerate(states_per_ckpt):
        with store.checkpoint(parent=parent) as w:
            w.add_pages(np.array([i % 4]), np.full((1, PAGE), i + 1, np.uint8))
            for name, data in states.items():
                w.add_state(name, data)
        parent = w.id
        ids.append(w.id)
    return ids


def _streams(store: Store, ckpt: int, name: str) -> bytes:
    return b"".join(store.state(c, name) for c in store.path(ckpt) if name in store.state_names(c))


def test_prune_folds_streams_and_copies_inherited_states(make_store):
    st = make_store()
    plan = [{"stream/out": b"base;"},
            {"stream/out": b"a;", "inherited/f1": b"F1", "other": b"x"},
            {"stream/log": b"L2;", "inherited/f2": b"F2"},
            {"stream/out": b"c;", "stream/log": b"L3;"},
            {"stream/out": b"d;", "inherited/f1": b"F1"}]
    ids = _chain(st, None, plan)
    # a branch from ids[2]: its kept leaf must see the removed ancestors' streams too
    branch = _chain(st, ids[2], [{"stream/out": b"B;"}])
    before = {c: (_streams(st, c, "stream/out"), _streams(st, c, "stream/log")) for c in (ids[4], branch[0])}
    st.prune(keep_ids=[ids[4], branch[0]])
    assert [c.id for c in st.checkpoints()] == sorted([ids[0], ids[4], branch[0]])
    for c, (out, log) in before.items():
        assert (_streams(st, c, "stream/out"), _streams(st, c, "stream/log")) == (out, log)
    assert st.state(ids[4], "inherited/f2") == b"F2"
    assert st.state(ids[4], "inherited/f1") == b"F1"        # its own copy wins, not duplicated
    assert st.state(branch[0], "inherited/f1") == b"F1"
    assert st.state(branch[0], "inherited/f2") == b"F2"
    assert "other" not in st.state_names(ids[4])           # plain states of removed checkpoints go
    assert st.verify().ok
