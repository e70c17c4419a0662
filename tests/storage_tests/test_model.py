"""Property-based: random checkpoint trees, page writes and prunes against a
plain in-memory model (a dict of numpy images)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import xxhash
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from storage_helpers import PAGE, image_digest, random_pages
from storage import ZERO_HASH_HEX, Store

N_PAGES = 12
KINDS = ["zero", "random", "text", "dup", "edit", "same"]


class StoreModel(RuleBasedStateMachine):
    """The model: images[c] (full memory), parent[c], tags."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def create(self, seed):
        self.rng = np.random.default_rng(seed)
        self.dir = tempfile.TemporaryDirectory()
        self.store = Store.create(os.path.join(self.dir.name, "s.snap"),
                                  {"mem_size": N_PAGES * PAGE}, synchronous="OFF")
        self.images: dict[int, np.ndarray] = {}
        self.parent: dict[int, int | None] = {}
        self.tags: dict[str, int] = {}
        self.next_id = 0
        self.write(None, [("text", list(range(0, N_PAGES, 2))), ("zero", [1])])

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            self.dir.cleanup()

    # -- helpers --

    def make_pages(self, kind, pages, base):
        rng = self.rng
        n = len(pages)
        if kind in ("zero", "random", "text"):
            return random_pages(rng, n, kind)
        if kind == "same":
            return base[pages].copy()
        if kind == "dup":      # content that already exists somewhere in the store
            pool = np.concatenate(list(self.images.values()))
            return pool[rng.integers(0, len(pool), n)].copy()
        out = base[pages].copy()   # "edit": a few bytes changed in place
        for row in out:
            k = int(rng.integers(1, 64))
            at = rng.integers(0, PAGE, k)
            row[at] = rng.integers(0, 256, k, dtype=np.uint8)
        return out

    def write(self, parent, batches):
        base = (self.images[parent] if parent is not None
                else np.zeros((N_PAGES, PAGE), np.uint8))
        image = base.copy()
        with self.store.checkpoint(parent, {"step": self.next_id, "trigger": "sync"}) as w:
            assert w.id == self.next_id
            for kind, pages in batches:
                pages = np.asarray(pages, np.int64)
                data = self.make_pages(kind, pages, image)
                w.add_pages(pages, data)
                image[pages] = data         # later rows win, like the store
            w.add_state("vcpu0", image[:, :8].tobytes())
        self.images[w.id] = image
        self.parent[w.id] = parent
        self.next_id += 1

    # -- rules --

    @rule(data=st.data(),
          batches=st.lists(st.tuples(st.sampled_from(KINDS),
                                     st.lists(st.integers(0, N_PAGES - 1), max_size=8)),
                           min_size=0, max_size=3))
    def checkpoint(self, data, batches):
        # Mostly continue from the newest checkpoint (as a running guest
        # does), sometimes branch from an older one (restore, then continue).
        ids = sorted(self.images)
        parent = data.draw(st.one_of(st.just(ids[-1]), st.sampled_from(ids)))
        self.write(parent, batches)

    @rule(data=st.data(), name=st.sampled_from(["a", "b", "keep-me"]))
    def tag(self, data, name):
        c = data.draw(st.sampled_from(sorted(self.images)))
        if name in self.tags and self.tags[name] != c:
            self.store.untag(name)
        self.store.tag(c, name)
        self.tags[name] = c

    @precondition(lambda self: len(self.images) > 2)
    @rule(data=st.data(), keep_last=st.one_of(st.none(), st.integers(0, 4)),
          keep_tagged=st.booleans())
    def prune(self, data, keep_last, keep_tagged):
        ids = sorted(self.images)
        keep_ids = data.draw(st.lists(st.sampled_from(ids), max_size=2))
        keep = {0} | set(keep_ids)
        if keep_last:
            keep |= set(ids[-keep_last:])
        if keep_tagged:
            keep |= set(self.tags.values())
        rep = self.store.prune(keep_last=keep_last, keep_ids=keep_ids, keep_tagged=keep_tagged)
        assert sorted(rep.removed) == sorted(set(ids) - keep)
        for c in rep.removed:
            del self.images[c]
        for c in list(self.parent):
            if c not in self.images:
                continue
            p = self.parent[c]
            while p is not None and p not in keep:
                p = self.parent[p]
            self.parent[c] = p
        self.parent = {c: p for c, p in self.parent.items() if c in self.images}
        self.tags = {t: c for t, c in self.tags.items() if c in self.images}

    @rule()
    def reopen(self):
        """Close and reopen: nothing may live only in the writer's caches."""
        self.store.close()
        self.store = Store.open(os.path.join(self.dir.name, "s.snap"), synchronous="OFF")

    @rule(data=st.data())
    def read_range(self, data):
        c = data.draw(st.sampled_from(sorted(self.images)))
        gpa = data.draw(st.integers(0, N_PAGES * PAGE))
        length = data.draw(st.integers(0, N_PAGES * PAGE - gpa))
        assert self.store.read(c, gpa, length) == self.images[c].tobytes()[gpa:gpa + length]

    # -- invariants: the store equals the model after every step --

    @invariant()
    def images_match(self):
        if not hasattr(self, "store"):
            return
        out = np.empty((N_PAGES, PAGE), np.uint8)
        infos = {i.id: i for i in self.store.checkpoints()}
        assert sorted(infos) == sorted(self.images)
        for c, image in self.images.items():
            out.fill(0xAA)                       # materialize must overwrite everything
            self.store.materialize(c, out)
            assert np.array_equal(out, image), f"checkpoint {c}"
            assert infos[c].parent == self.parent[c]
            assert infos[c].digest == image_digest(image)
            p = int(self.rng.integers(0, N_PAGES))
            assert self.store.read_page(c, p) == image[p].tobytes()
            assert self.store.state(c, "vcpu0") == image[:, :8].tobytes()
        assert {t: self.store.resolve(t) for t in self.tags} == self.tags

    @invariant()
    def diff_and_history_match(self):
        if not hasattr(self, "store"):
            return
        ids = sorted(self.images)
        a, b = ids[int(self.rng.integers(0, len(ids)))], ids[-1]
        want = np.flatnonzero((self.images[a] != self.images[b]).any(axis=1))
        assert np.array_equal(self.store.diff(a, b), want)
        page = int(self.rng.integers(0, N_PAGES))
        hist = []
        for c in ids:
            p = self.parent[c]
            before = self.images[p][page] if p is not None else np.zeros(PAGE, np.uint8)
            now = self.images[c][page]
            if not np.array_equal(before, now):
                h = xxhash.xxh3_128_hexdigest(now.tobytes()) if now.any() else ZERO_HASH_HEX
                hist.append((c, h))
        assert self.store.history(page) == hist

    @invariant()
    def verifies(self):
        if hasattr(self, "store"):
            rep = self.store.verify()
            assert rep.ok, rep.problems


StoreModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestStoreModel = StoreModel.TestCase
