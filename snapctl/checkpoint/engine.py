"""The checkpoint pipeline: run, restore, replay -- the names, from the modules that hold them.

The public facade for code outside snapctl; snapctl itself imports from the modules below.

One checkpoint:  pause every vCPU (a kick for async, a hold at the guest's
yield for sync) -> collect the dirty set (ring/bitmap harvest + pages
harvested at ring-full exits + the VMM's own writes) and reset, which
re-protects those pages -> gather their contents with one numpy fancy-index
copy -> capture vCPU state -> resume -> write the checkpoint in one store
transaction (hash, dedup, compress) while the guest runs on.

==================  =========================================================
``schedule``        :class:`Schedule`, :class:`ScheduleError`
``captures``        the pause: :func:`capture`, :class:`Capture`, :func:`merge`,
                    the staging pool, :func:`commit`
``writer``          the background :class:`Writer`
``session``         :class:`Checkpointer`, :class:`RunSummary`, :func:`run`
``restoring``       :func:`load_machine`, :func:`restore`
``replaying``       :func:`replay`, :class:`ReplayResult`
==================  =========================================================
"""

from __future__ import annotations

from .captures import (MACHINE_STATE, STREAM_PREFIX, Capture, StagingBuffer, StagingPool, capture, commit,
                       merge, vcpu_state_name)
from .replaying import ReplayResult, ReplayUnreachable, check_reachable, next_in_branch, replay, unreachable
from .restoring import lazy_errors, load_machine, restore
from .schedule import Schedule, ScheduleError
from .session import Checkpointer, RunSummary, StoreExistsError, prepare_new_store, run
from .writer import CheckpointWriteError, Writer

__all__ = ["MACHINE_STATE", "STREAM_PREFIX", "Capture", "CheckpointWriteError", "Checkpointer", "ReplayResult",
           "ReplayUnreachable", "RunSummary", "Schedule", "ScheduleError", "StagingBuffer", "StagingPool",
           "StoreExistsError", "Writer", "capture", "check_reachable", "commit", "lazy_errors", "load_machine", "merge",
           "next_in_branch", "prepare_new_store", "replay", "restore", "run", "unreachable", "vcpu_state_name"]
