"""snapctl.program: a user's own Linux program as the guest (on top of snapctl.machine).

``loader`` maps it like execve, ``mm`` keeps its address space, ``kernel`` and
``syscalls`` service its system calls (grouped by area), ``fs`` is the one
path resolver of the sandbox, ``guest`` plugs it into the machine, and
``inspect`` reads a checkpoint in the program's own terms (virtual
addresses, symbols, core files).
"""

from .guest import FILE_PREFIX, LOG, STATE, STDERR, STDOUT, ProgramGuest, ProgramSpec
from .kernel import Log, ReplayDivergence
from .loader import LoadError

__all__ = ["FILE_PREFIX", "LOG", "LoadError", "Log", "ProgramGuest", "ProgramSpec", "ReplayDivergence",
           "STATE", "STDERR", "STDOUT"]
