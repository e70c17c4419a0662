"""A port of the kernel selftest tools/testing/selftests/kvm/dirty_log_test.c.

The `dirtylog` guest stores the current round number N (from its mailbox) at
the start of random pages of a data area much larger than the ring, so ring-full
exits really happen. Each round the VMM stops every vCPU (a kick), collects the
dirty set and checks, for every data page p:

* p not reported dirty in round N  =>  value < N   (no write went unlogged)
* p reported dirty                 =>  value == N, except for the store that
  was in flight when the vCPU stopped. As in the kernel test, that is the
  "last page": here the page of step S+1, where S is the step counter the
  guest had published (taken from the independent model, not from the VMM).
  (a) in round N it may be reported with any value < N: KVM logged the page
      while handling the write fault, then exited for the kick or the full
      ring before the store retired;
  (b) in round N+1 it may hold a value < N+1 (normally N): the store retired
      late, with the round number it had loaded in round N. (When the kick
      interrupts the fault before KVM logs the page, (a) does not happen and
      only (b) shows.)

Then the VMM writes N+1 into each mailbox (a VMM write, which the tracker must
report) and resumes. Every KVM_RESET_DIRTY_RINGS is checked against the number
of entries harvested (DirtyRingResetMismatch otherwise).
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from guest_models import DATA_GPA, PAGE, Model, data_split, vcpu_seed
from kvm_helpers import kvm
from snapctl.machine import Machine, MachineConfig
from snapctl.machine.guests import MB_ROUND
from snapctl.machine.layout import mailbox_gpa

ROUNDS = 60


def _dirty_log_test(tracking: str, vcpus: int, ring_entries: int) -> dict:
    data_pages_per_vcpu = 8192  # 32 MiB per vCPU, far more than a 256-entry ring holds
    cfg = MachineConfig(guest="dirtylog", mem_size=DATA_GPA + vcpus * data_pages_per_vcpu * PAGE, vcpus=vcpus,
                        seed=0x5EED, steps_per_yield=1 << 62, tracking=tracking, ring_entries=ring_entries)
    seed = 1234
    print(f"seed {seed}")
    rng = random.Random(seed)
    split = data_split(cfg.mem_size, vcpus)
    first_data_page = DATA_GPA // PAGE
    owner = np.repeat(np.arange(vcpus), [p for _, p in split])  # data page index -> vCPU
    exceptions = {"unretired": 0, "late": 0}
    with Machine(cfg) as m:
        m.collect_dirty()
        for i in range(vcpus):
            m.memory.write_u64(mailbox_gpa(i) + MB_ROUND, 1)
        models = [Model("dirtylog", vcpu_seed(cfg.seed, i), pages) for i, (_, pages) in enumerate(split)]
        prev_last: dict[int, int] = {}  # vCPU -> data page of the store in flight at the last pause
        m.start()
        for n in range(1, ROUNDS + 1):
            time.sleep(rng.choice([0.0005, 0.002, 0.005, 0.01]))
            m.pause()
            dirty = m.collect_dirty()
            mailboxes = {mailbox_gpa(i) // PAGE for i in range(vcpus)}
            if n > 1:
                assert mailboxes <= set(dirty.tolist()), "the VMM's own mailbox write was not reported"
            data = m.memory.pages[first_data_page:first_data_page + vcpus * data_pages_per_vcpu, :8].copy()
            values = data.view("<u8").ravel()
            reported = np.zeros(values.size, bool)
            rel = dirty[dirty >= first_data_page] - first_data_page
            reported[rel] = True

            unreported_bad = np.flatnonzero(~reported & (values >= n))
            assert unreported_bad.size == 0, (
                f"round {n}: page {int(unreported_bad[0])} holds {int(values[unreported_bad[0]])} "
                f"but was not reported dirty (a lost write)")

            off = np.flatnonzero(reported & (values != n))
            steps = m.steps()
            last = {}
            for cpu, (first, _) in enumerate(split):
                models[cpu].run_to(steps[cpu] + 1)
                last[cpu] = first + models[cpu].written[steps[cpu]]  # page of step S+1: the store in flight
            for p in off.tolist():
                v, cpu = int(values[p]), int(owner[p])
                if v > n:
                    raise AssertionError(f"round {n}: page {p} holds a future round {v}")
                if p == last[cpu]:
                    exceptions["unretired"] += 1  # (a)
                elif p == prev_last.get(cpu):
                    exceptions["late"] += 1  # (b)
                else:
                    raise AssertionError(
                        f"round {n}: page {p} (vCPU {cpu}) was reported dirty but holds {v}, and it is not the "
                        f"store in flight (page {last[cpu]}) nor last round's (page {prev_last.get(cpu)})")
            prev_last = last

            for i in range(vcpus):
                m.memory.write_u64(mailbox_gpa(i) + MB_ROUND, n + 1)
            m.resume()
        m.pause()
        stats = dict(m.stats(), harvested=m.tracker.stats.entries_harvested, **exceptions)
    return stats


@kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_dirty_log_invariant_ring(vcpus):
    from snapctl.kvm import System
    with System() as s, s.create_vm() as vm:
        smallest = vm.dirty_ring_limits().min_entries
    stats = _dirty_log_test("ring", vcpus, smallest)
    assert stats["ring_full_exits"] > 0, stats  # the ring really filled (typically ~10x per round)
    assert stats["harvested"] > 0


@kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_dirty_log_invariant_bitmap(vcpus):
    stats = _dirty_log_test("bitmap", vcpus, 4096)
    assert stats["ring_full_exits"] == 0
