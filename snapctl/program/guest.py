"""A user's program as the machine's guest: the :class:`~snapctl.machine.driver.GuestDriver`.

The vCPU thread calls :meth:`ProgramGuest.on_io` at every port exit: a
system call (port 0xF0, from the trampoline) or an exception (port 0xF1,
from the IDT stubs). Registers move through the kvm_run sync-regs page, so a
system call costs one KVM_RUN round trip and no register ioctl. Every
system call is a *yield*: the machine can hold there exactly, which is how
interval checkpoints land on system-call boundaries and how replay stops
where the recording stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..machine.driver import IoVerdict
from ..machine.vmm import MachineError
from . import fs, loader, platform
from .kernel import FileCache, Kernel, Output, ProgramExit, ReplayDivergence
from .mm import PTE_ADDR, AddressSpace, Frames, OutOfMemory

MASK64 = (1 << 64) - 1
STATE = "program"
LOG, STDOUT, STDERR = "stream/log", "stream/stdout", "stream/stderr"
FILE_PREFIX = "inherited/file/"
#: CPU exceptions -> (signal number, signal name, what happened)
SIGNALS = {0: (8, "SIGFPE", "divide error"), 1: (5, "SIGTRAP", "debug"), 3: (5, "SIGTRAP", "breakpoint"),
           4: (11, "SIGSEGV", "overflow"), 5: (11, "SIGSEGV", "bound range"), 6: (4, "SIGILL", "invalid opcode"),
           7: (8, "SIGFPE", "device not available"), 8: (11, "SIGSEGV", "double fault"),
           10: (11, "SIGSEGV", "invalid TSS"), 11: (7, "SIGBUS", "segment not present"),
           12: (7, "SIGBUS", "stack fault"), 13: (11, "SIGSEGV", "general protection fault"),
           14: (11, "SIGSEGV", "page fault"), 16: (8, "SIGFPE", "x87 floating-point error"),
           17: (7, "SIGBUS", "alignment check"), 19: (8, "SIGFPE", "SIMD floating-point error")}


@dataclass
class ProgramSpec:
    """What a program run is: stored as ``config["program"]`` so the store can rebuild it."""

    path: str                      #: host path the binary was read from
    exe: str                       #: the program's own path, as it sees it (AT_EXECFN, /proc/self/exe)
    argv: list[str]
    env: list[str] = field(default_factory=list)
    root: str = "."
    stdin: str | None = None       #: host file for fd 0 (None: snapctl's own stdin)
    hash: str = ""                 #: sha256 of the binary
    ids: dict = field(default_factory=lambda: {"pid": 1000, "uid": 0, "gid": 0})
    #: host CPU the program's vCPU runs on: `cpuid` is not trapped on this platform, and
    #: libc keeps what it returned (leaf 1 holds the CPU's APIC id), so a replay or restore
    #: runs on the same CPU as the recording (docs/programs.md)
    cpu: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramSpec":
        if not isinstance(d, dict):
            raise ValueError("program description is not a dict")
        names = set(cls.__dataclass_fields__)
        spec = cls(**{k: v for k, v in d.items() if k in names})
        strs = lambda v: isinstance(v, list) and len(v) <= 1 << 16 and all(isinstance(x, str) for x in v)  # noqa: E731
        checks = {"path": isinstance(spec.path, str), "exe": isinstance(spec.exe, str), "argv": strs(spec.argv),
                  "env": strs(spec.env), "root": isinstance(spec.root, str),
                  "stdin": spec.stdin is None or isinstance(spec.stdin, str), "hash": isinstance(spec.hash, str),
                  "ids": isinstance(spec.ids, dict) and set(spec.ids) == {"pid", "uid", "gid"}
                  and all(type(v) is int and 0 <= v < 1 << 32 for v in spec.ids.values()),
                  "cpu": spec.cpu is None or (type(spec.cpu) is int and 0 <= spec.cpu < 1 << 16)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"stored program description: field {bad[0]!r} has the wrong type or range")
        return spec


class _Cpu:
    """What system calls may do to the vCPU beyond its general registers."""

    def __init__(self, vcpu):
        self.vcpu = vcpu

    def set_segment_base(self, seg: str, value: int) -> None:
        sr = self.vcpu.get_sregs()
        getattr(sr, seg).base = value
        self.vcpu.set_sregs(sr)

    def segment_base(self, seg: str) -> int:
        return getattr(self.vcpu.get_sregs(), seg).base


class ProgramGuest:
    """The driver. Build with :meth:`new` (a fresh run) or :meth:`resuming` (a checkpoint)."""

    name = "program"

    def __init__(self, spec: ProgramSpec, files: FileCache, *, live_output: bool, stdin=None,
                 state: dict | None = None):
        self.spec = spec
        self.files = files
        self.output = Output(live_output)
        self._stdin = stdin
        self._state = state
        self.kernel: Kernel | None = None
        self.machine = None
        self._checked_entry = state is not None and state["syscalls"] > 0
        self.fault: str | None = None

    @classmethod
    def new(cls, spec: ProgramSpec, exe_data: bytes, *, live_output: bool = True, stdin=None) -> "ProgramGuest":
        files = FileCache()
        spec.hash = files.add(exe_data)
        return cls(spec, files, live_output=live_output, stdin=stdin)

    @classmethod
    def resuming(cls, spec: ProgramSpec, state: dict, file_loader, *, live_output: bool, stdin=None) -> "ProgramGuest":
        """Continue from a checkpoint's ``state``; ``file_loader(hash)`` reads stored file contents."""
        files = FileCache(file_loader)
        return cls(spec, files, live_output=live_output, stdin=stdin, state=state)

    # -- GuestDriver ------------------------------------------------------------------------
    def attach(self, machine) -> None:
        self.machine = machine
        self.vcpu = machine.vcpu(0)
        self.regs = self.vcpu.use_sync_regs()
        mem = machine.memory
        sandbox = fs.Sandbox(self.spec.root, self.spec.path, self.spec.exe)
        if self._state is None:
            aspace = AddressSpace(mem, Frames(mem.npages))
        else:
            aspace = AddressSpace(mem, Frames.from_state(mem.npages, self._state["frames"]), self._state["pml4"])
        k = Kernel(aspace, self.files, sandbox, self.output, exe_path=self.spec.exe, argv=self.spec.argv,
                   env=self.spec.env, stdin=self._stdin, ids=self.spec.ids)
        k.cpu = _Cpu(self.vcpu)
        k.mmap_top = loader.MMAP_TOP
        self.kernel = k

    def boot(self, machine) -> None:
        k = self.kernel
        platform.build_kernel_area(k.mm)
        exe = (self.spec.exe, self.spec.hash, self.files.get(self.spec.hash))
        interp = None
        info = loader.parse(exe[2], self.spec.path)
        if info.interp:
            try:
                opened = k.sandbox.open(info.interp.encode(), cwd=b"/", flags=0)
            except OSError as e:
                raise loader.LoadError(f"{self.spec.path}: its interpreter {info.interp} cannot be opened under "
                                       f"--root {self.spec.root} ({os.strerror(e.errno or 0)}); "
                                       "a dynamically linked program needs --root / (or a root holding its libraries)"
                                       ) from None
            if opened.kind != "file":
                raise loader.LoadError(f"{self.spec.path}: its interpreter {info.interp} is not a file")
            interp = (opened.guest_path.decode(), self.files.add(opened.data), opened.data)
        cpuid = platform.guest_cpuid(machine.system.supported_cpuid())
        try:
            done = loader.load(k.mm, exe, interp, argv=self.spec.argv, env=self.spec.env,
                               random16=os.urandom(16), hwcap=platform.hwcap(cpuid), ids=self.spec.ids)
        except OutOfMemory as e:
            raise loader.LoadError(f"{self.spec.path}: --mem {machine.memory.size >> 20} MiB is too small to load "
                                   f"it ({e}); give more --mem") from None
        k.brk_start = k.brk_cur = done.brk
        k.images, k.auxv = done.images, done.auxv
        platform.setup_vcpu(self.vcpu, cpuid, k.mm.pml4, done.entry, done.sp)

    def restore(self) -> None:
        """After guest memory and vCPU state were restored: rebuild what mirrors them."""
        k = self.kernel
        k.mm.rebuild()
        k.load_state(self._state)

    def on_io(self, vcpu: int, io) -> IoVerdict:
        # The hot path of every system call: keep it lean (bench: program syscall round trip).
        regs = self.regs
        k = self.kernel
        if io.port == platform.PORT_SYSCALL:
            if not self._checked_entry:
                platform.check_syscall_entry(self.vcpu)
                self._checked_entry = True
            try:
                ret = k.syscall(regs.rax, (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9))
            except ProgramExit as e:
                k.count += 1
                k.exited = {"status": e.status, "signal": e.signal, "report": e.report}
                return IoVerdict.EXIT
            except ReplayDivergence as e:
                self.fault = f"replay diverged: {e}"
                k.exited = {"status": None, "signal": None, "report": self.fault}
                return IoVerdict.EXIT
            k.count += 1
            regs.rax = ret & MASK64
            regs.rip = regs.rcx
            regs.rflags = regs.r11
            self.vcpu.sync_regs_changed()
            return IoVerdict.YIELD
        if io.port == platform.PORT_EXCEPTION:
            self._fatal_exception(self.vcpu.io_value())
            return IoVerdict.EXIT
        raise MachineError(f"program guest: OUT to unknown port {io.port:#x} at rip {regs.rip:#x}")

    def step(self, vcpu: int) -> int:
        return self.kernel.count

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.sandbox.close()

    def save(self) -> dict[str, bytes]:
        k = self.kernel
        states = {STATE: json.dumps(k.state(), separators=(",", ":")).encode()}
        for name, blob in ((LOG, k.log.take()), (STDOUT, self.output.take(1)), (STDERR, self.output.take(2))):
            if blob:
                states[name] = blob
        for h in self.files.take_new():
            states[FILE_PREFIX + h] = self.files.get(h)
        return states

    # -- faults -----------------------------------------------------------------------------
    def _kernel_read(self, va: int, n: int) -> bytes:
        e = self.kernel.mm.pt.get(va >> 12)
        if e is None:
            raise MachineError(f"exception stack at {va:#x} is not mapped")
        g = (e & PTE_ADDR) | (va & 0xFFF)
        return self.machine.memory.read(g, n)

    def _fatal_exception(self, vector: int) -> None:
        regs = self.vcpu.get_regs()
        err, rip, rsp = platform.exception_frame(self._kernel_read, regs.rsp, vector)
        sig, signame, what = SIGNALS.get(vector, (11, "SIGSEGV", f"exception {vector}"))
        detail = ""
        if vector == 14:
            cr2 = self.vcpu.get_sregs().cr2
            access = "write" if err & 2 else "instruction fetch" if err & 16 else "read"
            detail = f" at address {cr2:#x} ({access}, {'protection' if err & 1 else 'not mapped'})"
        where = self.symbolize(rip)
        report = (f"program killed by {signame}: {what}{detail}; rip {rip:#x}"
                  f"{' (' + where + ')' if where else ''}, rsp {rsp:#x}")
        # The program's view for a core file: its rip/rsp/rflags at the fault (rax held the vector).
        regs.rip, regs.rsp = rip, rsp
        self.vcpu.set_regs(regs)
        self.kernel.exited = {"status": 128 + sig, "signal": sig, "report": report}
        self.fault = report

    def symbolize(self, va: int) -> str | None:
        try:
            from .inspect import Symbols
            return Symbols.from_state(self.kernel.state(), self.files.get).symbolize(va)
        except Exception:   # a courtesy in a crash report; never hide the crash itself
            return None
