"""Plain-data vCPU state and the one function that restores it in order.

Capture and restore go through :class:`VcpuState`, a bag of the raw kernel
structs as bytes (so nothing is lost in translation) with a versioned binary
serialisation for the store.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

from ..kvm import Vcpu
from ..kvm import structs as S

_MAGIC = b"SNAPVCPU"
_VERSION = 1
_REG_NAMES = [f[0] for f in S.KvmRegs._fields_]


@dataclass
class VcpuState:
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes | None
    debugregs: bytes | None
    events: bytes
    mp_state: int
    msrs: dict[int, int] = field(default_factory=dict)
    cpuid: bytes = b""

    # -- convenient views -------------------------------------------------------------
    def registers(self) -> dict[str, int]:
        r = S.KvmRegs.from_buffer_copy(self.regs)
        return {n: getattr(r, n) for n in _REG_NAMES}

    @property
    def rip(self) -> int:
        return self.registers()["rip"]

    # -- serialisation --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        fields = {
            "regs": self.regs, "sregs": self.sregs, "xsave": self.xsave, "events": self.events,
            "mp_state": struct.pack("<I", self.mp_state), "cpuid": self.cpuid,
            "msrs": b"".join(struct.pack("<IQ", k, v) for k, v in sorted(self.msrs.items())),
        }
        if self.xcrs is not None:
            fields["xcrs"] = self.xcrs
        if self.debugregs is not None:
            fields["debugregs"] = self.debugregs
        out = [_MAGIC, struct.pack("<II", _VERSION, len(fields))]
        for name, data in fields.items():
            nb = name.encode()
            out.append(struct.pack("<B", len(nb)) + nb + struct.pack("<I", len(data)) + data)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "VcpuState":
        """Parse a stored state; every size is checked against the blob and
        the kernel structs, so a damaged or forged one is a ValueError
        naming the field, never a struct.error or a huge allocation."""
        if not isinstance(blob, (bytes, bytearray)) or blob[:8] != _MAGIC:
            raise ValueError("not a snapctl vCPU state blob")
        if len(blob) < 16:
            raise ValueError("vCPU state: truncated header")
        version, n = struct.unpack_from("<II", blob, 8)
        if version > _VERSION:
            raise ValueError(f"vCPU state version {version} is newer than this snapctl ({_VERSION})")
        if n > _MAX_FIELDS:
            raise ValueError(f"vCPU state: {n} fields (at most {_MAX_FIELDS})")
        pos, f = 16, {}
        for _ in range(n):
            if pos + 1 > len(blob):
                raise ValueError("vCPU state: truncated (field name)")
            ln = blob[pos]
            name = blob[pos + 1:pos + 1 + ln].decode("ascii", "replace")
            pos += 1 + ln
            if pos + 4 > len(blob):
                raise ValueError(f"vCPU state: truncated (field {name!r:.40})")
            (dl,) = struct.unpack_from("<I", blob, pos)
            if pos + 4 + dl > len(blob):
                raise ValueError(f"vCPU state: field {name!r:.40} runs past the end")
            f[name] = bytes(blob[pos + 4:pos + 4 + dl])
            pos += 4 + dl
        for name, size in _FIXED.items():
            if name in f and len(f[name]) != size:
                raise ValueError(f"vCPU state: field {name!r} is {len(f[name])} bytes, not {size}")
        for name in ("regs", "sregs", "xsave", "events", "mp_state", "msrs"):
            if name not in f:
                raise ValueError(f"vCPU state: no field {name!r}")
        if len(f["msrs"]) % 12:
            raise ValueError(f"vCPU state: field 'msrs' is {len(f['msrs'])} bytes, not a multiple of 12")
        if len(f["xsave"]) > _MAX_XSAVE:
            raise ValueError(f"vCPU state: field 'xsave' is larger than {_MAX_XSAVE} bytes")
        cpuid = f.get("cpuid", b"")
        if cpuid:
            entry = ctypes.sizeof(S.KvmCpuidEntry2)
            if len(cpuid) < 8 or len(cpuid) != 8 + entry * struct.unpack_from("<I", cpuid)[0]:
                raise ValueError("vCPU state: field 'cpuid' does not hold its entry count")
        msrs = {k: v for k, v in struct.iter_unpack("<IQ", f["msrs"])}
        return cls(regs=f["regs"], sregs=f["sregs"], xsave=f["xsave"], xcrs=f.get("xcrs"),
                   debugregs=f.get("debugregs"), events=f["events"], mp_state=struct.unpack("<I", f["mp_state"])[0],
                   msrs=msrs, cpuid=cpuid)


_MAX_FIELDS = 64
_MAX_XSAVE = 1 << 20
_FIXED = {"regs": ctypes.sizeof(S.KvmRegs), "sregs": ctypes.sizeof(S.KvmSregs),
          "events": ctypes.sizeof(S.KvmVcpuEvents), "mp_state": 4,
          "xcrs": ctypes.sizeof(S.KvmXcrs), "debugregs": ctypes.sizeof(S.KvmDebugregs)}


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """Read everything a restore needs. The vCPU must be out of KVM_RUN with no
    half-done port exit (the VMM completes it first). MP_STATE is read before the
    rest (reading it can change LAPIC state), VCPU_EVENTS last."""
    mp = vcpu.get_mp_state()
    regs = bytes(vcpu.get_regs())
    sregs = bytes(vcpu.get_sregs())
    xsave = vcpu.get_xsave()
    xcrs = vcpu.get_xcrs()
    dbg = vcpu.get_debugregs()
    msrs = vcpu.get_msrs(msr_indices)
    cpuid = vcpu.get_cpuid2()
    events = bytes(vcpu.get_vcpu_events())
    return VcpuState(regs=regs, sregs=sregs, xsave=xsave, xcrs=bytes(xcrs) if xcrs is not None else None,
                     debugregs=bytes(dbg) if dbg is not None else None, events=events, mp_state=mp,
                     msrs=msrs, cpuid=bytes(cpuid))


def restore_vcpu(vcpu: Vcpu, st: VcpuState) -> list[int]:
    """Write ``st`` into a fresh vCPU, in the order each rule below requires.
    Returns MSR indices the kernel refused (skipped, reported, never fatal)."""
    # CPUID first: it decides which MSRs and XSAVE features exist.
    if st.cpuid:
        nent = struct.unpack_from("<I", st.cpuid)[0]
        cp = S.cpuid2_struct(nent).from_buffer_copy(st.cpuid)
        vcpu.set_cpuid2(cp)
    vcpu.set_mp_state(st.mp_state)
    vcpu.set_regs(S.KvmRegs.from_buffer_copy(st.regs))
    # SREGS before anything that depends on CR0/CR4/EFER (XSAVE needs CR4.OSXSAVE state).
    vcpu.set_sregs(S.KvmSregs.from_buffer_copy(st.sregs))
    vcpu.set_xsave(st.xsave)
    if st.xcrs is not None:
        vcpu.set_xcrs(S.KvmXcrs.from_buffer_copy(st.xcrs))
    if st.debugregs is not None:
        vcpu.set_debugregs(S.KvmDebugregs.from_buffer_copy(st.debugregs))
    # MSRs after SREGS (EFER is in both; sregs wins otherwise) and before events.
    refused = []
    items = list(st.msrs.items())
    while items:
        n = vcpu.set_msrs(dict(items))
        if n < len(items):
            refused.append(items[n][0])  # the kernel stops at the MSR it refuses
        items = items[n + 1:]
    # Pending exceptions / interrupt shadow last: earlier sets may clear them.
    vcpu.set_vcpu_events(S.KvmVcpuEvents.from_buffer_copy(st.events))
    return refused
