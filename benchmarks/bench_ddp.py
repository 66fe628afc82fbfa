"""Data-parallel training on this CPU: 2 gloo ranks x 1 thread against 1 process x 2 threads, same global batch.

Each round runs both arms one after the other (the order alternates), each a fresh process (or torchrun job)
that warms up and then times `--steps` training steps of ddpm_core's Trainer (the default UNet, batch
train.batch_size) after its start-up. Per round: the throughput ratio (2 ranks / 1 process); over rounds its
median and 95% interval. Inside the 2-rank job, steps with DDP's gradient all-reduce alternate with steps under
`no_sync()` (the same step without it): the all-reduce share of a step is 1 - t(no_sync) / t(step); and one
all-reduce of a buffer the size of all gradients is timed alone. This is a CPU figure (gloo over loopback, two
cores shared by both ranks), not a GPU one.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ddp.py             # writes reports/benchmarks/ddp.md, ddp.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_ddp.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core import compute, distributed  # noqa: E402
from ddpm_core.stats import mean_estimate  # noqa: E402


def build(smoke: bool):
    """(Trainer config, network, schedule, images) of the measured setting: params.yaml's model and batch."""
    from ddpm_core.schedules import NoiseSchedule
    from ddpm_core.train import TrainConfig
    from ddpm_core.unet import build_unet
    from pipeline.params import load_params

    p = load_params(ROOT / "params.yaml")
    model = p.model.model_dump()
    size, batch = 28, p.train.batch_size
    if smoke:
        model, size, batch = {**model, "channels": 16, "channel_mults": [1, 2], "attention_resolutions": [4]}, 8, 16
    images = torch.randint(0, 256, (4096, 1, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    torch.manual_seed(0)
    net = build_unet(model, 1, size)
    cfg = TrainConfig(steps=10**9, batch_size=batch, lr=p.train.lr, precision="fp32")
    return cfg, net, NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T), images


def timed_steps(trainer, n: int, no_sync: bool = False) -> float:
    ctx = trainer.forward.no_sync() if no_sync else contextlib.nullcontext()  # no_sync: DDP skips its all-reduce
    start = time.perf_counter()
    with ctx:
        for _ in range(n):
            trainer.train_step()
    return time.perf_counter() - start


def worker(args) -> None:
    """One arm, in its own process (or as a rank of a torchrun job): prints one JSON line from rank 0."""
    from ddpm_core.train import Trainer

    torch.set_num_threads(args.threads)
    c = compute.resolve("cpu", "fp32")
    cfg, net, schedule, images = build(args.smoke)
    with distributed.session(c):
        trainer = Trainer(net, schedule, images, cfg, c.device, world=c.world)
        timed_steps(trainer, args.warmup)
        out: dict = {"threads": torch.get_num_threads(), "world_size": c.world.world_size, "batch": cfg.batch_size}
        if c.world.world_size == 1:
            out["seconds_per_step"] = timed_steps(trainer, args.steps) / args.steps
        else:
            synced, unsynced = [], []
            for _ in range(max(1, args.steps // 2)):  # alternate: with and without the gradient all-reduce
                synced.append(timed_steps(trainer, 1))
                unsynced.append(timed_steps(trainer, 1, no_sync=True))
            out["seconds_per_step"] = float(np.mean(synced))
            out["seconds_per_step_no_sync"] = float(np.mean(unsynced))
            out["allreduce_seconds"] = allreduce_seconds(net, args.warmup + 3)
        out["params"] = sum(p.numel() for p in net.parameters())
        if c.world.is_main:
            print("RESULT " + json.dumps(out), flush=True)


def allreduce_seconds(net: torch.nn.Module, reps: int) -> float:
    """One all-reduce of a float32 buffer as large as all gradients (DDP's buckets add up to it)."""
    import torch.distributed as dist

    buf = torch.ones(sum(p.numel() for p in net.parameters()))
    dist.all_reduce(buf)
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    return (time.perf_counter() - start) / reps


def run_arm(ranks: int, args) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    me += ["--smoke"] if args.smoke else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if ranks == 1:
        cmd, env["OMP_NUM_THREADS"] = [sys.executable, *me, "--threads", "2"], "2"
    else:
        cmd, env["OMP_NUM_THREADS"] = distributed.torchrun_command(ranks, [*me, "--threads", "1"]), "1"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({out.returncode}): {out.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(rounds: list[dict]) -> dict:
    one = np.array([r["one"]["batch"] / r["one"]["seconds_per_step"] for r in rounds])
    two = np.array([r["two"]["batch"] / r["two"]["seconds_per_step"] for r in rounds])
    share = np.array([1 - r["two"]["seconds_per_step_no_sync"] / r["two"]["seconds_per_step"] for r in rounds])
    direct = np.array([r["two"]["allreduce_seconds"] / r["two"]["seconds_per_step"] for r in rounds])

    def interval(v: np.ndarray) -> dict:
        est = mean_estimate(v) if len(v) >= 2 else None
        return {"median": float(np.median(v)), "mean": float(v.mean()), "ci_low": est.ci_low if est else float("nan"),
                "ci_high": est.ci_high if est else float("nan"), "values": v.tolist()}

    return {"one_img_s": interval(one), "two_img_s": interval(two), "ratio": interval(two / one),
            "allreduce_share": interval(share), "allreduce_alone_share": interval(direct),
            "allreduce_ms": float(np.median([r["two"]["allreduce_seconds"] * 1e3 for r in rounds])),
            "params": rounds[0]["two"]["params"], "batch": rounds[0]["two"]["batch"]}


def markdown(s: dict, args, machine: list[str]) -> str:
    def cell(d: dict, fmt: str = ".0f") -> str:
        return f"{d['median']:{fmt}} (mean {d['mean']:{fmt}}, 95% CI {d['ci_low']:{fmt}} to {d['ci_high']:{fmt}})"

    return "\n".join([
        "# Data-parallel training on this CPU: 2 gloo ranks x 1 thread against 1 process x 2 threads", "",
        f"Command: `PYTHONPATH=. .venv/bin/python benchmarks/bench_ddp.py {' '.join(sys.argv[1:])}`", "",
        *[f"- {m}" for m in machine],
        f"- {args.rounds} rounds, each arm a fresh process timed over {args.steps} training steps after "
        f"{args.warmup} warm-up steps; the arms alternate order by round. Global batch {s['batch']} "
        f"({s['batch'] // 2} rows per rank), {s['params']:,} parameters, fp32.", "",
        "| | images/s: median (mean, 95% CI over rounds) |", "|---|---|",
        f"| 1 process, 2 threads | {cell(s['one_img_s'])} |",
        f"| 2 gloo ranks, 1 thread each | {cell(s['two_img_s'])} |",
        f"| ratio, 2 ranks / 1 process (per round) | {cell(s['ratio'], '.2f')} |", "",
        f"All-reduce share of a 2-rank step, 1 - t(step under no_sync) / t(step): {cell(s['allreduce_share'], '.3f')}. "
        f"One all-reduce of all {s['params']:,} gradients alone takes {s['allreduce_ms']:.1f} ms, "
        f"{cell(s['allreduce_alone_share'], '.3f')} of a step (DDP overlaps its buckets with the backward pass, "
        "so the first figure is what a step pays).", "",
        "This is a CPU figure: both ranks share the same two cores and talk over loopback. On GPUs each rank has its "
        "own device and NCCL; run benchmarks/device_check.py there.", ""])


def main() -> None:
    args = ARGS
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.rounds, args.steps, args.warmup = 2, 4, 1
    rounds = []
    for r in range(args.rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        got = {n: run_arm(n, args) for n in order}
        rounds.append({"one": got[1], "two": got[2]})
        print(f"round {r + 1}: 1x2 {got[1]['batch'] / got[1]['seconds_per_step']:.0f} img/s, 2x1 "
              f"{got[2]['batch'] / got[2]['seconds_per_step']:.0f} img/s", flush=True)
    s = summarize(rounds)
    machine = [*compute.describe_machine(), f"load average at the end {os.getloadavg()[0]:.1f} (shared machines "
               "move speed by up to 25% from minute to minute; the per-round ratio compares)"]
    stem = "ddp_smoke" if args.smoke else "ddp"
    write_report(args.out, stem, {"summary": s, "rounds": rounds, "machine": machine}, markdown(s, args, machine))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per arm and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 2 rounds of 4 steps: ddp_smoke.*")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    main()
