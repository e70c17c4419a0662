"""Run many `snapctl` commands cheaply: this process imports the CLI once,
then forks one child per command (so each still runs alone, in its own
process, under its own memory limit and timeout) -- a fresh interpreter per
command spent most of the crafted-store suite's time importing numpy.

Input on stdin: JSON {"limit": bytes, "timeout": s, "jobs": [[argv...], ...]}.
Output on stdout: JSON [{"code": exit code (-N: signal N, null: timeout),
"out": tail of stdout, "err": stderr}] in job order. Two children at a time.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time


def _child(argv: list[str], limit: int, out_fd: int, err_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    code = 1
    try:
        from snapctl.cli import main
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:                  # a traceback main() let through: show it
        import traceback
        traceback.print_exc()
        code = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    spec = json.load(sys.stdin)
    # imported once, before any fork: what the commands import lazily
    import rich.progress  # noqa: F401
    import rich.table  # noqa: F401
    import snapctl.checkpoint  # noqa: F401
    import snapctl.cli  # noqa: F401
    import snapctl.machine  # noqa: F401
    import storage  # noqa: F401
    import storage.maintenance  # noqa: F401
    import storage.writer  # noqa: F401
    storage.pageloops.loaded()        # the C loops load on first use: once here, not per child
    limit, timeout, jobs = spec["limit"], spec["timeout"], spec["jobs"]
    results: list = [None] * len(jobs)
    tmp = tempfile.mkdtemp(prefix="snapctl-fork-")
    running: dict[int, tuple] = {}
    nxt = 0
    while nxt < len(jobs) or running:
        while nxt < len(jobs) and len(running) < 2:
            o = os.open(os.path.join(tmp, f"{nxt}.out"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            e = os.open(os.path.join(tmp, f"{nxt}.err"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            pid = os.fork()
            if pid == 0:
                _child(jobs[nxt], limit, o, e)
            os.close(o)
            os.close(e)
            running[pid] = (nxt, time.monotonic() + timeout, time.monotonic())
            nxt += 1
        time.sleep(0.01)
        for pid, (i, deadline, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() < deadline:
                continue
            code = None
            if done == 0:                  # a hang: kill it
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            elif os.WIFSIGNALED(status):
                code = -os.WTERMSIG(status)
            else:
                code = os.WEXITSTATUS(status)
            del running[pid]
            with open(os.path.join(tmp, f"{i}.out"), errors="replace") as f:
                out = f.read()[-400:]
            with open(os.path.join(tmp, f"{i}.err"), errors="replace") as f:
                err = f.read()
            if code is None:
                err = f"HANG: no exit within {timeout} s\n{err[-300:]}"
            results[i] = {"code": code, "out": out, "err": err, "secs": round(time.monotonic() - t0, 2)}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
