"""Run the real `snapctl` CLI in a subprocess and compare exports to models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guest_models import DATA_GPA, PAGE, data_split, stamp_image, vcpu_seed


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes

    def json(self):
        return json.loads(self.out)


def _argv_env(args, store: Path | None, env: dict | None) -> tuple[list[str], dict]:
    argv = [sys.executable, "-m", "snapctl", *map(str, args)]
    if store is not None:
        argv += ["--store", str(store)]
    e = dict(os.environ, COLUMNS="200")
    e.pop("SNAPCTL_STORE", None)
    e.update(env or {})
    return argv, e


def snapctl(*args: str, store: Path | None = None, env: dict | None = None, timeout: float = 300,
            tty: bool = False, stdin: bytes | None = None) -> Result:
    """Run `python -m snapctl ARGS [--store STORE]` and collect what it printed.
    ``tty``: stdin, stdout and stderr are one pseudo-terminal (``out`` gets both, and the
    echo of ``stdin``, typed into it; ``err`` is empty)."""
    argv, e = _argv_env(args, store, env)
    if not tty:
        p = subprocess.run(argv, capture_output=True, timeout=timeout, env=e, input=stdin)
        return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), p.stdout)
    import pty
    import select
    import time

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=e, close_fds=True)
    os.close(slave)
    if stdin is not None:
        os.write(master, stdin)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    raw = b"".join(chunks)
    return Result(code, raw.decode(errors="replace"), "", raw)


def spawn(*args: str, store: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m snapctl ARGS` and return it running (to signal it); pipes for stdout/stderr."""
    argv, e = _argv_env(args, store, env)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)


def ok(*args, **kw) -> Result:
    r = snapctl(*args, **kw)
    assert r.code == 0, f"snapctl {' '.join(map(str, args))} exited {r.code}: {r.err}"
    return r


def export_image(store: Path, ckpt: int, tmp: Path) -> np.ndarray:
    out = tmp / f"export-{ckpt}-{os.getpid()}.raw"
    if out.exists():
        out.unlink()
    ok("export", ckpt, out, store=store)
    img = np.fromfile(out, dtype=np.uint8)
    out.unlink()
    return img


def stamp_data(img: np.ndarray, mem: int, vcpus: int, i: int) -> np.ndarray:
    first, pages = data_split(mem, vcpus)[i]
    start = DATA_GPA + first * PAGE
    return img[start:start + pages * PAGE].reshape(pages, PAGE)


def stamp_model(mem: int, vcpus: int, i: int, seed: int, step: int) -> np.ndarray:
    _, pages = data_split(mem, vcpus)[i]
    return stamp_image(vcpu_seed(seed, i), pages, step)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for suffix in ("", "-wal"):
        p = Path(str(path) + suffix)
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()
