"""The MLflow run of `dvc repro` is live from the first training step (issue 24): RUNNING with a growing curve while
train runs; killed with kill -9 and listed as KILLED; continued, curve and all, by the next `dvc repro`, which
finishes it once evaluate has logged into it. Tiny digits project in a temporary Git repository."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flows.points import tool_env

from project import ROOT, TINY, make_project, mlflow_runs, run

STEPS, LOG_EVERY, CHECKPOINT_EVERY = 120, 2, 20


def history(client, run_id, key="train_loss"):
    return client.get_metric_history(run_id, key)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`dvc repro` watched through the MLflow store while it trains, killed (its whole process group) once a
    checkpoint exists, then `python -m pipeline checkpoints`, then `dvc repro` again."""
    folder = make_project(tmp_path_factory.mktemp("lifecycle"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"].update(steps=STEPS, log_every=LOG_EVERY, checkpoint_every=CHECKPOINT_EVERY)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git commit -qam 'a longer training'", folder)
    env = tool_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=folder, env=env, start_new_session=True,
                            stdout=open(folder / "killed.log", "w"), stderr=subprocess.STDOUT)
    seen, end = [], time.time() + 900  # (time, status, points of the curve)
    while not (any((folder / "build" / "train_state").glob("*.pt")) and len({n for _, _, n in seen if n}) >= 2):
        assert proc.poll() is None and time.time() < end, (folder / "killed.log").read_text()[-3000:]
        # the run's id is written beside the checkpoint once train has created the store and the run: opening
        # the store before that would run MLflow's schema migrations alongside train's
        ready = any((folder / "build" / "train_state").glob("*.json"))
        client, runs = mlflow_runs(folder) if ready else (None, [])
        if runs:
            seen.append((time.time(), runs[0].info.status, len(history(client, runs[0].info.run_id))))
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    listing = run(f"{sys.executable} -m pipeline checkpoints", folder).stdout
    _, runs = mlflow_runs(folder)
    killed = [(r.info.run_id, r.info.status) for r in runs]
    out = run("dvc repro", folder)
    return folder, seen, listing, killed, out.stdout + out.stderr


@pytest.mark.slow
def test_the_run_is_running_with_a_growing_curve_while_train_runs(killed_and_resumed):
    _, seen, _, _, _ = killed_and_resumed
    assert seen and {status for _, status, _ in seen} == {"RUNNING"}
    counts = [n for _, _, n in seen]
    assert counts == sorted(counts) and len({n for n in counts if n}) >= 2


@pytest.mark.slow
def test_a_killed_training_is_marked_killed_and_its_checkpoint_listed(killed_and_resumed):
    _, _, listing, killed, _ = killed_and_resumed
    assert len(killed) == 1 and killed[0][1] == "KILLED"  # nobody resumed it yet: not shown as running
    line = next(ln for ln in listing.splitlines() if killed[0][0] in ln)
    step, steps = map(int, re.search(r"(\d+)/(\d+)", line).groups())
    assert steps == STEPS and step % CHECKPOINT_EVERY == 0 and 0 < step < STEPS and line.rstrip().endswith("KILLED")


@pytest.mark.slow
def test_the_next_repro_continues_the_same_run_to_finished(killed_and_resumed):
    folder, seen, _, killed, out = killed_and_resumed
    assert re.search(r"train: resumed from step \d+", out)
    client, runs = mlflow_runs(folder)
    assert len(runs) == 1 and runs[0].info.run_id == killed[0][0]
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["ddpm.phase"] == "evaluated" and "bpd" in r.data.metrics
    loss, lr = history(client, r.info.run_id), history(client, r.info.run_id, "lr")
    grid = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [m.step for m in loss] == grid and [m.step for m in lr] == grid  # no gap at the kill, no step twice
    images = [a.path for a in client.list_artifacts(r.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(re.search(r"step\+(\d+)\+", p).group(1)) for p in images) == list(
        range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    # its duration covers the training: it started before the first observation and ended after evaluate
    assert r.info.start_time <= seen[0][0] * 1000 and r.info.end_time >= max(m.timestamp for m in loss)
    versions = client.search_model_versions("name='ddpm-digits'")
    assert [v.run_id for v in versions] == [r.info.run_id]
    assert not list((folder / "build" / "train_state").glob("*.pt"))


@pytest.mark.slow
def test_a_second_repro_makes_no_new_run(killed_and_resumed):
    folder = killed_and_resumed[0]
    assert "Data and pipelines are up to date" in run("dvc repro", folder).stdout
    assert len(mlflow_runs(folder)[1]) == 1


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_stops_train_in_one_line_and_the_next_train_resumes(tmp_path, monkeypatch, capsys):
    """The write of the step-20 checkpoint fails as on a full disk: train stops with one line, the step-10
    checkpoint still loads, the run is FAILED; the next train resumes from step 10 into the same run."""
    import errno

    import torch

    from ddpm_core import checkpoint
    from pipeline import paths
    from pipeline.__main__ import main

    tiny_project(tmp_path, monkeypatch)
    assert main(["prepare"]) == 0
    real_save, writes = torch.save, []

    def full_disk_at_step_20(obj, f):
        writes.append(obj.get("step"))
        if obj.get("step") == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_step_20)
    capsys.readouterr()
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    scratch = next(paths.scratch_dir().glob("*.pt"))
    assert err[-1] == (f"error: train: could not write the checkpoint {scratch} (No space left on device); "
                       f"the previous checkpoint is kept"), err
    assert writes == [10, 20] and checkpoint.load_checkpoint(scratch)["step"] == 10
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["train"]) == 0
    assert "train: resumed from step 10" in capsys.readouterr().out
    client, again = mlflow_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in again] == [(runs[0].info.run_id, "FINISHED")]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")] == list(range(1, 31))


def tiny_project(folder, monkeypatch):
    """params.yaml of the tiny digits configuration in `folder`, the project root and working directory."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("DDPM_PROJECT_ROOT", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_damaged_scratch_checkpoint_is_one_line_naming_how_to_start_over(tmp_path, monkeypatch, capsys):
    import json

    from pipeline import paths
    from pipeline.__main__ import main
    from pipeline.params import load_params
    from pipeline.stages import run_fingerprint

    tiny_project(tmp_path, monkeypatch)
    assert main(["prepare"]) == 0
    name = run_fingerprint(load_params(), json.loads(paths.DATA_INFO.read_text())["sha256"])[:16]
    scratch = paths.scratch_dir() / f"{name}.pt"
    scratch.parent.mkdir(parents=True)
    scratch.write_bytes(b"PK\x03\x04 half a checkpoint")
    capsys.readouterr()
    assert main(["train"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: train: {scratch} is not a loadable ddpm_core checkpoint")
    assert err[0].endswith(f"; to train this configuration from step 0, remove it with `python -m pipeline "
                           f"checkpoints --remove {name}`")
    assert not (tmp_path / "mlflow").exists()  # stopped before any run was made
    assert main(["checkpoints", "--remove", name]) == 0 and not scratch.exists()


@pytest.mark.slow
def test_evaluate_fills_the_steps_a_store_outage_cost_the_curve(tmp_path, monkeypatch):
    """Points the store did not take while training (it was down until training ended) come from the per-step
    losses of reports/train_loss.csv when evaluate completes the run."""
    from ddpm_core.schedules import NoiseSchedule
    from ddpm_core.serving import save_eps_model
    from pipeline import tracking

    from helpers import TINY_MODEL, tiny_unet

    monkeypatch.setenv("DDPM_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    live = tracking.open_training_run("ddpm", tmp_path / "run.json", "tiny", {"train.log_every": 2}, {})
    for step in (2, 4):  # 6 and 8 were lost
        live.log(step, {"train_loss": step / 10})
    tracking.end_training_run(live, "FINISHED")
    eps = tmp_path / "eps.pt"
    save_eps_model(eps, tiny_unet(), NoiseSchedule.named("linear", 30),
                   {"model": TINY_MODEL, "image_shape": [1, 8, 8], "variance": "fixed_small", "objective": "eps",
                    "sampling": {"sampler": "ddim", "steps": 5, "eta": 0.0, "clip_x0": True, "batch_size": 4}})
    steps = list(range(1, 10))
    ids = tracking.log_run("ddpm", {"train.log_every": 2}, {"bpd": 1.0}, (steps, [s / 10 for s in steps]), [], eps,
                           {"run_name": "tiny"}, None, train_run_id=live.run_id, evaluation="k")
    client, runs = mlflow_runs(tmp_path)
    assert ids["run_id"] == live.run_id and [r.info.status for r in runs] == ["FINISHED"]
    curve = client.get_metric_history(live.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in curve) == [(2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8), (9, 0.9)]


def test_a_resumed_training_draws_the_grid_a_kill_interrupted_and_only_that(tmp_path, monkeypatch):
    """The curve had reached step 40 when the kill came, while the step-40 grid was being drawn (the checkpoint
    is written after it, so training resumes from 20): on resume, 20's grid is in the run and is not drawn
    again; 40's is not, and is drawn."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from ddpm_core.schedules import NoiseSchedule
    from pipeline import stages, tracking

    from helpers import tiny_unet

    monkeypatch.setenv("DDPM_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.open_training_run("ddpm", tmp_path / "run.json", "tiny", {}, {})
    for step in range(10, 41, 10):
        first.log(step, {"train_loss": 1.0})
    tracking.log_image(first, np.zeros((8, 8), np.uint8), "samples", 20)
    tracking.end_training_run(first, "KILLED")
    client, _ = mlflow_runs(tmp_path)
    live = tracking.LiveRun(client, first.run_id, after_step=40)
    try:
        assert tracking.image_steps(live, "samples") == {20}
        p = SimpleNamespace(diffusion=SimpleNamespace(variance="fixed_small", objective="eps"))
        hook = stages.checkpoint_grid(p, live, NoiseSchedule.named("linear", 30), (1, 8, 8), torch.device("cpu"))
        for step in (20, 40):
            hook(step, tiny_unet())
        images = [a.path for a in client.list_artifacts(live.run_id, "images") if a.path.endswith(".png")]
        assert sorted(int(re.search(r"step\+(\d+)\+", p).group(1)) for p in images) == [20, 40]
    finally:
        tracking.end_training_run(live, "FINISHED")


def test_orphans_are_runs_whose_owner_process_is_gone(tmp_path, monkeypatch):
    """RUNNING runs owned by a dead process on this host, or by a host whose heartbeat is 10 minutes old, are
    marked KILLED, ending at their last heartbeat; live owners, fresh heartbeats and runs without an owner stay."""
    import socket
    import time

    from pipeline import owner, tracking

    monkeypatch.setenv("DDPM_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    here, now = socket.gethostname(), time.time()
    owners = {"dead": (f"{here}:{dead.pid}:1", now - 30), "me": (owner.me(), now - 30),
              "remote-stale": ("elsewhere:1:1", now - 700), "remote-fresh": ("elsewhere:1:1", now - 60), "none": None}
    mlflow = tracking._connect("ddpm")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("ddpm").experiment_id
    ids = {}
    for name, who in owners.items():
        tags = {tracking.OWNER: who[0], tracking.HEARTBEAT: f"{who[1]:.0f}"} if who else {}
        ids[name] = client.create_run(exp, run_name=name, tags=tags).info.run_id
    last_beat = client.get_run(ids["dead"]).info.start_time // 1000 + 5  # it beat 5 s after it started
    client.set_tag(ids["dead"], tracking.HEARTBEAT, str(last_beat))
    killed = {r.info.run_name for r in tracking.mark_orphans("ddpm")}
    assert killed == {"dead", "remote-stale"}
    status = {name: client.get_run(i).info for name, i in ids.items()}
    assert {n: s.status for n, s in status.items()} == {"dead": "KILLED", "me": "RUNNING", "remote-stale": "KILLED",
                                                        "remote-fresh": "RUNNING", "none": "RUNNING"}
    assert status["dead"].end_time == last_beat * 1000
