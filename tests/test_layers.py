"""The layers of docs/architecture.md hold: the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([*cmd, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " kept, 0 broken" in r.stdout and "Contracts: 0 kept" not in r.stdout, r.stdout


def _contract_modules(name_start: str) -> set[str]:
    import tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for c in cfg["tool"]["importlinter"]["contracts"]:
        if c["name"].startswith(name_start):
            return {m.strip() for layer in c["layers"] for m in layer.split("|") for m in m.split(":")}
    raise AssertionError(f"no contract named {name_start!r}...")


def test_every_module_is_placed_in_a_layer():
    """A module left out of the layers contracts is checked by nothing: a new module must be
    given its place (storage's own parts; snapctl's top-level modules and packages)."""
    storage = _contract_modules("storage parts")
    missing = [f"storage.{p.stem}" for p in (ROOT / "storage").glob("*.py")
               if p.stem != "__init__" and f"storage.{p.stem}" not in storage]
    snap = _contract_modules("snapctl layers")
    code = [p for p in (ROOT / "snapctl").iterdir()
            if p.suffix == ".py" and p.stem != "__init__"
            or any(f.name != "__init__.py" or "import" in f.read_text() for f in p.glob("*.py"))]
    # (a data-only package, e.g. snapctl.schemas: an __init__ with a docstring, no code)
    missing += [f"snapctl.{p.stem}" for p in code if f"snapctl.{p.stem}" not in snap]
    assert not missing, f"not in any layer of pyproject.toml's contracts: {missing}"
