"""Primary and standby as two hosts: network namespaces joined by a veth pair.

``hosts`` (fixture) creates ``snrA<pid>`` (10.213.<n>.1) and ``snrB<pid>``
(10.213.<n>.2) with a veth pair between them and loopback up, and deletes
both namespaces (and with them the veth pair) whatever the test did. Every
process a test starts is started through :func:`spawn` and killed at the end.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_helpers import spawn

_count = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Hosts:
    a: str
    b: str
    a_addr: str
    b_addr: str
    veth_a: str
    procs: list = field(default_factory=list)

    def spawn(self, ns: str, args: list, out: Path, err: Path, *, stdin=None) -> subprocess.Popen:
        p = spawn(*args, prefix=["ip", "netns", "exec", ns], stdout=open(out, "wb"), stderr=open(err, "wb"),
                  stdin=stdin if stdin is not None else subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def cut(self) -> None:
        ip("-n", self.a, "link", "set", self.veth_a, "down")


def wait_for(path: Path, text: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}: {path.read_text(errors='replace') if path.exists() else ''}")


@pytest.fixture
def hosts():
    if shutil.which("ip") is None:
        pytest.fail("iproute2 (`ip`) is not installed: `.ci/run` installs it")
    if os.geteuid() != 0:
        pytest.fail("the replication tests create network namespaces: run them as root (CI does)")
    n = next(_count)
    tag = f"{os.getpid() % 100000}x{n}"
    a, b = f"snrA{tag}", f"snrB{tag}"
    va, vb = f"vra{tag}"[:15], f"vrb{tag}"[:15]
    subnet = 64 + (os.getpid() + n) % 150
    h = Hosts(a, b, f"10.213.{subnet}.1", f"10.213.{subnet}.2", va)
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", a)
        ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, h.a_addr), (b, vb, h.b_addr)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for p in h.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for ns in (a, b):
            ip("netns", "del", ns, check=False)
