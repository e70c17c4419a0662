"""The `snapctl` command line: parse, call the library, render. No logic here.

Exit codes: 0 success; 1 an error (unknown id, missing or foreign store, no
KVM, a failed check, ...); 2 a usage error (bad flag or value). Every error is
one line on stderr, never a traceback, and nothing is written.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, List, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Checkpoint and restore VMs on /dev/kvm.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEFAULT_STORE = "./snapshots.db"
StoreOpt = typer.Option(None, "--store", envvar="SNAPCTL_STORE", show_envvar=True,
                        help=f"Store file (default: $SNAPCTL_STORE, else {DEFAULT_STORE}).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
ReplicateOpt = typer.Option(None, "--replicate", metavar="HOST:PORT",
                            help="Replicate every checkpoint to a `snapctl standby` there.")
TokenFileOpt = typer.Option(None, "--token-file", metavar="F",
                            help="Replication: the shared secret (HMAC on every frame).")
ReplicateRequiredOpt = typer.Option(False, "--replicate-required",
                                    help="Replication: stop (exit 4) if the standby is lost.")


class Failure(Exception):
    """A user-facing error: printed as one line, exit 1."""


def _store_path(store: Optional[str]) -> str:
    return store or DEFAULT_STORE


def _kvm() -> str:
    """The KVM device ($SNAPCTL_KVM overrides /dev/kvm)."""
    return os.environ.get("SNAPCTL_KVM", "/dev/kvm")


# -- value parsing (usage errors, exit 2) ---------------------------------------------------------

def _number(text: str, what: str, *, allow_zero: bool = True) -> int:
    from .machine.memory import parse_size

    try:
        value = parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=what) from None
    if value < 0 or (value == 0 and not allow_zero):
        raise typer.BadParameter(f"must be {'non-negative' if allow_zero else 'positive'}, got {text}", param_hint=what)
    return value


def _params(items: list[str]) -> dict[str, int]:
    out_: dict[str, int] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
        try:
            out_[key] = int(val, 0)
        except ValueError:
            raise typer.BadParameter(f"{key}: not an integer: {val!r}", param_hint="--param") from None
    return out_


# -- opening stores (errors, exit 1) -----------------------------------------------------------

@contextmanager
def _open(store: Optional[str], *, write: bool = False) -> Iterator["Store"]:  # noqa: F821
    from storage import Store, StoreError

    path = _store_path(store)
    if not os.path.lexists(path):
        raise Failure(f"no store at {path} (run `snapctl run` first, or give --store / $SNAPCTL_STORE)")
    if os.path.isdir(path):
        raise Failure(f"{path} is a directory, not a store")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise Failure(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        # a FIFO would block the open forever; a device (/dev/zero) is never a store
        raise Failure(f"{path} is not a regular file, not a store")
    # Read-write even for reading: a read-only SQLite connection cannot remove the
    # -wal/-shm sidecars at close, so every `list` would leave two files behind.
    # The main file is not changed by reading either way.
    try:
        st = Store.open(path, readonly=False)
    except (PermissionError, StoreError) as e:
        if write or not os.access(path, os.R_OK) or os.access(path, os.W_OK):
            raise
        st = Store.open(path, readonly=True)  # a store we may only read
    try:
        yield st
    finally:
        st.close()


def _resolve(st, ref: str) -> int:
    return st.resolve(ref)


# -- rendering -------------------------------------------------------------------------------

def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _ckpt_dict(c, *, vcpus: Optional[list] = None) -> dict:
    d = {"id": c.id, "parent": c.parent, "step": c.step, "steps": c.meta.get("steps", [c.step]),
         "trigger": c.trigger, "created": c.created, "tags": c.tags, "digest": c.digest, "stats": c.stats}
    if vcpus is not None:
        d["vcpus"] = vcpus
    return d


def _summary_table(title: str, s: dict) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("checkpoints", f"{s['count']} ({s['checkpoints'][0]}..{s['checkpoints'][-1]})" if s["count"] else "0")
    t.add_row("pages harvested", f"{s['pages_harvested']:,}")
    t.add_row("bytes stored / raw", f"{_human(s['stored_bytes'])} / {_human(s['raw_bytes'])}")
    t.add_row("compression ratio", f"{s['compression_ratio']}x" if s["compression_ratio"] else "-")
    t.add_row("pause median / max", f"{s['pause_ms_median']} ms / {s['pause_ms_max']} ms"
              if s["pause_ms_median"] is not None else "-")
    return t


@contextmanager
def _progress(total: int, label: str, quiet: bool):
    """A progress bar over checkpoints on stderr; yields the per-checkpoint callback."""
    if quiet or total <= 0:
        yield None
        return
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda ckpt, stats: prog.advance(task)


# -- commands --------------------------------------------------------------------------------

def _version(value: bool) -> None:
    if value:
        out.print(f"snapctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version.")):
    pass


def _schedule(checkpoints: int, every_steps: Optional[str], interval: Optional[float], steps: Optional[str] = None):
    from .checkpoint import Schedule

    if every_steps is not None and interval is not None:
        raise typer.BadParameter("give either --every-steps or --interval, not both", param_hint="--every-steps")
    if checkpoints < 0:
        raise typer.BadParameter(f"must be >= 0, got {checkpoints}", param_hint="--checkpoints")
    if interval is not None and not (math.isfinite(interval) and 0 < interval <= 86_400_000):
        raise typer.BadParameter(f"must be a number of ms from > 0 to 86400000 (one day), got {interval}",
                                 param_hint="--interval")
    return Schedule(count=checkpoints,
                    every_steps=_number(every_steps, "--every-steps", allow_zero=False) if every_steps else None,
                    interval_ms=interval,
                    stop_after=_number(steps, "--steps", allow_zero=False) if steps else None)


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    program_args: Optional[List[str]] = typer.Argument(None, metavar="[-- ARG...]",
                                                        help="Arguments for --program (after --)."),
    program: Optional[str] = typer.Option(None, "--program", metavar="PATH",
                                          help="Run this Linux program (x86-64 ELF) as the guest."),
    root: Optional[str] = typer.Option(None, "--root", metavar="DIR",
                                       help="Program: the directory it sees as / (read-only; default: .)."),
    env: List[str] = typer.Option([], "--env", metavar="NAME=VALUE", help="Program: an environment variable."),
    stdin_file: Optional[str] = typer.Option(None, "--stdin", metavar="FILE",
                                             help="Program: read stdin from FILE (default: snapctl's stdin)."),
    argv0: Optional[str] = typer.Option(None, "--argv0", metavar="NAME", help="Program: its argv[0]."),
    every_syscalls: Optional[str] = typer.Option(None, "--every-syscalls", metavar="N",
                                                 help="Program: a checkpoint every N system calls."),
    guest: str = typer.Option("stamp", help="Built-in guest (see `snapctl guests`)."),
    mem: Optional[str] = typer.Option(None, help="Guest RAM, e.g. 64M, 1G (default 64M; program: 256M)."),
    vcpus: int = typer.Option(1, help="vCPUs."),
    seed: str = typer.Option("1", help="Guest seed (non-zero)."),
    steps_per_yield: str = typer.Option("1000", "--steps-per-yield", help="Guest steps between yields."),
    checkpoints: Optional[int] = typer.Option(None, help="Checkpoints to take after the base "
                                              "(default 10; program: until it exits)."),
    every_steps: Optional[str] = typer.Option(None, "--every-steps", help="Sync: every N guest steps."),
    interval: Optional[float] = typer.Option(None, "--interval", help="Async: every MS milliseconds "
                                             "(program: at the next system call after MS, default 100)."),
    ring_entries: str = typer.Option("4096", "--ring-entries", help="Dirty ring entries per vCPU."),
    tracking: str = typer.Option("ring", help="Dirty tracking: ring or bitmap."),
    param: List[str] = typer.Option([], "--param", help="Guest parameter NAME=VALUE (repeatable)."),
    precopy: bool = typer.Option(False, "--precopy", help="Copy pages harvested at ring-full exits early."),
    replicate: Optional[str] = ReplicateOpt,
    token_file: Optional[str] = TokenFileOpt,
    replicate_required: bool = ReplicateRequiredOpt,
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Boot a built-in guest (or --program), write checkpoint 0 and then the scheduled checkpoints."""
    from .checkpoint import run as run_
    from .machine import MachineConfig

    if tracking not in ("ring", "bitmap"):
        raise typer.BadParameter(f"must be ring or bitmap, got {tracking!r}", param_hint="--tracking")
    if program is not None:
        _run_program(program, program_args or [], root, env, stdin_file, argv0, every_syscalls, interval,
                     checkpoints, mem, tracking, store, as_json, (replicate, token_file, replicate_required))
        return
    if program_args or every_syscalls or root or env or stdin_file or argv0:
        raise typer.BadParameter("arguments, --root, --env, --stdin, --argv0 and --every-syscalls go with --program",
                                 param_hint="--program")
    checkpoints = 10 if checkpoints is None else checkpoints
    mem = mem or "64M"
    sched = _schedule(checkpoints, every_steps, interval)
    cfg = MachineConfig(guest=guest, mem_size=_number(mem, "--mem", allow_zero=False), vcpus=vcpus,
                        seed=_number(seed, "--seed"), steps_per_yield=_number(steps_per_yield, "--steps-per-yield"),
                        tracking=tracking, ring_entries=_number(ring_entries, "--ring-entries"), params=_params(param))
    path = _store_path(store)
    from . import cli_replication as R
    rep = R.replicator(replicate, token_file, replicate_required, path,
                       {"kind": "run", "schedule": R.schedule_dict(sched)})
    with _progress(sched.count + 1, "checkpoints", as_json) as cb:
        summary = run_(path, cfg, sched, on_checkpoint=cb, kvm_path=_kvm(), precopy=precopy,
                       after_commit=rep.after_commit if rep else None).as_dict()
    R.finish(rep, summary)
    if as_json:
        _print_json(summary)
    else:
        out.print(_summary_table(f"run: {path}", summary))


def _program_schedule(checkpoints: Optional[int], every_syscalls: Optional[str], interval: Optional[float],
                      steps: Optional[str] = None):
    from .checkpoint.program import ProgramSchedule

    if every_syscalls is not None and interval is not None:
        raise typer.BadParameter("give either --every-syscalls or --interval, not both", param_hint="--every-syscalls")
    if checkpoints is not None and checkpoints < 0:
        raise typer.BadParameter(f"must be >= 0, got {checkpoints}", param_hint="--checkpoints")
    if interval is not None and not (math.isfinite(interval) and 0 < interval <= 86_400_000):
        raise typer.BadParameter(f"must be a number of ms from > 0 to 86400000 (one day), got {interval}",
                                 param_hint="--interval")
    return ProgramSchedule(
        count=checkpoints, interval_ms=interval,
        every_syscalls=_number(every_syscalls, "--every-syscalls", allow_zero=False) if every_syscalls else None,
        stop_after=_number(steps, "--steps", allow_zero=False) if steps else None)


def _run_program(program, args, root, env, stdin_file, argv0, every_syscalls, interval, checkpoints, mem,
                 tracking, store, as_json, replication=(None, None, False)) -> None:
    from . import cli_program as P
    from . import cli_replication as R
    from .checkpoint.program import run_program

    sched = _program_schedule(checkpoints, every_syscalls, interval)
    spec = P.spec_from_args(program, args, root, env, stdin_file, argv0)
    path = _store_path(store)
    rep = R.replicator(*replication, path, {"kind": "run", "schedule": R.schedule_dict(sched)})
    res = run_program(path, spec, sched, mem_size=_number(mem or "256M", "--mem", allow_zero=False),
                      tracking=tracking, kvm_path=_kvm(), replica=rep)
    R.finish(rep, res.as_dict())
    raise typer.Exit(P.render_run(res, as_json, f"run {os.path.basename(spec.path)} into {path}"))


@app.command("list")
def list_(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List the checkpoints (a tree: each has a parent)."""
    with _open(store) as st:
        cks = st.checkpoints()
    if as_json:
        _print_json([_ckpt_dict(c) for c in cks])
        return
    t = Table()
    for name, just in (("id", "right"), ("parent", "right"), ("step", "right"), ("trigger", "left"),
                       ("created", "left"), ("dirty", "right"), ("stored", "right"), ("pause ms", "right"),
                       ("tags", "left")):
        t.add_column(name, justify=just, no_wrap=name != "tags")
    for c in cks:
        s = c.stats
        created = _dt.datetime.fromtimestamp(c.created).strftime("%m-%d %H:%M:%S")
        t.add_row(str(c.id), "-" if c.parent is None else str(c.parent), f"{c.step:,}", c.trigger, created,
                  f"{s.get('dirty_pages', 0):,}", _human(s.get("stored_bytes", 0)),
                  str(s.get("downtime_ms", "-")), ", ".join(c.tags))
    out.print(t)


@app.command()
def show(id: str = typer.Argument(..., help="Checkpoint id or tag."), store: Optional[str] = StoreOpt,
         as_json: bool = JsonOpt) -> None:
    """Show one checkpoint: tree position, statistics, vCPU registers."""
    from .checkpoint.engine import vcpu_state_name
    from .machine import VcpuState

    with _open(store) as st:
        c = st.get(_resolve(st, id))
        vcpus = []
        for i in range(int(st.config.get("vcpus", 1))):
            name = vcpu_state_name(i)
            if name in st.state_names(c.id):
                vcpus.append(VcpuState.from_bytes(st.state(c.id, name)).registers())
        children = st.children(c.id)
        from .checkpoint.program import is_program_store, program_info
        prog = program_info(st, c.id) if is_program_store(st) else None
    d = _ckpt_dict(c, vcpus=vcpus)
    d["children"] = children
    if prog is not None:
        d["program"] = prog
    if as_json:
        _print_json(d)
        return
    t = Table(title=f"checkpoint {c.id}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k in ("parent", "children", "step", "steps", "trigger", "tags", "digest"):
        t.add_row(k, str(d[k]))
    t.add_row("created", _when(c.created))
    for k, v in sorted(c.stats.items()):
        t.add_row(k, str(v))
    for i, r in enumerate(vcpus):
        t.add_row(f"vcpu{i}", " ".join(f"{n}={r[n]:#x}" for n in ("rip", "rsp", "rax", "rbx", "rflags")))
    for k, v in (prog or {}).items():
        t.add_row(k, str(v))
    out.print(t)


@app.command()
def restore(
    id: str = typer.Argument(..., help="Checkpoint id or tag to continue from."),
    checkpoints: Optional[int] = typer.Option(None, help="Checkpoints to take (default 10; program: until it exits)."),
    every_steps: Optional[str] = typer.Option(None, "--every-steps", help="Sync: every N guest steps."),
    every_syscalls: Optional[str] = typer.Option(None, "--every-syscalls", metavar="N",
                                                 help="Program: a checkpoint every N system calls."),
    interval: Optional[float] = typer.Option(None, "--interval", help="Async: every MS milliseconds."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Run exactly N more steps, then one checkpoint."),
    precopy: bool = typer.Option(False, "--precopy", help="Copy pages harvested at ring-full exits early."),
    replicate: Optional[str] = ReplicateOpt,
    token_file: Optional[str] = TokenFileOpt,
    replicate_required: bool = ReplicateRequiredOpt,
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Build a fresh VM from a checkpoint and continue; new checkpoints branch from it."""
    from .checkpoint import restore as restore_
    from .checkpoint.program import is_program_store

    from . import cli_replication as R

    with _open(store, write=True) as st:
        ckpt = _resolve(st, id)
        rep = R.replicator(replicate, token_file, replicate_required, st.filename, {"kind": "restore", "from": ckpt})
        if is_program_store(st):
            from . import cli_program as P
            from .checkpoint.program import restore_program

            if every_steps is not None:
                raise typer.BadParameter("a program counts system calls: use --every-syscalls", param_hint="--every-steps")
            psched = _program_schedule(checkpoints, every_syscalls, interval, steps)
            if rep is not None:
                rep.start_info["schedule"] = R.schedule_dict(psched)
            res = restore_program(st, ckpt, psched, kvm_path=_kvm(), replica=rep)
            R.finish(rep, res.as_dict())
            raise typer.Exit(P.render_run(res, as_json, f"restore {ckpt}"))
        if every_syscalls is not None:
            raise typer.BadParameter("--every-syscalls is for program guests", param_hint="--every-syscalls")
        sched = _schedule(10 if checkpoints is None else checkpoints, every_steps, interval, steps)
        total = 1 if sched.stop_after else sched.count
        with _progress(total, f"from {ckpt}", as_json) as cb:
            if rep is not None:
                rep.start_info["schedule"] = R.schedule_dict(sched)
            summary = restore_(st, ckpt, sched, on_checkpoint=cb, kvm_path=_kvm(), precopy=precopy,
                               after_commit=rep.after_commit if rep else None).as_dict()
        R.finish(rep, summary)
    summary["restored_from"] = ckpt
    if as_json:
        _print_json(summary)
    else:
        out.print(_summary_table(f"restore {ckpt}: {st.filename}", summary))


@app.command()
def standby(
    listen: str = typer.Option(..., "--listen", metavar="HOST:PORT", help="Where the primary connects."),
    store: str = typer.Option(..., "--store", help="The standby's own store (created, or re-synced into)."),
    token_file: Optional[str] = typer.Option(None, "--token-file", metavar="F",
                                             help="The shared secret: frames without its HMAC are refused."),
    failover_timeout: float = typer.Option(500.0, "--failover-timeout", metavar="MS",
                                           help="Fail over when no heartbeat arrives for this long."),
    as_json: bool = JsonOpt,
) -> None:
    """Receive a primary's checkpoints (`run/restore --replicate`); fail over if it is lost."""
    from . import cli_replication as R

    raise typer.Exit(R.standby(listen, store, token_file, failover_timeout, as_json))


@app.command()
def replay(
    id: str = typer.Argument(..., help="Checkpoint to restore."),
    to: Optional[str] = typer.Option(None, "--to", help="Checkpoint to reach (default: the next in the branch)."),
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Restore ID, re-execute to ID2's guest step, compare memory and registers; exit 1 on mismatch."""
    from .checkpoint import replay as replay_

    from .checkpoint.program import is_program_store

    with _open(store) as st:
        a = _resolve(st, id)
        b = _resolve(st, to) if to is not None else None
        if is_program_store(st):
            from . import cli_program as P
            from .checkpoint.engine import next_in_branch
            from .checkpoint.program import replay_program

            res = replay_program(st, a, b if b is not None else next_in_branch(st, a), kvm_path=_kvm())
            if not P.render_replay(res, as_json):
                raise Failure(f"replay {res.source} -> {res.target} does not match: "
                              f"{'; '.join(res.differences) or f'{len(res.differing_pages)} pages and {len(res.differing_registers)} registers differ'}")
            return
        res = replay_(st, a, b, kvm_path=_kvm())
    d = res.as_dict()
    if as_json:
        _print_json(d)
    elif res.match:
        out.print(f"replay {res.source} -> {res.target}: match (steps {res.steps}, memory and registers identical)")
    else:
        out.print(f"replay {res.source} -> {res.target}: MISMATCH (reached steps {res.steps}, recorded {res.target_steps})")
        if res.differing_pages:
            shown = ", ".join(f"{p * 4096:#x}" for p in res.differing_pages[:8])
            out.print(f"  {len(res.differing_pages)} pages differ, first: {shown}")
        for k, (a_, b_) in list(res.differing_registers.items())[:8]:
            out.print(f"  {k}: replayed {a_:#x}, recorded {b_:#x}")
    if res.note:
        print(f"note: {res.note}", file=sys.stderr)
    if not res.match:
        raise Failure(f"replay {res.source} -> {res.target} does not match: {len(res.differing_pages)} pages and "
                      f"{len(res.differing_registers)} registers differ")


@app.command()
def export(
    id: str = typer.Argument(..., help="Checkpoint id or tag."),
    out_path: str = typer.Argument(..., metavar="OUT", help="Output file."),
    fmt: str = typer.Option("raw", "--format", help="raw: byte i of OUT = guest-physical byte i."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (never writes through a symlink)."),
    store: Optional[str] = StoreOpt,
) -> None:
    """Write the guest memory image at a checkpoint to a file (mode 0600)."""
    from .checkpoint import export_raw

    if fmt != "raw":
        raise typer.BadParameter(f"only raw is supported, got {fmt!r}", param_hint="--format")
    with _open(store) as st:
        ckpt = _resolve(st, id)
        size = export_raw(st, ckpt, out_path, force=force)
    err.print(f"wrote {out_path}: checkpoint {ckpt}, {_human(size)}")


def _hexdump(base: int, data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:012x}  {hexes:<47}  {text}")
    return "\n".join(lines)


@app.command()
def read(
    id: str = typer.Argument(..., help="Checkpoint id or tag."),
    addr: str = typer.Argument(..., metavar="ADDR|SYMBOL",
                               help="Guest-physical address; for a program a virtual address or SYMBOL[+OFFSET]."),
    length: Optional[str] = typer.Argument(None, metavar="[LEN]",
                                           help="Bytes to read (default 256; a symbol's own size)."),
    fmt: str = typer.Option("hex", "--format", help="hex (hexdump) or raw (bytes to stdout)."),
    phys: bool = typer.Option(False, "--phys", help="Program: ADDR is guest-physical."),
    store: Optional[str] = StoreOpt,
) -> None:
    """Read guest memory as it was at a checkpoint."""
    from .checkpoint.program import is_program_store

    if fmt not in ("hex", "raw"):
        raise typer.BadParameter(f"must be hex or raw, got {fmt!r}", param_hint="--format")
    n = _number(length, "LEN") if length is not None else None
    with _open(store) as st:
        ckpt = _resolve(st, id)
        if is_program_store(st) and not phys:
            from .checkpoint.program import read_program

            gpa, data = read_program(st, ckpt, addr, n)
        else:
            gpa = _number(addr, "ADDR")
            data = st.read(ckpt, gpa, 256 if n is None else n)
    if fmt == "raw":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        print(_hexdump(gpa, data))


def _ranges(pages: list[int]) -> list[str]:
    outl, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        a, b = pages[i] * 4096, pages[j] * 4096 + 4095
        outl.append(f"{a:#x}-{b:#x}" if j > i else f"{a:#x}")
        i = j + 1
    return outl


@app.command()
def diff(a: str = typer.Argument(..., help="Checkpoint id or tag."),
         b: str = typer.Argument(..., help="Checkpoint id or tag."),
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """The guest pages whose content differs between two checkpoints."""
    from .checkpoint.program import is_program_store

    with _open(store) as st:
        ia, ib = _resolve(st, a), _resolve(st, b)
        pages = st.diff(ia, ib).tolist()
        virt = None
        if is_program_store(st):   # the program's own addresses, through b's page tables
            from .checkpoint.program import virtual_pages

            virt = virtual_pages(st, ib, pages)
    if as_json:
        d = {"pages": [p * 4096 for p in pages]}
        if virt is not None:
            d["virtual"] = {f"{p * 4096:#x}": f"{va:#x}" for p, va in virt.items()}
        _print_json(d)
        return
    out.print(f"{len(pages)} pages differ")
    if virt is not None:
        vas = sorted(virt.values())
        out.print(f"{len(vas)} of them mapped in the program at {ib} (virtual addresses):")
        for r in _ranges([va // 4096 for va in vas]):
            print(r)
        out.print("guest-physical:")
    for r in _ranges(pages):
        print(r)


@app.command()
def history(addr: str = typer.Argument(..., metavar="ADDR|SYMBOL",
                                       help="Guest-physical address; for a program a virtual address or SYMBOL."),
            phys: bool = typer.Option(False, "--phys", help="Program: ADDR is guest-physical."),
            store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """The checkpoints where the page holding ADDR changed, with content hashes."""
    from .checkpoint.program import is_program_store

    with _open(store) as st:
        if is_program_store(st) and not phys:
            from .checkpoint.program import program_history

            h = program_history(st, addr)
            if as_json:
                _print_json({"va": f"{h['va']:#x}", "checkpoints": [
                    {"id": r["id"], "hash": r["hash"], "gpa": None if r["gpa"] is None else f"{r['gpa']:#x}"}
                    for r in h["checkpoints"]]})
                return
            t = Table("checkpoint", "content hash", "physical page", title=f"virtual page {h['va']:#x}")
            for r in h["checkpoints"]:
                t.add_row(str(r["id"]), r["hash"] or "(unmapped)", "-" if r["gpa"] is None else f"{r['gpa']:#x}")
            out.print(t)
            return
    gpa = _number(addr, "ADDR")
    with _open(store) as st:
        if gpa >= st.page_count * 4096:
            raise Failure(f"address {gpa:#x} is beyond the end of guest RAM ({st.page_count * 4096:#x})")
        rows = st.history(gpa // 4096)
    if as_json:
        _print_json({"page": gpa // 4096 * 4096, "checkpoints": [{"id": i, "hash": h} for i, h in rows]})
        return
    t = Table("checkpoint", "content hash", title=f"page {gpa // 4096 * 4096:#x}")
    for i, h in rows:
        t.add_row(str(i), h)
    out.print(t)


@app.command()
def output(id: str = typer.Argument(..., help="Checkpoint id or tag."),
           stderr: bool = typer.Option(False, "--stderr", help="The program's stderr instead of its stdout."),
           store: Optional[str] = StoreOpt) -> None:
    """What the program had written to stdout (or stderr) by checkpoint ID, raw."""
    from .checkpoint.program import program_output

    with _open(store) as st:
        data = program_output(st, _resolve(st, id), stderr=stderr)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command()
def core(id: str = typer.Argument(..., help="Checkpoint id or tag."),
         out_path: str = typer.Argument(..., metavar="OUT", help="Core file to write (mode 0600)."),
         force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
         store: Optional[str] = StoreOpt) -> None:
    """An ELF core file of the program at ID: `gdb PROGRAM OUT` opens it."""
    from .checkpoint.program import write_program_core

    with _open(store) as st:
        ckpt = _resolve(st, id)
        size = write_program_core(st, ckpt, out_path, force=force)
    err.print(f"wrote {out_path}: checkpoint {ckpt}, {_human(size)}")


@app.command()
def verify(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Check every blob, reference, tree link and digest; exit 1 if anything is damaged."""
    with _open(store) as st:
        rep = st.verify()
    if as_json:
        _print_json({"ok": rep.ok, "problems": list(rep.problems), "checked": getattr(rep, "checked", {})})
    elif rep.ok:
        out.print(f"ok: {getattr(rep, 'checked', '')}")
    else:
        for p in rep.problems:
            print(f"damaged: {p}")
    if not rep.ok:
        first = rep.problems[0] if rep.problems else "unknown damage"
        raise Failure(f"store is damaged: {len(rep.problems)} problem(s); first: {first}")


@app.command()
def prune(keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep the newest N checkpoints."),
          keep: List[str] = typer.Option([], "--keep", help="Keep this checkpoint (repeatable)."),
          store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Remove the other checkpoints (tagged ones are kept); kept ones restore byte for byte as before."""
    if (keep_last is None) == (not keep):
        raise typer.BadParameter("give exactly one of --keep-last N or --keep ID ...", param_hint="--keep-last")
    if keep_last is not None and keep_last < 1:
        raise typer.BadParameter(f"must be >= 1, got {keep_last}", param_hint="--keep-last")
    with _open(store, write=True) as st:
        ids = [_resolve(st, k) for k in keep]
        rep = st.prune(keep_last=keep_last, keep_ids=ids)
    d = rep.__dict__ if hasattr(rep, "__dict__") else dict(rep)
    if as_json:
        _print_json(d)
    else:
        out.print(", ".join(f"{k}: {v}" for k, v in d.items()))


@app.command()
def tag(id: str = typer.Argument(..., help="Checkpoint id or tag."),
        name: str = typer.Argument(..., help="Tag name (not all digits)."),
        store: Optional[str] = StoreOpt) -> None:
    """Name a checkpoint; names work wherever an ID does."""
    with _open(store, write=True) as st:
        ckpt = _resolve(st, id)
        st.tag(ckpt, name)
    out.print(f"tagged {ckpt} as {name}")


@app.command()
def guests(as_json: bool = JsonOpt) -> None:
    """List the built-in guests and their parameters."""
    from .machine.guests import GUESTS

    rows = [{"name": g.name, "summary": g.summary,
             "params": [{"name": p.name, "default": p.default, "help": p.help} for p in g.params]}
            for g in GUESTS.values()]
    if as_json:
        _print_json(rows)
        return
    t = Table("guest", "what it does", "parameters")
    for r in rows:
        t.add_row(r["name"], r["summary"], ", ".join(f"{p['name']}={p['default']}" for p in r["params"]) or "-")
    out.print(t)
    out.print("Or your own Linux program as the guest: snapctl run --program PATH [-- ARG...] (docs/programs.md).")


@app.command()
def bench(quick: bool = typer.Option(False, "--quick", help="Smaller sizes; about a minute here."),
          only: List[str] = typer.Option([], "--only", help="Run only this benchmark (repeatable)."),
          plot: Optional[str] = typer.Option(None, "--plot", help="Also write the pause-vs-dirty-pages PNG here."),
          as_json: bool = JsonOpt) -> None:
    """Measure snapctl beside its floors and peers, in one run; figures as ratios with goals."""
    from . import bench as bench_

    unknown = [o for o in only if o not in bench_.BENCHES]
    if unknown:
        raise typer.BadParameter(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(bench_.BENCHES)}",
                                 param_hint="--only")
    results = bench_.run_all(quick, only or None, progress=None if as_json else (lambda n: err.print(f"bench: {n}")))
    if plot:
        rows = bench_.pause_curve(quick)
        results["pause_curve"] = rows
        bench_.plot_pause_curve(rows, plot)
    if as_json:
        _print_json(results)
        return
    t = Table("benchmark", "ratio", "goal", "met")
    for name, ratio, goal, met in bench_.verdict_rows(results):
        t.add_row(name, str(ratio), str(goal), {True: "[green]yes[/]", False: "[red]NO[/]"}.get(met, "-"))
    out.print(t)
    skip = ("ratio", "goal", "met", "ratio_vs_decompress", "goal_vs_decompress", "met_vs_decompress")
    f = Table("benchmark", "figures")
    for name, r in results.items():
        if name == "pause_curve":
            continue
        f.add_row(name, ", ".join(f"{k}={v}" for k, v in r.items()
                                  if k not in skip and not isinstance(v, (list, dict))))
    out.print(f)


@app.command()
def demo(store: Optional[str] = typer.Option(None, "--store", help="Store file (default: a temporary one)."),
         as_json: bool = JsonOpt) -> None:
    """Run, checkpoint, restore a branch, replay and verify, on a scratch store."""
    from .checkpoint import demo as demo_

    tmpdir = None
    if store is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="snapctl-demo-")
        store = os.path.join(tmpdir.name, "demo.db")
    elif os.path.lexists(store):
        raise Failure(f"{store} already exists; the demo writes a new store")
    try:
        with _progress(26, "demo", as_json) as cb:
            res = demo_(store, on_step=None if as_json else (lambda m: err.print(f"[bold]{m}[/]")), on_checkpoint=cb,
                        kvm_path=_kvm())
        d = {"store": store if tmpdir is None else None, "run": res.run.as_dict(), "branch": res.branch.as_dict(),
             "replay": res.replay.as_dict(), "verify": {"ok": res.verify_ok, "problems": res.verify_problems}}
        if as_json:
            _print_json(d)
        else:
            out.print(_summary_table("run (async)", d["run"]))
            out.print(_summary_table("restore 10 -> branch (sync)", d["branch"]))
            r = res.replay
            out.print(f"replay {r.source} -> {r.target}: {'match' if r.match else 'MISMATCH'}; "
                      f"verify: {'ok' if res.verify_ok else 'DAMAGED'}")
        if not (res.replay.match and res.verify_ok):
            raise typer.Exit(1)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


# -- entry point: one line per error, never a traceback -------------------------------------------

def _known_errors() -> tuple[type[BaseException], ...]:
    from storage import StoreError

    from .checkpoint.engine import CheckpointWriteError
    from .kvm import KvmError
    from .machine import MachineError

    return (Failure, StoreError, KvmError, MachineError, CheckpointWriteError, ValueError, OSError)


def _click_class(name: str) -> type[BaseException]:
    """typer may vendor click (typer._click): take its classes from its own hierarchy."""
    for base in (*typer.BadParameter.__mro__, *typer.Exit.__mro__, *typer.Abort.__mro__):
        if base.__name__ == name:
            return base
    return getattr(click.exceptions, name)


def _fail(msg: str, code: int) -> None:
    # plain print, not rich: an error is exactly one line, never wrapped
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    cmd = typer.main.get_command(app)
    usage, click_exc = _click_class("UsageError"), _click_class("ClickException")
    try:
        rv = cmd.main(args=argv, prog_name="snapctl", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(getattr(e, "exit_code", 0))
    except usage as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _fail(f"{e.format_message()}{hint}", 2)
    except click_exc as e:
        _fail(e.format_message(), getattr(e, "exit_code", 1))
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except _known_errors() as e:
        msg = str(e) or e.__class__.__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {e.strerror}"
        _fail(msg, 1)
