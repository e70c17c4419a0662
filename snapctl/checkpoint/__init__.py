"""snapctl.checkpoint: what to save and when. The Python API the CLI and examples use."""

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
