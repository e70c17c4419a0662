"""The `snapctl` command line: parse, call the library, render. No logic here."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Checkpoint and restore VMs on /dev/kvm.")
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"snapctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@app.command()
def guests(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in guests and their parameters."""
    from .machine.guests import GUESTS

    rows = [{"name": g.name, "summary": g.summary,
             "params": [{"name": p.name, "default": p.default, "help": p.help} for p in g.params]}
            for g in GUESTS.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("guest", "what it does", "parameters")
    for r in rows:
        t.add_row(r["name"], r["summary"], ", ".join(f"{p['name']}={p['default']}" for p in r["params"]) or "-")
    out.print(t)


def main() -> None:
    app()
