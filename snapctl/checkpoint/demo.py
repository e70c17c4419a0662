"""`snapctl demo`: the whole product in one run, on a scratch store."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage import Store

from ..machine import MachineConfig
from ..kvm.constants import DEFAULT_KVM_PATH
from .replaying import ReplayResult, replay
from .restoring import restore
from .schedule import Schedule
from .session import RunSummary, run


@dataclass
class DemoResult:
    store: str
    run: RunSummary
    branch: RunSummary
    replay: ReplayResult
    verify_ok: bool
    verify_problems: list[str] = field(default_factory=list)


def demo(store_path: str, *, on_step=None, on_checkpoint=None, kvm_path: str = DEFAULT_KVM_PATH) -> DemoResult:
    """stamp on 64 MiB with 20 async checkpoints; restore checkpoint 10 and take 5
    sync ones as a branch; replay the first branch checkpoint to the next; verify."""
    say = on_step or (lambda msg: None)
    cfg = MachineConfig(guest="stamp", mem_size=64 << 20, steps_per_yield=1000, ring_entries=4096)
    say("run: stamp on 64 MiB, base + 20 async checkpoints every 25 ms")
    first = run(store_path, cfg, Schedule(count=20, interval_ms=25), on_checkpoint=on_checkpoint, kvm_path=kvm_path)
    with Store.open(store_path) as store:
        say("restore: checkpoint 10, then 5 sync checkpoints every 50000 steps (a branch)")
        branch = restore(store, 10, Schedule(count=5, every_steps=50_000), on_checkpoint=on_checkpoint,
                         kvm_path=kvm_path)
        a, b = branch.checkpoints[0], branch.checkpoints[1]
        say(f"replay: restore {a}, re-execute to {b}'s step, compare memory and registers")
        rep = replay(store, a, b, kvm_path=kvm_path)
        say("verify: every blob, reference, tree link and digest")
        report = store.verify()
    return DemoResult(store_path, first, branch, rep, report.ok, list(report.problems))
