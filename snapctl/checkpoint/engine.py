"""The checkpoint pipeline: run, restore, replay.

One checkpoint:  pause every vCPU (a kick for async, a hold at the guest's
yield for sync) -> collect the dirty set (ring/bitmap harvest + pages
harvested at ring-full exits + the VMM's own writes) and reset, which
re-protects those pages -> gather their contents with one numpy fancy-index
copy -> capture vCPU state -> resume -> write the checkpoint in one store
transaction (hash, dedup, compress) while the guest runs on.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from storage import Store
from storage import lock as store_lock

from ..machine import Machine, MachineConfig, VcpuState
from ..stored import checked_info
from ..machine.guests import MB_STOP_AT

PAGE = 4096
MACHINE_STATE = "machine"
#: Guest states under this prefix hold what happened *during* an interval (a program's
#: output, its log of outside-world results): merging two captures appends them.
STREAM_PREFIX = "stream/"


def vcpu_state_name(i: int) -> str:
    return f"vcpu/{i}"


@dataclass
class Schedule:
    """When to take checkpoints: ``count`` of them, every ``every_steps`` guest steps
    (sync, at the guest's yields) or every ``interval_ms`` (async kicks).
    ``stop_after`` (restore --steps): run exactly that many more steps, then one sync checkpoint."""

    count: int = 10
    every_steps: int | None = None
    interval_ms: float | None = None
    stop_after: int | None = None

    def validate(self) -> None:
        if self.every_steps is not None and self.interval_ms is not None:
            raise ValueError("give either --every-steps or --interval, not both")
        if self.count < 0:
            raise ValueError(f"checkpoint count must be >= 0, got {self.count}")
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"--every-steps must be >= 1, got {self.every_steps}")
        if self.interval_ms is not None and not self.interval_ms > 0:
            raise ValueError(f"--interval must be > 0 ms, got {self.interval_ms}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--steps must be >= 1, got {self.stop_after}")

    @property
    def trigger(self) -> str:
        return "async" if self.interval_ms is not None else "sync"


@dataclass
class RunSummary:
    store: str
    checkpoints: list[int] = field(default_factory=list)
    pages: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    pauses_ms: list[float] = field(default_factory=list)
    dirty_pages: list[int] = field(default_factory=list)   #: per checkpoint, in order
    lazy: dict | None = None   #: a lazy restore's handler statistics (storage.lazy.LazyImage.stats)
    #: guest run time and pages dirtied in it, over Checkpointer.run calls (not the base)
    run_seconds: float = 0.0
    run_pages: int = 0

    def dirty_rate(self) -> dict | None:
        """Pages the guest dirtied per second while checkpointed (None before it ran)."""
        if self.run_seconds <= 0:
            return None
        per_s = self.run_pages / self.run_seconds
        return {"pages_per_s": round(per_s, 1), "mib_per_s": round(per_s * PAGE / 2**20, 2),
                "seconds": round(self.run_seconds, 3)}

    def as_dict(self) -> dict:
        p = self.pauses_ms
        return {
            "store": self.store, "checkpoints": self.checkpoints, "count": len(self.checkpoints),
            "pages_harvested": self.pages, "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes,
            "compression_ratio": round(self.raw_bytes / self.stored_bytes, 2) if self.stored_bytes else None,
            "pause_ms_median": round(statistics.median(p), 3) if p else None,
            "pause_ms_max": round(max(p), 3) if p else None,
            **({"lazy": self.lazy} if self.lazy is not None else {}),
            "dirty_rate": self.dirty_rate(),
        }


@dataclass
class Capture:
    """What was taken while the guest was paused."""

    pages: np.ndarray  # guest page numbers, sorted
    data: np.ndarray  # (n, 4096) contents of those pages (may be a staging-buffer view)
    vcpus: list[VcpuState]
    steps: list[int]
    trigger: str
    timings: dict = field(default_factory=dict)
    buffer: "StagingBuffer | None" = None  # returned to its pool once written
    # Pre-copied chunks [(pages, data)], oldest first; ``pages``/``data`` win over them.
    early: list = field(default_factory=list)
    #: the guest driver's own named states (``Machine.guest_states``), taken in the same pause
    states: dict = field(default_factory=dict)

    def flatten(self) -> "Capture":
        """Fold the pre-copied chunks in (later wins): one sorted pages/data pair."""
        if not self.early:
            return self
        pages = np.concatenate([p for p, _ in self.early] + [self.pages])
        data = np.concatenate([d for _, d in self.early] + [self.data])
        last, idx = np.unique(pages[::-1], return_index=True)  # newest occurrence of each page
        self.pages, self.data = last, data[pages.size - 1 - idx]
        self.early = []
        self.release()
        return self

    def page_count(self) -> int:
        if not self.early:
            return int(self.pages.size)
        return int(np.unique(np.concatenate([p for p, _ in self.early] + [self.pages])).size)

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.release()
            self.buffer = None

    def detach(self) -> "Capture":
        """Own the page data (copy it out of the staging buffer) and free the buffer."""
        self.flatten()
        if self.buffer is not None:
            self.data = np.array(self.data)
            self.release()
        return self


def merge(older: Capture, newer: Capture) -> Capture:
    """One capture equal to ``older`` followed by ``newer``: the union of their pages,
    ``newer``'s content where both have a page. Exact, because a page in ``older``
    that ``newer`` does not list was not written in between: its content is the same."""
    older.flatten()
    newer.flatten()
    only_old = ~np.isin(older.pages, newer.pages, assume_unique=True)
    pages = np.concatenate([older.pages[only_old], newer.pages])
    data = np.concatenate([older.data[only_old], newer.data])
    order = np.argsort(pages, kind="stable")
    states = dict(older.states)
    for name, blob in newer.states.items():
        states[name] = states.get(name, b"") + blob if name.startswith(STREAM_PREFIX) else blob
    out = Capture(pages[order], data[order], newer.vcpus, newer.steps, newer.trigger, dict(newer.timings),
                  states=states)
    newer.release()
    out.timings["carried_pages"] = int(only_old.sum())
    return out


class StagingBuffer:
    """A reusable, already-touched page buffer for the pause-time gather.

    A freshly allocated buffer pays a page fault per 4 KiB on first touch (up to
    6x the copy itself); reusing touched buffers keeps the copy at memory speed."""

    def __init__(self, pool: "StagingPool"):
        self.pool = pool
        self.array = np.empty((0, PAGE), np.uint8)

    def reserve(self, n: int) -> None:
        """Grow to at least ``n`` pages, touching them now (call outside the pause)."""
        if n > self.array.shape[0]:
            arr = np.empty((max(n, 256), PAGE), np.uint8)
            # Write every page now. np.zeros would not do: it is calloc, which maps
            # untouched zero pages, and the first-touch faults then landed in the
            # pause (4 slow copies per run, one per pooled buffer, ~7x the copy).
            arr.fill(0)
            self.array = arr

    def view(self, n: int) -> np.ndarray:
        if n > self.array.shape[0]:  # fallback: bigger than any capture so far
            self.reserve(int(n * 1.25))
        self.pool.note(n)
        return self.array[:n]

    def release(self) -> None:
        self.pool.free.put(self)


class StagingPool:
    """Buffers sized from the largest capture so far (initially up to 32 MiB), grown
    in :meth:`acquire`, before the pause, so the pause itself never allocates."""

    def __init__(self, count: int, hint_pages: int = 8192):
        self.free: queue.Queue[StagingBuffer] = queue.Queue()
        self.hint = hint_pages
        for _ in range(count):
            self.free.put(StagingBuffer(self))

    def note(self, n: int) -> None:
        if n > self.hint:
            self.hint = int(n * 1.25)

    def acquire(self) -> StagingBuffer:
        """Blocks while every buffer is still queued for writing: the writer is behind,
        so the next checkpoint waits (before the pause, while the guest runs)."""
        buf = self.free.get()
        buf.reserve(self.hint)
        return buf


def capture(machine: Machine, trigger: str, *, already_paused: bool = False,
            buffer: StagingBuffer | None = None, resume: bool = True) -> Capture:
    """The part of a checkpoint that needs the guest stopped. Resumes it at the end
    (unless ``resume`` is False: the last checkpoint of a run).

    Only this happens in the pause: harvest + reset, one gather of the dirty
    pages into a staging buffer (pages pre-copied at ring-full exits and not
    written since are not copied again), vCPU state. Hashing, compression and
    the store write happen after resume."""
    t0 = time.perf_counter()
    if not already_paused:
        machine.pause()
    t1 = time.perf_counter()
    pages = machine.collect_dirty()  # harvest + reset: contents are read after this
    early = machine.tracker.take_early_copies()  # O(1); merged by the writer, not here
    t2 = time.perf_counter()
    dest = buffer.view(pages.size) if buffer is not None else np.empty((pages.size, PAGE), np.uint8)
    np.take(machine.memory.pages, pages, axis=0, out=dest)  # the one vectorised gather
    t3 = time.perf_counter()
    vcpus = machine.capture_vcpus()
    steps = machine.steps()
    states = machine.guest_states()
    t4 = time.perf_counter()
    if resume:
        machine.resume()
    t5 = time.perf_counter()
    st = machine.tracker.stats
    timings = {
        "stop_ms": (t1 - t0) * 1e3, "harvest_ms": st.last_harvest_ms, "reset_ms": st.last_reset_ms,
        "collect_ms": (t2 - t1) * 1e3, "copy_ms": (t3 - t2) * 1e3, "state_ms": (t4 - t3) * 1e3,
        "downtime_ms": (t5 - t0) * 1e3, "precopied_pages": int(sum(p.size for p, _ in early)),
        "copied_in_pause": int(pages.size),
    }
    return Capture(pages, dest, vcpus, steps, trigger, timings, buffer, early, states)


def commit(store: Store, parent: int | None, cap: Capture, extra_stats: dict | None = None) -> tuple[int, dict]:
    """Write a capture as one checkpoint (one transaction). Returns (id, stats)."""
    meta = {"step": cap.steps[0], "steps": cap.steps, "trigger": cap.trigger}
    with store.checkpoint(parent=parent, meta=meta) as w:
        for pages, data in cap.early:  # pre-copied first: the pause's fresh copies win
            w.add_pages(pages, data)
        w.add_pages(cap.pages, cap.data)
        for i, st in enumerate(cap.vcpus):
            w.add_state(vcpu_state_name(i), st.to_bytes())
        w.add_state(MACHINE_STATE, json.dumps({"steps": cap.steps}).encode())
        for name, blob in cap.states.items():
            w.add_state(name, blob)
        stats = {"dirty_pages": cap.page_count(), **{k: round(v, 3) for k, v in cap.timings.items()}}
        stats.update(extra_stats or {})
        w.set_stats(stats)
    return w.id, dict(w.stats, **stats, digest=w.digest)


class CheckpointWriteError(Exception):
    """Checkpoints could not be written; those committed before are intact."""


class Writer:
    """Commits captures in order on a background thread, from a bounded queue.

    A failed write loses nothing: its capture is kept and merged into the next
    one (see :func:`merge`), which is then written instead. After
    ``max_failures`` failures in a row, or if the last capture still cannot be
    written at close, the run stops with :class:`CheckpointWriteError`; the
    store keeps every checkpoint committed before (each is one transaction)."""

    def __init__(self, store: Store, parent: int | None, *, depth: int = 2, max_failures: int = 3,
                 on_commit: Callable[[int, Capture, dict], None] | None = None):
        self.store = store
        self.parent = parent
        self.on_commit = on_commit
        self.max_failures = max_failures
        self._q: queue.Queue[Capture | None] = queue.Queue(maxsize=depth)
        self._carry: Capture | None = None
        self._failures = 0
        self.last_error: BaseException | None = None
        self.fatal: BaseException | None = None
        self.failed_writes = 0
        self._thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, cap: Capture) -> None:
        """Queue a capture; blocks while the queue is full (the writer is behind)."""
        if self.fatal is not None:
            cap.release()
            raise CheckpointWriteError(f"checkpoint writes keep failing: {self.fatal}") from self.fatal
        self._q.put(cap)

    def _loop(self) -> None:
        while True:
            cap = self._q.get()
            if cap is None:
                return
            self._write(cap)

    def _write(self, cap: Capture) -> bool:
        if self._carry is not None:
            cap, self._carry = merge(self._carry, cap), None
        try:
            ckpt, stats = commit(self.store, self.parent, cap)
        except Exception as e:  # disk full, I/O error: keep the pages for the next try
            self.failed_writes += 1
            self._failures += 1
            self.last_error = e
            self._carry = cap.detach()
            if self._failures >= self.max_failures:
                self.fatal = e
            return False
        self._failures = 0
        self.parent = ckpt
        if self.on_commit is not None:
            self.on_commit(ckpt, cap, stats)
        cap.release()
        return True

    def close(self) -> None:
        """Drain the queue; write anything carried over once more; raise if it still fails."""
        self._q.put(None)
        self._thread.join()
        if self._carry is not None:
            carry, self._carry = self._carry, None
            if not self._write(carry):
                raise CheckpointWriteError(
                    f"the last checkpoint could not be written ({self.last_error}); "
                    f"checkpoints committed before are intact (last: {self.parent})") from self.last_error
        if self.fatal is not None:
            raise CheckpointWriteError(f"checkpoint writes keep failing: {self.fatal}") from self.fatal


class Checkpointer:
    """Takes checkpoints of one machine into one store, as a chain from ``parent``.

    With ``background=True`` (the default) the guest resumes before a checkpoint
    is written; the writer's queue holds at most ``depth`` checkpoints."""

    def __init__(self, machine: Machine, store: Store, parent: int | None,
                 on_checkpoint: Callable[[int, dict], None] | None = None, *, background: bool = True,
                 depth: int = 2, precopy: bool = False,
                 after_commit: Callable[[int, Capture, dict], None] | None = None):
        self.machine = machine
        #: called with (id, capture, stats) once a checkpoint is committed, before its
        #: capture is released (replication sends it from here)
        self.after_commit = after_commit
        self.store = store
        self.parent = parent
        self.on_checkpoint = on_checkpoint
        self.summary = RunSummary(store=store.filename)
        self.background = background
        self.depth = depth
        machine.tracker.precopy = precopy
        self._pool = StagingPool(depth + 2, hint_pages=min(machine.memory.npages, 8192))
        self._demand = threading.Event()

    def request(self) -> None:
        """Ask for a checkpoint now (trigger "manual"), e.g. from a SIGUSR1 handler:
        only sets an event; :meth:`run` takes it between its scheduled ones."""
        self._demand.set()

    def _sleep(self, seconds: float, take) -> None:
        """Sleep ``seconds`` (async schedules), taking requested checkpoints meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._demand.wait(left):
                self._demand.clear()
                take("manual", False)

    def _wait_parked(self, take) -> None:
        """Wait for every vCPU to hold (sync schedules), taking requested checkpoints
        meanwhile. A request that finds a vCPU already holding at its step target
        waits for that scheduled checkpoint (resuming would release the hold)."""
        m, deferred = self.machine, False
        while not m.wait_parked(0.05, or_timeout=True):
            if deferred or not self._demand.is_set():
                continue
            self._demand.clear()
            m.pause()
            if any(m.holding()):
                m.resume(keep_holds=True)
                deferred = True
            else:
                take("manual", True)  # resumes; the step targets stay set
        if deferred:
            self._demand.set()

    def background_writer(self) -> Writer:
        """A writer committing this chain's captures behind a bounded queue (close it at the end)."""
        return Writer(self.store, self.parent, depth=self.depth, on_commit=self._account)

    def staging_buffer(self) -> StagingBuffer:
        """A reused staging buffer for the next capture (may wait while the writer is behind)."""
        return self._pool.acquire()

    def _account(self, ckpt: int, cap: Capture, stats: dict) -> None:
        self.parent = ckpt
        s = self.summary
        s.checkpoints.append(ckpt)
        n = int(stats.get("dirty_pages", cap.pages.size))
        s.pages += n
        s.dirty_pages.append(n)
        s.raw_bytes += n * PAGE
        s.stored_bytes += int(stats.get("stored_bytes", 0))
        s.pauses_ms.append(cap.timings.get("downtime_ms", 0.0))
        if self.after_commit is not None:
            self.after_commit(ckpt, cap, stats)
        if self.on_checkpoint:
            self.on_checkpoint(ckpt, stats)

    def record(self, cap: Capture) -> int:
        """Write a capture now, as the next checkpoint of this chain, and account for it."""
        ckpt, stats = commit(self.store, self.parent, cap)
        self._account(ckpt, cap, stats)
        cap.release()
        return ckpt

    def base(self) -> int:
        """Checkpoint 0 of a fresh machine: every page (zero pages cost a marker)."""
        m = self.machine
        m.collect_dirty()  # start tracking from here; the base holds everything
        m.tracker.take_early_copies()
        all_pages = np.arange(m.memory.npages, dtype=np.int64)
        cap = Capture(all_pages, m.memory.pages, m.capture_vcpus(), m.steps(), "base", {"downtime_ms": 0.0},
                      states=m.guest_states())
        return self.record(cap)

    def run(self, schedule: Schedule) -> RunSummary:
        """Start (or continue) the guest and take the scheduled checkpoints.

        Sync targets are always set while the guest is parked: at tens of
        millions of steps a second it would otherwise run past them."""
        schedule.validate()
        m = self.machine
        start_steps = m.steps()
        t_run, pages_before = time.perf_counter(), self.summary.pages
        writer = Writer(self.store, self.parent, depth=self.depth, on_commit=self._account) if self.background else None

        def take(trigger: str, already_paused: bool) -> None:
            buf = self._pool.acquire()  # before the pause: waiting here costs no downtime
            cap = capture(m, trigger, already_paused=already_paused, buffer=buf)
            if writer is not None:
                writer.submit(cap)
            else:
                self.record(cap)

        try:
            if schedule.stop_after is not None:
                m.set_stop_at([s + schedule.stop_after for s in start_steps])
                m.start()
                self._wait_parked(take)
                take("sync", True)
            elif schedule.interval_ms is not None:
                m.start()
                for _ in range(schedule.count):
                    self._sleep(schedule.interval_ms / 1e3, take)
                    take("async", False)
            else:
                every = schedule.every_steps or 100 * m.config.steps_per_yield

                def target(k: int) -> list[int]:
                    return [s + k * every for s in start_steps]

                if schedule.count:
                    m.pause_at_step(target(1))
                m.start()
                for k in range(1, schedule.count + 1):
                    self._wait_parked(take)
                    if k < schedule.count:
                        m.pause_at_step(target(k + 1))  # before capture() resumes the guest
                    take("sync", True)
            if self._demand.is_set():  # requested during the last wait
                self._demand.clear()
                take("manual", False)
        finally:
            m.pause()
            if writer is not None:
                writer.close()
            self.summary.run_seconds += time.perf_counter() - t_run
            self.summary.run_pages += self.summary.pages - pages_before
        return self.summary


# -- the three things a user does -------------------------------------------------------------

class StoreExistsError(FileExistsError):
    """`run` was given a path that already holds something worth keeping."""


def prepare_new_store(store_path: str) -> None:
    """Make ``store_path`` ready for a new run, or raise :class:`StoreExistsError`.

    A snapctl store with no checkpoint at all is what a run killed before its
    base checkpoint committed leaves behind (creation itself is atomic): it
    holds no history, so it is replaced -- but only once its creator is
    proven dead: a living creator holds the store's writer lock (a second
    `run` started a moment after the first would otherwise delete the store
    the first is writing). Anything else (a store with checkpoints, a
    foreign or damaged file, a directory) is never touched."""
    if not os.path.lexists(store_path):
        return
    if os.path.isfile(store_path) and not os.path.islink(store_path):
        with store_lock.replacing(store_path):     # StoreBusyError while its writer lives
            try:
                with Store.open(store_path, readonly=True) as st:
                    empty = not st.checkpoints()
            except Exception:
                empty = False
            if empty:
                Store.remove(store_path)
                return
    raise StoreExistsError(f"{store_path} already exists; use `snapctl restore ID` to continue it, "
                           "or choose another --store")


def run(store_path: str, config: MachineConfig, schedule: Schedule, *, on_checkpoint=None,
        kvm_path: str = "/dev/kvm", precopy: bool = False, on_checkpointer=None, after_commit=None) -> RunSummary:
    """Boot ``config``'s guest, write the base checkpoint and the scheduled ones into a new store."""
    schedule.validate()
    with Machine(config, kvm_path=kvm_path) as m:  # validates everything before a file is created
        prepare_new_store(store_path)
        store = Store.create(store_path, config.to_dict())
        with store:
            cp = Checkpointer(m, store, None, on_checkpoint, precopy=precopy, after_commit=after_commit)
            if on_checkpointer is not None:  # e.g. to call cp.request() on SIGUSR1
                on_checkpointer(cp)
            cp.base()
            return cp.run(schedule)


def load_machine(store: Store, ckpt: int, *, kvm_path: str = "/dev/kvm", driver=None,
                 lazy: bool = False) -> Machine:
    """A fresh, not yet started machine holding checkpoint ``ckpt`` exactly (a program
    guest's ``driver`` then rebuilds its own state from the restored memory).
    ``lazy``: guest RAM is served on first touch and filled in the background
    (snapctl/checkpoint/lazy.py); ``storage.lazy.LazyUnavailable`` without userfaultfd."""
    config = MachineConfig.from_dict(store.config)
    info = checked_info(store.get(ckpt))
    steps = info.meta.get("steps", [info.step])
    if len(steps) != config.vcpus:
        raise ValueError(f"checkpoint {ckpt}: {len(steps)} recorded step counts for {config.vcpus} vCPUs")
    names = store.state_names(ckpt)
    states = [VcpuState.from_bytes(store.state(ckpt, vcpu_state_name(i))) for i in range(config.vcpus)
              if vcpu_state_name(i) in names]
    if len(states) != config.vcpus:
        raise ValueError(f"checkpoint {ckpt} has no state for every vCPU; it cannot be restored")
    m = Machine(config, kvm_path=kvm_path, boot=False, driver=driver)
    try:
        if lazy:
            from .lazy import serve_lazily
            serve_lazily(store, ckpt, m)
        else:
            from storage.lazy import fill
            # straight into guest RAM: through userfaultfd where it is available (each page
            # allocated already filled: no first-touch fault), else decoded into the fresh,
            # all-zero mapping (zero pages are not touched)
            if not fill(store, ckpt, m.memory.host_addr, m.memory.npages):
                store.materialize(ckpt, m.memory.pages, out_is_zero=True)
        m.check_mailboxes(steps)
        m.restore_state(None, states)
    except BaseException:
        m.close()
        raise
    return m


def restore(store: Store, ckpt: int, schedule: Schedule, *, on_checkpoint=None,
            kvm_path: str = "/dev/kvm", precopy: bool = False, lazy: bool = False,
            on_checkpointer=None, after_commit=None) -> RunSummary:
    """Continue checkpoint ``ckpt`` in a fresh VM; new checkpoints branch from it.
    ``lazy``: the guest starts before its memory is restored (see :func:`load_machine`)."""
    schedule.validate()
    store.claim()  # another process writing the store: say so before the guest runs
    with load_machine(store, ckpt, kvm_path=kvm_path, lazy=lazy) as m, lazy_errors(m):
        cp = Checkpointer(m, store, ckpt, on_checkpoint, precopy=precopy, after_commit=after_commit)
        if on_checkpointer is not None:
            on_checkpointer(cp)
        summary = cp.run(schedule)
        if m.lazy is not None:
            summary.lazy = m.lazy.stats()
        return summary


@contextmanager
def lazy_errors(m: Machine):
    """A lazy restore's damaged page is the cause of whatever then stopped the machine
    (a vCPU's EFAULT on it, a pause that finds the machine failed): raise that instead."""
    try:
        yield
    except Exception as e:
        cause = m.lazy.error() if m.lazy is not None else None
        if cause is not None:
            raise cause from e
        raise


@dataclass
class ReplayResult:
    source: int
    target: int
    match: bool
    steps: list[int]
    target_steps: list[int]
    differing_pages: list[int]
    differing_registers: dict[str, tuple[int, int]]  # "vcpu0.rip": (replayed, recorded)
    note: str = ""
    registers_compared: bool = False  # sync targets only: an async kick lands mid-loop

    def as_dict(self) -> dict:
        return {"from": self.source, "to": self.target, "match": self.match, "steps": self.steps,
                "target_steps": self.target_steps, "differing_pages": self.differing_pages[:64],
                "differing_page_count": len(self.differing_pages),
                "differing_registers": {k: {"replayed": a, "recorded": b} for k, (a, b) in self.differing_registers.items()},
                "note": self.note, "registers_compared": self.registers_compared}


def next_in_branch(store: Store, ckpt: int) -> int:
    kids = store.children(ckpt)
    if not kids:
        raise ValueError(f"checkpoint {ckpt} has no later checkpoint in its branch; give --to")
    return min(kids)


def unreachable(store: Store, source: int, target: int) -> str:
    """Why re-executing ``source`` cannot reach ``target`` ("" when it can):
    ``target`` must be ``source`` or a descendant, at or after its guest steps."""
    if source not in store.path(target):
        return f"checkpoint {target} is not {source} or a descendant of it (see `snapctl list --tree`)"
    t, s = store.get(target), store.get(source)
    t_steps, s_steps = list(t.meta.get("steps") or [t.step]), list(s.meta.get("steps") or [s.step])
    if any(a < b for a, b in zip(t_steps, s_steps)):
        return f"checkpoint {target} is behind {source} in guest steps"
    return ""


def replay(store: Store, source: int, target: int | None = None, *, kvm_path: str = "/dev/kvm",
           timeout: float | None = 120.0, lazy: bool = False) -> ReplayResult:
    """Restore ``source``, re-execute to the guest steps recorded in ``target``, compare.

    Sync targets were captured at a yield, so the replay holds at the same
    yield and memory and registers must match exactly. Async targets stop at
    the recorded step with the guest's stop port; their registers are not
    compared (the kick landed mid-loop).
    """
    if target is None:
        target = next_in_branch(store, source)
    info_s, info_t = checked_info(store.get(source)), checked_info(store.get(target))
    t_steps = list(info_t.meta.get("steps") or [info_t.step])
    s_steps = list(info_s.meta.get("steps") or [info_s.step])
    note = ""
    if source not in store.path(target):
        note = f"checkpoint {target} is not a descendant of {source}"
    unreachable = any(t < s for t, s in zip(t_steps, s_steps))
    with load_machine(store, source, kvm_path=kvm_path, lazy=lazy) as m, lazy_errors(m):
        cfg = m.config
        if not unreachable:
            sync = info_t.trigger in ("sync", "base")
            saved_stop = [m.memory.read_u64(m.mailbox_gpa(i) + MB_STOP_AT) for i in range(cfg.vcpus)]
            if sync:
                m.pause_at_step(t_steps)
            else:
                m.set_stop_at(t_steps)
            m.start()
            m.wait_parked(timeout=timeout)
            if not sync:  # put back what the mailbox held, so memory compares fairly
                for i, v in enumerate(saved_stop):
                    m.memory.write_u64(m.mailbox_gpa(i) + MB_STOP_AT, v)
        else:
            note = (note + "; " if note else "") + "target is behind the source in guest steps: not reachable"
        steps = m.steps()
        if m.lazy is not None:  # every page in place (or the damaged one named) before comparing
            m.lazy.wait()
        expected = np.empty((store.page_count, PAGE), np.uint8)
        store.materialize(target, expected)
        live = m.memory.pages
        differ = np.flatnonzero((live != expected).any(axis=1)).tolist()
        regs = {}
        compared = info_t.trigger in ("sync", "base") and m.paused
        if compared:
            got = [st.registers() for st in m.capture_vcpus()]
            want = [VcpuState.from_bytes(store.state(target, vcpu_state_name(i))).registers()
                    for i in range(cfg.vcpus)]
            for i, (g, w) in enumerate(zip(got, want)):
                for name in g:
                    if g[name] != w[name]:
                        regs[f"vcpu{i}.{name}"] = (g[name], w[name])
    match = not differ and not regs and steps == t_steps and not unreachable
    return ReplayResult(source, target, match, steps, t_steps, differ, regs, note, compared)
