"""How long a study report's Frechet distance takes under each BLAS thread count, on this machine as it is now.

A study's report (flows/study_report.py, `python -m flows.study FILE --report`) spends its time in bootstrap
replicates of the FID-proxy: each one a Frechet distance between two sets of 1,000 features of 128 dimensions
(ddpm_core.fid.fid_from_features, as the featurizer writes them). Each arm is a fresh process with
OPENBLAS_NUM_THREADS set (numpy reads it when it loads), timing `--reps` distances one by one. Run it beside
whatever the report would run beside (e.g. a study's points) to see what that load does to each setting; the
load average before and after each arm is written with its figures.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_report_threads.py   # writes reports/benchmarks/report_threads.*
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core.stats import mean_estimate  # noqa: E402


def time_distances(reps: int) -> list[float]:
    """Seconds per distance, `reps` times, on fixed random features shaped as a study's (1,000 x 128)."""
    import time

    from ddpm_core.fid import fid_from_features

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 128)), rng.normal(size=(1000, 128)) + 0.1
    fid_from_features(a, b)  # warm-up: BLAS thread start, first-call allocations
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fid_from_features(a, b)
        out.append(time.perf_counter() - t)
    return out


def run_arm(threads: int, reps: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--arm", "--reps", str(reps)], env=env, check=True,
                          capture_output=True, text=True)
    seconds = np.array(json.loads(done.stdout))
    est = mean_estimate(seconds * 1e3)
    return {"threads": threads, "n": len(seconds), "mean_ms": est.mean, "ci_low_ms": est.ci_low,
            "ci_high_ms": est.ci_high, "median_ms": float(np.median(seconds) * 1e3),
            "load_before": before, "load_after": os.getloadavg()[0]}


def markdown(report: dict) -> str:
    lines = ["# Frechet distance (1,000 x 128 features) by BLAS thread count", "",
             f"{report['cpus']} CPUs; mean with its 95% interval over n distances; 1-min load average around each arm.",
             "", "| OPENBLAS_NUM_THREADS | n | mean ms (95% CI) | median ms | load before / after |",
             "|---|---|---|---|---|"]
    for a in report["arms"]:
        lines.append(f"| {a['threads']} | {a['n']} | {a['mean_ms']:.2f} ({a['ci_low_ms']:.2f} to {a['ci_high_ms']:.2f})"
                     f" | {a['median_ms']:.2f} | {a['load_before']:.1f} / {a['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", default="1,2", help="the arms, comma-separated (default 1,2)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--stem", default="report_threads")
    ap.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)  # one arm, in its own process
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(time_distances(args.reps)))
        return
    report = {"cpus": os.cpu_count(), "arms": [run_arm(int(t), args.reps) for t in args.threads.split(",")]}
    write_report(args.out, args.stem, report, markdown(report))


if __name__ == "__main__":
    main()
