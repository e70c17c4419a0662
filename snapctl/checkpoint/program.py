"""Checkpoints of a user's program: run it, restore it, replay it, read its output.

A program checkpoint is an ordinary checkpoint (guest memory, vCPU state)
plus the program guest's states (snapctl.program.guest): ``program`` (the
VMM's view: VMAs, frames, fds, brk, counters), ``stream/stdout``,
``stream/stderr`` and ``stream/log`` (what the interval since the parent
wrote, and the outside-world results it consumed), and ``file/<sha256>``
for each file first opened in that interval. The program's "step" is its
system-call count: sync checkpoints hold right after a system call, so a
replay can stop at exactly the same point.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from storage import Store

from ..machine import Machine, MachineConfig, MachineError, VcpuState
from ..program import FILE_PREFIX, LOG, STATE, STDERR, STDOUT, Log, ProgramGuest, ProgramSpec
from ..program.kernel import check_state
from ..kvm.constants import DEFAULT_KVM_PATH, PAGE_SIZE
from .captures import capture, vcpu_state_name
from .restoring import lazy_errors, load_machine
from .schedule import check_common
from .session import Checkpointer, RunSummary, prepare_new_store

DEFAULT_INTERVAL_MS = 100.0


@dataclass
class ProgramSchedule:
    """When to checkpoint a program: every ``interval_ms`` (landing on the next system call,
    or a kick if none comes within another interval) or every ``every_syscalls``; stop after
    ``count`` checkpoints (None: run to the exit) or after ``stop_after`` more system calls."""

    count: int | None = None
    every_syscalls: int | None = None
    interval_ms: float | None = None
    stop_after: int | None = None

    def validate(self) -> None:
        check_common(self.count, self.interval_ms, self.stop_after, per="--every-syscalls",
                     every=self.every_syscalls)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProgramRun:
    """How a program run (or a restore) ended."""

    summary: RunSummary
    spec: ProgramSpec
    exit_status: int | None          #: None: stopped by --checkpoints / --steps, still resumable
    signal: int | None = None
    report: str | None = None
    syscalls: int = 0
    unimplemented: dict = field(default_factory=dict)
    restored_from: int | None = None
    run_seconds: float = 0.0         #: from the program's (re)start to its exit or the last checkpoint

    def as_dict(self) -> dict:
        d = self.summary.as_dict()
        d.update({"program": self.spec.path, "argv": self.spec.argv, "exit_status": self.exit_status,
                  "signal": self.signal, "fault": self.report, "syscalls": self.syscalls,
                  "unimplemented_syscalls": self.unimplemented,
                  "running": self.exit_status is None, "run_seconds": round(self.run_seconds, 3)})
        if self.restored_from is not None:
            d["restored_from"] = self.restored_from
        return d


class _NoStdin:
    """snapctl itself has no stdin (fd 0 closed): the program reads end-of-file."""

    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _stdin_for(spec: ProgramSpec, pos: int = 0):
    """The program's fd 0: ``--stdin FILE`` (from ``pos`` on a restore), else snapctl's own stdin."""
    if spec.stdin is None:
        try:
            return os.fdopen(os.dup(0), "rb", buffering=0)
        except OSError:
            return _NoStdin()
    f = open(spec.stdin, "rb")
    f.seek(pos)
    return f


def start_pinned(m, cpu: int | None) -> None:
    """Start the machine with its vCPU thread on host CPU ``cpu`` (threads inherit the
    affinity of the thread that creates them); unpinned if that CPU is not ours to use."""
    if cpu is None or cpu not in os.sched_getaffinity(0):
        m.start()
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        m.start()
    finally:
        os.sched_setaffinity(0, mine)


def _loop(m, cp: Checkpointer, driver: ProgramGuest, sched: ProgramSchedule) -> float:
    """Start the program and take the scheduled checkpoints; a final one when it exits.
    Returns the seconds the program ran (from its start to its last checkpoint)."""
    writer = cp.background_writer()

    def take(trigger: str, *, last: bool = False) -> None:
        writer.submit(capture(m, trigger, already_paused=True, buffer=cp.staging_buffer(), resume=not last,
                              window=cp.pause_window))

    def boundary_or_kick(grace: float) -> str:
        """Hold at the next system call; kick if none comes within ``grace`` seconds."""
        m.pause_at_step(driver.step(0) + 1)
        if m.wait_parked_for(grace):
            return "exit" if m.finished else "sync"
        m.pause()
        held = m.held()
        m.pause_at_step(None)
        return "exit" if m.finished else "sync" if held else "async"

    taken = 0
    t0 = time.perf_counter()
    try:
        if sched.stop_after is not None:
            m.pause_at_step(driver.step(0) + sched.stop_after)
            start_pinned(m, driver.spec.cpu)
            m.wait_parked(timeout=None)
            t1 = time.perf_counter()
            take("exit" if m.finished else "sync", last=True)
            return t1 - t0
        every = sched.every_syscalls
        interval = None if every else (sched.interval_ms or DEFAULT_INTERVAL_MS) / 1e3
        if every and sched.count != 0:
            m.pause_at_step(driver.step(0) + every)
        if sched.count == 0:
            return 0.0
        start_pinned(m, driver.spec.cpu)
        while True:
            if every:
                m.wait_parked(timeout=None)
                trigger = "exit" if m.finished else "sync"
            elif m.wait_parked_for(interval):
                trigger = "exit"
            else:
                trigger = boundary_or_kick(interval)
            taken += 1
            last = trigger == "exit" or (sched.count is not None and taken >= sched.count)
            if every and not last:
                m.pause_at_step(driver.step(0) + every)   # before capture() resumes the program
            t1 = time.perf_counter()
            take(trigger, last=last)
            if last:
                return t1 - t0
    finally:
        try:
            m.pause()
        except MachineError:
            pass   # the machine's own error is already on its way up
        writer.close()


def _result(driver: ProgramGuest, summary: RunSummary, spec: ProgramSpec, seconds: float,
            restored_from=None) -> ProgramRun:
    k = driver.kernel
    ex = k.exited or {}
    return ProgramRun(summary, spec, ex.get("status") if k.exited else None, ex.get("signal"), ex.get("report"),
                      k.count, dict(k.unimplemented), restored_from, seconds)


def run_program(store_path: str, spec: ProgramSpec, sched: ProgramSchedule, *, mem_size: int = 256 << 20,
                tracking: str = "ring", kvm_path: str = DEFAULT_KVM_PATH, on_checkpoint=None,
                live_output: bool = True, replica=None) -> ProgramRun:
    """Load ``spec``'s program into a new VM, checkpoint 0 before its first instruction,
    then run it under ``sched`` into a new store. ``replica`` (snapctl.replication): gets
    every committed checkpoint (``after_commit``, waiting out the pauses: ``follow``) and the program's live output (``bind_output``)."""
    sched.validate()
    with open(spec.path, "rb") as f:
        exe = f.read()
    stdin = _stdin_for(spec)
    try:
        driver = ProgramGuest.new(spec, exe, stdin=stdin, live_output=live_output)
        if replica is not None:
            replica.bind_output(driver.output)
        cfg = MachineConfig(guest="program", mem_size=mem_size, vcpus=1, tracking=tracking, program=spec.to_dict())
        with Machine(cfg, kvm_path=kvm_path, driver=driver) as m:
            cfg.program = spec.to_dict()       # now with the binary's hash
            prepare_new_store(store_path)
            with Store.create(store_path, cfg.to_dict()) as store:
                cp = Checkpointer(m, store, None, on_checkpoint,
                                  replica=replica)
                cp.base()
                seconds = _loop(m, cp, driver, sched)
                return _result(driver, cp.summary, spec, seconds)
    finally:
        stdin.close()


def program_spec(store: Store) -> ProgramSpec:
    cfg = store.config
    if cfg.get("guest") != "program":
        raise ValueError(f"{store.filename} holds a built-in guest ({cfg.get('guest')!r}), not a program")
    return ProgramSpec.from_dict(cfg.get("program"))


def is_program_store(store: Store) -> bool:
    return store.config.get("guest") == "program"


def program_state(store: Store, ckpt: int) -> dict:
    try:
        state = json.loads(store.state(ckpt, STATE))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {ckpt}: program state is not valid JSON ({e})") from None
    try:
        return check_state(state)
    except ValueError as e:
        raise ValueError(f"checkpoint {ckpt}: {e}") from None


def file_loader(store: Store, ckpts: list[int]):
    """Read a stored file by content hash from any of ``ckpts`` (a path through the tree)."""
    def load(h: str) -> bytes:
        name = FILE_PREFIX + h
        for c in ckpts:
            if name in store.state_names(c):
                return store.state(c, name)
        raise ValueError(f"the store has no copy of file {h[:12]} on the path to checkpoint {ckpts[-1]}")
    return load


def restore_program(store: Store, ckpt: int, sched: ProgramSchedule, *, kvm_path: str = DEFAULT_KVM_PATH,
                    on_checkpoint=None, replica=None, lazy: bool = False) -> ProgramRun:
    """Continue the program from ``ckpt`` to its exit (or the schedule's end); new checkpoints branch from it.
    ``lazy``: the program runs while its memory is still being restored (as ``restore --lazy``:
    guest RAM served through userfaultfd; the driver's own reads of guest memory -- system call
    arguments, the kernel state it rebuilds -- are faults served like the vCPU's)."""
    sched.validate()
    spec = program_spec(store)
    state = program_state(store, ckpt)
    if state.get("exited"):
        ex = state["exited"]
        return ProgramRun(RunSummary(store=store.filename), spec, ex.get("status"), ex.get("signal"),
                          ex.get("report"), state.get("syscalls", 0), state.get("unimplemented", {}), ckpt)
    stdin = _stdin_for(spec, int(state.get("stdin_pos", 0)))
    try:
        driver = ProgramGuest.resuming(spec, state, file_loader(store, store.path(ckpt)), live_output=True, stdin=stdin)
        if replica is not None:
            replica.bind_output(driver.output)
        with load_machine(store, ckpt, kvm_path=kvm_path, driver=driver, lazy=lazy) as m, lazy_errors(m):
            driver.restore()
            cp = Checkpointer(m, store, ckpt, on_checkpoint,
                              replica=replica)
            seconds = _loop(m, cp, driver, sched)
            if m.lazy is not None:
                cp.summary.lazy = m.lazy.stats()
            return _result(driver, cp.summary, spec, seconds, ckpt)
    finally:
        stdin.close()


def continue_program(m: Machine, store: Store, ckpt: int, driver: ProgramGuest, sched: ProgramSchedule, *,
                     on_checkpoint=None) -> ProgramRun:
    """Run a machine already holding checkpoint ``ckpt`` (memory and vCPU state restored,
    ``driver`` built with :meth:`ProgramGuest.resuming`) under ``sched``; new checkpoints
    branch from ``ckpt``. What a standby's failover runs (snapctl.replication)."""
    sched.validate()
    driver.restore()
    cp = Checkpointer(m, store, ckpt, on_checkpoint)
    seconds = _loop(m, cp, driver, sched)
    return _result(driver, cp.summary, driver.spec, seconds, ckpt)


def streams(store: Store, path: list[int], name: str) -> bytes:
    return b"".join(store.state(c, name) for c in path if name in store.state_names(c))


def program_output(store: Store, ckpt: int, *, stderr: bool = False) -> bytes:
    """What the program had written to stdout (stderr) by checkpoint ``ckpt``."""
    program_spec(store)
    return streams(store, store.path(ckpt), STDERR if stderr else STDOUT)


#: what ``ProgramReplay.compared`` says -> its token in JSON
_COMPARED_TOKENS = {"system-call count": "syscall count", "stdout": "stdout", "stderr": "stderr",
                    "outside-world results consumed": "outside-world log", "memory (every page)": "memory",
                    "registers": "registers", "program state (VMAs, fds, brk, frames)": "program state"}


@dataclass
class ProgramReplay:
    source: int
    target: int
    match: bool
    trigger: str
    syscalls: int
    target_syscalls: int
    compared: list[str]
    differing_pages: list[int] = field(default_factory=list)
    differing_registers: dict = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        """The shape of a built-in guest's replay (docs/cli.md), steps being system calls;
        ``compared`` names what was compared in short tokens."""
        return {"from": self.source, "to": self.target, "match": self.match, "trigger": self.trigger,
                "steps": [self.syscalls], "target_steps": [self.target_syscalls],
                "compared": [_COMPARED_TOKENS[c] for c in self.compared],
                "differing_pages": [hex(p * PAGE_SIZE) for p in self.differing_pages[:64]],
                "differing_page_count": len(self.differing_pages),
                "differing_registers": {k: {"replayed": hex(v["replayed"]), "recorded": hex(v["recorded"])}
                                        for k, v in self.differing_registers.items()},
                "differences": self.differences, "note": self.note}


def replay_program(store: Store, source: int, target: int, *, kvm_path: str = DEFAULT_KVM_PATH,
                   timeout: float | None = None, lazy: bool = False) -> ProgramReplay:
    """Restore ``source`` and re-execute to ``target`` feeding back the recorded outside-world
    results; compare what the target's trigger allows (see ``compared``)."""
    spec = program_spec(store)
    path = store.path(target)
    if source not in path or source == target:
        raise ValueError(f"checkpoint {target} does not come after {source} in the same branch; "
                         "replay goes forward along one branch")
    between = path[path.index(source) + 1:]
    sstate, tstate = program_state(store, source), program_state(store, target)
    if sstate.get("exited"):
        raise ValueError(f"the program had already exited at checkpoint {source}")
    info = store.get(target)
    trigger = info.trigger
    entries = Log.parse(streams(store, between, LOG))
    driver = ProgramGuest.resuming(spec, sstate, file_loader(store, path), live_output=False)
    with load_machine(store, source, kvm_path=kvm_path, driver=driver, lazy=lazy) as m, lazy_errors(m):
        driver.restore()
        driver.kernel.log.replay(entries)
        t_count = int(tstate["syscalls"])
        if t_count > int(sstate["syscalls"]) or trigger == "exit":
            # an async target kicked before any further system call has nothing to run
            if trigger != "exit":
                m.pause_at_step(t_count)
            start_pinned(m, spec.cpu)
            m.wait_parked(timeout=timeout)
        k = driver.kernel
        diffs: list[str] = []
        if driver.fault and driver.fault.startswith("replay diverged"):
            diffs.append(driver.fault)
        compared = ["system-call count", "stdout", "stderr", "outside-world results consumed"]
        if k.count != t_count:
            diffs.append(f"reached system call {k.count}, the recording reached {t_count}")
        for name, fd in ((STDOUT, 1), (STDERR, 2)):
            want = streams(store, between, name)
            got = bytes(driver.output.interval[fd])
            if got != want:
                diffs.append(f"{name.split('/')[1]}: replay wrote {len(got)} bytes, the recording {len(want)}"
                             f"{' (same length, different bytes)' if len(got) == len(want) else ''}")
        if k.log.replay_left:
            diffs.append(f"{k.log.replay_left} recorded outside-world results were not consumed")
        pages: list[int] = []
        regs: dict = {}
        note = ""
        if trigger == "async":
            note = (f"checkpoint {target} was taken by a kick in the middle of computation (no system call "
                    f"within the interval), which no replay can stop at exactly; replay ran to its last "
                    f"system call ({t_count}) and compared only {', '.join(compared)}: memory, registers "
                    "and program state not compared")
        else:
            compared += ["memory (every page)", "registers", "program state (VMAs, fds, brk, frames)"]
            expected = np.empty((store.page_count, PAGE_SIZE), np.uint8)
            store.materialize(target, expected)
            pages = np.flatnonzero((m.memory.pages != expected).any(axis=1)).tolist()
            got = m.capture_vcpus()[0].registers()
            want = VcpuState.from_bytes(store.state(target, vcpu_state_name(0))).registers()
            regs = {n: {"replayed": got[n], "recorded": want[n]} for n in got if got[n] != want[n]}
            mine, theirs = dict(k.state()), dict(tstate)
            for d in (mine, theirs):
                d.pop("files", None)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    diffs.append(f"program state field {key!r} differs")
        if spec.cpu is not None and spec.cpu not in os.sched_getaffinity(0):
            note = (note + "; " if note else "") + (
                f"the recording ran on host CPU {spec.cpu}, which this replay may not use: `cpuid` is not "
                "trapped here, so what the program reads from it (the APIC id in leaf 1) can differ")
        match = not diffs and not pages and not regs
        return ProgramReplay(source, target, match, trigger, k.count, t_count, compared, pages, regs, diffs, note)


def program_info(store: Store, ckpt: int) -> dict:
    """What ``show`` adds for a program checkpoint."""
    spec = program_spec(store)
    st = program_state(store, ckpt)
    ex = st.get("exited")
    return {"program": spec.path, "exe": spec.exe, "argv": spec.argv, "root": spec.root,
            "syscalls": st.get("syscalls"), "exited": bool(ex), "exit_status": ex.get("status") if ex else None,
            "signal": ex.get("signal") if ex else None, "fault": ex.get("report") if ex else None,
            "output_bytes": st.get("output"), "unimplemented_syscalls": st.get("unimplemented", {})}




# -- the program's own terms: addresses, symbols, core files ------------------------------------

def _regs(store: Store, ckpt: int) -> tuple[dict, dict]:
    from ..kvm import structs as S
    st = VcpuState.from_bytes(store.state(ckpt, vcpu_state_name(0)))
    sr = S.KvmSregs.from_buffer_copy(st.sregs)
    sregs = {"cr3": sr.cr3, "fs_base": sr.fs.base, "gs_base": sr.gs.base, "cs": sr.cs.selector,
             "ss": sr.ss.selector, "ds": sr.ds.selector, "es": sr.es.selector, "fs": sr.fs.selector,
             "gs": sr.gs.selector}
    return st.registers(), sregs


def _reader(store: Store, ckpt: int):
    return lambda gpa, n: store.read(ckpt, gpa, n)


def symbols(store: Store, ckpt: int):
    from ..program.inspect import Symbols
    return Symbols.from_state(program_state(store, ckpt), file_loader(store, store.path(ckpt)))


def resolve_address(store: Store, ckpt: int, expr: str) -> tuple[int, int]:
    """(virtual address, size) of ``expr``: a number, SYMBOL or SYMBOL+OFFSET (size 0 for a number)."""
    try:
        return int(expr, 0), 0
    except ValueError:
        return symbols(store, ckpt).lookup(expr)


def read_program(store: Store, ckpt: int, expr: str, length: int | None) -> tuple[int, bytes]:
    """Bytes of program memory at ``expr`` (an address or a symbol) as they were at ``ckpt``."""
    from ..program.inspect import Unmapped, read_virtual
    program_spec(store)
    va, size = resolve_address(store, ckpt, expr)
    n = length if length is not None else (size or 256)
    _, sregs = _regs(store, ckpt)
    try:
        return va, read_virtual(_reader(store, ckpt), sregs["cr3"], va, n)
    except Unmapped as e:
        raise ValueError(f"checkpoint {ckpt}: {e}") from None


def program_history(store: Store, expr: str) -> dict:
    """Where the page holding ``expr`` changed, in program terms: for every checkpoint, the
    page's physical frame through that checkpoint's own page tables, and the checkpoints
    where its content (or its mapping) changed from the parent's."""
    from ..program.inspect import Unmapped, translate
    program_spec(store)
    cks = store.checkpoints()
    va, _ = resolve_address(store, cks[-1].id, expr)
    page_va = va & ~(PAGE_SIZE - 1)
    where: dict[int, int | None] = {}
    for c in cks:
        try:
            where[c.id] = translate(_reader(store, c.id), _regs(store, c.id)[1]["cr3"], page_va) >> 12
        except Unmapped:
            where[c.id] = None
    changed_at: dict[int, dict[int, str]] = {}
    for page in {p for p in where.values() if p is not None}:
        changed_at[page] = dict(store.history(page))
    rows = []
    for c in cks:
        page, parent = where[c.id], c.parent
        moved = parent is None or where.get(parent) != page
        if page is None:
            if moved:
                rows.append({"id": c.id, "hash": None, "gpa": None})
            continue
        if moved or c.id in changed_at[page]:
            h = changed_at[page].get(c.id) or _page_hash(store, c.id, page)
            rows.append({"id": c.id, "hash": h, "gpa": page << 12})
    return {"va": page_va, "checkpoints": rows}


def _page_hash(store: Store, ckpt: int, page: int) -> str:
    """The store's content hash of a page (the same hash ``history`` reports)."""
    from storage.codec import content_hash
    return content_hash(store.read_page(ckpt, page)).hex()


def write_program_core(store: Store, ckpt: int, out_path: str, *, force: bool = False) -> int:
    """An ELF core file of the program at ``ckpt`` (``gdb PROGRAM OUT`` opens it); mode 0600."""
    from ..program.inspect import write_core
    program_spec(store)
    state = program_state(store, ckpt)
    regs, sregs = _regs(store, ckpt)
    img = np.empty((store.page_count, PAGE_SIZE), np.uint8)
    store.materialize(ckpt, img)
    flat = img.reshape(-1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(out_path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{out_path} already exists (give --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        return write_core(f, read_phys=lambda gpa, n: flat[gpa:gpa + n].tobytes(), cr3=sregs["cr3"], state=state,
                          regs=regs, sregs=sregs, get_file=file_loader(store, store.path(ckpt)))


def virtual_pages(store: Store, ckpt: int, pages: list[int]) -> dict[int, int]:
    """Physical page number -> the program's virtual address of it at ``ckpt`` (for ``diff``)."""
    from ..program.inspect import reverse_map
    rmap = reverse_map(_reader(store, ckpt), _regs(store, ckpt)[1]["cr3"])
    return {p: rmap[p] for p in pages if p in rmap}
