"""The sweep flow: every (schedule, T) point of a grid is one DVC experiment of the pipeline.

    python -m flows.sweep --name NAME --schedules linear cosine --T 100 1000 [--set key=value ...]
        [--concurrency 2] [--deployment ddpm-sweep-point/worker]

Points run as `dvc exp run --temp` in this checkout (at most `concurrency` at once, torch threads split
between them), or, with `deployment`, as runs of the `ddpm-sweep-point` flow on a Prefect work pool whose
workers each have their own checkout (see flows/deploy.py and the README). Either way each point's
experiment is restorable with `dvc exp apply`, its evaluate stage logs one MLflow child run under the sweep's
parent run, and the summary goes to reports/sweeps/NAME/ and to the flow run's Prefect artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Any, Literal

import flows  # noqa: E402,F401  (telemetry off, server start-up time: before prefect is imported)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows import summary  # noqa: E402
from flows.points import (  # noqa: E402
    NAME_RE, Point, PointError, PointResult, collect, dvc_cmd, execute, existing_exp, exp_ref, git,
    make_grid, parse_set, point_params_error, tool_env,
)
from pipeline import tracking  # noqa: E402
from pipeline.params import ParamsError, load_params  # noqa: E402

Schedule = Literal["linear", "quadratic", "cosine", "sigmoid"]
RETRIES = 2
NO_RETRY = "(not retried)"  # marks a point flow's failure that running again cannot fix


def _retry_transient(task, task_run, state) -> bool:
    """Retry crashes and kills, never a point whose parameters or data are wrong."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, PointError) and not exc.transient)


def threads_per_point(concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // concurrency)


@task(retries=RETRIES, retry_delay_seconds=5, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE,
      task_run_name="{point.schedule} T={point.T}")
def run_point(root: Path, sweep: str, point: Point, parent_run_id: str) -> PointResult:
    """One point in this checkout; output of `dvc exp run` in reports/sweeps/SWEEP/logs/."""
    log = summary.sweep_dir(root, sweep) / "logs" / f"{point.exp_name(sweep)}.log"
    result = execute(root, point, sweep, log, tool_env({"DDPM_PARENT_RUN_ID": parent_run_id}))
    get_run_logger().info("%s: %s%s", point.label, "reused existing experiment " if result.cached else "",
                          {k: round(v, 4) for k, v in result.metrics.items()})
    return result


@task(retries=RETRIES, retry_delay_seconds=5, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE,
      task_run_name="{point.schedule} T={point.T} on {deployment}")
def run_point_on_worker(root: Path, sweep: str, point: Point, parent_run_id: str, deployment: str,
                        commit: str) -> PointResult:
    """One point as a run of the point deployment; its experiment comes back through the Git and DVC remotes."""
    from prefect.deployments import run_deployment

    start = time.perf_counter()
    ref = exp_ref(commit, point.exp_name(sweep))
    rev = existing_exp(root, commit, point.exp_name(sweep))
    if rev:  # pulled by an earlier sweep: nothing to run
        return collect(root, point, point.exp_name(sweep), rev, True, time.perf_counter() - start)
    fr = run_deployment(deployment, parameters={
        "sweep": sweep, "commit": commit, "schedule": point.schedule, "T": point.T,
        "overrides": dict(point.overrides), "parent_run_id": parent_run_id}, timeout=None, poll_interval=2)
    if not fr.state.is_completed():
        message = fr.state.message or fr.state.name
        raise PointError(f"flow run {fr.name} {fr.state.name}: {message}", transient=NO_RETRY not in message)
    out = subprocess.run(dvc_cmd("exp", "pull", "origin", ref), cwd=root, env=tool_env(), capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise PointError(f"dvc exp pull origin {ref} failed: {out.stderr.strip()[-400:]}", transient=True)
    rev = git(root, "rev-parse", ref + "^{commit}")
    return collect(root, point, point.exp_name(sweep), rev, False, time.perf_counter() - start)


def failed_result(point: Point, sweep: str, reason: str, seconds: float = 0.0) -> PointResult:
    return PointResult(point.schedule, point.T, "failed", point.exp_name(sweep), seconds=seconds, reason=reason)


def warm_shared_stages(root: Path, name: str, grid: list[Point]) -> None:
    """`dvc repro featurizer` once, so that points running at once restore data and featurizer from the
    run-cache instead of computing them side by side (only when no point changes the data or featurizer)."""
    if any(k.startswith(("data.", "featurizer.")) for p in grid for k, _ in p.overrides):
        return
    log = summary.sweep_dir(root, name) / "logs" / "shared-stages.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run(dvc_cmd("--wait-for-lock", "repro", "featurizer"), cwd=root, env=tool_env(),
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        get_run_logger().warning("dvc repro featurizer failed (see %s); each point runs its own", log)


def submit_points(root: Path, name: str, grid: list[Point], parent: str, concurrency: int,
                  deployment: str | None) -> list[PointResult]:
    """Invalid points fail at once; the rest run, at most `concurrency` at a time."""
    logger = get_run_logger()
    commit = git(root, "rev-parse", "HEAD")
    results, pending = [], []
    if concurrency > 1 and not deployment:
        warm_shared_stages(root, name, grid)
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        for point in grid:
            reason = point_params_error(root, point)
            if reason:
                logger.error("%s cannot run: %s", point.label, reason)
                results.append(failed_result(point, name, reason))
            elif deployment:
                pending.append((point, runner.submit(run_point_on_worker, {
                    "root": root, "sweep": name, "point": point, "parent_run_id": parent,
                    "deployment": deployment, "commit": commit})))
            else:
                pending.append((point, runner.submit(run_point, {
                    "root": root, "sweep": name, "point": point, "parent_run_id": parent})))
        for point, future in pending:
            future.wait()
            if future.state.is_completed():
                results.append(future.result())
            else:
                exc = future.state.result(raise_on_failure=False)
                logger.error("%s failed: %s", point.label, exc)
                results.append(failed_result(point, name, str(exc)))
    return results


def check_sweep(root: Path, name: str, concurrency: int, deployment: str | None) -> None:
    if not NAME_RE.match(name):
        raise ParamsError(f"sweep name {name!r} is not allowed: letters, digits, '_', '.', '-' (at most 64)")
    if concurrency < 1:
        raise ParamsError(f"concurrency = {concurrency} is not allowed: must be >= 1")
    if not (root / "dvc.yaml").exists():
        raise ParamsError(f"{root} has no dvc.yaml: run the sweep from the project's root")
    if deployment and git(root, "status", "--porcelain", "--untracked-files=no"):
        raise ParamsError("the checkout has uncommitted changes, which workers cannot see: commit and push first")
    load_params(root / "params.yaml")


@flow(name="ddpm-sweep", log_prints=True, validate_parameters=True)
def sweep(name: str, schedules: list[Schedule], T: list[int], overrides: dict[str, Any] | None = None,
          concurrency: int = 1, deployment: str | None = None, project: str | None = None):
    """Cross `schedules` with `T`, run every point as a DVC experiment, and summarize them.

    overrides: other params keys for every point, e.g. {"train.steps": 300}. concurrency: points at once
    (torch threads are split between them unless train.threads is given). deployment: run the points on a
    work pool through this deployment of `ddpm-sweep-point` instead of in this checkout. project: the
    project's folder (default: the current directory).
    """
    root = Path(project or ".").resolve()
    overrides = dict(overrides or {})
    check_sweep(root, name, concurrency, deployment)
    if concurrency > 1 and "train.threads" not in overrides:
        overrides["train.threads"] = threads_per_point(concurrency)
    grid = make_grid(list(schedules), list(T), overrides)
    experiment = load_params(root / "params.yaml").mlflow["experiment"]
    with project_root_env(root):
        return _run_sweep(root, name, schedules, T, overrides, concurrency, deployment, grid, experiment)


@contextlib.contextmanager
def project_root_env(root: Path):
    """The MLflow store of this project also when the flow runs from another folder."""
    old = os.environ.get("DDPM_PROJECT_ROOT")
    os.environ["DDPM_PROJECT_ROOT"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DDPM_PROJECT_ROOT", None)
        else:
            os.environ["DDPM_PROJECT_ROOT"] = old


def _run_sweep(root, name, schedules, T, overrides, concurrency, deployment, grid, experiment):
    start = time.perf_counter()
    parent = tracking.start_parent_run(
        experiment, f"sweep-{name}", {"sweep.schedules": list(schedules), "sweep.T": list(T),
                                      "sweep.overrides": overrides, "sweep.concurrency": concurrency},
        {"sweep": name, "sweep_deployment": deployment or ""})
    results: list[PointResult] = []
    try:
        results = submit_points(root, name, grid, parent, concurrency, deployment)
    finally:
        ok = sum(r.status == "ok" for r in results)
        message = f"{ok} of {len(grid)} points succeeded"
        header = f"{message} in {time.perf_counter() - start:.0f} s; commit {git(root, 'rev-parse', 'HEAD')[:10]}; " \
                 f"overrides {overrides or 'none'}; MLflow parent run {parent}"
        files = summary.write_all(root, name, results, header) if results else {}
        if files:
            summary.publish_prefect(name, results, files, header)
        tracking.finish_parent_run(
            experiment, parent, {"points_ok": ok, "points_failed": len(grid) - ok}, list(files.values()),
            "FINISHED" if results and ok == len(grid) else "FAILED", {"summary": message})
    print(f"sweep {name}: {message}; summary in {summary.sweep_dir(root, name)}")
    failed = "; ".join(f"{r.schedule} T={r.T}: {r.reason}" for r in results if r.status != "ok")
    if ok == len(grid):
        return Completed(message=message, data=[r.row() for r in results])
    return Failed(message=f"{message}; failed: {failed}", data=[r.row() for r in results])


@flow(name="ddpm-sweep-point", log_prints=True)
def sweep_point(sweep: str, commit: str, schedule: str, T: int, overrides: dict[str, Any] | None = None,
                parent_run_id: str = "") -> dict[str, Any]:
    """One point on a worker: check out `commit` in the worker's checkout ($DDPM_CHECKOUT), run the
    experiment, and push it to the Git remote `origin` and the default DVC remote."""
    try:
        return _point_in_checkout(Path(os.environ.get("DDPM_CHECKOUT") or ".").resolve(), sweep, commit,
                                  Point(schedule, int(T), tuple(sorted((overrides or {}).items()))), parent_run_id)
    except PointError as e:
        if e.transient:
            raise
        raise PointError(f"{NO_RETRY} {e}", transient=False) from None


def _point_in_checkout(root: Path, sweep: str, commit: str, point: Point, parent_run_id: str) -> dict[str, Any]:
    git(root, "fetch", "-q", "origin")
    if git(root, "rev-parse", "-q", "--verify", "HEAD", check=False) != commit:
        git(root, "checkout", "-q", "--detach", commit)
    env = tool_env({"DDPM_PARENT_RUN_ID": parent_run_id})
    pulled = subprocess.run(dvc_cmd("pull", "--run-cache", "-q"), cwd=root, env=env, capture_output=True, text=True)
    if pulled.returncode != 0:
        print(f"dvc pull --run-cache: {pulled.stderr.strip()[-300:]} (stages that miss the cache will run)")
    log = root / "reports" / "sweeps" / sweep / "logs" / f"{point.exp_name(sweep)}.log"
    result = execute(root, point, sweep, log, env)
    pushed = subprocess.run(dvc_cmd("exp", "push", "--run-cache", "origin", point.exp_name(sweep)), cwd=root,
                            env=env, capture_output=True, text=True)
    if pushed.returncode != 0:
        raise PointError(f"dvc exp push origin {point.exp_name(sweep)} failed: {pushed.stderr.strip()[-400:]}",
                         transient=True)
    print(f"{point.label}: {result.metrics} (pushed {point.exp_name(sweep)} from {root})")
    return result.row()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="sweep name: reports/sweeps/NAME/, experiment names NAME-...")
    ap.add_argument("--schedules", nargs="+", required=True, choices=["linear", "quadratic", "cosine", "sigmoid"])
    ap.add_argument("--T", nargs="+", type=int, required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other params for every point")
    ap.add_argument("--concurrency", type=int, default=1, help="points at once (default 1)")
    ap.add_argument("--deployment", help="run points on a work pool through this ddpm-sweep-point deployment")
    args = ap.parse_args(argv)
    try:
        overrides = parse_set(args.set)
        check_sweep(Path.cwd(), args.name, args.concurrency, args.deployment)
    except ParamsError as e:
        print(f"error: sweep: {e}", file=sys.stderr)
        return 2
    state = sweep(args.name, args.schedules, args.T, overrides, args.concurrency, args.deployment,
                  return_state=True)
    print(state.message)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
