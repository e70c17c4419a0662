"""Running the real `snapctl` CLI (the only module in tests/ that does), checking its
errors, and comparing exports to models."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guest_models import DATA_GPA, PAGE, data_split, stamp_image, vcpu_seed


@dataclass
class Result:
    code: int | None   #: None: no exit within the timeout (``snapctl(..., hang_ok=True)``)
    out: str
    err: str
    raw: bytes

    def json(self):
        return json.loads(self.out)


def cli_env(extra: dict | None = None) -> dict:
    """The environment every test runs the CLI in: wide columns, no $SNAPCTL_STORE."""
    e = dict(os.environ, COLUMNS="200")
    e.pop("SNAPCTL_STORE", None)
    e.update(extra or {})
    return e


def cli_argv(args, store: Path | None = None, prefix=(), code: str | None = None) -> list[str]:
    """``[*prefix, python, -m, snapctl, *args, --store STORE]``; with ``code``, ``python -c CODE``
    instead of ``-m snapctl`` (code that patches something, then calls ``snapctl.cli.main(sys.argv[1:])``)."""
    argv = [*prefix, sys.executable, *(["-c", code] if code is not None else ["-m", "snapctl"]), *map(str, args)]
    if store is not None:
        argv += ["--store", str(store)]
    return argv


def _preexec(umask: int | None, memory_limit: int | None, sigint_default: bool = False):
    if umask is None and memory_limit is None and not sigint_default:
        return None

    def pre():
        if sigint_default:   # as a shell starts it: Ctrl-C (SIGINT) not ignored
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if umask is not None:
            os.umask(umask)
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return pre


def snapctl(*args, store: Path | None = None, env: dict | None = None, timeout: float = 300,
            tty: bool = False, stdin: bytes | None = None, umask: int | None = None, cwd=None,
            memory_limit: int | None = None, hang_ok: bool = False, code: str | None = None) -> Result:
    """Run the real CLI, `python -m snapctl ARGS [--store STORE]`, and collect what it printed:
    the one way the tests run a command to its end (:func:`spawn` starts one; :func:`snapctl_many`
    runs many under a memory limit).

    ``umask``, ``cwd``, ``memory_limit`` (bytes of address space) set up the child; ``code``:
    see :func:`cli_argv`;
    ``hang_ok``: a command still running at ``timeout`` is killed and its Result has
    ``code`` None (else the timeout raises). ``tty``: stdin, stdout and stderr are one
    pseudo-terminal (``out`` gets both, and the echo of ``stdin``, typed into it; ``err``
    is empty)."""
    argv, e = cli_argv(args, store, code=code), cli_env(env)
    pre = _preexec(umask, memory_limit)
    if not tty:
        try:
            p = subprocess.run(argv, capture_output=True, timeout=timeout, env=e, input=stdin, cwd=cwd,
                               preexec_fn=pre)
        except subprocess.TimeoutExpired:
            if not hang_ok:
                raise
            return Result(None, "", f"HANG: no exit within {timeout} s", b"")
        return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), p.stdout)
    import pty
    import select
    import time

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=e, close_fds=True, cwd=cwd,
                         preexec_fn=pre)
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


def spawn(*args, store: Path | None = None, env: dict | None = None, umask: int | None = None, cwd=None,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=None, prefix=(),
          sigint_default: bool = False) -> subprocess.Popen:
    """Start the real CLI and return it running (to signal it, or read it as it goes).
    ``prefix``: run it through another command (``ip netns exec NS``)."""
    return subprocess.Popen(cli_argv(args, store, prefix), stdout=stdout, stderr=stderr, stdin=stdin,
                            env=cli_env(env), cwd=cwd, preexec_fn=_preexec(umask, None, sigint_default))


def cli_shim(bindir: Path) -> dict:
    """A ``snapctl`` command in ``bindir`` that runs this tree's CLI (whatever is installed), and
    the environment that finds it first: for shell scripts (examples/*.sh)."""
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "snapctl"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m snapctl \"$@\"\n")
    shim.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    return cli_env({"PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(root)})


def snapctl_many(jobs: list[tuple[list, Path]], *, memory_limit: int, timeout: float) -> list[dict]:
    """Each (args, store) as its own CLI process under ``memory_limit`` and ``timeout``,
    forked from one that imported snapctl (tests/fork_runner.py: a fresh interpreter per
    command would spend most of the time importing numpy). Returns per job
    {"args", "code" (None: a hang), "out" (its tail), "err"}."""
    spec = {"limit": memory_limit, "timeout": timeout,
            "jobs": [[*map(str, args), "--store", str(store)] for args, store in jobs]}
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("fork_runner.py"))],
                       input=json.dumps(spec).encode(), capture_output=True, env=cli_env(),
                       timeout=timeout * (len(jobs) + 1))
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return [dict(r, args=[str(a) for a in args]) for r, (args, _) in zip(json.loads(p.stdout), jobs)]


def one_line_error(r: Result, code: int, *needles: str) -> str:
    """Exit ``code``, stderr exactly one line starting with ``error:`` (no blank line
    before it either), no traceback; each needle in it (any case). Returns the line."""
    assert r.code == code, (r.code, r.out[-500:], r.err[-2000:])
    assert "Traceback" not in r.err, r.err
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1 and r.err == lines[0] + "\n", repr(r.err)
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


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
