"""Restoring a checkpoint: a fresh machine holding it exactly, and continuing it.

:func:`load_machine` builds the VM as `run` did, fills guest RAM (eagerly, or
lazily through userfaultfd: snapctl/checkpoint/lazy.py) and restores every
vCPU; :func:`restore` continues it as a new branch of the tree.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from storage import Store

from ..kvm.constants import DEFAULT_KVM_PATH
from ..machine import Machine, MachineConfig, VcpuState
from ..stored import checked_info
from .captures import vcpu_state_name
from .schedule import Schedule
from .session import Checkpointer, RunSummary


def load_machine(store: Store, ckpt: int, *, kvm_path: str = DEFAULT_KVM_PATH, driver=None,
                 lazy: bool = False) -> Machine:
    """A fresh, not yet started machine holding checkpoint ``ckpt`` exactly (a program
    guest's ``driver`` then rebuilds its own state from the restored memory).
    ``lazy``: guest RAM is served on first touch and filled in the background
    (snapctl/checkpoint/lazy.py); ``storage.lazy.LazyUnavailable`` without userfaultfd."""
    config = MachineConfig.from_dict(store.config)
    info = checked_info(store.get(ckpt))
    steps = info.meta.get("steps", [info.step])
    if len(steps) != config.vcpus:
        raise ValueError(f"checkpoint {ckpt}: {len(steps)} recorded step counts for {config.vcpus} vCPUs")
    names = store.state_names(ckpt)
    states = [VcpuState.from_bytes(store.state(ckpt, vcpu_state_name(i))) for i in range(config.vcpus)
              if vcpu_state_name(i) in names]
    if len(states) != config.vcpus:
        raise ValueError(f"checkpoint {ckpt} has no state for every vCPU; it cannot be restored")
    # the VM is built (its memory slots registered on a thread of their own) while a lazy
    # restore reads the checkpoint's page index on another: both grow with memory, and
    # the time to the first instruction is what a lazy restore is for (leaving the block
    # waits for the read, whatever failed)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-read") as pool:
        index = pool.submit(store.page_index, ckpt) if lazy else None
        m = Machine(config, kvm_path=kvm_path, boot=False, driver=driver, register_in_background=True)
        try:
            if lazy:
                from .lazy import serve_lazily
                serve_lazily(store, ckpt, m, index=index.result())
            else:
                from storage.lazy import fill
                # straight into guest RAM: through userfaultfd where it is available (each page
                # allocated already filled: no first-touch fault), else decoded into the fresh,
                # all-zero mapping (zero pages are not touched)
                if not fill(store, ckpt, m.memory.host_addr, m.memory.npages):
                    store.materialize(ckpt, m.memory.pages, out_is_zero=True)
            m.check_mailboxes(steps)
            m.restore_state(None, states)
        except BaseException:
            m.close()
            raise
    return m


def restore(store: Store, ckpt: int, schedule: Schedule, *, on_checkpoint=None,
            kvm_path: str = DEFAULT_KVM_PATH, precopy: bool = False, lazy: bool = False,
            on_checkpointer=None, replica=None) -> RunSummary:
    """Continue checkpoint ``ckpt`` in a fresh VM; new checkpoints branch from it.
    ``lazy``: the guest starts before its memory is restored (see :func:`load_machine`)."""
    schedule.validate()
    store.claim()  # another process writing the store: say so before the guest runs
    with load_machine(store, ckpt, kvm_path=kvm_path, lazy=lazy) as m, lazy_errors(m):
        cp = Checkpointer(m, store, ckpt, on_checkpoint, precopy=precopy, replica=replica)
        if on_checkpointer is not None:
            on_checkpointer(cp)
        summary = cp.run(schedule)
        if m.lazy is not None:
            summary.lazy = m.lazy.stats()
        return summary


@contextmanager
def lazy_errors(m: Machine):
    """A lazy restore's damaged page is the cause of whatever then stopped the machine
    (a vCPU's EFAULT on it, a pause that finds the machine failed): raise that instead."""
    try:
        yield
    except Exception as e:
        cause = m.lazy.error() if m.lazy is not None else None
        if cause is not None:
            raise cause from e
        raise
