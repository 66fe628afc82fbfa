"""What the live MLflow run costs the training: streaming train_loss and lr, and the sample grid at checkpoints.

    python benchmarks/bench_live_run.py            # the default model (params.yaml), ~5 min on 2 cores
    python benchmarks/bench_live_run.py --smoke    # a quick check with few steps
writes reports/benchmarks/live_run.md and live_run.json (--smoke: live_run-smoke.*).

Side by side in one process, in interleaved rounds: `steps` training steps of the default model (batch
train.batch_size, random 28x28 images; the cost does not depend on the pixels) without tracking, and the same
with a pipeline.tracking.LiveRun logging every train.log_every steps into a fresh sqlite store. The overhead is
the per-round ratio of the two (mean with a 95% interval over rounds). The sample grid of each checkpoint
(pipeline.stages.GRID_N images, DDIM-GRID_STEPS, on the EMA model) is timed against train.checkpoint_every
training steps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

OUT = ROOT / "reports" / "benchmarks"


def interval(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    v = np.asarray(values, dtype=float)
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), float(v.mean() - h), float(v.mean() + h)


def trainer(p):
    from ddpm_core.schedules import NoiseSchedule
    from ddpm_core.train import Trainer
    from ddpm_core.unet import build_unet
    from pipeline.stages import train_config

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2048, 1, 28, 28), dtype=torch.uint8)
    net = build_unet(p.model.model_dump(), 1, 28, 1)
    return Trainer(net, NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T), images, train_config(p),
                   torch.device("cpu"))


def round_time(t, steps: int, live=None, log_every: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = t.train_step()
        if live is not None and t.step % log_every == 0:
            live.log(t.step, {"train_loss": loss, "lr": t.sched.get_last_lr()[0]})
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40, help="training steps per round and setting")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 2, 4
    from pipeline import tracking
    from pipeline.params import load_params
    from pipeline.stages import GRID_N, GRID_STEPS, checkpoint_grid

    p = load_params(ROOT / "params.yaml")
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    t = trainer(p)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DDPM_PROJECT_ROOT"] = tmp
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        live = tracking.open_training_run("bench", Path(tmp) / "run.json", "bench-live", {}, {})
        round_time(t, 2)  # warm-up
        ratios, plain, logged = [], [], []
        for _ in range(args.rounds):
            a = round_time(t, args.steps)
            b = round_time(t, args.steps, live, p.train.log_every)
            plain.append(a / args.steps)
            logged.append(b / args.steps)
            ratios.append(b / a)
        grid = checkpoint_grid(p, live, t.schedule, (1, 28, 28), torch.device("cpu"))
        live.after_step = -1
        grid_s = []
        for k in range(3):
            start = time.perf_counter()
            grid(10_000 + k, t.ema.module)
            grid_s.append(time.perf_counter() - start)
        tracking.end_training_run(live, "FINISHED")
    report(args, p, plain, logged, ratios, grid_s, GRID_N, GRID_STEPS)
    return 0


def report(args, p, plain, logged, ratios, grid_s, grid_n, grid_steps) -> None:
    step_s, grid_mean = interval(plain), interval(grid_s)
    interval_s = p.train.checkpoint_every * step_s[0]
    fraction = [g / interval_s for g in grid_mean]
    result = {"rounds": args.rounds, "steps_per_round": args.steps, "log_every": p.train.log_every,
              "checkpoint_every": p.train.checkpoint_every, "step_s": step_s, "step_s_logged": interval(logged),
              "logging_ratio": interval(ratios), "grid_s": grid_mean, "grid_fraction": fraction,
              "cores": os.cpu_count(), "threads": torch.get_num_threads(), "smoke": args.smoke}
    name = "live_run-smoke" if args.smoke else "live_run"
    f = lambda v, k=1.0, d=3: f"{v[0] * k:.{d}f} (95% CI {v[1] * k:.{d}f} to {v[2] * k:.{d}f})"  # noqa: E731
    lines = [f"# What the live MLflow run costs the training{' (smoke)' if args.smoke else ''}", "",
             f"`python benchmarks/bench_live_run.py{' --smoke' if args.smoke else ''}`: the default model, batch "
             f"{p.train.batch_size}, {torch.get_num_threads()} threads on {os.cpu_count()} cores; {args.rounds} "
             f"interleaved rounds of {args.steps} steps per setting.", "",
             "| measure | value |", "|---|---|",
             f"| training step, no tracking (s) | {f(step_s)} |",
             f"| training step, streaming every {p.train.log_every} steps (s) | {f(interval(logged))} |",
             f"| streaming / no tracking (per round) | {f(interval(ratios))} |",
             f"| sample grid at a checkpoint ({grid_n} images, DDIM-{grid_steps}) (s) | {f(grid_mean)} |",
             f"| grid / {p.train.checkpoint_every} training steps | {f(fraction, 100, 1)} % |", ""]
    write_report(OUT, name, result, "\n".join(lines), indent=2)


if __name__ == "__main__":
    sys.exit(main())
