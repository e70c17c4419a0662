"""docs/cli.md is regenerated from the real --help: every command is in it,
and its generated part is exactly what `python -m snapctl.docgen` writes."""

from __future__ import annotations

from snapctl import docgen
from snapctl.cli import command

from cli_helpers import ok


def test_every_command_has_its_help_in_docs_cli_md():
    doc = docgen.DOC.read_text()
    missing = [n for n in command().commands if f"### `snapctl {n}`" not in doc]
    assert not missing, f"docs/cli.md lacks {missing}: run python -m snapctl.docgen"


def test_the_generated_reference_is_current():
    doc = docgen.DOC.read_text()
    assert docgen.render(doc) == doc, "docs/cli.md is stale: run python -m snapctl.docgen"


def test_the_generated_help_is_what_the_cli_prints():
    # the reference is rendered at 80 columns; so is the CLI with COLUMNS=80
    for path, text in docgen.help_texts()[:4]:
        args = path.split()[1:] + ["--help"]
        assert ok(*args, env={"COLUMNS": "80"}).out.rstrip() == text.rstrip(), path


def test_every_command_is_in_the_hand_written_table():
    doc = docgen.DOC.read_text().split(docgen.BEGIN)[0]
    missing = [n for n in command().commands if f"`{n}" not in doc]
    assert not missing, f"docs/cli.md's table lacks {missing}"
