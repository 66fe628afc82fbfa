"""Concurrent DVC temp experiments in one checkout: each runs its own point once, under its own environment.

A one-stage DVC project whose stage logs (its param, CUDA_VISIBLE_DEVICES) to a file outside the workspace;
eight points run four at a time, each with its own CUDA_VISIBLE_DEVICES, through flows.points.run_experiment
(flows/exp_one.py: DVC's `exp run --temp` that runs only its own queue entry). Plain `dvc exp run --temp`
processes pop each other's entries from the shared temporary queue (see flows/exp_one.py); that is what
`reproduce_duplication` below measures (not a test: a race is seen only sometimes)."""

from concurrent.futures import ThreadPoolExecutor
import os
from pathlib import Path
import subprocess
import sys

import pytest

from flows.points import Point, dvc_cmd, existing_exp, git, run_experiment, tool_env
from tests.project import run

STAGE = """import os, sys, time
p = open("params.yaml").read().split(":")[1].strip()
time.sleep(1.0)
with open(os.environ["QUEUE_TEST_LOG"], "a") as f:
    f.write(f"{p} {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")
open("out.txt", "w").write(p)
"""
DVC_YAML = "stages:\n  work:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [p]\n    outs: [out.txt]\n"


def tiny_dvc_project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text("p: 0\n")
    (folder / "stage.py").write_text(STAGE)
    (folder / "dvc.yaml").write_text(DVC_YAML)
    (folder / ".gitignore").write_text("/out.txt\n")
    run("git init -q -b main && git config user.email t@t && git config user.name t && dvc init -q && "
        "dvc config core.analytics false && git add -A && git commit -qm init", folder)
    return folder


def run_points(folder: Path, n: int, concurrency: int, plain_dvc: bool) -> list[tuple[str, str]]:
    """n points at `concurrency` at once; point k runs with CUDA_VISIBLE_DEVICES=k. Returns the stage's log."""
    log = folder.parent / f"{folder.name}.log"
    log.unlink(missing_ok=True)

    def one(k: int) -> None:
        env = tool_env({"QUEUE_TEST_LOG": str(log), "CUDA_VISIBLE_DEVICES": str(k)})
        point = Point((("p", k),))
        if plain_dvc:
            cmd = dvc_cmd("--wait-for-lock", "exp", "run", "--temp", "--name", f"pt{k}", *point.set_args())
            subprocess.run(cmd, cwd=folder, env=env, capture_output=True)
        else:
            run_experiment(folder, point, f"pt{k}", folder.parent / f"pt{k}.log", env)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return [tuple(line.split()) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_concurrent_points_each_run_once_under_their_own_environment(tmp_path):
    folder = tiny_dvc_project(tmp_path / "proj")
    ran = run_points(folder, 8, 4, plain_dvc=False)
    assert sorted(ran, key=lambda r: int(r[0])) == [(str(k), str(k)) for k in range(8)], ran
    baseline = git(folder, "rev-parse", "HEAD")
    assert all(existing_exp(folder, baseline, f"pt{k}") for k in range(8))
    assert not git(folder, "stash", "list", check=False)


def reproduce_duplication(rounds: int = 5, n: int = 8, concurrency: int = 4, modes: str = "plain,fixed") -> None:
    """`PYTHONPATH=. python tests/test_exp_queue.py ROUNDS [plain|fixed|plain,fixed]`: plain `dvc exp run --temp`
    (and the fixed runner) side by side, counting points that ran more than once or under another's environment."""
    import tempfile

    for plain in [m == "plain" for m in modes.split(",")]:
        bad = 0
        for r in range(rounds):
            folder = tiny_dvc_project(Path(tempfile.mkdtemp()) / "proj")
            ran = run_points(folder, n, concurrency, plain_dvc=plain)
            wrong = [row for row in ran if row[0] != row[1]]
            extra = len(ran) - len({row[0] for row in ran})
            bad += bool(wrong or extra)
            print(f"{'dvc exp run --temp' if plain else 'flows.exp_one'} round {r + 1}: {len(ran)} stage runs for "
                  f"{n} points, {extra} duplicated, {len(wrong)} under another point's environment", flush=True)
        print(f"{'plain' if plain else 'fixed'}: {bad} of {rounds} rounds went wrong", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    reproduce_duplication(int(sys.argv[1]) if len(sys.argv) > 1 else 5,
                          modes=sys.argv[2] if len(sys.argv) > 2 else "plain,fixed")
