"""Ctrl-C (SIGINT) or SIGTERM to `python -m flows.sweep` / `python -m flows.study`: stop now, and keep what a
rerun of the same command resumes from.

Without this, the signal reached Prefect's temporary server (a child in the same process group, so Ctrl-C in a
terminal stops it too) while the flow went on: running points finished or were retried, and the process then
hung on the dead server, for minutes. Now the command's own handler, installed for the run of the flow:

1. refuses to start any further `dvc` process (a retry of an interrupted point included);
2. sends SIGINT to each running point's processes (`dvc exp run` and its stage: a training ends its MLflow run
   KILLED, DVC removes its temporary copy), then SIGKILL to what is left after GRACE_S;
3. ends this process's MLflow parent runs KILLED and their Prefect flow runs Crashed (where the Prefect server
   still answers; else the next run of the command does), stops its other children (Prefect's temporary
   server);
4. prints one line and exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

What was finished stays: experiments of finished points, training checkpoints (build/train_state/). A rerun
of the same command reuses the finished points, continues a killed training from its last checkpoint and
marks the killed Prefect flow run Crashed (flows/lifecycle.py), as after kill -9. A second Ctrl-C while
stopping kills everything at once.

A run of a Prefect deployment (the UI's Run, a schedule, a worker's point) is stopped the same way when its
runner cancels it: the runner sends SIGTERM to the flow run's process alone and SIGKILLs it 30 s later, which
left the points' `dvc exp run` and stage processes running on, orphaned, to the end of the point. There the
handler does 1 and 2, ends the MLflow parent runs KILLED and exits 143; the flow run's state is the runner's
to set (Cancelled). Other callers of the flows (a test, a notebook) keep their own handlers.

Points that run on a work pool (`--deployment`) are flow runs of their own, in a worker's process: stopping
the sweep asks Prefect to cancel each of them (Cancelling), and their worker stops them as a runner does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Iterator

GRACE_S = 20.0
_procs: set[subprocess.Popen] = set()
_remote: set = set()  # ids of the points' flow runs on a work pool
_lock = threading.RLock()  # the handler runs in the main thread, which may hold it (in `run`)
_stopping = threading.Event()
_enabled = False


class Interrupted(RuntimeError):
    """A point's process was not started (or was stopped) because the command is being interrupted."""


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Around the flow call of a command-line entry point: `handling` installs the handler within it."""
    global _enabled
    _enabled = True
    try:
        yield
    finally:
        _enabled = False


def stopping() -> bool:
    return _stopping.is_set()


def run(cmd: list[str], **kwargs) -> int:
    """subprocess.run(cmd, **kwargs).returncode, for a process the handler stops on an interrupt."""
    with _lock:
        if _stopping.is_set():
            raise Interrupted(f"not started, the command is being interrupted: {' '.join(cmd[:6])}")
        proc = subprocess.Popen(cmd, **kwargs)
        _procs.add(proc)
    try:
        return proc.wait()
    finally:
        with _lock:
            _procs.discard(proc)


@contextlib.contextmanager
def on_worker(what: str, flow_run_id) -> Iterator[None]:
    """While a point's flow run on a work pool runs: stopping `what` cancels it."""
    with _lock:
        _remote.add(flow_run_id)
        stopped = _stopping.is_set()
    try:
        if stopped:  # created just as the command was being interrupted: the handler did not see it
            _cancel_remote(what, [flow_run_id], "interrupted")
            raise Interrupted(f"flow run {flow_run_id} cancelled, the command is being interrupted")
        yield
    finally:
        with _lock:
            _remote.discard(flow_run_id)


def _cancel_remote(what: str, flow_run_ids: list, why: str, timeout: float = 10.0) -> None:
    """Set the flow runs Cancelling, which their workers act on; in a thread, as `_end_runs`."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    def cancel() -> None:
        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            for flow_run_id in flow_run_ids:
                with contextlib.suppress(Exception):
                    client.set_flow_run_state(flow_run_id, Cancelling(message=f"{what} {why}"), force=True)
    _in_thread(cancel, timeout)


def _in_thread(fn, timeout: float) -> None:
    """fn() in a thread with this context (Prefect's settings), for at most `timeout` s: the main thread, where
    the handler runs, may hold a lock that the clients need."""
    import contextvars

    worker = threading.Thread(target=contextvars.copy_context().run, args=(fn,), daemon=True)
    worker.start()
    worker.join(timeout)


def _in_deployment_run() -> bool:
    """Whether this is the process a Prefect runner or worker started for a flow run of a deployment."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


@contextlib.contextmanager
def handling(what: str) -> Iterator[None]:
    """SIGINT and SIGTERM stop `what` (e.g. "study NAME") as the module says, while the block runs: within
    `enabled` (a command) or in a deployment's flow run, and in the main thread (signal handlers can be set
    nowhere else). Installed inside the flow, so it replaces Prefect's SIGTERM handler for the block and
    Prefect's is back afterwards."""
    command = _enabled
    if not (command or _in_deployment_run()) or threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = lambda signum, frame: _stop(what, signum, command)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop(what: str, signum: int, command: bool = True) -> None:
    """`command`: a command-line run, which also ends its Prefect flow runs (Crashed); a deployment's flow run
    (False) leaves its state to the runner that stopped it."""
    import psutil

    if _stopping.is_set():  # a second signal while stopping: everything, now
        _kill_all(psutil.Process().children(recursive=True), signal.SIGKILL)
        os._exit(128 + signum)
    with _lock:
        _stopping.set()
        points, remote = list(_procs), list(_remote)
    name = signal.Signals(signum).name
    again = "the same command again" if command else "the deployment again with the same parameters"
    on_pool = f" and cancelling {len(remote)} point flow run(s) on the work pool" if remote else ""
    print(f"{what}: {name}: stopping {len(points)} running point process(es){on_pool}; run {again} to resume "
          "(finished points are reused, a killed training continues from its last checkpoint)", file=sys.stderr,
          flush=True)
    if remote:
        _cancel_remote(what, remote, f"interrupted by {name}")
    trees = [q for p in points for q in _tree(p.pid)]
    _kill_all(trees, signal.SIGINT)
    _, alive = psutil.wait_procs(trees, timeout=GRACE_S)
    _kill_all(alive, signal.SIGKILL)
    _end_runs(what, signum, crash_flow_run=command)
    rest = psutil.Process().children(recursive=True)  # Prefect's temporary server, anything else of ours
    _kill_all(rest, signal.SIGTERM)
    _, alive = psutil.wait_procs(rest, timeout=5)
    _kill_all(alive, signal.SIGKILL)
    os._exit(128 + signum)


def _tree(pid: int) -> list:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _kill_all(procs: list, sig: int) -> None:
    import psutil

    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            q.send_signal(sig)


def _end_runs(what: str, signum: int, crash_flow_run: bool = True, timeout: float = 10.0) -> None:
    """This process's MLflow parent runs KILLED and (`crash_flow_run`) the Prefect flow runs they name Crashed.
    Where the Prefect server cannot be reached (Ctrl-C stopped the temporary one too) the parent stays RUNNING,
    with its owner gone, so that the next run of the command ends both (flows/lifecycle.py), as after kill -9.
    In a thread (`_in_thread`)."""
    from flows.lifecycle import FLOW_RUN_TAG, crash_flow_runs
    from pipeline import tracking

    def end() -> None:
        for run_id, live in list(tracking._PARENTS.items()):
            with contextlib.suppress(Exception):
                run = live.client.get_run(run_id)
                flow_run = run.data.tags.get(FLOW_RUN_TAG)
                message = f"{what} interrupted by {signal.Signals(signum).name}; run the same command to resume"
                if not (crash_flow_run and flow_run) or crash_flow_runs([run], message, announce=False):
                    live.client.set_terminated(run_id, status="KILLED")
    _in_thread(end, timeout)
