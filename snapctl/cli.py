"""The `snapctl` command line: parse, call the library, render. No logic here.

Exit codes: 0 success; 1 an error (unknown id, missing or foreign store, no
KVM, a failed check, ...); 2 a usage error (bad flag or value, a replay
target that cannot be reached); 130 interrupted. Every error is one line on
stderr (``{"error": ...}`` with ``--json``), never a traceback, and nothing
is written. JSON shapes: snapctl/schemas/cli.json; text rendering:
snapctl/render.py.

Start-up matters (`read`/`history` answer in a blink): only the standard
library and typer are imported here; rich, numpy and the store are imported
by the commands that use them.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

import typer

from . import __version__
from . import render as R
from .kvm.constants import DEFAULT_KVM_PATH, PAGE_SIZE

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Checkpoint and restore VMs on /dev/kvm.")

DEFAULT_STORE = "./snapshots.db"
_STORE_HELP = f"Store file (default: $SNAPCTL_STORE, else {DEFAULT_STORE}); also accepted before the command."
StoreOpt = typer.Option(None, "--store", metavar="PATH", help=_STORE_HELP)
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts (schema: docs/cli.md).")
_GLOBAL: dict = {"store": None}
ReplicateOpt = typer.Option(None, "--replicate", metavar="HOST:PORT",
                            help="Replicate every checkpoint to a `snapctl standby` there.")
TokenFileOpt = typer.Option(None, "--token-file", metavar="F",
                            help="Replication: the shared secret (HMAC on every frame).")
ReplicateRequiredOpt = typer.Option(False, "--replicate-required",
                                    help="Replication: stop (exit 4) if the standby is lost.")


class Failure(Exception):
    """A user-facing error: printed as one line, exit 1 (``code`` otherwise)."""

    code = 1


class UsageFailure(Failure):
    """A request that cannot be carried out as asked: exit 2."""

    code = 2


class Interrupted(BaseException):
    """Ctrl-C (SIGINT): not an Exception, so no ``except Exception`` on the way
    swallows it; the message says what was kept. Exit 130."""


def _store_path(store: Optional[str]) -> str:
    return store or _GLOBAL["store"] or os.environ.get("SNAPCTL_STORE") or DEFAULT_STORE


def _kvm() -> str:
    """The KVM device ($SNAPCTL_KVM overrides /dev/kvm)."""
    return os.environ.get("SNAPCTL_KVM", DEFAULT_KVM_PATH)


def _out(text: str = "") -> None:
    print(text)


def _note(text: str) -> None:
    print(text, file=sys.stderr)


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


def _tracking(mode: str) -> None:
    """--tracking: a mode a store's machine can have (the library's rule), else a usage error."""
    from .machine.vmm import check_tracking

    try:
        check_tracking(mode, stored=True)
    except ValueError:
        raise typer.BadParameter(f"must be ring or bitmap, got {mode!r}", param_hint="--tracking") from None


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
    from .stored import NoStoreError, open_store

    path = _store_path(store)
    try:
        st = open_store(path, write=write)
    except NoStoreError as e:
        raise Failure(f"{e} (run `snapctl run` first, or give --store / $SNAPCTL_STORE)") from None
    try:
        yield st
    finally:
        st.close()


@contextmanager
def _usage() -> Iterator[None]:
    """A value the library refuses by the option it came from (a ScheduleError): a usage error, exit 2."""
    from .checkpoint.schedule import ScheduleError

    try:
        yield
    except ScheduleError as e:
        raise typer.BadParameter(e.message, param_hint=e.option) from None


def _resolve(st, ref: str) -> int:
    return st.resolve(ref)


def _file_bytes(path: str) -> int:
    """The store's size on disk: the file and its WAL."""
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


# -- rendering -------------------------------------------------------------------------------

def _tty(stream=None) -> bool:
    try:
        return (stream or sys.stdout).isatty()
    except (AttributeError, ValueError):
        return False


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def _kv(rows: list[tuple[str, str]], title: str | None = None) -> None:
    """Aligned "key  value" lines (values already safe)."""
    if title:
        _out(title)
    w = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        _out(f"  {k.ljust(w)}  {v}")


def _summary_rows(s: dict) -> list[tuple[str, str]]:
    rows = [("checkpoints", f"{s['count']} ({R.ids_text(s['checkpoints'])})" if s["count"] else "0"),
            ("pages harvested", f"{s['pages_harvested']:,}"),
            ("bytes stored / raw", f"{R.human(s['stored_bytes'])} / {R.human(s['raw_bytes'])}"),
            ("compression ratio", f"{s['compression_ratio']}x" if s["compression_ratio"] else "-"),
            ("pause median / max", f"{s['pause_ms_median']} ms / {s['pause_ms_max']} ms"
             if s["pause_ms_median"] is not None else "-")]
    rate = s.get("dirty_rate")
    if rate:
        rows.append(("dirty rate", f"{rate['pages_per_s']:,.0f} pages/s, {rate['mib_per_s']} MiB/s"))
    return rows


class _Bar:
    """What ``_progress`` yields: ``bar(n=1, info="")`` advances; ``bar.to(done,
    total)`` is the ``progress`` callback the store's long operations take
    (``total`` None while it cannot be known: vacuum)."""

    def __init__(self, prog=None, task=None):
        self._prog, self._task = prog, task

    def __call__(self, n: int = 1, info: str = "") -> None:
        if self._prog is not None:
            self._prog.update(self._task, advance=n, info=info)

    def to(self, done: int, total: int | None) -> None:
        if self._prog is not None:
            self._prog.update(self._task, completed=done, total=total)


@contextmanager
def _progress(total: int | None, label: str, quiet: bool, *, live: bool = False, bar: bool | None = None):
    """A progress bar with ETA on stderr, only when stderr is a terminal (else
    nothing, not even a blank line). Yields a ``_Bar``. ``total=None`` with
    ``bar`` false: a spinner with the elapsed time (no ETA can be known);
    with ``bar`` true the total comes later through ``_Bar.to``."""
    if quiet or not _tty(sys.stderr):
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    if bar is None:
        bar = total is not None
    cols = ([TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             TextColumn("eta"), TimeRemainingColumn()] if bar else
            [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()])
    if live:
        cols.append(TextColumn("{task.fields[info]}"))
    with Progress(*cols, console=Console(stderr=True, highlight=False), transient=True) as prog:
        yield _Bar(prog, prog.add_task(R.safe(label), total=total, info=""))


def _live(advance):
    """on_checkpoint for run/restore: the bar shows each checkpoint's pause and pages."""
    def cb(ckpt, stats):
        advance(1, f"#{ckpt}: pause {stats.get('downtime_ms', 0):.2f} ms, {stats.get('dirty_pages', 0):,} pages")
    return cb


# -- signals: Ctrl-C and on-demand checkpoints ---------------------------------------------------

def _on_sigint(signum, frame):
    # Later Ctrl-Cs are ignored: the first one's clean-up (drain the writer,
    # close the store) must finish for the store to stay whole.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted()


def _interrupted(st, after: int) -> Interrupted:
    """The message for Ctrl-C during run/restore: what this command kept."""
    ids = [] if st is None else [c.id for c in st.checkpoints() if c.id > after]
    last = f" (last: {ids[-1]})" if ids else ""
    return Interrupted(f"interrupted: {len(ids)} checkpoint{'s' if len(ids) != 1 else ''} kept{last}")


@contextmanager
def _on_demand(control: Optional[str]):
    """SIGUSR1 (and lines "checkpoint" on the --control socket) ask the running
    Checkpointer for a checkpoint now. Yields the ``on_checkpointer`` hook."""
    holder: dict = {"cp": None}

    def request(*_):
        if holder["cp"] is not None:
            holder["cp"].request()

    old = signal.signal(signal.SIGUSR1, request)
    server = _control_socket(control, request) if control else None
    try:
        yield lambda cp: holder.__setitem__("cp", cp)
    finally:
        signal.signal(signal.SIGUSR1, old)
        if server is not None:
            server()


def _control_socket(path: str, request):
    """A Unix socket at ``path``: each line "checkpoint" requests one (answer
    "ok"), anything else is answered "error: ...". Returns the closer."""
    import socket
    import threading

    if os.path.lexists(path):
        raise Failure(f"--control {path} already exists")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
    except OSError as e:
        srv.close()
        raise Failure(f"--control {path}: {e.strerror}") from None
    os.chmod(path, 0o600)
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            # a reader apart from the answers: writing through one "rw" text file
            # would drop the lines it had already read ahead
            with conn, conn.makefile("r", errors="replace") as lines:
                try:
                    for line in lines:
                        if line.strip() == "checkpoint":
                            request()
                            conn.sendall(b"ok\n")
                        else:
                            what = R.safe(line.strip()[:40])
                            conn.sendall(f"error: unknown request {what!r}; send \"checkpoint\"\n".encode())
                except OSError:  # the client went away
                    pass

    threading.Thread(target=serve, name="snapctl-control", daemon=True).start()

    def close():
        srv.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return close


# -- commands --------------------------------------------------------------------------------

def _version(value: bool) -> None:
    if value:
        _out(f"snapctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version."),
          store: Optional[str] = typer.Option(None, "--store", metavar="PATH",
                                              help="Store file for the command (as its own --store).")):
    _GLOBAL["store"] = store


def _schedule(checkpoints: Optional[int], every: Optional[str], interval: Optional[float],
              steps: Optional[str] = None, *, program: bool = False):
    """The checkpoint schedule of run/restore: guest steps (``every`` is --every-steps), or
    for a program (``program``) system calls (``every`` is --every-syscalls); validated."""
    if program:
        from .checkpoint.program import ProgramSchedule as Kind
        per, option = "every_syscalls", "--every-syscalls"
    else:
        from .checkpoint import Schedule as Kind
        per, option = "every_steps", "--every-steps"
    sched = Kind(count=checkpoints, interval_ms=interval, **{per: _number(every, option) if every else None},
                 stop_after=_number(steps, "--steps") if steps else None)
    with _usage():
        sched.validate()
    return sched


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    program_args: Optional[List[str]] = typer.Argument(None, metavar="-- ARG...",
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
    guest: str = typer.Option("stamp", metavar="NAME", help="Built-in guest (see `snapctl guests`)."),
    mem: Optional[str] = typer.Option(None, metavar="SIZE", help="Guest RAM, e.g. 64M, 1G (default 64M; program: 256M)."),
    vcpus: int = typer.Option(1, metavar="N", help="vCPUs."),
    seed: str = typer.Option("1", metavar="N", help="Guest seed (non-zero)."),
    steps_per_yield: str = typer.Option("1000", "--steps-per-yield", metavar="N", help="Guest steps between yields."),
    checkpoints: Optional[int] = typer.Option(None, metavar="N", help="Checkpoints to take after the base "
                                              "(default 10; program: until it exits)."),
    every_steps: Optional[str] = typer.Option(None, "--every-steps", metavar="N", help="Sync: every N guest steps."),
    interval: Optional[float] = typer.Option(None, "--interval", metavar="MS", help="Async: every MS milliseconds "
                                             "(program: at the next system call after MS, default 100)."),
    ring_entries: str = typer.Option("4096", "--ring-entries", metavar="N", help="Dirty ring entries per vCPU."),
    tracking: str = typer.Option("ring", metavar="ring|bitmap", help="Dirty tracking: ring or bitmap."),
    param: List[str] = typer.Option([], "--param", metavar="NAME=VALUE", help="Guest parameter (repeatable)."),
    precopy: bool = typer.Option(False, "--precopy", help="Copy pages harvested at ring-full exits early."),
    replicate: Optional[str] = ReplicateOpt,
    token_file: Optional[str] = TokenFileOpt,
    replicate_required: bool = ReplicateRequiredOpt,
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
    control: Optional[str] = typer.Option(None, "--control", metavar="SOCKET",
                                          help="Unix socket: a line \"checkpoint\" takes one now (as SIGUSR1 does)."),
) -> None:
    """Boot a built-in guest (or --program), write checkpoint 0 and then the scheduled checkpoints.

    `kill -USR1 PID` (or --control) takes a checkpoint now; Ctrl-C stops, keeping what was written."""
    from .checkpoint import run as run_
    from .machine import MachineConfig

    _tracking(tracking)
    if program is not None:
        _run_program(program, program_args or [], root, env, stdin_file, argv0, every_syscalls, interval,
                     checkpoints, mem, tracking, store, as_json, (replicate, token_file, replicate_required))
        return
    if program_args or every_syscalls or root or env or stdin_file or argv0:
        raise typer.BadParameter("arguments, --root, --env, --stdin, --argv0 and --every-syscalls go with --program",
                                 param_hint="--program")
    checkpoints = 10 if checkpoints is None else checkpoints
    mem = "64M" if mem is None else mem
    sched = _schedule(checkpoints, every_steps, interval)
    cfg = MachineConfig(guest=guest, mem_size=_number(mem, "--mem", allow_zero=False), vcpus=vcpus,
                        seed=_number(seed, "--seed"), steps_per_yield=_number(steps_per_yield, "--steps-per-yield"),
                        tracking=tracking, ring_entries=_number(ring_entries, "--ring-entries"), params=_params(param))
    path = _store_path(store)
    existed = os.path.lexists(path)
    from . import cli_replication as RP
    rep = RP.replicator(replicate, token_file, replicate_required, path,
                        {"kind": "run", "schedule": RP.schedule_dict(sched)})
    try:
        with _on_demand(control) as hook, _progress(sched.count + 1, "checkpoints", as_json, live=True) as adv:
            summary = run_(path, cfg, sched, on_checkpoint=_live(adv), kvm_path=_kvm(), precopy=precopy,
                           on_checkpointer=hook, replica=rep).as_dict()
    except Interrupted:
        if existed or not os.path.exists(path):  # never created (or not ours): nothing kept
            raise Interrupted("interrupted: 0 checkpoints kept") from None
        with _open(path) as st:
            raise _interrupted(st, -1) from None
    RP.finish(rep, summary)
    if as_json:
        R.print_json(R.summary_json(summary))
    else:
        _kv(_summary_rows(summary), f"run: {R.safe(path)}")


def _run_program(program, args, root, env, stdin_file, argv0, every_syscalls, interval, checkpoints, mem,
                 tracking, store, as_json, replication=(None, None, False)) -> None:
    from . import cli_program as P
    from . import cli_replication as RP
    from .checkpoint.program import run_program

    sched = _schedule(checkpoints, every_syscalls, interval, program=True)
    spec = P.spec_from_args(program, args, root, env, stdin_file, argv0)
    path = _store_path(store)
    rep = RP.replicator(*replication, path, {"kind": "run", "schedule": RP.schedule_dict(sched)})
    res = run_program(path, spec, sched, mem_size=_number("256M" if mem is None else mem, "--mem", allow_zero=False),
                      tracking=tracking, kvm_path=_kvm(), replica=rep)
    RP.finish(rep, res.as_dict())
    raise typer.Exit(P.render_run(res, as_json, f"run {os.path.basename(spec.path)} into {path}"))


@app.command("list")
def list_(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
          fmt: Optional[str] = typer.Option(None, "--format", metavar="table|plain|tsv|csv|json",
                                            help="Default: table on a terminal (fitted to it), plain otherwise."),
          as_tree: bool = typer.Option(False, "--tree", help="Draw the branches (restore makes them).")) -> None:
    """List the checkpoints (a tree: each has a parent). Never cuts an id or a value."""
    fmts = ("table", "plain", "tsv", "csv", "json")
    if fmt is not None and fmt not in fmts:
        raise typer.BadParameter(f"must be one of {', '.join(fmts)}, got {fmt!r}", param_hint="--format")
    fmt = "json" if as_json else fmt or ("table" if _tty() else "plain")
    with _open(store) as st:
        cks = st.checkpoints()
    if fmt == "json":
        R.print_json([R.checkpoint_json(c) for c in cks])
        return
    if as_tree:
        if fmt not in ("table", "plain"):
            raise typer.BadParameter("--tree draws text: use it with --format table or plain", param_hint="--tree")
        for line in R.tree(cks, _tree_label):
            _out(line)
        return
    cols = [R.Column("id", True), R.Column("parent", True), R.Column("step", True), R.Column("trigger"),
            R.Column("created", drop=3), R.Column("dirty", True, drop=2), R.Column("stored", True, drop=4),
            R.Column("pause ms", True, drop=1), R.Column("tags")]
    rows = []
    for c in cks:
        s = c.stats
        rows.append([str(c.id), "-" if c.parent is None else str(c.parent), R.safe(c.step), R.safe(c.trigger),
                     R.iso(c.created), R.safe(s.get("dirty_pages", 0)), R.safe(s.get("stored_bytes", 0)),
                     R.safe(s.get("downtime_ms", "-")), ",".join(R.safe(t) for t in c.tags)])
        if fmt == "table":  # for people: separators and units
            rows[-1][2], rows[-1][5] = R.num(c.step), R.num(s.get("dirty_pages", 0))
            stored = s.get("stored_bytes", 0)
            rows[-1][6] = R.human(stored) if isinstance(stored, (int, float)) else R.safe(stored)
            rows[-1][4] = R.iso(c.created)[5:19].replace("T", " ")
            rows[-1][8] = ", ".join(R.safe(t) for t in c.tags)
    text, dropped = R.table(cols, rows, fmt, _width() if fmt == "table" else None)
    _out(text)
    if dropped:
        _note(f"(too narrow for: {', '.join(dropped)}; widen the terminal or use --format plain)")


def _tree_label(c) -> str:
    tags = f"  [{', '.join(R.safe(t) for t in c.tags)}]" if c.tags else ""
    return f"{c.id}  {R.safe(c.trigger)}  step {R.num(c.step)}{tags}"


@app.command()
def show(id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."), store: Optional[str] = StoreOpt,
         as_json: bool = JsonOpt) -> None:
    """Show one checkpoint: tree position, statistics, vCPU registers."""
    from .checkpoint.describe import describe

    with _open(store) as st:
        view = describe(st, _resolve(st, id))
    c, children, vcpus, prog = view.info, view.children, view.vcpus, view.program
    d = R.checkpoint_json(c)
    d["children"] = children
    d["vcpus"] = [R.registers_json(r) for r in vcpus]
    if prog is not None:
        d["program"] = prog
    if as_json:
        R.print_json(d)
        return
    rows = [("parent", "-" if c.parent is None else str(c.parent)), ("children", R.ids_text(children)),
            ("step", R.num(c.step)), ("steps", ", ".join(map(R.safe, d["steps"]))), ("trigger", R.safe(c.trigger)),
            ("tags", ", ".join(R.safe(t) for t in c.tags) or "-"), ("digest", d["digest"]), ("created", d["created"])]
    rows += [(R.safe(k), R.safe(v)) for k, v in d["stats"].items()]
    for i, r in enumerate(vcpus):
        rows.append((f"vcpu{i}", " ".join(f"{n}={r[n]:#x}" for n in ("rip", "rsp", "rax", "rbx", "rflags"))))
    for k, v in (prog or {}).items():
        rows.append((k, R.safe(str(v))))
    _kv(rows, f"checkpoint {c.id}")


@app.command()
def restore(
    id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag to continue from."),
    checkpoints: Optional[int] = typer.Option(None, metavar="N", help="Checkpoints to take "
                                              "(default 10; program: until it exits)."),
    every_steps: Optional[str] = typer.Option(None, "--every-steps", metavar="N", help="Sync: every N guest steps."),
    every_syscalls: Optional[str] = typer.Option(None, "--every-syscalls", metavar="N",
                                                 help="Program: a checkpoint every N system calls."),
    interval: Optional[float] = typer.Option(None, "--interval", metavar="MS", help="Async: every MS milliseconds."),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="N", help="Run exactly N more steps, then one checkpoint."),
    precopy: bool = typer.Option(False, "--precopy", help="Copy pages harvested at ring-full exits early."),
    lazy: bool = typer.Option(False, "--lazy", help="Start the guest at once; serve its memory on first touch "
                                                    "(userfaultfd) while the rest is restored in the background."),
    replicate: Optional[str] = ReplicateOpt,
    token_file: Optional[str] = TokenFileOpt,
    replicate_required: bool = ReplicateRequiredOpt,
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
    control: Optional[str] = typer.Option(None, "--control", metavar="SOCKET",
                                          help="Unix socket: a line \"checkpoint\" takes one now (as SIGUSR1 does)."),
) -> None:
    """Build a fresh VM from a checkpoint and continue; new checkpoints branch from it.

    `kill -USR1 PID` (or --control) takes a checkpoint now; Ctrl-C stops, keeping what was written."""
    from .checkpoint import restore as restore_
    from .checkpoint.program import is_program_store

    from . import cli_replication as RP

    if lazy and as_json:  # a VMM thread on a damaged page exits from C: in the JSON error form too
        from storage.lazy import report_as_json
        report_as_json()
    with _open(store, write=True) as st:
        ckpt = _resolve(st, id)
        rep = RP.replicator(replicate, token_file, replicate_required, st.filename, {"kind": "restore", "from": ckpt})
        if is_program_store(st):
            from . import cli_program as P
            from .checkpoint.program import restore_program

            if every_steps is not None:
                raise typer.BadParameter("a program counts system calls: use --every-syscalls", param_hint="--every-steps")
            psched = _schedule(checkpoints, every_syscalls, interval, steps, program=True)
            if rep is not None:
                rep.start_info["schedule"] = RP.schedule_dict(psched)
            res = restore_program(st, ckpt, psched, kvm_path=_kvm(), replica=rep, lazy=lazy)
            RP.finish(rep, res.as_dict())
            raise typer.Exit(P.render_run(res, as_json, f"restore {ckpt}"))
        if every_syscalls is not None:
            raise typer.BadParameter("--every-syscalls is for program guests", param_hint="--every-syscalls")
        sched = _schedule(10 if checkpoints is None else checkpoints, every_steps, interval, steps)
        last_before = max(c.id for c in st.checkpoints())
        total = sched.checkpoints_expected
        try:
            with _on_demand(control) as hook, _progress(total, f"restore {ckpt}", as_json, live=True) as adv:
                if rep is not None:
                    rep.start_info["schedule"] = RP.schedule_dict(sched)
                summary = restore_(st, ckpt, sched, on_checkpoint=_live(adv), kvm_path=_kvm(), precopy=precopy,
                                   lazy=lazy, on_checkpointer=hook, replica=rep).as_dict()
        except Interrupted:
            raise _interrupted(st, last_before) from None
        RP.finish(rep, summary)
    summary["restored_from"] = ckpt
    if as_json:
        R.print_json(R.summary_json(summary))
    else:
        _kv(_summary_rows(summary), f"restore {ckpt}: {R.safe(st.filename)}")


@app.command()
def standby(
    listen: str = typer.Option(..., "--listen", metavar="HOST:PORT", help="Where the primary connects."),
    store: str = typer.Option(..., "--store", metavar="PATH", help="The standby's own store (created, or re-synced into)."),
    token_file: Optional[str] = typer.Option(None, "--token-file", metavar="F",
                                             help="The shared secret: frames without its HMAC are refused."),
    failover_timeout: float = typer.Option(500.0, "--failover-timeout", metavar="MS",
                                           help="Fail over when no heartbeat arrives for this long."),
    as_json: bool = JsonOpt,
) -> None:
    """Receive a primary's checkpoints (`run/restore --replicate`); fail over if it is lost."""
    from . import cli_replication as RP

    raise typer.Exit(RP.standby(listen, store, token_file, failover_timeout, as_json))


@app.command()
def replay(
    id: str = typer.Argument(..., metavar="ID", help="Checkpoint to restore."),
    to: Optional[str] = typer.Option(None, "--to", metavar="ID2", help="Checkpoint to reach (default: the next in the branch)."),
    lazy: bool = typer.Option(False, "--lazy", help="Restore ID lazily (userfaultfd), as `restore --lazy`."),
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Restore ID, re-execute to ID2's guest step, compare; exit 1 on mismatch, 2 if ID2 is not reachable.

    Sync targets compare memory and registers; async and manual ones memory only (the kick landed mid-loop)."""
    from .checkpoint import replay as replay_
    from .checkpoint.program import is_program_store
    from .checkpoint.replaying import ReplayUnreachable, check_reachable, next_in_branch

    if lazy and as_json:
        from storage.lazy import report_as_json
        report_as_json()
    with _open(store) as st:
        a = _resolve(st, id)
        b = _resolve(st, to) if to is not None else None
        if b is not None:
            try:
                check_reachable(st, a, b)
            except ReplayUnreachable as e:
                raise UsageFailure(str(e)) from None
        if is_program_store(st):
            from . import cli_program as P
            from .checkpoint.program import replay_program

            res = replay_program(st, a, b if b is not None else next_in_branch(st, a), kvm_path=_kvm(), lazy=lazy)
            if not P.render_replay(res, as_json):
                what = "; ".join(res.differences) or (f"{len(res.differing_pages)} pages and "
                                                       f"{len(res.differing_registers)} registers differ")
                raise Failure(f"replay {res.source} -> {res.target} does not match: {what}"
                              + (f" ({res.note})" if res.note else ""))
            return
        res = replay_(st, a, b, kvm_path=_kvm(), lazy=lazy)
    d = R.replay_json(res.as_dict())
    compared = "memory and registers" if res.registers_compared else "memory"
    if as_json:
        R.print_json(d)
    elif res.match:
        _out(f"replay {res.source} -> {res.target}: match at steps {', '.join(map(str, res.steps))}; "
             f"compared {compared}: identical" + ("" if res.registers_compared else
                                                  "; registers not compared (the target was taken mid-loop)"))
    else:
        _out(f"replay {res.source} -> {res.target}: MISMATCH (reached steps {res.steps}, recorded {res.target_steps}; "
             f"compared {compared})")
        if res.differing_pages:
            shown = ", ".join(d["differing_pages"][:8])
            _out(f"  {len(res.differing_pages)} pages differ, first: {shown}")
        for k, (a_, b_) in list(res.differing_registers.items())[:8]:
            _out(f"  {k}: replayed {a_:#x}, recorded {b_:#x}")
    if res.note and res.match:
        _note(f"note: {res.note}")
    if not res.match:  # the note goes into the one error line
        raise Failure(f"replay {res.source} -> {res.target} does not match: {len(res.differing_pages)} pages and "
                      f"{len(res.differing_registers)} registers differ" + (f" ({res.note})" if res.note else ""))


@app.command()
def export(
    id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
    out_path: str = typer.Argument(..., metavar="OUT", help="Output file, or - for stdout (not a terminal)."),
    fmt: str = typer.Option("raw", "--format", metavar="raw", help="raw: byte i of OUT = guest-physical byte i."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (never writes through a symlink)."),
    store: Optional[str] = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON (not with OUT -)."),
) -> None:
    """Write the guest memory image at a checkpoint to a file (mode 0600, sparse) or stdout."""
    from .checkpoint.export import export_raw

    if fmt != "raw":
        raise typer.BadParameter(f"only raw is supported, got {fmt!r}", param_hint="--format")
    if out_path == "-":
        if as_json:
            raise typer.BadParameter("the image goes to stdout with OUT -; JSON would mix with it", param_hint="--json")
        if _tty(sys.stdout):
            raise UsageFailure("refusing to write a memory image to a terminal; redirect stdout or give a file")
    with _open(store) as st:
        ckpt = _resolve(st, id)
        with _progress(st.page_count, f"export {ckpt}", as_json) as adv:
            if out_path == "-":
                size = export_raw(st, ckpt, sys.stdout.buffer, on_pages=adv)
            else:
                size = export_raw(st, ckpt, out_path, force=force, on_pages=adv)
    if as_json:
        R.print_json({"checkpoint": ckpt, "path": out_path, "bytes": size})
    else:
        _note(f"wrote {'stdout' if out_path == '-' else R.safe(out_path)}: checkpoint {ckpt}, {R.human(size)}")


@app.command()
def read(
    id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
    addr: str = typer.Argument(..., metavar="ADDR|SYMBOL",
                               help="Guest-physical address; for a program a virtual address or SYMBOL[+OFFSET]."),
    length: Optional[str] = typer.Argument(None, metavar="LEN",
                                           help="Bytes to read (default 256; a symbol's own size)."),
    fmt: str = typer.Option("hex", "--format", metavar="hex|raw", help="hex (hexdump) or raw (bytes to stdout)."),
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
        print(R.hexdump(gpa, data))


@app.command()
def diff(a: str = typer.Argument(..., metavar="A", help="Checkpoint id or tag."),
         b: str = typer.Argument(..., metavar="B", help="Checkpoint id or tag."),
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
        d = {"from": ia, "to": ib, "count": len(pages), "pages": [R.hexa(p * PAGE_SIZE) for p in pages]}
        if virt is not None:
            d["virtual"] = {R.hexa(p * PAGE_SIZE): R.hexa(va) for p, va in virt.items()}
        R.print_json(d)
        return
    _out(f"{len(pages)} pages differ")
    if virt is not None:
        vas = sorted(virt.values())
        _out(f"{len(vas)} of them mapped in the program at {ib} (virtual addresses):")
        for r in R.page_ranges([va // PAGE_SIZE for va in vas]):
            _out(r)
        _out("guest-physical:")
    for r in R.page_ranges(pages):
        _out(r)


@app.command()
def history(addr: str = typer.Argument(..., metavar="ADDR|SYMBOL",
                                       help="Guest-physical address; for a program a virtual address or SYMBOL."),
            phys: bool = typer.Option(False, "--phys", help="Program: ADDR is guest-physical."),
            store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """The checkpoints where the page holding ADDR changed, with content digests."""
    from .checkpoint.program import is_program_store

    with _open(store) as st:
        if is_program_store(st) and not phys:
            from .checkpoint.program import program_history

            h = program_history(st, addr)
            if as_json:   # the shape of the guest-physical form, plus the virtual address
                R.print_json({"va": R.hexa(h["va"]), "checkpoints": [r["id"] for r in h["checkpoints"]],
                              "versions": [{"checkpoint": r["id"], "digest": r["hash"],
                                            "gpa": None if r["gpa"] is None else R.hexa(r["gpa"])}
                                           for r in h["checkpoints"]]})
                return
            text, _ = R.table([R.Column("checkpoint"), R.Column("content digest"), R.Column("physical page")],
                              [[str(r["id"]), r["hash"] or "(unmapped)", "-" if r["gpa"] is None else f"{r['gpa']:#x}"]
                               for r in h["checkpoints"]], "table" if _tty() else "plain", _width() if _tty() else None)
            _out(f"virtual page {h['va']:#x}")
            _out(text)
            return
    gpa = _number(addr, "ADDR")
    with _open(store) as st:
        if gpa >= st.page_count * PAGE_SIZE:
            raise Failure(f"address {gpa:#x} is beyond the end of guest RAM ({st.page_count * PAGE_SIZE:#x})")
        rows = st.history(gpa // PAGE_SIZE)
    page = gpa // PAGE_SIZE * PAGE_SIZE
    if as_json:
        R.print_json({"page": R.hexa(page), "checkpoints": [i for i, _ in rows],
                      "versions": [{"checkpoint": i, "digest": h} for i, h in rows]})
        return
    _out(f"page {page:#x}: {len(rows)} version{'s' if len(rows) != 1 else ''}")
    text, _ = R.table([R.Column("checkpoint", True), R.Column("digest")], [[str(i), h] for i, h in rows], "plain")
    _out(text)


@app.command()
def output(id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
           stderr: bool = typer.Option(False, "--stderr", help="The program's stderr instead of its stdout."),
           store: Optional[str] = StoreOpt) -> None:
    """What the program had written to stdout (or stderr) by checkpoint ID, raw."""
    from .checkpoint.program import program_output

    with _open(store) as st:
        data = program_output(st, _resolve(st, id), stderr=stderr)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command()
def core(id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
         out_path: str = typer.Argument(..., metavar="OUT", help="Core file to write (mode 0600)."),
         force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
         store: Optional[str] = StoreOpt) -> None:
    """An ELF core file of the program at ID: `gdb PROGRAM OUT` opens it."""
    from .checkpoint.program import write_program_core

    with _open(store) as st:
        ckpt = _resolve(st, id)
        size = write_program_core(st, ckpt, out_path, force=force)
    _note(f"wrote {R.safe(out_path)}: checkpoint {ckpt}, {R.human(size)}")


@app.command()
def verify(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Check every blob, reference, tree link and digest; exit 1 if anything is damaged."""
    with _open(store) as st:
        with _progress(None, "verifying", as_json, bar=True) as bar:
            rep = st.verify(progress=bar.to)
    checked = rep.checked
    if as_json:
        R.print_json({"ok": rep.ok, "problems": list(rep.problems), "checked": checked})
    elif rep.ok:
        _out("ok: " + (", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in checked.items()) or "nothing to check")
             + " checked")
    else:
        for p in rep.problems:
            _out(f"damaged: {R.safe(p)}")
    if not rep.ok:
        first = rep.problems[0] if rep.problems else "unknown damage"
        raise Failure(f"store is damaged: {len(rep.problems)} problem(s); first: {first}")


def _removal_text(rep, before: int, after: int | None, vacuumed: bool) -> None:
    """Human text for prune/delete: what goes (or went), what stays, the file size."""
    verb = "would remove" if rep.dry_run else "removed"
    _out(f"{verb} {len(rep.removed)} checkpoint{'s' if len(rep.removed) != 1 else ''}: {R.ids_text(rep.removed)}")
    _out(f"kept {len(rep.kept)}: {R.ids_text(rep.kept)}")
    for c, p in sorted(rep.reparented.items()):
        _out(f"  {c} now branches from {'-' if p is None else p}")
    if rep.tags_removed:
        _out(f"tags {'to remove' if rep.dry_run else 'removed'}: {', '.join(R.safe(t) for t in rep.tags_removed)}")
    if rep.dry_run:
        _out("dry run: nothing changed")
    elif after is not None:
        _out(f"store file: {R.human(before)} -> {R.human(after)}")
    elif not vacuumed:
        _out(f"freed {R.human(rep.bytes_freed)} inside the store (file: {R.human(before)}); "
             "`snapctl vacuum` gives it back to the file system")


def _confirm(rep, yes: bool, as_json: bool) -> None:
    """On a terminal, show what would go and ask (unless --yes)."""
    if yes or as_json or not (_tty(sys.stdin) and _tty(sys.stdout)):
        return
    _removal_text(rep, 0, None, True)
    try:
        answer = input(f"remove {len(rep.removed)} checkpoint(s)? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise Failure("nothing removed (not confirmed)")


def _remove(store: Optional[str], select, *, keep_tagged: bool, dry_run: bool, yes: bool, vacuum: bool,
            as_json: bool, what: str) -> None:
    """prune and delete: ``select(st)`` -> (keep_last, keep_ids); preview, confirm on a
    terminal, remove, give the space back, report the file size (once the store is
    closed and its WAL copied back)."""
    path = _store_path(store)
    with _open(store, write=not dry_run) as st:
        keep_last, keep_ids = select(st)
        preview = st.prune(keep_last=keep_last, keep_ids=keep_ids, keep_tagged=keep_tagged, dry_run=True)
        before = _file_bytes(path)
        if dry_run or not preview.removed:
            if as_json:
                R.print_json(R.prune_json(preview, before, before))
            else:
                if not preview.removed:
                    _out(f"nothing to {what}")
                _removal_text(preview, before, before, True)
            return
        _confirm(preview, yes, as_json)
        with _progress(None, f"{what}: rewriting the kept checkpoints' maps", as_json, bar=True) as bar:
            rep = st.prune(keep_last=keep_last, keep_ids=keep_ids, keep_tagged=keep_tagged, progress=bar.to)
        if vacuum:
            with _progress(None, "vacuum: compacting the store file", as_json) as bar:
                st.vacuum(progress=bar.to)
    after = _file_bytes(path)
    if as_json:
        R.print_json(R.prune_json(rep, before, after))
    else:
        _removal_text(rep, before, after if vacuum else None, vacuum)


@app.command()
def prune(keep_last: Optional[int] = typer.Option(None, "--keep-last", metavar="N", help="Keep the newest N checkpoints."),
          keep: List[str] = typer.Option([], "--keep", metavar="ID", help="Keep this checkpoint (repeatable)."),
          store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
          dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; change nothing."),
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask on a terminal."),
          vacuum: bool = typer.Option(True, "--vacuum/--no-vacuum",
                                      help="Compact the file afterwards, so it shrinks (rewrites the store).")) -> None:
    """Remove the other checkpoints (tagged ones and the base are kept); kept ones restore byte for byte as before."""
    if (keep_last is None) == (not keep):
        raise typer.BadParameter("give exactly one of --keep-last N or --keep ID ...", param_hint="--keep-last")
    if keep_last is not None:
        from .checkpoint.removal import check_keep_last

        with _usage():
            check_keep_last(keep_last)
    _remove(store, lambda st: (keep_last, [_resolve(st, k) for k in keep]), keep_tagged=True, dry_run=dry_run,
            yes=yes, vacuum=vacuum, as_json=as_json, what="prune")


@app.command()
def tag(id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
        name: str = typer.Argument(..., metavar="NAME", help="Tag name (not all digits)."),
        store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Name a checkpoint; names work wherever an ID does."""
    with _open(store, write=True) as st:
        ckpt = _resolve(st, id)
        st.tag(ckpt, name)
    if as_json:
        R.print_json({"checkpoint": ckpt, "tag": name})
    else:
        _out(f"tagged {ckpt} as {R.safe(name)}")


@app.command("dirty-rate")
def dirty_rate(
    seconds: float = typer.Option(2.0, "--seconds", metavar="S", help="How long to measure."),
    from_: Optional[str] = typer.Option(None, "--from", metavar="ID", help="Restore this checkpoint instead of booting."),
    sample_ms: float = typer.Option(100.0, "--sample-ms", metavar="MS",
                                    help="Collect every MS ms: the figure is what checkpoints that often would copy."),
    guest: str = typer.Option("stamp", metavar="NAME", help="Built-in guest (without --from)."),
    mem: str = typer.Option("64M", metavar="SIZE", help="Guest RAM (without --from)."),
    vcpus: int = typer.Option(1, metavar="N", help="vCPUs (without --from)."),
    seed: str = typer.Option("1", metavar="N", help="Guest seed (without --from)."),
    tracking: str = typer.Option("ring", metavar="ring|bitmap", help="Dirty tracking (without --from; per vCPU: ring)."),
    param: List[str] = typer.Option([], "--param", metavar="NAME=VALUE", help="Guest parameter (repeatable)."),
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure how fast a guest dirties memory (pages/s, MiB/s, per vCPU); stores nothing."""
    from .checkpoint import load_machine
    from .checkpoint.dirtyrate import check_args, measure
    from .machine import Machine, MachineConfig

    with _usage():
        check_args(seconds, sample_ms)
    _tracking(tracking)
    ckpt = None
    if from_ is not None:
        with _open(store) as st:
            ckpt = _resolve(st, from_)
            machine = load_machine(st, ckpt, kvm_path=_kvm())
    else:
        cfg = MachineConfig(guest=guest, mem_size=_number(mem, "--mem", allow_zero=False), vcpus=vcpus,
                            seed=_number(seed, "--seed"), tracking=tracking, params=_params(param))
        machine = Machine(cfg, kvm_path=_kvm())
    with machine, _progress(None, f"measuring for {seconds:g} s", as_json):
        d = measure(machine, seconds, sample_ms)
    d["from"] = ckpt
    if as_json:
        R.print_json(d)
        return
    src = f"checkpoint {ckpt}" if ckpt is not None else f"{R.safe(guest)} on {R.human(machine.config.mem_size)}"
    _out(f"dirty rate of {src}: {d['seconds']} s, a collect every {sample_ms:g} ms ({d['samples']} samples), "
         f"{d['tracking']} tracking")
    rows = [["all vCPUs", f"{d['pages_per_s']:,.0f}", f"{d['mib_per_s']}"]]
    rows += [[f"vcpu{v['vcpu']}", "-" if v["pages_per_s"] is None else f"{v['pages_per_s']:,.0f}",
              "-" if v["mib_per_s"] is None else str(v["mib_per_s"])] for v in d["vcpus"]]
    text, _ = R.table([R.Column(""), R.Column("pages/s", True), R.Column("MiB/s", True)], rows, "plain")
    _out(text)


# -- managing checkpoints and tags: delete, untag, rename-tag, vacuum -------------------------------

@app.command()
def delete(id: str = typer.Argument(..., metavar="ID", help="Checkpoint id or tag."),
           store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
           dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask on a terminal."),
           vacuum: bool = typer.Option(True, "--vacuum/--no-vacuum",
                                       help="Compact the file afterwards, so it shrinks (rewrites the store).")) -> None:
    """Delete one checkpoint (and its tags); its children branch from its parent and restore as before."""
    from .checkpoint.removal import keep_all_but

    def select(st):
        return None, keep_all_but(st, _resolve(st, id))

    _remove(store, select, keep_tagged=False, dry_run=dry_run, yes=yes, vacuum=vacuum, as_json=as_json, what="delete")


@app.command()
def untag(name: str = typer.Argument(..., metavar="NAME", help="Tag to remove (the checkpoint stays)."),
          store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Remove a tag; the checkpoint it named stays (and may then be pruned)."""
    with _open(store, write=True) as st:
        ckpt = _tag_target(st, name)
        st.untag(name)
    if as_json:
        R.print_json({"checkpoint": ckpt, "tag": name})
    else:
        _out(f"untagged {R.safe(name)} (checkpoint {ckpt})")


@app.command("rename-tag")
def rename_tag(old: str = typer.Argument(..., metavar="OLD", help="Existing tag."),
               new: str = typer.Argument(..., metavar="NEW", help="New name (not all digits, not taken)."),
               store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Rename a tag; it keeps naming the same checkpoint."""
    with _open(store, write=True) as st:
        ckpt = _tag_target(st, old)
        if new != old:
            st.tag(ckpt, new)  # first: a taken or invalid NEW changes nothing
            st.untag(old)
    if as_json:
        R.print_json({"checkpoint": ckpt, "tag": new, "old_tag": old})
    else:
        _out(f"renamed tag {R.safe(old)} -> {R.safe(new)} (checkpoint {ckpt})")


def _tag_target(st, name: str) -> int:
    if name.isdigit():
        raise UsageFailure(f"{name!r} is a checkpoint id, not a tag")
    return st.resolve(name)


@app.command()
def vacuum(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Give the space freed by prune/delete back to the file system (rewrites the store file)."""
    path = _store_path(store)
    with _open(store, write=True) as st:
        before = _file_bytes(path)
        with _progress(None, "vacuum: compacting the store file", as_json) as bar:
            st.vacuum(progress=bar.to)
    after = _file_bytes(path)
    if as_json:
        R.print_json({"file_bytes": {"before": before, "after": after}})
    else:
        _out(f"store file: {R.human(before)} -> {R.human(after)}")


@app.command()
def guests(as_json: bool = JsonOpt) -> None:
    """List the built-in guests and their parameters."""
    from .machine.guests import GUESTS

    rows = [{"name": g.name, "summary": g.summary,
             "params": [{"name": p.name, "default": p.default, "help": p.help} for p in g.params]}
            for g in GUESTS.values()]
    if as_json:
        R.print_json(rows)
        return
    text, _ = R.table([R.Column("guest"), R.Column("parameters"), R.Column("what it does")],
                      [[r["name"], ", ".join(f"{p['name']}={p['default']}" for p in r["params"]) or "-", r["summary"]]
                       for r in rows], "table" if _tty() else "plain", _width() if _tty() else None)
    _out(text)
    _out("Or your own Linux program as the guest: snapctl run --program PATH [-- ARG...] (docs/programs.md).")


@app.command()
def bench(quick: bool = typer.Option(False, "--quick", help="Smaller sizes; about a minute here."),
          only: List[str] = typer.Option([], "--only", metavar="NAME", help="Run only this benchmark (repeatable)."),
          plot: Optional[str] = typer.Option(None, "--plot", metavar="PNG", help="Also write the pause-vs-dirty-pages PNG here."),
          as_json: bool = JsonOpt) -> None:
    """Measure snapctl beside its floors and peers, in one run; figures as ratios with goals."""
    from . import bench as bench_

    unknown = [o for o in only if o not in bench_.BENCHES]
    if unknown:
        raise typer.BadParameter(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(bench_.BENCHES)}",
                                 param_hint="--only")
    results = bench_.run_all(quick, only or None, progress=None if as_json else (lambda n: _note(f"bench: {n}")))
    if plot:
        rows = bench_.pause_curve(quick)
        results["pause_curve"] = rows
        bench_.plot_pause_curve(rows, plot)
    if as_json:
        R.print_json(results)
        return
    yes_no = {True: "yes", False: "NO"}
    text, _ = R.table([R.Column("benchmark"), R.Column("ratio", True), R.Column("goal"), R.Column("met"),
                       R.Column("figure")],
                      [[name, str(ratio), str(goal), yes_no.get(met, "-"), figure]
                       for name, ratio, goal, met, figure in bench_.verdict_rows(results, figures=True)], "plain")
    _out(text)
    _out()
    skip = ("ratio", "goal", "met", "ratio_vs_decompress", "goal_vs_decompress", "met_vs_decompress", "checks")
    for name, r in results.items():
        if name == "pause_curve":
            continue
        _out(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()
                                     if k not in skip and not isinstance(v, (list, dict))))
        for k, sub in r.items():   # a second set of figures (replication's veth pair)
            if isinstance(sub, dict) and "link" in sub:
                _out(f"{name} {k} ({sub['link']}): " + ", ".join(
                    f"{kk}={next((vv[x] for x in ('ratio', 'per_s', 'ms') if x in vv), None)}"
                    for kk, vv in sub.items() if isinstance(vv, dict)))
            elif isinstance(sub, dict) and "skipped" in sub:
                _out(f"{name} {k}: skipped ({sub['skipped']})")


@app.command()
def demo(store: Optional[str] = typer.Option(None, "--store", metavar="PATH", help="Store file (default: a temporary one)."),
         as_json: bool = JsonOpt) -> None:
    """Run, checkpoint, restore a branch, replay and verify, on a scratch store."""
    import tempfile

    from .checkpoint import demo as demo_

    tmpdir = None
    if store is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="snapctl-demo-")
        store = os.path.join(tmpdir.name, "demo.db")
    elif os.path.lexists(store):
        raise Failure(f"{store} already exists; the demo writes a new store")
    try:
        with _progress(26, "demo", as_json) as adv:
            res = demo_(store, on_step=None if as_json else _note, on_checkpoint=lambda c, s: adv(),
                        kvm_path=_kvm())
        d = {"store": store if tmpdir is None else None, "run": res.run.as_dict(), "branch": res.branch.as_dict(),
             "replay": R.replay_json(res.replay.as_dict()),
             "verify": {"ok": res.verify_ok, "problems": res.verify_problems}}
        if as_json:
            R.print_json(d)
        else:
            _kv(_summary_rows(d["run"]), "run (async)")
            _kv(_summary_rows(d["branch"]), "restore 10 -> branch (sync)")
            r = res.replay
            _out(f"replay {r.source} -> {r.target}: {'match' if r.match else 'MISMATCH'}; "
                 f"verify: {'ok' if res.verify_ok else 'DAMAGED'}")
        if not (res.replay.match and res.verify_ok):
            raise typer.Exit(1)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


# -- entry point: one line per error, never a traceback -------------------------------------------

def _known_errors() -> tuple[type[BaseException], ...]:
    try:
        from storage import StoreError

        from .checkpoint.writer import CheckpointWriteError
        from .kvm import KvmError
        from .machine import MachineError
    except ImportError:   # e.g. another installed package named `storage` (docs/architecture.md)
        return (Failure, ImportError, ValueError, OSError)
    return (Failure, StoreError, KvmError, MachineError, CheckpointWriteError, ValueError, OSError)


def _click_class(name: str) -> type[BaseException]:
    """typer may vendor click (typer._click): take its classes from its own hierarchy."""
    for base in (*typer.BadParameter.__mro__, *typer.Exit.__mro__, *typer.Abort.__mro__):
        if base.__name__ == name:
            return base
    import click

    return getattr(click.exceptions, name)


def _fail(msg: str, code: int, as_json: bool = False) -> None:
    # plain print, not rich: an error is exactly one line, never wrapped
    line = " ".join(str(msg).split())
    print(R.error_json(line, code) if as_json else f"error: {line}", file=sys.stderr)
    sys.exit(code)


def command():
    """The click command tree, with plain argument names in the help: ``ID``
    and ``[LEN]`` (typer writes ``{ID}`` and ``ID <str>``)."""
    cmd = typer.main.get_command(app)

    def tidy(c):
        for p in c.params:
            if type(p).__name__ == "TyperArgument":
                name = p.metavar or p.name.upper()
                p._usage_display_name = (lambda n=name, req=p.required: n if req else f"[{n}]")
                p.display_type_rich = lambda ctx: None
        for sub in getattr(c, "commands", {}).values():
            tidy(sub)
    tidy(cmd)
    return cmd


def _wants_json(args: list[str]) -> bool:
    opts = args[:args.index("--")] if "--" in args else args
    return "--json" in opts or any(a == "--format=json" for a in opts) or \
        any(a == "--format" and b == "json" for a, b in zip(opts, opts[1:]))


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:  # the quickest answer: nothing else to import
        print(f"snapctl {__version__}")
        sys.exit(0)
    as_json = _wants_json(args)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    cmd = command()
    usage, click_exc = _click_class("UsageError"), _click_class("ClickException")
    exit_exc, abort_exc = _click_class("Exit"), _click_class("Abort")
    try:
        rv = cmd.main(args=args, prog_name="snapctl", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except SystemExit:
        raise
    except (typer.Exit, exit_exc) as e:
        sys.exit(getattr(e, "exit_code", 0))
    except Interrupted as e:
        msg = str(e) or "interrupted"
        print(R.error_json(msg, 130) if as_json else msg, file=sys.stderr)
        sys.exit(130)
    except usage as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help(), file=sys.stderr)  # the normal help, as `snapctl -h` prints it
            sys.exit(2)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _fail(f"{e.format_message()}{hint}", 2, as_json)
    except click_exc as e:
        _fail(e.format_message(), getattr(e, "exit_code", 1), as_json)
    except (typer.Abort, abort_exc, KeyboardInterrupt):
        _fail("interrupted", 130, as_json)
    except Failure as e:
        _fail(str(e), e.code, as_json)
    except _known_errors() as e:
        msg = str(e) or e.__class__.__name__
        if isinstance(e, ImportError):
            msg = f"snapctl is not installed whole: {msg}"
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {e.strerror}"
        _fail(msg, 1, as_json)
