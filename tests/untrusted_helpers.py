"""Crafting stores someone else made, and running every command on them
under a memory limit and a timeout (tests/test_rel_untrusted_store.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path

from cli_helpers import snapctl, snapctl_many

#: Address space per command: numpy, the C page loops' threads and a 64 MiB
#: guest fit in well under 1 GiB (measured); a store's claims must not push
#: a command past this.
MEMORY_LIMIT = 3 << 30
#: A command on a 8 MiB store takes about a second; a hang is one that
#: takes this long.
TIMEOUT = 60

#: Commands that only read: the store's bytes must not change.
READERS = [("list",), ("show", "1"), ("verify",), ("read", "1", "0x200000", "64"), ("diff", "0", "2"),
           ("history", "0x200000"), ("export", "2", "{out}"), ("replay", "1")]
#: Commands that write: each on its own copy.
WRITERS = [("tag", "1", "newtag"), ("prune", "--keep-last", "1"), ("restore", "2", "--steps", "1", "--json")]


def run_limited(args, store: Path, timeout: float = TIMEOUT) -> dict:
    """The real CLI on ``store`` under MEMORY_LIMIT and ``timeout``, as a dict for :func:`problem`."""
    r = snapctl(*args, store=store, timeout=timeout, memory_limit=MEMORY_LIMIT, hang_ok=True, stdin=b"")
    return {"args": args, "code": r.code, "err": r.err, "out": r.out[-400:]}


def problem(r: dict) -> str | None:
    """What is wrong with a command's outcome, or None: it must exit 0, or 1/2
    with exactly one stderr line ``error: ...`` (or its JSON form under --json);
    no traceback, signal or hang."""
    code, err = r["code"], r["err"]
    if code is None:
        return err
    if code < 0:
        return f"killed by signal {-code}: {err[-300:]}"
    if "Traceback" in err or "MemoryError" in err:
        return f"traceback: {err[-1500:]}"
    if code == 0:
        return None
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code not in (1, 2) or len(lines) != 1 or not (lines[0].startswith("error: ") or _json_error(lines[0], code)):
        return f"exit {code} with stderr {err[-600:]!r}"
    return None


def _json_error(line: str, code: int) -> bool:
    """With --json an error is one JSON object instead (docs/cli.md): {"error", "exit_code"}."""
    try:
        d = json.loads(line)
    except ValueError:
        return False
    return isinstance(d, dict) and set(d) == {"error", "exit_code"} and d["exit_code"] == code


def data_state(store: Path) -> tuple:
    """The store's data: the main file and a -wal with frames (SQLite itself
    creates and removes -shm and an empty -wal as connections come and go)."""
    out = [hashlib.sha256(store.read_bytes()).hexdigest()]
    wal = Path(str(store) + "-wal")
    if wal.exists() and wal.stat().st_size > 32:
        out.append(hashlib.sha256(wal.read_bytes()).hexdigest())
    return tuple(out)


def copy_store(src: Path, dst: Path) -> Path:
    for suffix in ("-wal", "-shm"):
        p = Path(str(dst) + suffix)
        if p.exists():
            p.unlink()
    shutil.copyfile(src, dst)
    return dst


def check_all_commands(store: Path, work: Path, readers=READERS, writers=WRITERS) -> list[str]:
    """Every command on ``store`` (writers on copies); the problems found."""
    jobs = []
    for i, cmd in enumerate(readers):
        out = work / f"export-{i}.raw"
        jobs.append(([a.format(out=out) for a in cmd], store))
    for i, cmd in enumerate(writers):
        jobs.append((list(cmd), copy_store(store, work / f"{store.stem}-w{i}.db")))
    before = data_state(store)
    results = snapctl_many(jobs, memory_limit=MEMORY_LIMIT, timeout=TIMEOUT)
    found = [f"{' '.join(r['args'])}: {p}" for r in results if (p := problem(r))]
    if data_state(store) != before:
        found.append("a read-only command changed the store")
    return found


# -- crafting ----------------------------------------------------------------------------------------

def sql(store: Path, *statements: str, params=()) -> None:
    """Run statements on a store with plain sqlite3 (as a forger would) and
    leave a self-contained file (WAL copied in)."""
    conn = sqlite3.connect(store, isolation_level=None)
    try:
        for s in statements:
            conn.execute(s, params) if params else conn.execute(s)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def recompute_checks(store: Path) -> None:
    """Make every pack's and map's check value match its (forged) contents,
    where the contents allow one, so only the value checks can catch them."""
    from storage.codec import check63
    from storage.packs import pack_meta_check

    conn = sqlite3.connect(store, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for r in conn.execute("SELECT id, first, n, codecs, bases, hashes, ends, crcs FROM packs").fetchall():
            try:
                conn.execute("UPDATE packs SET mchk = ? WHERE id = ?", (pack_meta_check(*r), r[0]))
            except Exception:   # noqa: BLE001 - forged types: no check value can be computed
                pass
        for ckpt, pages, blobs in conn.execute("SELECT ckpt, pages, blobs FROM maps").fetchall():
            try:
                chk = check63(struct.pack("<q", ckpt), pages, blobs)
                conn.execute("UPDATE maps SET chk = ? WHERE ckpt = ?", (chk, ckpt))
            except Exception:   # noqa: BLE001
                pass
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default
