"""A checkpointing session: the chain of checkpoints one machine writes into one store.

:class:`Checkpointer` takes the base checkpoint and then the scheduled (and
requested) ones, capturing in the pause and writing behind it on the
:class:`~.writer.Writer`; :func:`run` is a new store's whole life: boot,
base, schedule.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from storage import Store
from storage import lock as store_lock

from ..kvm.constants import DEFAULT_KVM_PATH, PAGE_SIZE
from ..machine import Machine, MachineConfig
from . import captures as C
from .captures import STAGING_HINT_PAGES, Capture, PauseWindow, StagingBuffer, StagingPool, capture
from .schedule import Schedule
from .writer import QUEUE_DEPTH, Writer


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
        return {"pages_per_s": round(per_s, 1), "mib_per_s": round(per_s * PAGE_SIZE / 2**20, 2),
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


class Replica(Protocol):
    """What follows a run's checkpoints as they are committed (snapctl.replication's
    Replicator)."""

    def follow(self, window: PauseWindow) -> None:
        """The checkpointer's pause window: closed while the guest is paused."""

    def after_commit(self, ckpt: int, cap: Capture, stats: dict) -> None:
        """Called on the writer thread once ``ckpt`` is committed, before ``cap`` is
        released: ``cap.transfer`` is what the checkpoint added to the store
        (storage.transfer)."""


class Checkpointer:
    """Takes checkpoints of one machine into one store, as a chain from ``parent``.

    With ``background=True`` (the default) the guest resumes before a checkpoint
    is written; the writer's queue holds at most ``depth`` checkpoints."""

    def __init__(self, machine: Machine, store: Store, parent: int | None,
                 on_checkpoint: Callable[[int, dict], None] | None = None, *, background: bool = True,
                 depth: int = QUEUE_DEPTH, precopy: bool = False, replica: Replica | None = None):
        self.machine = machine
        #: closed while a capture has the guest paused (work beside the guest waits it out)
        self.pause_window = PauseWindow()
        #: called with (id, capture, stats) once a checkpoint is committed, before its
        #: capture is released (replication sends it from here)
        self.after_commit = replica.after_commit if replica is not None else None
        if replica is not None:
            replica.follow(self.pause_window)
        self.store = store
        self.parent = parent
        self.on_checkpoint = on_checkpoint
        self.summary = RunSummary(store=store.filename)
        self.background = background
        self.depth = depth
        machine.set_precopy(precopy)
        # one buffer per queued capture, one being written, one being filled
        self._pool = StagingPool(depth + 2, hint_pages=min(machine.memory.npages, STAGING_HINT_PAGES))
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
        return Writer(self.store, self.parent, depth=self.depth, on_commit=self._account,
                      transfer=self.after_commit is not None, window=self.pause_window)

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
        s.raw_bytes += n * PAGE_SIZE
        s.stored_bytes += int(stats.get("stored_bytes", 0))
        s.pauses_ms.append(cap.timings.get("downtime_ms", 0.0))
        if self.after_commit is not None:
            self.after_commit(ckpt, cap, stats)
        if self.on_checkpoint:
            self.on_checkpoint(ckpt, stats)

    def record(self, cap: Capture) -> int:
        """Write a capture now, as the next checkpoint of this chain, and account for it."""
        ckpt, stats = (C.commit(self.store, self.parent, cap, transfer=True) if self.after_commit is not None
                       else C.commit(self.store, self.parent, cap))
        self._account(ckpt, cap, stats)
        cap.release()
        return ckpt

    def base(self) -> int:
        """Checkpoint 0 of a fresh machine: every page (zero pages cost a marker)."""
        m = self.machine
        m.collect_dirty()  # start tracking from here; the base holds everything
        m.take_early_copies()
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
        writer = Writer(self.store, self.parent, depth=self.depth, on_commit=self._account,
                        transfer=self.after_commit is not None, window=self.pause_window) if self.background else None

        def take(trigger: str, already_paused: bool) -> None:
            buf = self._pool.acquire()  # before the pause: waiting here costs no downtime
            cap = capture(m, trigger, already_paused=already_paused, buffer=buf, window=self.pause_window)
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


# -- a new store's run ----------------------------------------------------------------------------

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
        kvm_path: str = DEFAULT_KVM_PATH, precopy: bool = False, on_checkpointer=None,
        replica: Replica | None = None) -> RunSummary:
    """Boot ``config``'s guest, write the base checkpoint and the scheduled ones into a new store."""
    schedule.validate()
    with Machine(config, kvm_path=kvm_path) as m:  # validates everything before a file is created
        prepare_new_store(store_path)
        store = Store.create(store_path, config.to_dict())
        with store:
            cp = Checkpointer(m, store, None, on_checkpoint, precopy=precopy, replica=replica)
            if on_checkpointer is not None:  # e.g. to call cp.request() on SIGUSR1
                on_checkpointer(cp)
            cp.base()
            return cp.run(schedule)
