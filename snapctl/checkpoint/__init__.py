"""snapctl.checkpoint: what to save and when -- the Python API the CLI, the examples and
code outside snapctl use (snapctl itself imports from the modules below).

One checkpoint:  pause every vCPU (a kick for async, a hold at the guest's
yield for sync) -> collect the dirty set (ring/bitmap harvest + pages
harvested at ring-full exits + the VMM's own writes) and reset, which
re-protects those pages -> gather their contents with one numpy fancy-index
copy -> capture vCPU state -> resume -> write the checkpoint in one store
transaction (hash, dedup, compress) while the guest runs on.

==================  =========================================================
``schedule``        :class:`Schedule`, :class:`ScheduleError`
``captures``        the pause: :func:`capture`, :class:`Capture`, :func:`commit`
``writer``          the background writer thread
``session``         :class:`Checkpointer`, :class:`RunSummary`, :func:`run`
``restoring``       :func:`load_machine`, :func:`restore`
``replaying``       :func:`replay`, :class:`ReplayResult`
``program``         the same for a user's program as the guest
==================  =========================================================
"""

from .captures import Capture, capture, commit
from .demo import DemoResult, demo
from .export import export_raw
from .program import (ProgramReplay, ProgramRun, ProgramSchedule, program_output, replay_program, restore_program,
                      run_program)
from .replaying import ReplayResult, replay
from .restoring import load_machine, restore
from .schedule import Schedule, ScheduleError
from .session import Checkpointer, RunSummary, run

__all__ = ["Capture", "Checkpointer", "DemoResult", "ReplayResult", "RunSummary", "Schedule", "ScheduleError",
           "capture", "commit", "demo", "export_raw", "load_machine", "program_output", "ProgramReplay", "ProgramRun",
           "ProgramSchedule", "replay", "replay_program", "restore", "restore_program", "run", "run_program"]
