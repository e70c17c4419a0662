"""The background writer: commits captures in order while the guest runs."""

from __future__ import annotations

import queue
import threading
from typing import Callable

from storage import Store

from . import captures as C
from .captures import Capture

#: Captures queued for the writer at most; the next checkpoint waits (before its
#: pause) while the queue is full.
QUEUE_DEPTH = 2
#: Failed writes in a row that stop a run.
MAX_FAILURES = 3


class CheckpointWriteError(Exception):
    """Checkpoints could not be written; those committed before are intact."""


class Writer:
    """Commits captures in order on a background thread, from a bounded queue.

    A failed write loses nothing: its capture is kept and merged into the next
    one (see :func:`merge`), which is then written instead. After
    ``max_failures`` failures in a row, or if the last capture still cannot be
    written at close, the run stops with :class:`CheckpointWriteError`; the
    store keeps every checkpoint committed before (each is one transaction)."""

    def __init__(self, store: Store, parent: int | None, *, depth: int = QUEUE_DEPTH, max_failures: int = MAX_FAILURES,
                 on_commit: Callable[[int, Capture, dict], None] | None = None, transfer: bool = False,
                 window: C.PauseWindow | None = None):
        self.store = store
        self.window = window       # the checkpointer's pauses: each write step waits one out
        self.transfer = transfer   # keep each checkpoint's storage.transfer.Transfer on its capture
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
            cap, self._carry = C.merge(self._carry, cap), None
        try:
            ckpt, stats = C.commit(self.store, self.parent, cap, transfer=self.transfer, window=self.window)
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
