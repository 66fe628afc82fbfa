"""Ctrl-C / SIGTERM to a sweep or study command (flows/interrupt.py): the command stops its points' processes,
children of children included, prints one line and exits 128 + the signal at once; once stopping, nothing new
starts and no point is retried. The end-to-end case (a real sweep, its MLflow and Prefect runs, the rerun) is in
tests/test_sweep_resume.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from flows import interrupt
from flows.points import PointError
from flows.sweep import _retry_transient

from project import ROOT

# a command that runs a "point": a python child that starts a grandchild, both sleeping, pids in files
COMMAND = textwrap.dedent("""
    import contextlib, sys, time
    from pathlib import Path
    from flows import interrupt
    out = Path(sys.argv[1])
    child = ("import subprocess, sys, time; from pathlib import Path; "
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             "Path(sys.argv[1], 'grandchild').write_text(str(g.pid)); time.sleep(120)")
    if sys.argv[2] == "deployment":  # the process a Prefect runner started for a deployment's flow run
        interrupt._in_deployment_run = lambda: True
        entered = contextlib.nullcontext()
    else:
        entered = interrupt.enabled()
    with entered, interrupt.handling("sweep demo"):
        interrupt.run([sys.executable, "-c", child, str(out)])
    print("not interrupted")
""")


def _started(out, proc, seconds=60):
    end = time.time() + seconds
    while not (out / "grandchild").exists():
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.1)
    command = psutil.Process(proc.pid)
    return [command.children()[0].pid, int((out / "grandchild").read_text())]


@pytest.mark.parametrize("sig, entry", [(signal.SIGINT, "command"), (signal.SIGTERM, "command"),
                                        (signal.SIGTERM, "deployment")])
def test_a_signal_stops_the_point_processes_and_exits_at_once(tmp_path, sig, entry):
    """A command's Ctrl-C or kill; a deployment's flow run cancelled (its runner sends SIGTERM to it alone)."""
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, str(tmp_path), entry], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = _started(tmp_path, proc)
    sent = time.time()
    proc.send_signal(sig)  # to the command alone (kill PID); Ctrl-C in a terminal reaches the whole group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig
    assert time.time() - sent < interrupt.GRACE_S  # the points took SIGINT; no SIGKILL was needed
    assert "not interrupted" not in out
    name = signal.Signals(sig).name
    again = "the same command again" if entry == "command" else "the deployment again with the same parameters"
    assert f"sweep demo: {name}: stopping 1 running point process(es); run {again} to resume" in err
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_once_stopping_nothing_starts_and_no_point_is_retried(monkeypatch, tmp_path):
    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=False):
            return self.exc

    crash = Failed(PointError("dvc exp run exited with -9", transient=True))
    assert _retry_transient(None, None, crash)
    stopping = interrupt.threading.Event()
    monkeypatch.setattr(interrupt, "_stopping", stopping)
    stopping.set()
    assert not _retry_transient(None, None, crash)
    with pytest.raises(interrupt.Interrupted, match="not started"):
        interrupt.run([sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
    assert not (tmp_path / "ran").exists()


def test_handlers_only_within_enabled_and_the_old_ones_back_after():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert not interrupt._in_deployment_run()
    with interrupt.handling("sweep demo"):  # a flow called from Python (a test, a notebook): its handlers stay
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with interrupt.enabled():
        with interrupt.handling("sweep demo"):
            assert signal.getsignal(signal.SIGINT) not in before and signal.getsignal(signal.SIGTERM) not in before
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with interrupt.handling("sweep demo"):  # not left enabled for later flows in this process (a test's main())
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_cancelled_deployment_run_leaves_its_flow_run_state_to_the_runner(monkeypatch):
    """The MLflow parent ends KILLED either way; only a command marks its Prefect flow run Crashed (a deployment's
    runner marks it Cancelled once the process is gone)."""
    from flows import lifecycle
    from pipeline import tracking

    class Client:
        def __init__(self):
            self.ended = []

        def get_run(self, run_id):
            return type("Run", (), {"data": type("Data", (), {"tags": {lifecycle.FLOW_RUN_TAG: "fr-1"}})()})()

        def set_terminated(self, run_id, status):
            self.ended.append((run_id, status))

    crashed = []
    monkeypatch.setattr(lifecycle, "crash_flow_runs",
                        lambda runs, message, announce: crashed.append((message, announce)) or ["fr-1"])
    client = Client()
    monkeypatch.setattr(tracking, "_PARENTS", {"run-1": type("Live", (), {"client": client})()})
    interrupt._end_runs("sweep demo", signal.SIGTERM, crash_flow_run=False)
    assert client.ended == [("run-1", "KILLED")] and crashed == []
    interrupt._end_runs("sweep demo", signal.SIGINT)
    assert client.ended == [("run-1", "KILLED")] * 2
    assert crashed == [("sweep demo interrupted by SIGINT; run the same command to resume", False)]
