"""`python -m pipeline checkpoints [--remove NAME ... | --remove-all]`: the scratch checkpoints of trainings that
were killed and have not been resumed (pipeline/scratch.py), with their MLflow runs; remove the ones that will
never resume.

Each is the full training state: the weights, their EMA and AdamW's two moments (4x the model's weights) plus
the per-step loss history; one per configuration fingerprint, never more (a finished training removes its own).
"""

from __future__ import annotations

import argparse
import sys

from . import scratch
from .paths import scratch_dir


def size_text(n: float) -> str:
    """Bytes as people read them: '812 B', '3.4 kB', '18.1 MB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


def run_statuses(run_ids: list[str]) -> dict[str, str]:
    """Each run's status after marking orphans KILLED, or {} when the tracking store cannot be asked."""
    try:
        import mlflow

        from . import tracking
        from .params import load_params

        tracking.mark_orphans(load_params().mlflow.experiment)
        client = mlflow.MlflowClient(tracking.tracking_uri())
        return {r: client.get_run(r).info.status for r in run_ids if r}
    except Exception as e:  # no params.yaml here, the server is down, a run deleted: list without statuses
        print(f"(MLflow run statuses unavailable: {type(e).__name__}: {' '.join(str(e).split())[:120]})")
        return {}


def show(entries: list[scratch.Entry]) -> None:
    if not entries:
        print(f"no scratch checkpoints in {scratch_dir()}")
        return
    statuses = run_statuses([e.run_id for e in entries])
    print(f"{len(entries)} scratch checkpoint(s) in {scratch_dir()}, {size_text(sum(e.size for e in entries))} in all; "
          f"the training of each resumes from it when it runs again:")
    print(f"  {'name':<22} {'step':>11} {'size':>9} {'age':>7}  MLflow run")
    for e in entries:
        step = f"{e.step}/{e.steps}" if e.step is not None else "none yet"
        run = f"{e.run_id} {statuses.get(e.run_id, '')}".strip() or "-"
        print(f"  {e.name:<22} {step:>11} {size_text(e.size):>9} {_age(e.age_s):>7}  {run}"
              f"{'  (training now)' if e.in_use else ''}")
    print("remove those that will never resume: python -m pipeline checkpoints --remove NAME ... (or --remove-all)")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline checkpoints", description=__doc__.splitlines()[0])
    ap.add_argument("--remove", nargs="+", metavar="NAME", default=[], help="remove these (names as listed)")
    ap.add_argument("--remove-all", action="store_true", help="remove every one no process is training now")
    args = ap.parse_args(argv)
    entries = scratch.entries()
    if not (args.remove or args.remove_all):
        show(entries)
        return 0
    names = {e.name for e in entries}
    unknown = [n for n in args.remove if n not in names]
    if unknown:
        print(f"error: checkpoints: no scratch checkpoint named {', '.join(unknown)} in {scratch_dir()} "
              f"(`python -m pipeline checkpoints` lists them)", file=sys.stderr)
        return 2
    chosen = [e for e in entries if args.remove_all or e.name in args.remove]
    if args.remove_all:  # the empty lock files finished trainings leave behind
        for lock in scratch_dir().glob("*.lock"):
            if lock.stem not in names:
                scratch.remove(lock.stem)
    kept = [e.name for e in chosen if not scratch.remove(e.name)]
    freed = sum(e.size for e in chosen if e.name not in kept)
    print(f"removed {len(chosen) - len(kept)} scratch checkpoint(s), {size_text(freed)}"
          + (f"; kept {', '.join(kept)}: a process is training it now" if kept else ""))
    run_statuses([e.run_id for e in chosen])  # their runs, orphaned for good, are marked KILLED
    return 0
