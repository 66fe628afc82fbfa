"""Data-parallel training with torchrun on the CPU (gloo, 2 ranks x 1 thread) on the tiny digits data: the same
run as one process at the same global batch, one writer, kill -9 and resume, a different N refused, and the
train stage started under torchrun by `dvc repro`.

Tolerance (measured): after 20 steps at global batch 32 the 2-rank weights differ from the 1-process weights by
at most 2.2e-5 (learned_range + hybrid + importance-sampled t) and 2.8e-5 (default) in absolute value, weights
up to 1.03, the per-step losses by at most 4.1e-7 relatively: float rounding of convolutions over 16 rows
instead of 32 and of the gradient average, grown a little by Adam. The tests allow 1e-4 and 1e-5.
"""

import json
import os
import re
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm_core import distributed
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.compute import World
from ddpm_core.train import ResumeError, TrainConfig, train
from project import make_project, mlflow_runs, run
from tests.dist_train import MODEL, SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "dist_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEPS = 20


def one_process(path: Path, steps: int, setting: str) -> None:
    subprocess.run([sys.executable, SCRIPT, str(path), str(steps), setting], env=ENV, check=True)


def two_ranks(path: Path, steps: int, setting: str, **popen) -> subprocess.Popen:
    cmd = distributed.torchrun_command(2, [SCRIPT, str(path), str(steps), setting])
    return subprocess.Popen(cmd, env=ENV, **popen)


def floats(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process and 2-rank runs of the learned-variance setting (importance-sampled t: the gathered history)."""
    folder = tmp_path_factory.mktemp("dist")
    one_process(folder / "one.pt", STEPS, "learned_hybrid_is")
    assert two_ranks(folder / "two.pt", STEPS, "learned_hybrid_is").wait() == 0
    return folder


@pytest.mark.slow
def test_two_ranks_at_the_same_global_batch_train_like_one_process(runs):
    a, b = load_checkpoint(runs / "one.pt"), load_checkpoint(runs / "two.pt")
    assert (a["step"], b["step"], a["world_size"], b["world_size"]) == (STEPS, STEPS, 1, 2)
    for key in ("model", "ema"):  # the EMA is updated on every rank from the same weights: equal to one process's
        assert (floats(a[key]) - floats(b[key])).abs().max() < 1e-4, key
    la, lb = a["losses"], b["losses"]
    assert len(lb) == STEPS and ((la - lb).abs() / la.abs()).max() < 1e-5  # the loss curve (global batch means)
    # the importance sampler learned from both ranks' losses in global batch order: same counts, same history
    assert torch.equal(a["t_sampler"]["counts"], b["t_sampler"]["counts"]) and int(b["t_sampler"]["counts"].min()) == 10
    assert (a["t_sampler"]["history"] - b["t_sampler"]["history"]).abs().max() < 1e-5
    assert len(b["rng"]["ranks"]["torch"]) == 2  # each rank's dropout stream is saved


@pytest.mark.slow
def test_only_rank_0_writes_checkpoints(runs):
    saves = (runs / "two.pt.saves").read_text().split()
    assert saves[0::2] == ["0"] * (STEPS // 2) and saves[1::2] == [str(s) for s in range(2, STEPS + 1, 2)]
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("two")) == ["two.pt", "two.pt.saves"]


@pytest.mark.slow
def test_a_killed_two_rank_job_resumes_bit_identically(runs):
    """SIGKILL to the whole job (torchrun and both ranks) once rank 0 starts writing step 6's checkpoint (the
    kill may land in that write: then step 4's is the one kept), then the same command again."""
    path = runs / "killed.pt"
    saves = Path(str(path) + ".saves")
    job = two_ranks(path, STEPS, "learned_hybrid_is", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        if saves.exists() and any(int(s) >= 6 for s in saves.read_text().split()[1::2]):
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = load_checkpoint(path)["step"]
    assert 4 <= killed_at < STEPS, killed_at
    time.sleep(1.0)
    leftover = subprocess.run(["pgrep", "-s", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover
    assert two_ranks(path, STEPS, "learned_hybrid_is").wait() == 0
    a, b = load_checkpoint(runs / "two.pt"), load_checkpoint(path)
    assert b["step"] == STEPS
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["losses"], b["losses"])
    for k in a["t_sampler"]:
        assert torch.equal(a["t_sampler"][k], b["t_sampler"][k]), k


@pytest.mark.slow
def test_resuming_with_another_number_of_ranks_is_refused(runs):
    from ddpm_core.data import load_digits
    from ddpm_core.schedules import NoiseSchedule
    from ddpm_core.unet import build_unet

    extra, T, width = SETTINGS["learned_hybrid_is"]
    cfg = TrainConfig(steps=STEPS + 2, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=2, log_every=1,
                      seed=3, **extra)
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\) and this run has 1: resume it with "
                                          r"train.devices: 2"):
        train(build_unet(MODEL, 1, 8, width), NoiseSchedule.named("linear", T),
              torch.from_numpy(load_digits().train_images), cfg, runs / "two.pt", progress=False, world=World())


def test_each_rank_takes_its_slice_of_the_global_batch():
    assert distributed.rank_slice(32, World(1, 2, 1, "gloo")) == slice(16, 32)
    assert distributed.rank_slice(32, World()) == slice(0, 32)
    with pytest.raises(ValueError, match="a batch of 30 does not split over 4 ranks"):
        distributed.rank_slice(30, World(0, 4, 0, "gloo"))


@pytest.mark.slow
def test_dvc_repro_with_two_devices_trains_under_torchrun(tmp_path):
    """train.devices: 2 in params.yaml: the train stage (`python -m pipeline train`, as DVC runs it) starts
    torchrun with 2 gloo ranks; rank 0 writes the model, the loss curve and the one MLflow run."""
    import yaml

    folder = make_project(tmp_path / "project")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"]["devices"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run("dvc repro", folder)
    assert re.search(r"train: (fp32|bf16 autocast) on cpu \(.+\), 2 processes", out.stdout + out.stderr)
    meta = load_checkpoint(folder / "build" / "model.pt")["meta"]["compute"]
    assert (meta["world_size"], meta["backend"]) == (2, "gloo")
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert metrics["train_world_size"] == 2 and metrics["train_backend"] == "gloo"
    assert len((folder / "reports" / "train_loss.csv").read_text().splitlines()) == 31
    _, runs_ = mlflow_runs(folder)
    assert len(runs_) == 1 and runs_[0].data.tags["train_world_size"] == "2"
    assert not list((folder / "build" / "train_state").glob("*.pt"))  # the finished run's scratch is removed
