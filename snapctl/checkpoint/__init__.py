"""snapctl.checkpoint: what to save and when. The Python API the CLI and examples use."""

from .demo import DemoResult, demo
from .engine import (Capture, Checkpointer, ReplayResult, RunSummary, Schedule, capture, commit, load_machine,
                     replay, restore, run)
from .export import export_raw

__all__ = ["Capture", "Checkpointer", "DemoResult", "ReplayResult", "RunSummary", "Schedule", "capture", "commit",
           "demo", "export_raw", "load_machine", "replay", "restore", "run"]
