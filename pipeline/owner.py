"""Which process works on an MLflow run, and whether it still lives: how a rerun tells an orphan run (its process
was killed) from a run that something is working on.

An owner is "host:pid:start", start being the process's start time in clock ticks since boot (/proc), so a pid
reused by another process does not count as the owner. On the owner's host that is exact and immediate; a run
owned on another host (a Prefect worker writing to a shared tracking server) counts as gone once its heartbeat,
refreshed every HEARTBEAT_S seconds while the owner lives, is older than STALE_S.
"""

from __future__ import annotations

import os
from pathlib import Path
import socket

HEARTBEAT_S = 60.0
STALE_S = 600.0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None without /proc or process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def start_ticks(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{start_ticks(os.getpid())}"


def pid_alive(pid: int, start: str = "") -> bool:
    """True while the process runs (a zombie, killed but not yet reaped, does not); with `start`, only if it is
    still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:  # no /proc (macOS): the pid exists, which is all we can tell
        return True
    return fields[0] not in ("Z", "X") and (not start or fields[19] == start)


def alive(owner: str, heartbeat: float | None, now: float) -> bool:
    """Whether the owner "host:pid:start" of a run is still at work (see the module docstring)."""
    rest = owner.split(":")
    if len(rest) < 3 or not rest[-2].isdigit():
        return True  # not an owner this code wrote: leave the run alone
    host, pid, start = ":".join(rest[:-2]), int(rest[-2]), rest[-1]
    if host == socket.gethostname():
        return pid_alive(pid, start)
    return heartbeat is not None and now - heartbeat < STALE_S
