"""The interface between the VMM and a guest it does not build itself.

:class:`~snapctl.machine.vmm.Machine` runs its built-in guests on its own. A
layer above it (``snapctl.program``: a user's Linux program) plugs in through
a :class:`GuestDriver`: the machine keeps the vCPU threads, pause/resume,
dirty tracking and state capture; the driver sets up guest memory, services
the guest's port exits and says where the guest is ("steps") so that
checkpoints can hold at exact points.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..kvm.structs import KvmRunIo
    from .vmm import Machine


class IoVerdict(enum.Enum):
    """What the vCPU thread does after the driver handled a port exit."""

    CONTINUE = 0   #: re-enter the guest
    YIELD = 1      #: a point where a checkpoint may hold (``pause_at_step`` targets are checked)
    EXIT = 2       #: the guest is finished: its vCPU thread ends, the machine stays inspectable


class GuestDriver(Protocol):
    """A guest the machine runs but does not understand."""

    name: str

    def boot(self, machine: "Machine") -> None:
        """Write the guest into fresh memory and set up its vCPUs (a new run)."""

    def attach(self, machine: "Machine") -> None:
        """Called once the machine exists (new run and restore alike), before any vCPU runs."""

    def on_io(self, vcpu: int, io: "KvmRunIo") -> IoVerdict:
        """Service a port exit on vCPU ``vcpu``'s thread."""

    def step(self, vcpu: int) -> int:
        """The guest's progress counter (monotonic; checkpoints hold at yields where it reached a target)."""

    def save(self) -> dict[str, bytes]:
        """Named state the driver keeps outside guest memory, for a checkpoint (machine paused)."""

    def close(self) -> None:
        """Release what the driver holds (the machine is closing; its vCPU threads have ended)."""
