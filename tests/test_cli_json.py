"""Every command's --json output against the one documented schema
(snapctl/schemas/cli.json), with jsonschema; errors with --json too."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from cli_helpers import ok, snapctl
from kvm_helpers import kvm

SCHEMA = json.loads((Path(__file__).parents[1] / "snapctl" / "schemas" / "cli.json").read_text())


def validate(name: str, doc) -> None:
    """``doc`` against ``#/commands/NAME``; the refs resolve inside the one file."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator({**SCHEMA, "$ref": f"#/commands/{name}"},
                                    format_checker=jsonschema.FormatChecker()).validate(doc)


def json_commands() -> set[str]:
    """The commands that take --json, from the real command tree."""
    from snapctl.cli import command

    group = command()
    return {name for name, c in group.commands.items() if any("--json" in p.opts for p in c.params)}


def test_every_command_with_json_has_a_schema_entry():
    missing = json_commands() - set(SCHEMA["commands"])
    assert not missing, f"add these to snapctl/schemas/cli.json and docs/cli.md: {sorted(missing)}"


def test_the_schema_rejects_what_it_should():
    good = {"error": "no store at x", "exit_code": 1}
    jsonschema.Draft202012Validator({**SCHEMA, "$ref": "#/$defs/error"}).validate(good)
    for bad in ({"error": "x"}, {"error": "x", "exit_code": 1, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator({**SCHEMA, "$ref": "#/$defs/error"}).validate(bad)
    with pytest.raises(jsonschema.ValidationError):  # addresses are hex strings, not numbers
        validate("diff", {"from": 1, "to": 2, "count": 1, "pages": [4096]})


@kvm
def test_every_json_command_matches_the_schema(tmp_path):
    store = tmp_path / "j.db"
    seen: dict[str, object] = {}

    def run(name, *args, **kw):
        doc = ok(*args, "--json", store=kw.pop("store", store), **kw).json()
        validate(name, doc)
        seen[name] = doc
        return doc

    run("run", "run", "--mem", "8M", "--checkpoints", 3, "--every-steps", 2000)
    run("restore", "restore", 1, "--checkpoints", 1, "--every-steps", 1000)
    listing = run("list", "list")
    assert [c["id"] for c in listing] == [0, 1, 2, 3, 4]
    validate("list", ok("list", "--format", "json", store=store).json())
    show = run("show", "show", 2)
    assert show["vcpus"][0]["rip"].startswith("0x") and show["created"].endswith("Z")
    assert "pause_ms" in show["stats"] and "downtime_ms" not in show["stats"]
    assert run("replay", "replay", 1)["compared"] == ["memory", "registers"]
    assert run("diff", "diff", 1, 2)["count"] > 0
    run("history", "history", "0x200000")
    assert run("verify", "verify")["ok"]
    run("tag", "tag", 2, "x")
    run("rename-tag", "rename-tag", "x", "y")
    run("untag", "untag", "y")
    run("export", "export", 1, tmp_path / "one.raw")
    run("guests", "guests", store=None)
    run("dirty-rate", "dirty-rate", "--seconds", "0.3", "--mem", "8M", store=None)
    assert run("prune", "prune", "--keep-last", 2, "--dry-run")["dry_run"]
    d = run("delete", "delete", 4)
    assert d["removed"] == [4] and not d["dry_run"]
    assert run("prune", "prune", "--keep-last", 1)["removed"] == [1, 2]
    run("vacuum", "vacuum")
    run("bench", "bench", "--only", "cli_startup", "--quick", store=None)
    run("demo", "demo", store=None, timeout=120)
    # standby needs a primary on another host: tests/test_replication.py validates its --json
    assert set(seen) | {"standby"} == json_commands(), "a command with --json is not exercised here"
    # errors with --json: one JSON object on stderr, nothing on stdout
    for args, code in ((["show", "99"], 1), (["show", "1", "--bogus"], 2), (["list"], 1)):
        r = snapctl(*args, "--json", store=store if args[0] != "list" else tmp_path / "none.db")
        assert r.code == code and r.out == "", (r.code, r.out, r.err)
        err = json.loads(r.err)
        jsonschema.Draft202012Validator({**SCHEMA, "$ref": "#/$defs/error"}).validate(err)
        assert err["exit_code"] == code


@kvm
def test_program_json_matches_the_schema(tmp_path):
    """A program store: run/restore summaries (on stderr: stdout is the program's), show, replay,
    diff and history --json, against the same schema."""
    import subprocess

    src = tmp_path / "p.c"
    src.write_text('#include <stdio.h>\nlong counter;\nint main(void){for(int i=0;i<4;i++){counter+=i;'
                   'printf("%ld\\n",counter);fflush(stdout);}return 3;}\n')
    prog = tmp_path / "p"
    subprocess.run(["gcc", "-static", "-g", "-O0", "-o", str(prog), str(src)], check=True)
    store = tmp_path / "p.db"
    r = snapctl("run", "--program", prog, "--root", tmp_path, "--every-syscalls", 2, "--json", "--store", store)
    assert r.code == 3, r.err
    summary = json.loads(r.err[r.err.index("{"):])
    validate("run", summary)
    assert summary["exit_status"] == 3 and summary["program"] == str(prog)
    mid = summary["checkpoints"][len(summary["checkpoints"]) // 2]
    r = snapctl("restore", mid, "--json", store=store)
    assert r.code == 3, r.err
    validate("restore", json.loads(r.err[r.err.index("{"):]))
    show = ok("show", mid, "--json", store=store).json()
    validate("show", show)
    assert show["program"]["syscalls"] == show["step"]
    rep = ok("replay", mid, "--json", store=store).json()
    validate("replay", rep)
    assert rep["match"] and "memory" in rep["compared"]
    validate("diff", ok("diff", 0, mid, "--json", store=store).json())
    hist = ok("history", "counter", "--json", store=store).json()
    validate("history", hist)
    assert hist["checkpoints"] and hist["va"].startswith("0x")
