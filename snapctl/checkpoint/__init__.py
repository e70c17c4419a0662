"""snapctl.checkpoint: what to save and when. The Python API the CLI and examples use."""

from .demo import DemoResult, demo
from .engine import (Capture, Checkpointer, ReplayResult, RunSummary, Schedule, capture, commit, load_machine,
                     replay, restore, run)
from .export import export_raw
from .program import (ProgramReplay, ProgramRun, ProgramSchedule, program_output, replay_program, restore_program,
                      run_program)

__all__ = ["Capture", "Checkpointer", "DemoResult", "ReplayResult", "RunSummary", "Schedule", "capture", "commit",
           "demo", "export_raw", "load_machine", "program_output", "ProgramReplay", "ProgramRun", "ProgramSchedule",
           "replay", "replay_program", "restore", "restore_program", "run", "run_program"]
