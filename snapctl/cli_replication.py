"""The replication side of the command line: ``standby``, and ``--replicate`` for run/restore."""

from __future__ import annotations

import sys
from typing import Optional


def replicator(addr: Optional[str], token_file: Optional[str], required: bool, store_path: str, start: dict):
    """A Replicator for ``--replicate`` (None without it)."""
    if addr is None:
        if required or token_file:
            raise ValueError("--replicate-required and --token-file go with --replicate HOST:PORT")
        return None
    from .replication.primary import Replicator
    from .replication.protocol import load_token

    return Replicator(addr, token=load_token(token_file), required=required, store_path=store_path, start=start)


def schedule_dict(sched) -> dict:
    """A Schedule's or a ProgramSchedule's fields, for the standby's start message."""
    return sched.as_dict()


def finish(rep, summary: dict) -> None:
    if rep is not None:
        rep.finish(summary)
        if rep.lost_reason is None:
            print(f"snapctl: replicated {rep.sent} checkpoints to {rep.addr} "
                  f"(last acknowledged: {rep.acked})", file=sys.stderr, flush=True)


def standby(listen: str, store: str, token_file: Optional[str], failover_timeout: float, as_json: bool) -> int:
    from .replication.protocol import load_token
    from .replication.standby import Standby, as_json as to_json, log, summary_line

    sb = Standby(listen, store, token=load_token(token_file), failover_timeout_ms=failover_timeout)
    host, port = sb.bind()
    log(f"listening on {host}:{port}, store {store}")
    res = sb.serve()
    print(to_json(res) if as_json else summary_line(res), file=sys.stderr, flush=True)
    return res.exit_status
