"""Shared fixtures and the KVM accounting `.ci/run` relies on.

Every test that needs /dev/kvm is marked ``kvm`` (directly or through the
``kvm_available`` fixture). It may skip only when /dev/kvm does not exist; at
the end of the session we print how many KVM tests ran and skipped, and write
the same counts as JSON to $SNAPCTL_KVM_REPORT so `.ci/run` can fail when KVM
is present but its tests skipped.
"""

from __future__ import annotations

import json
import os

import pytest

from kvm_helpers import KVM_PATH

_counts = {"kvm_present": os.path.exists(KVM_PATH), "ran": 0, "passed": 0, "failed": 0, "skipped": 0}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kvm" in item.keywords and not os.path.exists(KVM_PATH):
            item.add_marker(pytest.mark.skip(reason=f"{KVM_PATH} is absent on this machine"))


def pytest_runtest_logreport(report):
    if "kvm" not in report.keywords:
        return
    if report.when == "call":
        _counts["ran"] += 1
        _counts["passed" if report.passed else "failed"] += 1
    elif report.skipped and report.when == "setup":
        _counts["skipped"] += 1
    elif report.failed and report.when == "setup":
        _counts["failed"] += 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"KVM tests: {_counts['ran']} ran ({_counts['passed']} passed, {_counts['failed']} failed), "
        f"{_counts['skipped']} skipped; /dev/kvm {'present' if _counts['kvm_present'] else 'absent'}"
    )
    out = os.environ.get("SNAPCTL_KVM_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(_counts, f)
