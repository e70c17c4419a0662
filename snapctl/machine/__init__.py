"""snapctl.machine: the VMM (guest memory, vCPU threads, pause/resume, state)."""

from .dirty import BitmapTracker, DirtyTracker, RingTracker
from .guests import GUESTS, get_guest
from .memory import GuestMemory, parse_size
from .state import VcpuState
from .vmm import Machine, MachineConfig, MachineError

__all__ = ["BitmapTracker", "DirtyTracker", "GUESTS", "GuestMemory", "Machine", "MachineConfig",
           "MachineError", "RingTracker", "VcpuState", "get_guest", "parse_size"]
