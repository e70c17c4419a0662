"""The VMM: a VM with guest RAM, one thread per vCPU, pause/resume, state.

Threading model. Each vCPU has a thread that loops on KVM_RUN. A vCPU *parks*
(waits on the machine's condition variable, out of KVM_RUN) when

* the machine is paused (:meth:`Machine.pause` kicks every vCPU and returns
  only once all are parked), or
* it *holds*: it reached its step target at a yield exit
  (:meth:`Machine.pause_at_step`) or the guest's stop port
  (mailbox ``stop_at``). :meth:`Machine.wait_parked` waits for all to hold.

``kvm_run.immediate_exit`` is set by every kick and cleared only under the
condition lock when a parked vCPU is released, so a kick racing with the
thread's own check is never lost (see :mod:`snapctl.kvm.vcpu`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..kvm import KvmIoctlError, System, Vcpu
from ..kvm.constants import (
    DEFAULT_KVM_PATH,
    EXIT_NAMES,
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
)
from . import guests as G
from . import layout as L
from .dirty import DirtyTracker, make_tracker
from .driver import GuestDriver, IoVerdict
from .memory import GuestMemory, validate_mem_size
from .state import VcpuState, capture_vcpu, restore_vcpu

TRACKING_MODES = ("ring", "bitmap", "none")
#: ... of which a store's machine can have (`run` takes checkpoints: it tracks).
STORED_TRACKING_MODES = ("ring", "bitmap")
#: ``MachineConfig.guest`` of a guest brought by a :class:`GuestDriver` (a user's program).
DRIVEN_GUEST = "program"


def check_tracking(mode: str, *, stored: bool = False) -> None:
    """Raise ValueError unless ``mode`` is a tracking mode (``stored``: one a store's machine can have)."""
    modes = STORED_TRACKING_MODES if stored else TRACKING_MODES
    if mode not in modes:
        raise ValueError(f"unknown tracking mode {mode!r}; use one of: {', '.join(modes)}")


#: Longest wait without waking the main thread (so that it answers Ctrl-C).
_WAIT_SLICE = 0.25


class MachineError(Exception):
    """The machine stopped: a guest fault, an unexpected exit, or a VMM error."""


@dataclass
class MachineConfig:
    """Everything needed to build the same machine again (stored with checkpoints)."""

    guest: str = "stamp"
    mem_size: int = 64 << 20
    vcpus: int = 1
    seed: int = 1
    steps_per_yield: int = 1000
    tracking: str = "ring"
    ring_entries: int = 4096
    params: dict = field(default_factory=dict)
    #: for ``guest == "program"``: what the driver needs to build it again (opaque here)
    program: dict | None = None

    def validate(self) -> None:
        validate_mem_size(self.mem_size)
        check_tracking(self.tracking)
        if self.guest == DRIVEN_GUEST:
            if self.vcpus != 1:
                raise ValueError(f"a program guest has one vCPU, got {self.vcpus}")
            if not isinstance(self.program, dict):
                raise ValueError("a program guest needs its program description")
            return
        guest = G.get_guest(self.guest)
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= L.MAX_VCPUS:
            raise ValueError(f"vCPU count must be 1..{L.MAX_VCPUS}, got {self.vcpus}")
        if not 1 <= self.seed < (1 << 64):
            raise ValueError(f"seed must be 1..2^64-1 (xorshift never leaves 0), got {self.seed}")
        if not 1 <= self.steps_per_yield < (1 << 63):
            raise ValueError(f"steps per yield must be at least 1, got {self.steps_per_yield}")
        if self.data_pages_per_vcpu < 1:
            raise ValueError(f"{self.mem_size >> 20} MiB leaves no data pages for each of {self.vcpus} vCPUs")
        guest.param_values(self.params, self.data_pages_per_vcpu)

    @property
    def data_pages(self) -> int:
        return (self.mem_size - L.SYSTEM_SIZE) // L.PAGE

    @property
    def data_pages_per_vcpu(self) -> int:
        return self.data_pages // self.vcpus

    def data_region(self, vcpu: int) -> tuple[int, int]:
        """(gpa of first data page, pages) of vCPU ``vcpu``'s part of the data area."""
        per = self.data_pages_per_vcpu
        return L.SYSTEM_SIZE + vcpu * per * L.PAGE, per

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["program"] is None:
            del d["program"]
        d["memslots"] = [
            {"slot": 0, "gpa": 0, "size": L.SYSTEM_SIZE, "name": "system"},
            {"slot": 1, "gpa": L.SYSTEM_SIZE, "size": self.mem_size - L.SYSTEM_SIZE, "name": "data"},
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MachineConfig":
        """The configuration stored with a store's checkpoints, type-checked
        field by field (a store may come from anyone): a wrong one is a
        ValueError naming it. Ranges are checked by :meth:`validate`."""
        if not isinstance(d, dict):
            raise ValueError("stored config is not an object")
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("mem_size", "vcpus", "seed", "steps_per_yield", "ring_entries"):
            if k in kw and type(kw[k]) is not int:
                raise ValueError(f"stored config: {k} is not an integer ({kw[k]!r:.40})")
        for k in ("guest", "tracking"):
            if k in kw and type(kw[k]) is not str:
                raise ValueError(f"stored config: {k} is not a string ({kw[k]!r:.40})")
        if "vcpus" in kw and not 1 <= kw["vcpus"] <= L.MAX_VCPUS:
            raise ValueError(f"stored config: vcpus {kw['vcpus']} is not 1..{L.MAX_VCPUS}")
        if "tracking" in kw and kw["tracking"] not in STORED_TRACKING_MODES:
            raise ValueError(f"stored config: unknown tracking mode {kw['tracking']!r:.40}")
        params = kw.get("params", {})
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in params.items()):
            raise ValueError("stored config: params is not an object of integers")
        if kw.get("guest") == DRIVEN_GUEST:
            # what the program layer needs: an object here, its fields checked by that layer
            # (snapctl.program.ProgramSpec.from_dict) before anything uses them
            if not isinstance(d.get("program"), dict):
                raise ValueError("stored config: program is not an object")
        elif "guest" in kw and kw["guest"] not in G.GUESTS:
            raise ValueError(f"stored config: unknown guest {kw['guest']!r:.40}")
        return cls(**kw)


@dataclass
class _Runner:
    index: int
    vcpu: Vcpu
    thread: threading.Thread | None = None
    parked: bool = True
    hold: bool = False
    exited: bool = False
    pending_io: bool = False
    step_target: int | None = None
    yields: int = 0
    exits: int = 0
    ring_full: int = 0
    finished: bool = False
    io: object = None  # the vCPU's kvm_run port-I/O exit view (one ctypes object, reused)

    def __post_init__(self) -> None:
        self.io = self.vcpu.run_struct.exit.io


class Machine:
    """A running (or runnable) VM. Use as a context manager.

    ``Machine(config)`` boots the built-in guest: page tables, GDT, code and
    mailboxes are written through :class:`GuestMemory` (so recorded as VMM
    writes) and each vCPU starts at the code address in 64-bit CPL 3.
    ``Machine(config, boot=False)`` builds the same VM without a guest, for
    :meth:`restore_state`.
    """

    def __init__(self, config: MachineConfig, *, kvm_path: str = DEFAULT_KVM_PATH, boot: bool = True,
                 driver: GuestDriver | None = None, memory: GuestMemory | None = None,
                 register_in_background: bool = False):
        """``register_in_background``: guest RAM's memory slots are registered with KVM on
        a thread of their own while the caller goes on (a restore reads its checkpoint
        meanwhile: KVM's set-up of a slot grows with its size, ~0.5 ms a GiB here); whatever
        needs them -- start, boot, restoring vCPU state, close -- waits for it
        (:meth:`memory_registered`)."""
        config.validate()
        if memory is not None and memory.size != config.mem_size:
            raise MachineError(f"given guest memory is {memory.size} bytes, the machine has {config.mem_size}")
        if (driver is None) != (config.guest != DRIVEN_GUEST):
            raise MachineError(f"guest {config.guest!r} {'needs' if driver is None else 'takes no'} guest driver")
        self.config = config
        self.driver = driver
        self._closed = False
        self._cond = threading.Condition()
        self._pause_req = False
        self._stopping = False
        self._error: BaseException | None = None
        self.on_yield = None  # optional callback(vcpu_index, step) on the vCPU thread
        self.system = System(kvm_path)
        self.vm = None
        self.memory = None
        self._given_memory = memory  # already filled (a standby's warm memory): adopted, closed with us
        self.tracker: DirtyTracker | None = None
        self._runners: list[_Runner] = []
        #: a ``storage.lazy.LazyImage`` while guest RAM is served lazily (``load_machine(lazy=True)``)
        self.lazy = None
        self._slots: threading.Thread | None = None
        self._slots_error: BaseException | None = None
        try:
            self._build(register_in_background)
            if driver is not None:
                driver.attach(self)
            if boot:
                driver.boot(self) if driver is not None else self._boot()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------------
    def _build(self, register_in_background: bool) -> None:
        cfg = self.config
        self.vm = self.system.create_vm()
        try:
            self.vm.set_tss_addr()
        except KvmIoctlError:
            pass  # only VMX needs it; PVM and SVM may refuse
        if cfg.tracking == "ring":
            self.ring_limits = self.vm.enable_dirty_ring(cfg.ring_entries)
        elif cfg.tracking == "bitmap":
            self.vm.enable_manual_dirty_log_protect()
        self.memory = self._given_memory if self._given_memory is not None else GuestMemory(cfg.mem_size)
        if register_in_background:
            self._slots = threading.Thread(target=self._register_memory, name="memslots", daemon=True)
            self._slots.start()
        else:
            self._register_memory()
            self.memory_registered()
        self.tracker = make_tracker(cfg.tracking, self.vm, self.memory)
        self.msr_indices = self.system.msr_index_list()
        self._cpuid = self.system.supported_cpuid()
        for i in range(cfg.vcpus):
            v = self.vm.create_vcpu(i)
            self._runners.append(_Runner(i, v))

    def _register_memory(self) -> None:
        log = self.config.tracking != "none"
        try:
            for r in self.memory.regions:
                self.vm.set_memory_region(r.slot, r.gpa, self.memory.host_addr + r.gpa, r.size, log_dirty=log)
        except BaseException as e:   # noqa: BLE001 - raised by memory_registered on the caller's thread
            self._slots_error = e

    def memory_registered(self) -> None:
        """Wait until guest RAM's memory slots are registered with KVM; raise what failed."""
        t = self._slots
        if t is not None:           # (join twice is harmless: two waiting threads both may)
            t.join()
            self._slots = None
        if self._slots_error is not None:
            raise self._slots_error

    def _boot(self) -> None:
        self.memory_registered()
        cfg, mem = self.config, self.memory
        guest = G.get_guest(cfg.guest)
        code = guest.code()
        if len(code) > L.CODE_MAX:
            raise MachineError(f"guest {cfg.guest} code is {len(code)} bytes, more than {L.CODE_MAX}")
        for page in L.write_page_tables(mem.flat, cfg.mem_size) + L.write_gdt(mem.flat):
            mem.note_written(np.array([page]))
        mem.write(L.CODE_GPA, code)
        for r in self._runners:
            base, pages = cfg.data_region(r.index)
            p1, p2 = guest.param_values(cfg.params, pages)
            mb = L.mailbox_gpa(r.index)
            fields = np.zeros(16, np.uint64)
            fields[G.MB_MAGIC // 8] = G.MAILBOX_MAGIC
            fields[G.MB_SEED // 8] = G.vcpu_seed(cfg.seed, r.index)
            fields[G.MB_K // 8] = cfg.steps_per_yield
            fields[G.MB_DATA_BASE // 8] = base
            fields[G.MB_DATA_PAGES // 8] = pages
            fields[G.MB_PARAM1 // 8] = p1
            fields[G.MB_PARAM2 // 8] = p2
            mem.write(mb, fields)
            v = r.vcpu
            v.set_cpuid2(self._cpuid)
            v.set_sregs(L.long_mode_sregs(v.get_sregs()))
            regs = v.get_regs()
            regs.rip, regs.rdi, regs.rsp = L.CODE_GPA, mb, L.stack_top(r.index)
            regs.rflags = L.RFLAGS_RESERVED1 | L.RFLAGS_IOPL3
            v.set_regs(regs)

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start one thread per vCPU; the guest runs until paused, held or stopped."""
        self.memory_registered()
        with self._cond:
            for r in self._runners:
                if r.thread is not None:
                    raise MachineError("machine already started")
                r.parked = False
                r.thread = threading.Thread(target=self._loop, args=(r,), name=f"vcpu{r.index}", daemon=True)
        for r in self._runners:
            r.thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        t = self._slots
        if t is not None:               # the VM's fd and the memory stay until it is done with them
            t.join()
        with self._cond:
            self._stopping = True
            for r in self._runners:
                r.vcpu.kick()
            self._cond.notify_all()
        for r in self._runners:
            if r.thread is not None and r.thread is not threading.current_thread():
                r.thread.join()
        if self.driver is not None:
            self.driver.close()
        if self.tracker is not None:
            self.tracker.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        self.system.close()

    # -- the vCPU thread -------------------------------------------------------------------
    def _loop(self, r: _Runner) -> None:
        v = r.vcpu
        v.thread_ident = threading.get_ident()
        if self.lazy is not None:       # about to enter the guest: a lazy fill need not make way any more
            self.lazy.started()
        try:
            while True:
                # Unlocked fast path: a pause sets _pause_req under the lock *before* it kicks, and
                # the kick's immediate_exit makes the KVM_RUN below return at once, so a flag
                # read stale here is seen on the next turn; nothing is lost.
                if (self._pause_req or r.hold or self._stopping) and not self._park(r):
                    return
                reason = v.run()
                r.exits += 1
                r.pending_io = False
                if reason == KVM_EXIT_IO:
                    self._on_io(r)
                    if r.finished:
                        return
                elif reason == KVM_EXIT_INTR:
                    continue
                elif reason == KVM_EXIT_DIRTY_RING_FULL:
                    r.ring_full += 1
                    self.tracker.on_ring_full(v)
                else:
                    raise MachineError(self._describe_exit(r, reason))
        except BaseException as e:  # the machine stops; the error is re-raised to the controller
            with self._cond:
                if self._error is None:
                    self._error = e if isinstance(e, MachineError) else MachineError(f"vCPU {r.index}: {e}")
                    self._error.__cause__ = e if not isinstance(e, MachineError) else None
                self._stopping = True
                for other in self._runners:
                    if other is not r:
                        other.vcpu.kick()
        finally:
            with self._cond:
                r.parked = True
                r.exited = True
                # Every kick happens under this lock: none may signal this thread once it is
                # gone (pthread_kill on an ended thread whose stack glibc has unmapped segfaults).
                v.thread_ident = None
                self._cond.notify_all()

    def _park(self, r: _Runner) -> bool:
        """Park the vCPU while paused or holding; False when the machine is stopping."""
        v = r.vcpu
        with self._cond:
            if self._pause_req or r.hold or self._stopping:
                if r.pending_io and not self._stopping:
                    # Finish the OUT (RIP past it) so captured state is clean.
                    v.complete_pending_io()
                    r.pending_io = False
                r.parked = True
                self._cond.notify_all()
                while (self._pause_req or r.hold) and not self._stopping:
                    # resume() clears `parked`; if a new pause came before we woke,
                    # say so again or that pause() would wait forever.
                    if not r.parked:
                        r.parked = True
                        self._cond.notify_all()
                    self._cond.wait()
                if self._stopping:
                    return False
                r.parked = False
                v.run_struct.immediate_exit = 0
        return True

    def _on_io(self, r: _Runner) -> None:
        io = r.io
        r.pending_io = True
        if self.driver is not None:
            verdict = self.driver.on_io(r.index, io)
            if verdict is IoVerdict.YIELD:
                self._yielded(r, self.driver.step(r.index))
            elif verdict is IoVerdict.EXIT:
                r.pending_io = False
                r.finished = True
            return
        step = self.step(r.index)
        if io.direction == KVM_EXIT_IO_OUT and io.port == G.PORT_YIELD:
            self._yielded(r, step)
        elif io.direction == KVM_EXIT_IO_OUT and io.port == G.PORT_STOP:
            with self._cond:
                r.hold = True
        else:
            kind = "OUT" if io.direction == KVM_EXIT_IO_OUT else "IN"
            raise MachineError(self._describe_exit(r, KVM_EXIT_IO, f"{kind} to unknown port {io.port:#x}"))

    def _yielded(self, r: _Runner, step: int) -> None:
        r.yields += 1
        if self.on_yield is not None:
            self.on_yield(r.index, step)
        if r.step_target is None:   # read without the lock: targets are set while parked or
            return                  # before a wait; one missed here is seen at the next yield
        with self._cond:
            if r.step_target is not None and step >= r.step_target:
                r.step_target = None
                r.hold = True

    def _describe_exit(self, r: _Runner, reason: int, detail: str = "") -> str:
        name = EXIT_NAMES.get(reason, "unknown")
        run = r.vcpu.run_struct
        if reason == KVM_EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            detail = f"suberror {ie.suberror}, data {[hex(x) for x in ie.data[:min(ie.ndata, 4)]]}"
        elif reason == KVM_EXIT_FAIL_ENTRY:
            detail = f"hardware entry failure reason {run.exit.fail_entry.hardware_entry_failure_reason:#x}"
        try:
            regs = r.vcpu.get_regs()
            rs = " ".join(f"{n}={getattr(regs, n):#x}" for n in ("rip", "rsp", "rax", "rbx", "rdx", "rdi", "rflags"))
        except Exception as e:  # the registers are a courtesy; never mask the exit itself
            rs = f"(registers unreadable: {e})"
        return f"vCPU {r.index} stopped: unexpected exit {name} ({reason}){': ' + detail if detail else ''}; {rs}"

    # -- control from other threads ----------------------------------------------------------
    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error

    def fail(self, error: BaseException) -> None:
        """Stop the machine from outside its vCPU threads: every vCPU is kicked and every later
        pause/wait raises ``error`` (a MachineError carrying its message). Used when guest RAM
        cannot be served (a lazy restore's damaged page): that cause replaces the EFAULT a vCPU
        on the page may have reported first."""
        with self._cond:
            err = error if isinstance(error, MachineError) else MachineError(str(error))
            if error is not err:
                err.__cause__ = error
            self._error = err
            self._stopping = True
            for r in self._runners:
                r.vcpu.kick()
            self._cond.notify_all()

    def pause(self, timeout: float | None = 30.0) -> None:
        """Kick every vCPU out of KVM_RUN; return once all are parked."""
        with self._cond:
            self._check_error()
            self._pause_req = True
            for r in self._runners:
                if not r.parked:
                    r.vcpu.kick()
            if not self._cond.wait_for(lambda: all(r.parked for r in self._runners) or self._error, timeout):
                raise MachineError(f"vCPUs did not stop within {timeout} s ({self._runner_report()})")
            self._check_error()

    def resume(self, *, keep_holds: bool = False) -> None:
        """Release every parked or holding vCPU (``keep_holds``: release only the
        paused ones; a vCPU holding at its step target or stop port stays)."""
        with self._cond:
            self._check_error()
            self._pause_req = False
            for r in self._runners:
                if keep_holds and r.hold:
                    continue
                r.hold = False
                # Cleared here, not by the waking thread: a wait_parked() right
                # after resume() must not see the stale "parked" of the old pause.
                if r.thread is not None and not r.exited:
                    r.parked = False
            self._cond.notify_all()

    def _per_vcpu(self, value: int | list[int]) -> list[int]:
        vals = list(value) if isinstance(value, (list, tuple)) else [value] * len(self._runners)
        if len(vals) != len(self._runners):
            raise ValueError(f"need one value per vCPU ({len(self._runners)}), got {len(vals)}")
        return vals

    def pause_at_step(self, target: int | list[int]) -> None:
        """Ask each vCPU to hold at its first yield where step >= target (sync pause).
        ``target`` may be one value for all vCPUs or one per vCPU."""
        targets = self._per_vcpu(target)
        with self._cond:
            for r, t in zip(self._runners, targets):
                r.step_target = t

    def run_to_steps(self, steps: list[int], *, at_yield: bool, timeout: float | None = 60.0) -> None:
        """Start the machine and return once every vCPU holds at ``steps``: at its first
        yield with step >= target (``at_yield``: where a sync checkpoint was taken), or
        exactly after that step (the guest's stop port; the mailbox's stop field is then
        put back as it was, so guest memory holds only what the guest wrote)."""
        saved = None
        if at_yield:
            self.pause_at_step(steps)
        else:
            if self.driver is None:
                saved = [self.memory.read_u64(L.mailbox_gpa(r.index) + G.MB_STOP_AT) for r in self._runners]
            self.set_stop_at(steps)
        self.start()
        self.wait_parked(timeout=timeout)
        if saved is not None:
            for r, v in zip(self._runners, saved):
                self.memory.write_u64(L.mailbox_gpa(r.index) + G.MB_STOP_AT, v)

    def set_stop_at(self, step: int | list[int]) -> None:
        """Make each vCPU's guest hold exactly after step ``step`` (a VMM write to the mailbox;
        a driven guest holds at the yield where its step reaches it)."""
        if self.driver is not None:
            self.pause_at_step(step)
            return
        for r, s in zip(self._runners, self._per_vcpu(step)):
            self.memory.write_u64(L.mailbox_gpa(r.index) + G.MB_STOP_AT, s)

    def wait_parked(self, timeout: float | None = 60.0, *, or_timeout: bool = False) -> bool:
        """Wait until every vCPU is parked (holding at a target/stop, or paused).
        ``or_timeout``: return False at the timeout instead of raising."""
        done = lambda: all(r.parked for r in self._runners) or self._error  # noqa: E731
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            # In slices: a SIGINT is often delivered to a vCPU thread, and
            # Python runs its handler only when the main thread wakes up, so
            # an endless wait would ignore Ctrl-C (a guest that never holds).
            while not done():
                left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
                if left <= 0:
                    if or_timeout:
                        return False
                    raise MachineError(f"vCPUs did not reach their hold point within {timeout} s "
                                       f"({self._runner_report()})")
                self._cond.wait(left)
            self._check_error()
            return True

    def holding(self) -> list[bool]:
        """Per vCPU: is it holding at its step target or stop port?"""
        with self._cond:
            return [r.hold for r in self._runners]

    def _runner_report(self) -> str:
        """Each vCPU's control state and mailbox, for a timeout's message."""
        parts = []
        for r in self._runners:
            if self.driver is not None:
                parts.append(f"vCPU {r.index}: parked={r.parked} hold={r.hold} exited={r.exited} "
                             f"target={r.step_target} exits={r.exits} step={self.driver.step(r.index)}")
                continue
            try:
                mb = L.mailbox_gpa(r.index)
                where = f"step {self.memory.read_u64(mb + G.MB_STEP)}, stop_at {self.memory.read_u64(mb + G.MB_STOP_AT)}"
            except Exception as e:  # a courtesy: never mask the timeout itself
                where = f"mailbox unreadable: {e}"
            parts.append(f"vCPU {r.index}: parked={r.parked} hold={r.hold} exited={r.exited} "
                         f"target={r.step_target} exits={r.exits} yields={r.yields} "
                         f"ring_full={r.ring_full}, {where}")
        return "; ".join(parts)

    def vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (for a guest driver: its thread is the only one that runs it)."""
        return self._runners[index].vcpu

    def held(self) -> bool:
        """Every vCPU is parked at a hold point it reached itself (a step target), or finished,
        as opposed to stopped mid-instruction by a kick."""
        with self._cond:
            return all(r.finished or (r.parked and r.hold) for r in self._runners)

    def wait_parked_for(self, timeout: float) -> bool:
        """Like :meth:`wait_parked` but returns False instead of raising when time runs out."""
        return self.wait_parked(timeout, or_timeout=True)

    @property
    def paused(self) -> bool:
        """Every vCPU is out of KVM_RUN (paused, holding, finished, or not started)."""
        return all(r.parked for r in self._runners)

    # -- state ------------------------------------------------------------------------------------
    def step(self, vcpu: int = 0) -> int:
        """The guest's step counter for ``vcpu`` (from its mailbox, or its driver)."""
        if self.driver is not None:
            return self.driver.step(vcpu)
        return self.memory.read_u64(L.mailbox_gpa(vcpu) + G.MB_STEP)

    @property
    def finished(self) -> bool:
        """Every vCPU's guest has ended (a driven guest's program exited)."""
        return all(r.finished for r in self._runners)

    def guest_states(self) -> dict[str, bytes]:
        """The driver's own state for a checkpoint (must be paused); {} for built-in guests."""
        self._require_parked()
        return self.driver.save() if self.driver is not None else {}

    def steps(self) -> list[int]:
        return [self.step(i) for i in range(self.config.vcpus)]

    def mailbox_gpa(self, vcpu: int) -> int:
        return L.mailbox_gpa(vcpu)

    def _require_parked(self) -> None:
        if not self.paused:
            raise MachineError("the machine must be paused for this")

    def collect_dirty(self) -> np.ndarray:
        """Guest pages written since the last collect (must be paused): sorted, unique."""
        self._require_parked()
        self.memory_registered()
        return self.tracker.collect()

    def take_early_copies(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pages, contents)] pre-copied at ring-full exits since the last call, oldest
        first (see :meth:`DirtyTracker.take_early_copies`); O(1)."""
        return self.tracker.take_early_copies()

    def set_precopy(self, on: bool) -> None:
        """Copy the pages harvested at ring-full exits right after their reset (pre-copy)."""
        self.tracker.precopy = on

    def collect_timings(self) -> dict[str, float]:
        """The last :meth:`collect_dirty`'s harvest and reset times, in ms."""
        st = self.tracker.stats
        return {"harvest_ms": st.last_harvest_ms, "reset_ms": st.last_reset_ms}

    def count_dirty_per_vcpu(self, on: bool) -> None:
        """Count the distinct pages each vCPU writes, per collect (ring tracking; costs a
        unique() per vCPU inside the pause, so it is off for checkpoints)."""
        self.tracker.count_per_vcpu = on

    def dirty_pages_per_vcpu(self) -> dict[int, int]:
        """vCPU id -> distinct pages it wrote, summed over collects (while counted)."""
        return dict(self.tracker.stats.per_vcpu_pages)

    def capture_vcpus(self) -> list[VcpuState]:
        self._require_parked()
        return [capture_vcpu(r.vcpu, self.msr_indices) for r in self._runners]

    def restore_state(self, image: np.ndarray | None, vcpu_states: list[VcpuState]) -> list[int]:
        """Load a memory image and vCPU states into a machine built with ``boot=False``
        (``image=None``: RAM was already filled through ``memory.pages``).
        Returns MSRs the kernel refused. Dirty tracking starts clean from this image."""
        self.memory_registered()
        if any(r.thread is not None for r in self._runners):
            raise MachineError("restore_state needs a machine that has not started")
        if len(vcpu_states) != len(self._runners):
            raise MachineError(f"state has {len(vcpu_states)} vCPUs, machine has {len(self._runners)}")
        if image is not None:
            self.memory.load_image(image)
        self.memory.take_vmm_written()  # the image is the baseline, not a delta
        refused = []
        for r, st in zip(self._runners, vcpu_states):
            refused += restore_vcpu(r.vcpu, st)
        return refused

    def check_mailboxes(self, steps: list[int]) -> None:
        """After a restore: each vCPU's mailbox must be the one this config
        boots (magic, K, data region, parameters) and say the recorded step
        -- a forged mailbox could otherwise make the guest run past every
        stop and yield target. Built-in guests only."""
        cfg = self.config
        if cfg.guest not in G.GUESTS:
            return
        guest = G.get_guest(cfg.guest)
        for r in self._runners:
            base, pages = cfg.data_region(r.index)
            p1, p2 = guest.param_values(cfg.params, pages)
            want = {G.MB_MAGIC: ("magic", G.MAILBOX_MAGIC), G.MB_K: ("steps per yield", cfg.steps_per_yield),
                    G.MB_DATA_BASE: ("data base", base), G.MB_DATA_PAGES: ("data pages", pages),
                    G.MB_PARAM1: ("param1", p1), G.MB_PARAM2: ("param2", p2),
                    G.MB_STEP: ("step", steps[r.index])}
            mb = L.mailbox_gpa(r.index)
            for off, (name, value) in want.items():
                got = self.memory.read_u64(mb + off)
                if got != value % (1 << 64):
                    raise MachineError(f"vCPU {r.index}: the restored mailbox's {name} is {got:#x}, "
                                       f"expected {value:#x} (the checkpoint is damaged or forged)")

    def stats(self) -> dict:
        return {
            "exits": sum(r.exits for r in self._runners),
            "yields": sum(r.yields for r in self._runners),
            "ring_full_exits": sum(r.ring_full for r in self._runners),
        }
