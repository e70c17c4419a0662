"""Helpers for the end-to-end tests of program guests (`snapctl run --program`).

* :func:`compile_c` builds a C program with ``gcc -static -g -O0`` (or
  ``-static-pie``) into a directory; the ``cc`` fixture caches builds per session.
* The ``busybox`` fixture finds Debian's busybox-static; it never skips: a
  missing busybox is a broken test environment (``.ci/run`` installs it).
* :func:`run_program` is the one way these tests start ``snapctl run --program``:
  it goes through ``cli_helpers.snapctl`` and puts ``--store`` *before* ``--``,
  so it never lands among the program's own arguments.
* :func:`native` runs the same binary on the host: the independent source each
  guest run is compared with.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import Result, ok, snapctl

GCC = "gcc"
BUSYBOX_PATHS = ("/usr/bin/busybox", "/bin/busybox")
#: generous: a loaded 2-core CI machine
TIMEOUT = 300


# -- building programs -----------------------------------------------------------------------

def compile_c(out_dir: Path, name: str, source: str, *, pie: bool = False, static: bool = True,
              extra: tuple[str, ...] = ()) -> Path:
    """``gcc -static -g -O0`` (``-static-pie`` with ``pie``; dynamically linked without
    ``static``) ``source`` into ``out_dir/name``."""
    if shutil.which(GCC) is None:
        pytest.fail("gcc is not installed: these tests build their guest programs with gcc -static")
    src = out_dir / f"{name}.c"
    exe = out_dir / name
    src.write_text(source)
    link = ["-static-pie", "-fPIE"] if pie else ["-static"] if static else []
    cmd = [GCC, *link, "-g", "-O0", *extra, "-o", str(exe), str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stderr}"
    return exe


@pytest.fixture(scope="session")
def cc(tmp_path_factory):
    """``cc(name, source, pie=False)`` -> path of the built program (cached per session)."""
    base = tmp_path_factory.mktemp("progs")
    built: dict[tuple, Path] = {}

    def build(name: str, source: str, *, pie: bool = False, extra: tuple[str, ...] = ()) -> Path:
        key = (name, hashlib.sha256(source.encode()).hexdigest(), pie, extra)
        if key not in built:
            d = base / f"{name}-{key[1][:12]}{'-pie' if pie else ''}"
            d.mkdir(exist_ok=True)
            built[key] = compile_c(d, name, source, pie=pie, extra=extra)
        return built[key]

    return build


def find_busybox() -> str:
    for p in BUSYBOX_PATHS:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    pytest.fail(f"busybox is not installed (looked for {', '.join(BUSYBOX_PATHS)}): "
                "`.ci/run` installs Debian's busybox-static (apt-get install busybox-static); "
                "the program-guest tests need it and do not skip without it")


@pytest.fixture(scope="session")
def busybox() -> str:
    path = find_busybox()
    with open(path, "rb") as f:
        head = f.read(64)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    # a statically linked busybox has no PT_INTERP; `file`-free check: readelf may be absent
    data = Path(path).read_bytes()
    assert b"/lib64/ld-linux-x86-64.so.2" not in data[:4096], (
        f"{path} is dynamically linked: install Debian's busybox-static (`.ci/run` does)")
    return path


# -- running ---------------------------------------------------------------------------------

@dataclass
class Native:
    code: int
    out: bytes
    err: bytes


def native(argv: list, *, cwd: Path | None = None, stdin: Path | None = None, env: dict | None = None,
           timeout: float = TIMEOUT) -> Native:
    """Run a program on the host, with exactly ``env`` as its environment (the guest gets only --env)."""
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        p = subprocess.run([str(a) for a in argv], stdin=f, capture_output=True, cwd=cwd, env=env or {},
                           timeout=timeout)
    return Native(p.returncode, p.stdout, p.stderr)


def run_program(program, *args, store: Path, root=None, env: dict | list | None = None, stdin: Path | None = None,
                mem: str | None = None, opts: tuple = (), timeout: float = TIMEOUT) -> Result:
    """``snapctl run --program PROGRAM [--root] [--env]... [--stdin] [--mem] OPTS --store STORE -- ARGS``."""
    argv: list = ["run", "--program", program]
    if mem is not None:
        argv += ["--mem", mem]
    if root is not None:
        argv += ["--root", root]
    items = env.items() if isinstance(env, dict) else [tuple(e.split("=", 1)) for e in env or []]
    for k, v in items:
        argv += ["--env", f"{k}={v}"]
    if stdin is not None:
        argv += ["--stdin", stdin]
    argv += [*opts, "--store", store]
    if args:
        argv += ["--", *args]
    return snapctl(*argv, timeout=timeout)


def checkpoints(store: Path, *, cli: bool = False) -> list[dict]:
    """Every checkpoint as ``list --json`` gives it (id, parent, step, trigger), in id order.
    Read in-process through the store API unless ``cli``: the tests look the tree up often,
    and each CLI start-up costs half a second of CPU (``list --json`` itself is checked
    against this in test_every_syscalls_checkpoints_at_multiples_and_exit)."""
    if cli:
        return ok("list", "--json", store=store).json()
    from storage import Store
    st = Store.open(str(store), readonly=True)
    try:
        return [{"id": c.id, "parent": c.parent, "step": c.step, "trigger": c.trigger}
                for c in sorted(st.checkpoints(), key=lambda c: c.id)]
    finally:
        st.close()


def show(store: Path, ckpt) -> dict:
    return ok("show", ckpt, "--json", store=store).json()


def output(store: Path, ckpt, *, stderr: bool = False) -> bytes:
    args = ["output", ckpt] + (["--stderr"] if stderr else [])
    return ok(*args, store=store).raw


def stored_output(store: Path, ckpt: int, *, stderr: bool = False) -> bytes:
    """What ``output ID`` prints, read in-process through the store API (no CLI start-up):
    for models that need it at many checkpoints. ``output`` itself is tested through the CLI."""
    from snapctl.checkpoint.program import program_output
    from storage import Store
    st = Store.open(str(store), readonly=True)
    try:
        return program_output(st, ckpt, stderr=stderr)
    finally:
        st.close()


def snapctl_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("snapctl:")]


def program_stderr(err: str) -> str:
    """The program's part of a `run`/`restore` stderr: everything before snapctl's own summary lines."""
    lines = err.splitlines(keepends=True)
    while lines and lines[-1].startswith("snapctl:"):
        lines.pop()
    return "".join(lines)


def seeded(name: str) -> random.Random:
    """A random source whose seed is printed (pytest shows it on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{name}: random seed {seed}")
    return random.Random(seed)


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> kind:sha256/target of everything under ``path`` (symlinks not followed)."""
    res = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            rel = str(p.relative_to(path))
            st = p.lstat()
            if p.is_symlink():
                res[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                res[rel] = f"dir:{st.st_mode:o}"
            else:
                res[rel] = f"file:{st.st_mode:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    return res


def tamper_state(store: Path, ckpt: int, name: str, data: bytes) -> None:
    """Replace one stored state and recompute its hash column with the store's own content hash,
    so the store stays valid (``verify`` passes) while its content changed."""
    from storage.codec import content_hash
    conn = sqlite3.connect(store)
    try:
        cur = conn.execute("UPDATE states SET data = ?, hash = ? WHERE ckpt = ? AND name = ?",
                           (data, content_hash(data), ckpt, name))
        assert cur.rowcount == 1, f"checkpoint {ckpt} has no state {name!r}"
        conn.commit()
    finally:
        conn.close()


def read_state(store: Path, ckpt: int, name: str) -> bytes:
    conn = sqlite3.connect(store)
    try:
        row = conn.execute("SELECT data FROM states WHERE ckpt = ? AND name = ?", (ckpt, name)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"checkpoint {ckpt} has no state {name!r}"
    return bytes(row[0])
