"""Regenerate the command reference in docs/cli.md from the real `--help`.

    python -m snapctl.docgen            # rewrite the generated part of docs/cli.md
    python -m snapctl.docgen --check    # exit 1 if it is out of date

The part between the two markers below is generated (as an 80-column
terminal shows it, one section per command, in the order `snapctl --help`
lists them); the rest of docs/cli.md is written by hand. tests/test_cli_docs.py fails when the file is
stale, e.g. when a command was added without regenerating it.
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED: python -m snapctl.docgen (do not edit by hand) -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
#: What click lays help out to on an 80-column terminal (it keeps 2 columns free).
WIDTH = 78


def help_texts() -> list[tuple[str, str]]:
    """[(command path, its --help text)]: the root first, then each command."""
    from .cli import command

    root = command()
    settings = dict(getattr(root, "context_settings", None) or {})  # -h as well as --help
    settings.update(terminal_width=WIDTH, max_content_width=WIDTH)
    ctx = root.context_class(root, info_name="snapctl", **settings)
    out = [("snapctl", root.get_help(ctx))]
    for name in root.list_commands(ctx):
        sub = root.get_command(ctx, name)
        sctx = sub.context_class(sub, info_name=name, parent=ctx, terminal_width=WIDTH, max_content_width=WIDTH)
        out.append((f"snapctl {name}", sub.get_help(sctx)))
    return out


def generated() -> str:
    parts = [BEGIN, ""]
    for path, text in help_texts():
        parts += [f"### `{path}`", "", "```text", text.rstrip(), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def render(doc: str) -> str:
    """``doc`` with its generated part replaced (appended when it has none)."""
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + generated() + tail
    return doc.rstrip("\n") + "\n\n## Command reference (`--help`)\n\n" + generated() + "\n"


def main(argv: list[str]) -> int:
    doc = DOC.read_text()
    new = render(doc)
    if "--check" in argv:
        if new != doc:
            print(f"{DOC} is out of date: run python -m snapctl.docgen", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
