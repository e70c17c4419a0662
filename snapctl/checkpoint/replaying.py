"""Replay: restore a checkpoint, re-execute to a later one, compare memory and registers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage import Store

from ..kvm.constants import DEFAULT_KVM_PATH, PAGE_SIZE
from ..machine import VcpuState
from ..stored import checked_info
from .captures import vcpu_state_name
from .restoring import lazy_errors, load_machine


@dataclass
class ReplayResult:
    source: int
    target: int
    match: bool
    steps: list[int]
    target_steps: list[int]
    differing_pages: list[int]
    differing_registers: dict[str, tuple[int, int]]  # "vcpu0.rip": (replayed, recorded)
    note: str = ""
    registers_compared: bool = False  # sync targets only: an async kick lands mid-loop

    def as_dict(self) -> dict:
        return {"from": self.source, "to": self.target, "match": self.match, "steps": self.steps,
                "target_steps": self.target_steps, "differing_pages": self.differing_pages[:64],
                "differing_page_count": len(self.differing_pages),
                "differing_registers": {k: {"replayed": a, "recorded": b} for k, (a, b) in self.differing_registers.items()},
                "note": self.note, "registers_compared": self.registers_compared}


def next_in_branch(store: Store, ckpt: int) -> int:
    kids = store.children(ckpt)
    if not kids:
        raise ValueError(f"checkpoint {ckpt} has no later checkpoint in its branch; give --to")
    return min(kids)


def _steps(info) -> list[int]:
    """A checkpoint's guest steps per vCPU (``info`` from :func:`checked_info`)."""
    return list(info.meta.get("steps") or [info.step])


def _behind(t_steps: list[int], s_steps: list[int]) -> bool:
    return any(a < b for a, b in zip(t_steps, s_steps))


def unreachable(store: Store, source: int, target: int) -> str:
    """Why re-executing ``source`` cannot reach ``target`` ("" when it can):
    ``target`` must be ``source`` or a descendant, at or after its guest steps.
    A forged record is a ValueError naming it (:func:`checked_info`)."""
    if source not in store.path(target):
        return f"checkpoint {target} is not {source} or a descendant of it (see `snapctl list --tree`)"
    if _behind(_steps(checked_info(store.get(target))), _steps(checked_info(store.get(source)))):
        return f"checkpoint {target} is behind {source} in guest steps"
    return ""


class ReplayUnreachable(ValueError):
    """A replay target that re-execution cannot reach (a usage error)."""


def check_reachable(store: Store, source: int, target: int) -> None:
    """Raise :class:`ReplayUnreachable` unless re-executing ``source`` can reach ``target``."""
    why = unreachable(store, source, target)
    if why:
        raise ReplayUnreachable(f"cannot replay {source} -> {target}: {why}; replay reaches only later checkpoints "
                                f"of {source}'s own branch")


def replay(store: Store, source: int, target: int | None = None, *, kvm_path: str = DEFAULT_KVM_PATH,
           timeout: float | None = 120.0, lazy: bool = False) -> ReplayResult:
    """Restore ``source``, re-execute to the guest steps recorded in ``target``, compare.

    Sync targets were captured at a yield, so the replay holds at the same
    yield and memory and registers must match exactly. Async targets stop at
    the recorded step with the guest's stop port; their registers are not
    compared (the kick landed mid-loop).
    """
    if target is None:
        target = next_in_branch(store, source)
    info_s, info_t = checked_info(store.get(source)), checked_info(store.get(target))
    t_steps = _steps(info_t)
    note = ""
    if source not in store.path(target):
        note = f"checkpoint {target} is not a descendant of {source}"
    behind = _behind(t_steps, _steps(info_s))
    with load_machine(store, source, kvm_path=kvm_path, lazy=lazy) as m, lazy_errors(m):
        cfg = m.config
        if not behind:
            m.run_to_steps(t_steps, at_yield=info_t.trigger in ("sync", "base"), timeout=timeout)
        else:
            note = (note + "; " if note else "") + "target is behind the source in guest steps: not reachable"
        steps = m.steps()
        if m.lazy is not None:  # every page in place (or the damaged one named) before comparing
            m.lazy.wait()
        expected = np.empty((store.page_count, PAGE_SIZE), np.uint8)
        store.materialize(target, expected)
        live = m.memory.pages
        differ = np.flatnonzero((live != expected).any(axis=1)).tolist()
        regs = {}
        compared = info_t.trigger in ("sync", "base") and m.paused
        if compared:
            got = [st.registers() for st in m.capture_vcpus()]
            want = [VcpuState.from_bytes(store.state(target, vcpu_state_name(i))).registers()
                    for i in range(cfg.vcpus)]
            for i, (g, w) in enumerate(zip(got, want)):
                for name in g:
                    if g[name] != w[name]:
                        regs[f"vcpu{i}.{name}"] = (g[name], w[name])
    match = not differ and not regs and steps == t_steps and not behind
    return ReplayResult(source, target, match, steps, t_steps, differ, regs, note, compared)
