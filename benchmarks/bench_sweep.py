"""Orchestration overhead of a sweep point, and two points at once against one after the other.

    python benchmarks/bench_sweep.py
writes reports/benchmarks/sweep.json and sweep.md.

1. Overhead: the same point (Fashion-MNIST, small budget) from an empty cache, once as the pipeline's stage
   commands run directly (`python -m pipeline STAGE` for every stage, what `dvc repro` calls) and once as a
   one-point sweep (`python -m flows.sweep`: Prefect's temporary server, the MLflow parent run, the
   DVC experiment in a temporary copy, the summary). Overhead per point = point time in the sweep minus the
   direct time; the target is at most max(15 s, 10% of the point's time).
2. Parallel speed-up: two points (linear, cosine) with the shared stages already cached, first with
   --concurrency 1 and 2 torch threads per point, then with --concurrency 2 and 1 thread per point.
Each measurement runs in its own fresh copy of the project, one after the other, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
BENCH = {
    "diffusion": {"T": 100},
    "train": {"steps": 150, "checkpoint_every": 50},
    "featurizer": {"epochs": 1},
    "sample": {"n": 200, "steps": 20, "batch_size": 200},
    "evaluate": {"bpd_estimator": "all_t", "bpd_passes": 800, "n_fid": 200, "chunk_size": 200},
}
STAGES = ("check", "prepare", "featurizer", "train", "sample", "evaluate")


def env() -> dict[str, str]:
    return {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
            "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def sh(cmd: list[str] | str, cwd: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env(), shell=isinstance(cmd, str), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def make_project(folder: Path, schedule: str = "linear") -> Path:
    for name in ("ddpm_core", "pipeline", "flows"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in BENCH.items():
        params[section].update(values)
    params["diffusion"]["schedule"] = schedule
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q -b main && git config user.email b@b && git config user.name b && dvc init -q", folder)
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    sh("git add -A && git commit -qm bench", folder)
    return folder


def point_seconds(folder: Path, sweep: str) -> dict[str, float]:
    with open(folder / "reports" / "sweeps" / sweep / "summary.csv") as f:
        return {f"{r['schedule']} T={r['T']}": float(r["seconds"]) for r in csv.DictReader(f)}


def overhead(tmp: Path) -> dict:
    direct = make_project(tmp / "direct")
    stage_s = {s: sh([sys.executable, "-m", "pipeline", s], direct) for s in STAGES}
    swept = make_project(tmp / "sweep")
    wall = sh([sys.executable, "-m", "flows.sweep", "--name", "one", "--schedules", "linear", "--T", "100"], swept)
    point = point_seconds(swept, "one")["linear T=100"]
    d = sum(stage_s.values())
    return {"direct_stage_seconds": stage_s, "direct_seconds": d, "sweep_point_seconds": point,
            "sweep_wall_seconds": wall, "overhead_per_point_seconds": point - d,
            "fixed_sweep_overhead_seconds": wall - point, "target_seconds": max(15.0, 0.1 * point),
            "within_target": point - d <= max(15.0, 0.1 * point)}


def parallel(tmp: Path) -> dict:
    folder = make_project(tmp / "parallel")
    sh("dvc repro featurizer", folder)  # shared stages cached for both runs
    seq = sh([sys.executable, "-m", "flows.sweep", "--name", "seq", "--schedules", "linear", "cosine", "--T", "100",
              "--set", "train.threads=2", "--concurrency", "1"], folder)
    par = sh([sys.executable, "-m", "flows.sweep", "--name", "par", "--schedules", "linear", "cosine", "--T", "100",
              "--set", "train.threads=1", "--concurrency", "2"], folder)
    return {"sequential_wall_seconds": seq, "sequential_points": point_seconds(folder, "seq"),
            "parallel_wall_seconds": par, "parallel_points": point_seconds(folder, "par"),
            "speedup": seq / par}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    ap.add_argument("--parts", nargs="+", choices=["overhead", "parallel"], default=["overhead", "parallel"],
                    help="measure only these; the others are kept from reports/benchmarks/sweep.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    old = json.loads((OUT / "sweep.json").read_text()) if (OUT / "sweep.json").exists() else {}
    try:
        res = {"command": "python benchmarks/bench_sweep.py", "cpus": os.cpu_count(), "config": BENCH,
               "overhead": overhead(tmp) if "overhead" in args.parts else old["overhead"],
               "parallel": parallel(tmp) if "parallel" in args.parts else old["parallel"]}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sweep.json").write_text(json.dumps(res, indent=2) + "\n")
    o, p = res["overhead"], res["parallel"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in o["direct_stage_seconds"].items())
    (OUT / "sweep.md").write_text(
        f"# Sweep orchestration ({res['cpus']} CPUs)\n\n`{res['command']}`; point config: `{json.dumps(BENCH)}`\n\n"
        f"## Overhead per point (empty cache)\n\n| | seconds |\n|---|---|\n"
        f"| stages run directly ({stages}) | {o['direct_seconds']:.1f} |\n"
        f"| the same point in a sweep (dvc exp run --temp + MLflow child) | {o['sweep_point_seconds']:.1f} |\n"
        f"| **overhead per point** | **{o['overhead_per_point_seconds']:.1f}** (target <= {o['target_seconds']:.0f}: "
        f"{'met' if o['within_target'] else 'NOT met'}) |\n"
        f"| whole one-point sweep (Prefect temporary server, parent run, summary) | {o['sweep_wall_seconds']:.1f} |\n\n"
        f"## Two points at once\n\n| | wall s | per point s |\n|---|---|---|\n"
        f"| one after the other, 2 threads each | {p['sequential_wall_seconds']:.1f} | "
        f"{', '.join(f'{k}: {v:.0f}' for k, v in p['sequential_points'].items())} |\n"
        f"| both at once, 1 thread each | {p['parallel_wall_seconds']:.1f} | "
        f"{', '.join(f'{k}: {v:.0f}' for k, v in p['parallel_points'].items())} |\n"
        f"| **speed-up** | **{p['speedup']:.2f}x** | |\n")
    print((OUT / "sweep.md").read_text())


if __name__ == "__main__":
    main()
