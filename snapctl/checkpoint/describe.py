"""One checkpoint as `snapctl show` presents it: its record, its place in the tree,
each vCPU's registers (decoded from the stored state) and, for a program, the
program's own view."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage import Store

from ..machine import MachineConfig, VcpuState
from ..stored import checked_info
from .captures import vcpu_state_name
from .program import is_program_store, program_info


@dataclass
class CheckpointView:
    info: object                    #: the store's CheckpointInfo, type-checked
    children: list[int]
    vcpus: list[dict[str, int]] = field(default_factory=list)   #: per vCPU with a stored state: name -> value
    program: dict | None = None     #: a program checkpoint's own fields (None for a built-in guest)


def describe(store: Store, ckpt: int) -> CheckpointView:
    info = checked_info(store.get(ckpt))
    names = store.state_names(info.id)
    vcpus = [VcpuState.from_bytes(store.state(info.id, vcpu_state_name(i))).registers()
             for i in range(MachineConfig.from_dict(store.config).vcpus) if vcpu_state_name(i) in names]
    children = store.children(info.id)
    prog = program_info(store, info.id) if is_program_store(store) else None
    return CheckpointView(info, children, vcpus, prog)
