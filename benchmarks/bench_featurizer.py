"""Is the FID-proxy featurizer the same on every machine? The featurizer stage's training, under several CPU settings.

Each arm is a fresh process that trains the featurizer exactly as `python -m pipeline featurizer` does
(ddpm_core.fid.load_or_train_featurizer on params.yaml's data and featurizer config) into a scratch file, and
reports the file's md5 (what dvc.lock records), the weights' test accuracy with its 95% interval (binomial, over
the test images) and the wall time. The arms change only what a machine changes: the torch thread count and
PyTorch's CPU kernels (ATEN_CPU_CAPABILITY=default: the portable ones instead of this CPU's AVX2 / AVX-512).
The first arm runs twice: equal md5s there show that a setting gives the same weights every time, so a
difference between arms is the setting's. A study's FID-proxy values compare only under one featurizer
(flows/records.py restores the recorded one where a machine trains another).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_featurizer.py        # writes reports/benchmarks/featurizer.*
    PYTHONPATH=. .venv/bin/python benchmarks/bench_featurizer.py --smoke --out /tmp/x   # digits, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

Z95 = 1.959964


def arms(threads: int) -> list[tuple[str, dict[str, str]]]:
    """(label, environment) per arm: this machine's default threads and kernels (twice), one thread fewer or
    more, and the portable kernels."""
    other = 1 if threads > 1 else 2
    native = {"OMP_NUM_THREADS": str(threads)}
    return [(f"{threads} threads, native kernels", native),
            (f"{threads} threads, native kernels (again)", native),
            (f"{other} thread{'s' if other > 1 else ''}, native kernels", {"OMP_NUM_THREADS": str(other)}),
            (f"{threads} threads, portable kernels", {**native, "ATEN_CPU_CAPABILITY": "default"})]


def train_one(dataset: str) -> dict:
    """In this process: the featurizer stage's training into a scratch file; its md5, accuracy and time."""
    import torch

    from ddpm_core.data import load_dataset
    from ddpm_core.fid import load_or_train_featurizer
    from pipeline.params import load_params
    from pipeline.stages import featurizer_config

    p = load_params(ROOT / "params.yaml")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    data = load_dataset(dataset or p.data.dataset, p.data.root, False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, info = load_or_train_featurizer(Path(tmp) / "featurizer.pt", data, featurizer_config(p), progress=False)
        seconds = time.perf_counter() - start
        md5 = hashlib.md5((Path(tmp) / "featurizer.pt").read_bytes()).hexdigest()
    n = len(data.test_labels)
    acc = info["accuracy"]
    half = Z95 * (acc * (1 - acc) / n) ** 0.5
    return {"md5": md5, "accuracy": acc, "accuracy_ci": [acc - half, acc + half], "n_test": n,
            "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "kernels": torch.backends.cpu.get_cpu_capability(), "dataset": data.name}


def run_arm(label: str, env: dict[str, str], dataset: str) -> dict:
    cmd = [sys.executable, __file__, "--arm"] + (["--dataset", dataset] if dataset else [])
    full = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | {"PYTHONPATH": str(ROOT), **env}
    out = subprocess.run(cmd, env=full, capture_output=True, text=True, check=True, cwd=ROOT)
    return {"arm": label, "env": env, **json.loads(out.stdout.strip().splitlines()[-1])}


def markdown(report: dict) -> str:
    rows = ["| arm | torch threads | kernels | md5 of featurizer.pt | test accuracy (95% CI) | seconds |",
            "|---|---|---|---|---|---|"]
    for a in report["arms"]:
        lo, hi = a["accuracy_ci"]
        rows.append(f"| {a['arm']} | {a['threads']} | {a['kernels']} | `{a['md5']}` | "
                    f"{a['accuracy']:.4f} ({lo:.4f}-{hi:.4f}) | {a['seconds']} |")
    first = report["arms"][0]
    return "\n".join([
        "# The FID-proxy featurizer under several CPU settings", "",
        f"`{report['command']}`; machine: {report['machine']}; data: {first['dataset']} "
        f"({first['n_test']} test images); load average at the end {report['load']:.2f}.", "",
        *rows, "",
        f"- The same setting twice gives {'the same' if report['repeat_identical'] else 'DIFFERENT'} weights.",
        f"- {report['distinct']} distinct featurizers from {len(report['arms'])} arms: the weights depend on "
        "the thread count and the CPU kernels, so FID-proxy values from two machines compare only under one "
        "featurizer (a study restores its recorded one: flows/records.py).",
        "- The accuracies' intervals are binomial over the test images; the md5s are exact.", ""])


def main(args: argparse.Namespace) -> None:
    import torch

    from ddpm_core import compute

    threads = args.threads or torch.get_num_threads()
    dataset = "digits" if args.smoke else ""
    results = []
    for label, env in arms(threads):
        print(f"featurizer: {label} ...", file=sys.stderr, flush=True)
        results.append(run_arm(label, env, dataset))
    report = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/bench_featurizer.py " + " ".join(sys.argv[1:]),
              "machine": list(compute.describe_machine()), "arms": results,
              "repeat_identical": results[0]["md5"] == results[1]["md5"],
              "distinct": len({r["md5"] for r in results}), "load": os.getloadavg()[0]}
    stem = "featurizer_smoke" if args.smoke else "featurizer"
    write_report(args.out, stem, report, markdown(report))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="digits: the code path in seconds (featurizer_smoke.*)")
    ap.add_argument("--threads", type=int, default=0, help="the native arms' threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)  # one arm, in this process
    ap.add_argument("--dataset", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(train_one(a.dataset)))
    else:
        main(a)
