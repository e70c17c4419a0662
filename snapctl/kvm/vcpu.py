"""The vCPU fd: KVM_RUN through ctypes, the kvm_run page, register state.

Kicking: another thread sets ``kvm_run.immediate_exit = 1`` and sends
:data:`KICK_SIGNAL` to the vCPU thread. If the signal lands while the thread
is inside KVM_RUN, the ioctl returns EINTR; if it lands just before, KVM sees
immediate_exit at entry and returns EINTR at once. Either way the kick is not
lost. (KVM_RUN is called through ctypes: fcntl.ioctl retries EINTR from 3.14.)
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
import signal
import threading

from . import ioctls as I
from . import structs as S
from ._libc import ioctl, ioctl_raw
from .constants import KVM_CAP_DEBUGREGS, KVM_CAP_SYNC_REGS, KVM_CAP_XCRS, KVM_EXIT_INTR, KVM_SYNC_X86_REGS
from .errors import KvmError, KvmIoctlError
from .ring import DirtyRing

KICK_SIGNAL = signal.SIGRTMIN + 4
_kick_installed = False


def install_kick_handler() -> None:
    """Install a no-op handler for KICK_SIGNAL (CPython's handler leaves SA_RESTART off,
    so a blocked KVM_RUN returns EINTR). Must run in the main thread once."""
    global _kick_installed
    if _kick_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmError("the first vCPU must be created from the main thread (it installs the kick signal handler)")
    signal.signal(KICK_SIGNAL, lambda *_: None)
    _kick_installed = True


class Vcpu:
    def __init__(self, vm, vcpu_id: int):
        install_kick_handler()
        self.vm = vm
        self.id = vcpu_id
        self.fd = ioctl(vm.fd, I.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
        os.set_inheritable(self.fd, False)
        self._run_mm = mmap.mmap(self.fd, vm.system.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # from_address, not from_buffer: a buffer export would make close() fail while
        # any ctypes sub-object (e.g. held by a traceback) is alive. Nothing uses
        # run_struct after close().
        anchor = C.c_char.from_buffer(self._run_mm)
        self.run_struct = S.KvmRun.from_address(C.addressof(anchor))
        del anchor
        self.ring: DirtyRing | None = None
        if vm.dirty_ring_entries:
            self.ring = DirtyRing(self.fd, vm.dirty_ring_entries, on_harvest=vm._note_harvested)
        self.thread_ident: int | None = None  # set by the thread that runs this vCPU

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self._run_mm is not None:
            del self.run_struct
            self._run_mm.close()
            self._run_mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- running ---------------------------------------------------------------
    def run(self) -> int:
        """One KVM_RUN. Returns the exit reason (KVM_EXIT_INTR when kicked/interrupted)."""
        ret, err = ioctl_raw(self.fd, I.KVM_RUN)
        if ret < 0:
            if err in (errno.EINTR, errno.EAGAIN):
                self.run_struct.exit_reason = KVM_EXIT_INTR
                return KVM_EXIT_INTR
            raise KvmIoctlError("KVM_RUN", err)
        return self.run_struct.exit_reason

    def kick(self) -> None:
        """Make the vCPU leave (or not enter) KVM_RUN. Safe from any thread."""
        self.run_struct.immediate_exit = 1
        if self.thread_ident is not None:
            try:
                signal.pthread_kill(self.thread_ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def io_value(self) -> int:
        """The value of the current port-I/O exit (up to 4 bytes, at ``data_offset`` in kvm_run)."""
        io = self.run_struct.exit.io
        raw = (C.c_uint8 * io.size).from_address(C.addressof(self.run_struct) + io.data_offset)
        return int.from_bytes(bytes(raw), "little")

    def use_sync_regs(self) -> S.KvmRegs:
        """Have KVM store the general registers in ``kvm_run`` at every exit
        (KVM_CAP_SYNC_REGS) and return that view. Change it, then call
        :meth:`sync_regs_changed`, and the next KVM_RUN loads it: no
        KVM_GET_REGS/KVM_SET_REGS ioctl per exit (15-25 us each here)."""
        if not self.vm.system.check_extension(KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_REGS:
            raise KvmError("this KVM cannot exchange registers through kvm_run (KVM_CAP_SYNC_REGS)")
        self.run_struct.kvm_valid_regs = KVM_SYNC_X86_REGS
        return self.run_struct.sync_regs

    def sync_regs_changed(self) -> None:
        self.run_struct.kvm_dirty_regs = KVM_SYNC_X86_REGS

    def flush_sync_regs(self) -> None:
        """Load registers changed through :meth:`use_sync_regs` now (KVM_SET_REGS), so
        that a state capture before the next KVM_RUN reads them."""
        if self.run_struct.kvm_dirty_regs & KVM_SYNC_X86_REGS:
            self.set_regs(S.KvmRegs.from_buffer_copy(self.run_struct.sync_regs))
            self.run_struct.kvm_dirty_regs = 0

    def complete_pending_io(self) -> None:
        """Re-enter KVM_RUN with immediate_exit=1 so a half-done port/MMIO exit completes
        (RIP moves past the OUT) before state is captured; returns at once with EINTR.
        Registers changed through the sync-regs page are loaded first."""
        self.flush_sync_regs()
        self.run_struct.immediate_exit = 1
        ret, err = ioctl_raw(self.fd, I.KVM_RUN)
        if ret < 0 and err not in (errno.EINTR, errno.EAGAIN):
            raise KvmIoctlError("KVM_RUN(immediate_exit)", err)

    # -- state (kernel API 4.11-4.13, 4.18-4.19, 4.22, 4.31-4.32, 4.38-4.39, 4.42-4.45) --
    def _get(self, req: int, struct_type, name: str):
        s = struct_type()
        ioctl(self.fd, req, s, name=name)
        return s

    def get_regs(self) -> S.KvmRegs:
        return self._get(I.KVM_GET_REGS, S.KvmRegs, "KVM_GET_REGS")

    def set_regs(self, regs: S.KvmRegs) -> None:
        ioctl(self.fd, I.KVM_SET_REGS, regs, name="KVM_SET_REGS")

    def get_sregs(self) -> S.KvmSregs:
        return self._get(I.KVM_GET_SREGS, S.KvmSregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs: S.KvmSregs) -> None:
        ioctl(self.fd, I.KVM_SET_SREGS, sregs, name="KVM_SET_SREGS")

    def get_xsave(self) -> bytes:
        """XSAVE area; KVM_GET_XSAVE2 when the kernel's XSAVE size exceeds 4 KiB."""
        size = self.vm.xsave_size
        if size > C.sizeof(S.KvmXsave):
            buf = (C.c_uint8 * size)()
            ioctl(self.fd, I.KVM_GET_XSAVE2, buf, name="KVM_GET_XSAVE2")
        else:
            buf = S.KvmXsave()
            ioctl(self.fd, I.KVM_GET_XSAVE, buf, name="KVM_GET_XSAVE")
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        buf = (C.c_uint8 * max(len(data), C.sizeof(S.KvmXsave))).from_buffer_copy(
            data.ljust(C.sizeof(S.KvmXsave), b"\0"))
        ioctl(self.fd, I.KVM_SET_XSAVE, buf, name="KVM_SET_XSAVE")

    def get_xcrs(self) -> S.KvmXcrs | None:
        if not self.vm.check_extension(KVM_CAP_XCRS):
            return None
        return self._get(I.KVM_GET_XCRS, S.KvmXcrs, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: S.KvmXcrs) -> None:
        ioctl(self.fd, I.KVM_SET_XCRS, xcrs, name="KVM_SET_XCRS")

    def get_debugregs(self) -> S.KvmDebugregs | None:
        if not self.vm.check_extension(KVM_CAP_DEBUGREGS):
            return None
        return self._get(I.KVM_GET_DEBUGREGS, S.KvmDebugregs, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, d: S.KvmDebugregs) -> None:
        ioctl(self.fd, I.KVM_SET_DEBUGREGS, d, name="KVM_SET_DEBUGREGS")

    def get_vcpu_events(self) -> S.KvmVcpuEvents:
        return self._get(I.KVM_GET_VCPU_EVENTS, S.KvmVcpuEvents, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, ev: S.KvmVcpuEvents) -> None:
        ioctl(self.fd, I.KVM_SET_VCPU_EVENTS, ev, name="KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        return self._get(I.KVM_GET_MP_STATE, S.KvmMpState, "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, I.KVM_SET_MP_STATE, S.KvmMpState(state), name="KVM_SET_MP_STATE")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; an MSR that fails to read is skipped, not fatal.

        The kernel returns how many it read and stops at the first failure, so we
        resume after each failing index.
        """
        out: dict[int, int] = {}
        pending = list(indices)
        while pending:
            buf = S.msrs_struct(len(pending))()
            buf.nmsrs = len(pending)
            for i, idx in enumerate(pending):
                buf.entries[i].index = idx
            n = ioctl(self.fd, I.KVM_GET_MSRS, buf, name="KVM_GET_MSRS")
            for i in range(n):
                out[buf.entries[i].index] = buf.entries[i].data
            pending = pending[n + 1:]  # skip the one that failed
        return out

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS. Returns how many were set: the kernel stops at the first
        MSR it refuses, so a result < len(msrs) names that MSR by position."""
        if not msrs:
            return 0
        buf = S.msrs_struct(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (idx, val) in enumerate(msrs.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        return ioctl(self.fd, I.KVM_SET_MSRS, buf, name="KVM_SET_MSRS")

    def set_cpuid2(self, cpuid) -> None:
        ioctl(self.fd, I.KVM_SET_CPUID2, cpuid, name="KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256):
        """KVM_GET_CPUID2: the CPUID this vCPU has now (read, never cached)."""
        while True:
            buf = S.cpuid2_struct(max_entries)()
            buf.nent = max_entries
            try:
                ioctl(self.fd, I.KVM_GET_CPUID2, buf, name="KVM_GET_CPUID2")
            except KvmIoctlError as e:
                if e.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            out = S.cpuid2_struct(buf.nent)()
            C.memmove(C.addressof(out), C.addressof(buf), C.sizeof(out))
            return out
