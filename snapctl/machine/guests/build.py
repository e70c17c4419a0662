"""Assemble the built-in guests: ``python -m snapctl.machine.guests.build``.

Each ``<name>.S`` here (plus ``common.inc``) becomes ``<name>.bin``, the flat
machine code the VMM loads at the code address. Needs GNU binutils (``as``,
``objcopy``) only when the sources change; the ``.bin`` files are shipped, so
installing or running snapctl needs no assembler. ``tests/test_guests.py``
re-assembles and checks the shipped bytes match.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
    return sorted(HERE.glob("*.S"))


def assemble(src: Path) -> bytes:
    """Assemble one guest source to flat binary (the .text section, origin 0)."""
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (GNU binutils) is needed to build guests; apt-get install binutils")
    with tempfile.TemporaryDirectory() as d:
        obj, out = Path(d) / "g.o", Path(d) / "g.bin"
        subprocess.run(["as", "--64", "-I", str(HERE), "-o", str(obj), str(src)], check=True, capture_output=True, text=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
        return out.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the shipped .bin files match the sources")
    args = ap.parse_args(argv)
    stale = []
    for src in sources():
        code = assemble(src)
        binf = src.with_suffix(".bin")
        if args.check:
            if not binf.exists() or binf.read_bytes() != code:
                stale.append(binf.name)
        else:
            binf.write_bytes(code)
            print(f"{binf.name}: {len(code)} bytes")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
