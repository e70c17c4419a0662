"""What a checkpoint takes while the guest is paused, and how it becomes one.

:func:`capture` is the pause: harvest + reset the dirty set, one gather of
those pages into a reused staging buffer, vCPU state, resume. A
:class:`Capture` holds the result; :func:`commit` writes it as one store
transaction; :func:`merge` folds a capture whose write failed into the next.
"""

from __future__ import annotations

import json
import queue
import select
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from storage import Store

from ..kvm.constants import PAGE_SIZE
from ..machine import Machine, VcpuState

MACHINE_STATE = "machine"
#: Guest states under this prefix hold what happened *during* an interval (a program's
#: output, its log of outside-world results): merging two captures appends them.
STREAM_PREFIX = "stream/"


#: Staging buffers start at up to this many pages (32 MiB) and grow with the largest capture.
STAGING_HINT_PAGES = 8192


def vcpu_state_name(i: int) -> str:
    return f"vcpu/{i}"


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
    #: once committed with ``commit(..., transfer=True)``: what the checkpoint added to the
    #: store, as a ``storage.transfer.Transfer`` (replication ships it)
    transfer: object = None

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

    def named_states(self) -> dict[str, bytes]:
        """The named states a checkpoint of this capture holds: each vCPU's, the
        machine's (guest steps), then the capture's own (``states``)."""
        out = {vcpu_state_name(i): st.to_bytes() for i, st in enumerate(self.vcpus)}
        out[MACHINE_STATE] = json.dumps({"steps": self.steps}).encode()
        out.update(self.states)
        return out

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
        self.array = np.empty((0, PAGE_SIZE), np.uint8)

    def reserve(self, n: int) -> None:
        """Grow to at least ``n`` pages, touching them now (call outside the pause)."""
        if n > self.array.shape[0]:
            arr = np.empty((max(n, 256), PAGE_SIZE), np.uint8)
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

    def __init__(self, count: int, hint_pages: int = STAGING_HINT_PAGES):
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


class PauseWindow:
    """Open while the guest runs, closed while :func:`capture` runs (the pause).

    Work that runs beside the guest in this process (the store writer,
    replication's sender, acknowledgement and heartbeat threads) waits for it to
    open before each step instead of competing with the pause for the GIL and a
    CPU. Measured on the 2-core host: a replication sender running into a pause
    lengthened it by about 0.4 ms (median pause 0.63 ms without an overlap, 1.07
    ms with one).

    A step already running when a capture begins carries on; the window only
    keeps the next one from starting. A thread that blocks on a file descriptor
    (a socket it reads) would still wake in a pause when data arrives, and take
    the GIL to find the window closed; it waits with :meth:`readable` instead,
    which does not wake it until the window is open.

    The window is closed exactly while :func:`capture` runs (with
    ``already_paused`` the guest stopped a little earlier; with ``resume=False``
    it stays stopped after the window opens)."""

    #: the longest a waiter waits for one pause (a pause is ~1 ms; never a deadlock)
    LONGEST = 1.0

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()       # the watch list and every arm() change
        self._watches: list[Readable] = []

    @contextmanager
    def closed(self):
        """Closed for the body (a capture), open again however it ends."""
        try:
            with self._lock:
                self._open.clear()
                for w in self._watches:
                    w.arm(False)
            yield
        finally:
            with self._lock:
                self._open.set()
                for w in self._watches:
                    w.arm(True)

    def is_open(self) -> bool:
        return self._open.is_set()

    def wait(self) -> None:
        """Return once no capture is running (at most :attr:`LONGEST` s)."""
        if not self._open.is_set():
            self._open.wait(self.LONGEST)

    def readable(self, fd: int) -> "Readable":
        """A wait for ``fd`` to be readable that a pause does not wake (close it when done)."""
        w = Readable(fd)
        with self._lock:      # armed as the window is now, and re-armed by every change after
            self._watches.append(w)
            w.arm(self._open.is_set())
        return w

    def forget(self, w: "Readable") -> None:
        """Close ``w`` (a :meth:`readable` of this window)."""
        with self._lock:
            if w in self._watches:
                self._watches.remove(w)
            w.close()


class Readable:
    """:meth:`PauseWindow.readable`: an epoll set holding ``fd`` only while the window
    is open, so data that arrives in a pause wakes the waiter once the capture is over
    (a hang-up or an error still wakes it at once: epoll always reports those)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._ep = select.epoll(1)
        try:
            self._ep.register(fd, 0)
        except BaseException:
            self._ep.close()
            raise

    def arm(self, on: bool) -> None:
        try:
            self._ep.modify(self._fd, select.EPOLLIN if on else 0)
        except (OSError, ValueError):   # the descriptor is closed: nothing left to wake
            pass

    def wait(self, timeout: float | None) -> bool:
        """True once ``fd`` is readable (or at error/hang-up: the read will say) with the
        window open; False after ``timeout`` seconds."""
        return bool(self._ep.poll(-1 if timeout is None else timeout, 1))

    def close(self) -> None:
        self._ep.close()


def _nothing() -> None:
    pass


def capture(machine: Machine, trigger: str, *, already_paused: bool = False,
            buffer: StagingBuffer | None = None, resume: bool = True,
            window: PauseWindow | None = None) -> Capture:
    """The part of a checkpoint that needs the guest stopped. Resumes it at the end
    (unless ``resume`` is False: the last checkpoint of a run). ``window`` is
    closed while this runs.

    Only this happens in the pause: harvest + reset, one gather of the dirty
    pages into a staging buffer (pages pre-copied at ring-full exits and not
    written since are not copied again), vCPU state. Hashing, compression and
    the store write happen after resume."""
    with window.closed() if window is not None else nullcontext():
        return _capture(machine, trigger, already_paused, buffer, resume)


def _capture(machine: Machine, trigger: str, already_paused: bool, buffer: "StagingBuffer | None",
             resume: bool) -> Capture:
    t0 = time.perf_counter()
    if not already_paused:
        machine.pause()
    t1 = time.perf_counter()
    pages = machine.collect_dirty()  # harvest + reset: contents are read after this
    early = machine.take_early_copies()  # O(1); merged by the writer, not here
    t2 = time.perf_counter()
    dest = buffer.view(pages.size) if buffer is not None else np.empty((pages.size, PAGE_SIZE), np.uint8)
    np.take(machine.memory.pages, pages, axis=0, out=dest)  # the one vectorised gather
    t3 = time.perf_counter()
    vcpus = machine.capture_vcpus()
    steps = machine.steps()
    states = machine.guest_states()
    t4 = time.perf_counter()
    if resume:
        machine.resume()
    t5 = time.perf_counter()
    collect = machine.collect_timings()
    timings = {
        "stop_ms": (t1 - t0) * 1e3, "harvest_ms": collect["harvest_ms"], "reset_ms": collect["reset_ms"],
        "collect_ms": (t2 - t1) * 1e3, "copy_ms": (t3 - t2) * 1e3, "state_ms": (t4 - t3) * 1e3,
        "downtime_ms": (t5 - t0) * 1e3, "precopied_pages": int(sum(p.size for p, _ in early)),
        "copied_in_pause": int(pages.size),
    }
    return Capture(pages, dest, vcpus, steps, trigger, timings, buffer, early, states)


def commit(store: Store, parent: int | None, cap: Capture, extra_stats: dict | None = None, *,
           transfer: bool = False, window: PauseWindow | None = None) -> tuple[int, dict]:
    """Write a capture as one checkpoint (one transaction). Returns (id, stats). With
    ``transfer``, ``cap.transfer`` is then what the checkpoint added (storage.transfer).
    With ``window`` (a writer thread's, while the guest runs on), each step -- the
    transaction's start, each batch of pages, the states, the COMMIT -- waits out a pause
    in progress: pauses measured 0.79 -> 0.70 ms median and 1.45 -> 1.01 ms at the 90th
    percentile with the writer standing aside (random guest, ~160 pages a checkpoint)."""
    aside = window.wait if window is not None else _nothing
    meta = {"step": cap.steps[0], "steps": cap.steps, "trigger": cap.trigger}
    aside()
    with store.checkpoint(parent=parent, meta=meta, transfer=transfer) as w:
        for pages, data in cap.early:  # pre-copied first: the pause's fresh copies win
            aside()
            w.add_pages(pages, data)
        aside()
        w.add_pages(cap.pages, cap.data)
        aside()
        for name, blob in cap.named_states().items():
            w.add_state(name, blob)
        stats = {"dirty_pages": cap.page_count(), **{k: round(v, 3) for k, v in cap.timings.items()}}
        stats.update(extra_stats or {})
        w.set_stats(stats)
        aside()
    cap.transfer = w.transfer
    return w.id, dict(w.stats, **stats, digest=w.digest)
