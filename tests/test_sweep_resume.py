"""Long runs survive (issue 21): a sweep killed with kill -9 of its whole process group, then run again with the
same command, resumes the point's training from its checkpoint under the project root, ends bit-identical to an
uninterrupted training, and leaves one FINISHED MLflow child per point, nothing RUNNING, and the killed Prefect
flow run Crashed. Ctrl-C during `evaluate` stops the sweep at once (flows/interrupt.py) and a rerun reuses the
trained model. Tiny digits project, one point per sweep."""

import io
import os
from pathlib import Path
import re
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from flows.points import read_exp_file, tool_env

from project import make_project, mlflow_runs, run

LONG = ["train.steps=150", "train.log_every=5", "train.checkpoint_every=25"]


def sweep_cmd(name: str, *settings: str) -> list[str]:
    return [sys.executable, "-m", "flows.sweep", "--name", name, "--schedules", "linear", "--T", "50",
            "--set", *settings]


def sweep_env(prefect_home: Path) -> dict[str, str]:
    """The project's own MLflow store and a Prefect temporary server on a database of this test's own."""
    env = tool_env({"PREFECT_HOME": str(prefect_home)})
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


def start(folder: Path, cmd: list[str], prefect_home: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=folder, env=sweep_env(prefect_home), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def rerun(folder: Path, cmd: list[str], prefect_home: Path) -> str:
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=sweep_env(prefect_home))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def kill_when(proc: subprocess.Popen, ready, what: str, seconds: float = 900, sig: int = signal.SIGKILL) -> int:
    """`sig` (kill -9; SIGINT is a terminal's Ctrl-C) to the sweep's whole process group (dvc, the stage,
    Prefect's server) once ready() holds; the sweep's exit status."""
    end = time.time() + seconds
    while not ready():
        assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before {what}"
        assert time.time() < end, f"no {what} after {seconds} s"
        time.sleep(0.5)
    os.killpg(proc.pid, sig)
    return proc.wait(60)  # Ctrl-C included: raises TimeoutExpired if the sweep hangs (it did, before flows/interrupt)


def processes_in(folder: Path) -> list[str]:
    """Command lines of live processes working in `folder` (a point's DVC copy included)."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(folder):
            found.append(" ".join(proc.info["cmdline"] or []))
    return found


def children(folder: Path, sweep: str):
    client, runs = mlflow_runs(folder)
    parents = [r for r in runs if r.data.tags.get("sweep") == sweep]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], kids, runs


def flow_run_states(prefect_home: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return db.execute("select flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id "
                          "where flow.name = 'ddpm-sweep' order by flow_run.created").fetchall()


def weights(folder: Path, rev: str | None = None) -> dict[str, torch.Tensor]:
    data = read_exp_file(folder, rev, "build/model.pt", binary=True) if rev else (folder / "build/model.pt").read_bytes()
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("resume"))


@pytest.mark.slow
def test_a_sweep_killed_in_training_resumes_bit_identically(project, tmp_path):
    home = tmp_path / "prefect"
    killed = start(project, sweep_cmd("long", *LONG), home, tmp_path / "first.log")
    kill_when(killed, lambda: any((project / "build" / "train_state").glob("*.pt")), "a training checkpoint")
    assert [s for (s,) in flow_run_states(home)] == ["RUNNING"]
    _, runs = mlflow_runs(project)
    assert {r.info.status for r in runs} == {"RUNNING"}  # the parent and the point's run, with nothing behind them
    copies = project / ".dvc" / "tmp" / "exps" / "standalone"
    assert len(list(copies.glob("tmp*.owner"))) == 1  # the killed point's DVC copy, which the rerun removes

    out = rerun(project, sweep_cmd("long", *LONG), home)
    assert not list(copies.glob("tmp*"))
    step = int(re.search(r"linear, T = 50: training resumed from step (\d+)", out).group(1))
    assert 0 < step < 150 and step % 25 == 0
    assert "1 of 1 points succeeded" in out and "of a killed sweep marked Crashed" in out
    assert [s for (s,) in flow_run_states(home)] == ["CRASHED", "COMPLETED"]

    parent, kids, runs = children(project, "long")
    assert parent.info.status == "FINISHED" and len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    client, _ = mlflow_runs(project)
    steps = [m.step for m in client.get_metric_history(kids[0].info.run_id, "train_loss")]
    assert steps == list(range(5, 151, 5))  # one curve: no gap at the kill, no step twice
    assert not list((project / "build" / "train_state").glob("*.pt"))  # a finished training removes its own

    # the same point trained without a kill, in a plain folder with the same params (CPU, one thread)
    plain = tmp_path / "plain"
    plain.mkdir()
    params = yaml.safe_load(run("git show HEAD:params.yaml", project).stdout)
    params["train"].update(steps=150, log_every=5, checkpoint_every=25)
    (plain / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"DDPM_PROJECT_ROOT": str(plain), "PYTHONPATH": str(project)}
    run(f"{sys.executable} -m pipeline prepare && {sys.executable} -m pipeline train", plain, env=env)
    refs = run("git for-each-ref --format='%(objectname) %(refname)' refs/exps", project).stdout.splitlines()
    rev = next(line.split()[0] for line in refs if line.endswith("/long-linear-t50"))
    resumed, uninterrupted = weights(project, rev), weights(plain)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_ctrl_c_in_evaluate_stops_the_sweep_at_once_and_a_rerun_reuses_the_trained_model(project, tmp_path):
    home = tmp_path / "prefect"
    name, settings = "evalkill", ["train.steps=20", "train.seed=4"]
    killed = start(project, sweep_cmd(name, *settings), home, tmp_path / "first.log")

    def evaluating():
        client, runs = mlflow_runs(project)
        return any(r.data.tags.get("ddpm.phase") == "evaluate" and r.info.status == "RUNNING" for r in runs)

    assert kill_when(killed, evaluating, "a running evaluate", sig=signal.SIGINT) == 128 + signal.SIGINT
    first = (tmp_path / "first.log").read_text()
    assert f"sweep {name}: SIGINT: stopping 1 running point process(es); run the same command again" in first
    assert processes_in(project) == []  # the stage, dvc and Prefect's server all gone with it
    out = rerun(project, sweep_cmd(name, *settings), home)
    assert "1 of 1 points succeeded" in out
    assert [s for (s,) in flow_run_states(home)] == ["CRASHED", "COMPLETED"]
    log = (project / "reports" / "sweeps" / name / "logs" / f"{name}-linear-t50.log").read_text()
    last = log[log.rfind("\n$ "):]
    assert "Stage 'train' is cached" in last and "Running stage 'train'" not in last  # no retraining
    assert "Running stage 'evaluate'" in last
    parent, kids, runs = children(project, name)
    assert parent.info.status == "FINISHED" and len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert kids[0].data.tags["ddpm.phase"] == "evaluated" and "bpd" in kids[0].data.metrics
    assert len(mlflow_runs(project)[0].get_metric_history(kids[0].info.run_id, "train_loss")) == 20
    assert not [r for r in runs if r.info.status == "RUNNING"]
