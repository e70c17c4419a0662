"""Helpers for tests that run real VMs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from guest_models import DATA_GPA, PAGE, data_split
from snapctl.kvm.constants import DEFAULT_KVM_PATH as KVM_PATH

kvm = pytest.mark.kvm


def require_kvm() -> None:
    """Skip (a fixture that builds stores with the real CLI) when this machine has no KVM device:
    the only reason a KVM test may skip (tests/conftest.py)."""
    if not os.path.exists(KVM_PATH):
        pytest.skip(f"{KVM_PATH} is absent")


def data_view(machine, vcpu: int = 0) -> np.ndarray:
    """A copy of vCPU ``vcpu``'s data pages, (P, 4096), located from the documented split."""
    cfg = machine.config
    first, pages = data_split(cfg.mem_size, cfg.vcpus)[vcpu]
    start = DATA_GPA // PAGE + first
    return machine.memory.pages[start:start + pages].copy()


def first_diff(a: np.ndarray, b: np.ndarray) -> str:
    rows = np.flatnonzero((a != b).any(axis=1))
    if not rows.size:
        return "equal"
    p = int(rows[0])
    return f"{rows.size} pages differ; first: page {p}: got {a[p, :16].tobytes().hex()} want {b[p, :16].tobytes().hex()}"
