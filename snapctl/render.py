"""Rendering for the command line: JSON documents (the schema in
snapctl/schemas/cli.json), plain and terminal tables, the branch tree.

Standard library only (and snapctl.kvm.constants, which is too), so that
`snapctl list` and `--help` stay quick to start.
Every string that came out of a store goes through :func:`safe` before it
reaches a terminal: a trigger or tag may hold escape sequences.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import sys
import textwrap
from dataclasses import dataclass

from .kvm.constants import PAGE_SIZE


# -- values -------------------------------------------------------------------------------------

def safe(text) -> str:
    """``text`` with control and other non-printing characters escaped
    (``\\x1b``, ``\\n``, ``\\u200b``), so a stored string cannot drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            cp = ord(ch)
            out.append(f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")
    return "".join(out)


def num(v) -> str:
    """An integer with thousands separators; anything else (a damaged or
    crafted store) as escaped text."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "-" if v is None else safe(v)


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with milliseconds: 2026-11-29T15:24:21.123Z."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hexa(n: int) -> str:
    return f"{int(n):#x}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)


def print_json(obj, file=None) -> None:
    print(dumps(obj), file=file or sys.stdout)


# -- JSON documents (one shape per thing, the same names everywhere) ----------------------------

def stats_json(stats: dict) -> dict:
    """A checkpoint's statistics; the store's ``downtime_ms`` is ``pause_ms`` here."""
    out = {("pause_ms" if k == "downtime_ms" else k): v for k, v in stats.items()}
    return dict(sorted(out.items()))


def checkpoint_json(c) -> dict:
    return {"id": c.id, "parent": c.parent, "step": c.step, "steps": list(c.meta.get("steps", [c.step])),
            "trigger": c.trigger, "created": iso(c.created), "tags": list(c.tags), "digest": c.digest,
            "stats": stats_json(c.stats)}


def registers_json(regs: dict) -> dict:
    return {k: hexa(v) for k, v in regs.items()}


def summary_json(s: dict) -> dict:
    """A RunSummary.as_dict() as documented (it already uses the schema's names)."""
    return dict(s)


def replay_json(d: dict) -> dict:
    """ReplayResult.as_dict() with addresses and register values as hex strings."""
    out = dict(d)
    out["differing_pages"] = [hexa(p * PAGE_SIZE) for p in d["differing_pages"]]
    out["differing_registers"] = {k: {"replayed": hexa(v["replayed"]), "recorded": hexa(v["recorded"])}
                                  for k, v in d["differing_registers"].items()}
    out["compared"] = ["memory", "registers"] if d.get("registers_compared") else ["memory"]
    out.pop("registers_compared", None)
    return out


def prune_json(rep, before: int, after: int | None) -> dict:
    return {"dry_run": bool(rep.dry_run), "kept": list(rep.kept), "removed": list(rep.removed),
            "reparented": [{"checkpoint": c, "parent": p} for c, p in sorted(rep.reparented.items())],
            "tags_removed": list(rep.tags_removed), "bytes_freed": int(rep.bytes_freed),
            "file_bytes": {"before": before, "after": after}}


def error_json(message: str, code: int) -> str:
    return json.dumps({"error": message, "exit_code": code})


# -- tables -------------------------------------------------------------------------------------

@dataclass
class Column:
    name: str
    right: bool = False
    #: dropped first (highest) when a terminal is too narrow; 0 = never dropped
    drop: int = 0


def ids_text(ids: list[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    out, i = [], 0
    ids = sorted(ids)
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(f"{ids[i]}-{ids[j]}" if j > i + 1 else ", ".join(map(str, ids[i:j + 1])))
        i = j + 1
    return ", ".join(out) or "-"


def table(columns: list[Column], rows: list[list[str]], fmt: str, width: int | None = None) -> tuple[str, list[str]]:
    """Render ``rows`` (already strings, already :func:`safe`) as ``fmt``:

    * ``plain``: aligned columns, nothing cut or dropped (for pipes and files);
    * ``tsv`` / ``csv``: one line per row, a header first;
    * ``table``: ``plain`` fitted to ``width`` (a terminal): columns are
      dropped in their ``drop`` order until it fits, and the last column
      folds onto further lines if it must. Values are never cut.

    Returns the text and the names of dropped columns."""
    header = [c.name for c in columns]
    if fmt == "tsv":
        lines = ["\t".join(header)] + ["\t".join(v.replace("\t", "\\t") for v in r) for r in rows]
        return "\n".join(lines), []
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n"), []
    keep = list(range(len(columns)))

    def widths(idx):
        return [max([len(header[i])] + [len(r[i]) for r in rows]) for i in idx]

    dropped: list[str] = []
    if fmt == "table" and width:
        order = sorted((c.drop, i) for i, c in enumerate(columns) if c.drop)
        while sum(widths(keep)) + 2 * (len(keep) - 1) > width and order:
            _, i = order.pop()
            keep.remove(i)
            dropped.append(columns[i].name)
    ws = widths(keep)
    fold_at = None
    if fmt == "table" and width:
        used = sum(ws[:-1]) + 2 * (len(keep) - 1)
        if used + ws[-1] > width and width - used >= 8:
            fold_at = width - used
            ws[-1] = min(ws[-1], fold_at)

    def line(vals):
        cells = []
        for k, (i, v) in enumerate(zip(keep, vals)):
            last = k == len(keep) - 1
            cells.append(v if last and not columns[i].right else v.rjust(ws[k]) if columns[i].right else v.ljust(ws[k]))
        return "  ".join(cells).rstrip()

    out = [line([header[i] for i in keep])]
    for r in rows:
        vals = [r[i] for i in keep]
        if fold_at and len(vals[-1]) > fold_at:
            parts = textwrap.wrap(vals[-1], fold_at, break_long_words=True, break_on_hyphens=False) or [""]
            out.append(line(vals[:-1] + [parts[0]]))
            pad = sum(ws[:-1]) + 2 * (len(keep) - 1)
            out += [" " * pad + p for p in parts[1:]]
        else:
            out.append(line(vals))
    return "\n".join(out), dropped


def tree(cks, label) -> list[str]:
    """The checkpoint tree, one line per checkpoint: a chain goes straight
    down; where a checkpoint has several children each branch is drawn
    with ├─ / └─ (the later branches, e.g. from `restore`, last)."""
    kids: dict = {}
    roots = []
    for c in cks:
        if c.parent is None:
            roots.append(c)
        else:
            kids.setdefault(c.parent, []).append(c)
    lines: list[str] = []
    stack = [(r, "", "") for r in reversed(roots)]
    while stack:
        c, first, rest = stack.pop()
        lines.append(first + label(c))
        children = sorted(kids.get(c.id, []), key=lambda k: k.id)
        if len(children) == 1:
            stack.append((children[0], rest, rest))
        elif children:
            for n, ch in reversed(list(enumerate(children))):
                last = n == len(children) - 1
                stack.append((ch, rest + ("└─ " if last else "├─ "), rest + ("   " if last else "│  ")))
    return lines



def hexdump(base: int, data: bytes) -> str:
    """``data`` as lines of 16 bytes: address, hex, printable text."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:012x}  {hexes:<47}  {text}")
    return "\n".join(lines)


def page_ranges(pages: list[int]) -> list[str]:
    """Sorted page numbers as address ranges: [0x200, 0x201, 0x300] -> ["0x200000-0x201fff", "0x300000"]."""
    out, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        a, b = pages[i] * PAGE_SIZE, pages[j] * PAGE_SIZE + PAGE_SIZE - 1
        out.append(f"{a:#x}-{b:#x}" if j > i else f"{a:#x}")
        i = j + 1
    return out
