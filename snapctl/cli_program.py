"""The program-guest side of the command line (``run --program``, ``output``, ``core``, and the
program forms of ``restore``/``replay``/``read``/``history``/``show``/``diff``): parse, call, render.

The program's stdout and stderr are the program's: everything snapctl says
about a program run goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from .kvm.constants import PAGE_SIZE


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def spec_from_args(program: str, args: list[str], root: Optional[str], env: list[str], stdin: Optional[str],
                   argv0: Optional[str]):
    from .program import ProgramSpec

    if not os.path.exists(program):
        raise FileNotFoundError(f"--program {program}: no such file")
    if not os.path.isfile(program):
        raise ValueError(f"--program {program}: not a regular file")
    for item in env:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
    root = os.path.abspath(root or ".")
    if not os.path.isdir(root):
        raise ValueError(f"--root {root}: not a directory")
    if stdin is not None and not os.path.isfile(stdin):
        raise ValueError(f"--stdin {stdin}: not a regular file")
    host = os.path.abspath(program)
    rel = os.path.relpath(host, root)
    exe = "/" + rel if not rel.startswith("..") and rel != "." else host
    return ProgramSpec(path=host, exe=exe.replace("//", "/"), argv=[argv0 or program, *args], env=list(env),
                       root=root, stdin=os.path.abspath(stdin) if stdin else None,
                       ids={"pid": 1000, "uid": os.getuid(), "gid": os.getgid()},
                       cpu=min(os.sched_getaffinity(0)))


def render_run(result, as_json: bool, title: str) -> int:
    """Print a program run's summary on stderr; return the exit status snapctl should end with."""
    d = result.as_dict()
    if as_json:
        say(json.dumps(d, indent=2, default=str))
    else:
        if result.report:
            say(f"snapctl: {result.report}")
        cks = d["checkpoints"]
        span = f"{cks[0]}..{cks[-1]}" if cks else "none"
        state = (f"exited with status {d['exit_status']}" if not d["running"]
                 else f"stopped, still running (continue with `snapctl restore {cks[-1] if cks else '?'}`)")
        say(f"snapctl: {title}: {state}; {d['syscalls']} system calls; {d['count']} checkpoints ({span}); "
            f"pause median {d['pause_ms_median']} ms")
        if d["unimplemented_syscalls"]:
            names = ", ".join(f"{k} x{v}" for k, v in sorted(d["unimplemented_syscalls"].items()))
            say(f"snapctl: system calls not available to the program (returned an error): {names}")
    return 0 if d["running"] else int(d["exit_status"] or 0)


def render_replay(res, as_json: bool) -> bool:
    d = res.as_dict()
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return res.match
    verdict = "match" if res.match else "MISMATCH"
    print(f"replay {res.source} -> {res.target} ({res.trigger} target, system call {res.target_syscalls}): {verdict}")
    print(f"  compared: {', '.join(res.compared)}")
    for line in res.differences[:8]:
        print(f"  {line}")
    if res.differing_pages:
        print(f"  {len(res.differing_pages)} pages differ, first: "
              + ", ".join(f"{p * PAGE_SIZE:#x}" for p in res.differing_pages[:8]))
    for k, v in list(res.differing_registers.items())[:8]:
        print(f"  {k}: replayed {v['replayed']:#x}, recorded {v['recorded']:#x}")
    if res.note and res.match:   # on a mismatch the note goes into the one error line
        print(f"note: {res.note}", file=sys.stderr)
    return res.match
