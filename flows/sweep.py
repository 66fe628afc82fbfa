"""The sweep flow: every point of a grid over params.yaml keys is one DVC experiment of the pipeline.

    python -m flows.sweep --name NAME [--schedules linear cosine] [--T 100 1000] [--seeds 0 1]
        [--grid key=v1,v2 ...] [--set key=value ...] [--reference key=value ...]
        [--concurrency 2 | --devices 0,1,2,3] [--deployment ddpm-sweep-point/worker]

--schedules, --T and --seeds are shortcuts for --grid diffusion.schedule=..., diffusion.T=..., train.seed=...;
the grid is the cross product of all of them. The summary compares every point with a reference point (the
first of the grid, or the one --reference names) by paired differences with 95% intervals.

Points run as `dvc exp run --temp` in this checkout (at most `concurrency` at once, torch threads split
between them; or, with `devices`, one per free GPU, each with its own CUDA_VISIBLE_DEVICES: flows/devices.py),
or, with `deployment`, as runs of the `ddpm-sweep-point` flow on a Prefect work pool whose
workers each have their own checkout (see flows/deploy.py and the README). Either way each point's
experiment is restorable with `dvc exp apply`, its evaluate stage logs one MLflow child run under the sweep's
parent run, and the summary goes to reports/sweeps/NAME/ and to the flow run's Prefect artifacts.
"""

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
from prefect.futures import as_completed  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows import devices as gpus, interrupt, summary  # noqa: E402
from flows.lifecycle import resumed_step, sweep_parent  # noqa: E402
from flows.progress import Progress  # noqa: E402
from flows.points import (  # noqa: E402
    NAME_RE, Point, PointError, PointResult, collect, combine_axes, dvc_cmd, execute, existing_exp, exp_ref, git,
    make_grid, parse_grid, parse_set, point_params_error, repro_shared, tool_env,
)
from pipeline import tracking  # noqa: E402
from pipeline.params import Overrides, ParamsError, load_params, overrides as typed_overrides  # noqa: E402

Schedule = Literal["linear", "quadratic", "cosine", "sigmoid"]
GridValue = int | float | bool | str | list[int] | None  # a params value: number, choice, flag, list (channel_mults)
RETRIES = 2
NO_RETRY = "(not retried)"  # marks a point flow's failure that running again cannot fix


def _retry_transient(task, task_run, state) -> bool:
    """Retry crashes and kills, never a point whose parameters or data are wrong."""
    exc = state.result(raise_on_failure=False)
    return not interrupt.stopping() and not (isinstance(exc, PointError) and not exc.transient)


def threads_per_point(concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // concurrency)


@task(retries=RETRIES, retry_delay_seconds=5, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE,
      task_run_name="{point.label}")
def run_point(root: Path, sweep: str, point: Point, parent_run_id: str, pool: str = "") -> PointResult:
    """One point in this checkout (holding its GPUs of device pool `pool`, if any); output of `dvc exp run` in
    reports/sweeps/SWEEP/logs/."""
    log = summary.sweep_dir(root, sweep) / "logs" / f"{point.exp_name(sweep)}.log"
    env = {"DDPM_PARENT_RUN_ID": parent_run_id}
    with gpus.held(pool, gpus.point_devices(root, point)) if pool else contextlib.nullcontext() as visible:
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
            get_run_logger().info("%s: on CUDA_VISIBLE_DEVICES=%s", point.label, visible)
        result = execute(root, point, sweep, log, tool_env(env))
    resumed = resumed_step(log) if not result.cached else None
    get_run_logger().info("%s: %s%s%s", point.label, "reused existing experiment " if result.cached else "",
                          f"training resumed from step {resumed}; " if resumed else "",
                          {k: round(v, 4) for k, v in result.metrics.items()})
    return result


@task(retries=RETRIES, retry_delay_seconds=5, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE,
      task_run_name="{point.label} on {deployment}")
def run_point_on_worker(root: Path, sweep: str, point: Point, parent_run_id: str, deployment: str,
                        commit: str) -> PointResult:
    """One point as a run of the point deployment; its experiment comes back through the Git and DVC remotes."""
    from prefect.deployments import run_deployment

    start = time.perf_counter()
    ref = exp_ref(commit, point.exp_name(sweep))
    rev = existing_exp(root, commit, point.exp_name(sweep))
    if rev:  # pulled by an earlier sweep: nothing to run
        return collect(root, point, point.exp_name(sweep), rev, True, time.perf_counter() - start)
    if interrupt.stopping():
        raise PointError("not started, the sweep is being interrupted", transient=False)
    fr = run_deployment(deployment, parameters={
        "sweep": sweep, "commit": commit, "axes": dict(point.axes), "overrides": dict(point.overrides),
        "parent_run_id": parent_run_id}, timeout=0)
    try:
        with interrupt.on_worker(f"sweep {sweep}", fr.id):
            fr = finished_flow_run(fr.id)
    except interrupt.Interrupted as e:
        raise PointError(str(e), transient=False) from None
    if not fr.state.is_completed():
        raise worker_point_error(fr.name, fr.state)
    out = subprocess.run(dvc_cmd("exp", "pull", "origin", ref), cwd=root, env=tool_env(), capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise PointError(f"dvc exp pull origin {ref} failed: {out.stderr.strip()[-400:]}", transient=True)
    rev = git(root, "rev-parse", ref + "^{commit}")
    return collect(root, point, point.exp_name(sweep), rev, False, time.perf_counter() - start)


def worker_point_error(name: str, state) -> PointError:
    """Why a point's flow run on a worker did not complete; retried unless running it again cannot help (a
    failure its flow marked not retried) or someone cancelled it (in the UI, or by stopping the sweep)."""
    message = state.message or state.name
    transient = NO_RETRY not in message and not state.is_cancelled()
    return PointError(f"flow run {name} {state.name}: {message}", transient=transient)


def finished_flow_run(flow_run_id, poll_s: float = 2.0):
    """The flow run, once it is in a final state (Completed, Failed, Crashed, Cancelled)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not (fr := client.read_flow_run(flow_run_id)).state or not fr.state.is_final():
            time.sleep(poll_s)
    return fr


def failed_result(point: Point, sweep: str, reason: str, seconds: float = 0.0) -> PointResult:
    return PointResult(dict(point.axes), "failed", point.exp_name(sweep), seconds=seconds, reason=reason)


def warm_shared_stages(root: Path, name: str, grid: list[Point]) -> None:
    """`dvc repro featurizer` once, so that points running at once restore data and featurizer from the
    run-cache instead of computing them side by side (only when no point changes the data or featurizer)."""
    if any(k.startswith(("data.", "featurizer.")) for p in grid for k in p.settings()):
        return
    log = summary.sweep_dir(root, name) / "logs" / "shared-stages.log"
    if repro_shared(root, log, "featurizer") != 0:
        get_run_logger().warning("dvc repro featurizer failed (see %s); each point runs its own", log)


def submit_points(root: Path, name: str, grid: list[Point], parent: str, concurrency: int,
                  deployment: str | None, devices: list[int] | None = None,
                  progress: Progress | None = None, after: dict[int, int] | None = None) -> list[PointResult]:
    """Invalid points fail at once; the rest run, at most `concurrency` at a time (with `devices`: as many as
    have their GPUs free), each started when a slot frees: the first in grid order that may start. `after`:
    point i -> the point j that must have ended before i starts (e.g. the one that trains i's network).
    `progress`: what counts the ended points (default: of this grid alone)."""
    logger = get_run_logger()
    commit = git(root, "rev-parse", "HEAD")
    results: dict[int, PointResult] = {}
    concurrency = len(devices) if devices else concurrency
    if concurrency > 1 and not deployment:
        warm_shared_stages(root, name, grid)
    pool = gpus.register(devices) if devices else ""
    progress = progress or Progress(f"sweep {name}", len(grid), logger)
    waiting = []
    for i, point in enumerate(grid):
        reason = point_params_error(root, point)
        if not reason and devices and gpus.point_devices(root, point) > len(devices):
            reason = f"train.devices = {gpus.point_devices(root, point)} needs more GPUs than devices = {devices}"
        if reason:
            logger.error("%s cannot run: %s", point.label, reason)
            results[i] = failed_result(point, name, reason)
            progress.ended(results[i], log=False)  # said in the line above
        else:
            waiting.append(i)
    after = after or {}
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        running: dict[Any, int] = {}
        while waiting or running:
            while len(running) < concurrency and (i := next_ready(waiting, after, results, not running)) is not None:
                waiting.remove(i)
                if deployment:
                    future = runner.submit(run_point_on_worker, {
                        "root": root, "sweep": name, "point": grid[i], "parent_run_id": parent,
                        "deployment": deployment, "commit": commit})
                else:
                    future = runner.submit(run_point, {
                        "root": root, "sweep": name, "point": grid[i], "parent_run_id": parent, "pool": pool})
                running[future] = i
            future = next(as_completed(list(running)))  # the first to end, for the progress line and a free slot
            i = running.pop(future)
            future.wait()  # keeps the final state (with its result) here; else .state asks the API, which has no result
            if future.state.is_completed():
                results[i] = future.result()
            else:
                exc = future.state.result(raise_on_failure=False)
                logger.error("%s failed: %s", grid[i].label, exc)
                results[i] = failed_result(grid[i], name, str(exc))
            progress.ended(results[i])
    gpus.release(pool)
    return [results[i] for i in sorted(results)]  # grid order


def next_ready(waiting: list[int], after: dict[int, int], ended: dict[int, Any], idle: bool) -> int | None:
    """The first waiting point whose `after` point has ended (or that waits for none); when nothing runs, the
    first waiting point at all (an `after` that can never end must not stall the sweep)."""
    ready = next((i for i in waiting if i not in after or after[i] in ended), None)
    return waiting[0] if ready is None and idle and waiting else ready


def check_sweep(root: Path, name: str, concurrency: int, deployment: str | None,
                devices: list[int] | None = None) -> None:
    gpus.check_devices(devices, concurrency, deployment)
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
def sweep(name: str, schedules: list[Schedule] | None = None, T: list[int] | None = None,
          overrides: Overrides | None = None, concurrency: int = 1, deployment: str | None = None,
          project: str | None = None, grid: dict[str, list[GridValue]] | None = None, seeds: list[int] | None = None,
          reference: dict[str, GridValue] | None = None, devices: list[int] | None = None):
    """Cross every grid key's values, run every point as a DVC experiment, and compare them with a reference.

    schedules, T, seeds: shortcuts for grid keys diffusion.schedule, diffusion.T, train.seed. grid: any other
    params keys, e.g. {"train.loss": ["simple", "hybrid"]}. overrides: fixed keys for every point, typed by
    section as params.yaml has them (a form in the UI), e.g. {"train": {"steps": 300}} or {"train.steps": 300}.
    reference: the point the others are compared with (default: the first of the grid),
    e.g. {"diffusion.schedule": "linear", "diffusion.T": 100}. concurrency: points at once (torch threads
    are split between them unless train.threads is given). deployment: run the points on a work pool through
    this deployment of `ddpm-sweep-point`. project: the project's folder (default: the current directory).
    devices: GPU numbers, e.g. [0, 1, 2, 3]: up to that many points at once, each with CUDA_VISIBLE_DEVICES
    set to the GPUs it holds (as many as its train.devices); instead of concurrency.
    """
    root = Path(project or ".").resolve()
    try:
        overrides = typed_overrides(overrides or {}).flat()
        check_sweep(root, name, concurrency, deployment, devices)
        axes = combine_axes(schedules, T, grid, seeds)
        at_once = len(devices) if devices else concurrency
        if at_once > 1 and "train.threads" not in overrides and "train.threads" not in axes:
            overrides["train.threads"] = threads_per_point(at_once)
        points = make_grid(axes, overrides)
        experiment = load_params(root / "params.yaml").mlflow.experiment
    except ParamsError as e:
        return refused("sweep", e)
    with project_root_env(root), interrupt.handling(f"sweep {name}"):
        return _run_sweep(root, name, axes, overrides, concurrency, deployment, points, experiment, reference,
                          devices)


def refused(what: str, error: ParamsError):
    """A run whose parameters cannot work ends Failed with one line saying why, no traceback (the UI shows it as
    the run's state message; the served process logs it)."""
    message = f"error: {what}: {error}; edit the parameters and run again"
    get_run_logger().error(message)
    return Failed(message=message)


@contextlib.contextmanager
def project_root_env(root: Path):
    """The MLflow store of this project also when the flow runs from another folder. MLFLOW_TRACKING_URI is
    restored too: mlflow.set_tracking_uri writes it into os.environ, so the next flow in this process (a served
    deployment's next run, for another project) would otherwise log into this project's store."""
    saved = {key: os.environ.get(key) for key in ("DDPM_PROJECT_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["DDPM_PROJECT_ROOT"] = str(root)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_sweep(root, name, axes, overrides, concurrency, deployment, grid, experiment, reference, devices=None):
    start = time.perf_counter()
    parent = sweep_parent(  # a rerun of a killed sweep ends what it left running and reports under its parent
        experiment, f"sweep-{name}", {"sweep.grid": axes, "sweep.overrides": overrides,
                                      "sweep.concurrency": concurrency, "sweep.reference": reference or "first",
                                      "sweep.devices": devices or "none"},
        {"sweep": name, "sweep_deployment": deployment or ""}, git(root, "rev-parse", "HEAD"))
    results: list[PointResult] = []
    try:
        results = submit_points(root, name, grid, parent, concurrency, deployment, devices)
    finally:
        ok = sum(r.status == "ok" for r in results)
        message = f"{ok} of {len(grid)} points succeeded"
        header = f"{message} in {time.perf_counter() - start:.0f} s; commit {git(root, 'rev-parse', 'HEAD')[:10]}; " \
                 f"overrides {overrides or 'none'}; MLflow parent run {parent}"
        summary_ = summary.write_all(root, name, results, header, reference) if results else None
        files = summary_["files"] if summary_ else {}
        if summary_:
            summary.publish_prefect(name, summary_, header)
            log_differences(experiment, results, summary_["frame"])
            alias_best(results)
        tracking.finish_parent_run(
            experiment, parent, {"points_ok": ok, "points_failed": len(grid) - ok}, list(files.values()),
            "FINISHED" if results and ok == len(grid) else "FAILED", {"summary": message})
    print(f"sweep {name}: {message}; summary in {summary.sweep_dir(root, name)}")
    for line in (summary_ or {}).get("verdicts", []):
        print(f"  {line}")
    failed = "; ".join(f"{r.label}: {r.reason}" for r in results if r.status != "ok")
    rows = summary_["frame"].to_dict("records") if summary_ else []
    if ok == len(grid):
        return Completed(message=message, data=rows)
    return Failed(message=f"{message}; failed: {failed}", data=rows)


def log_differences(experiment: str, results: list[PointResult], frame) -> None:
    """The paired differences as MLflow metrics of each point's run (a run reused from an earlier sweep gets
    this sweep's differences)."""
    from flows.analysis import DIFF_COLUMNS

    for r, row in zip(results, frame.to_dict("records")):
        diffs = {k: row[k] for k in DIFF_COLUMNS if row.get(k) is not None and row[k] == row[k]}
        if r.mlflow_run_id and diffs:
            tracking.log_metrics_to(experiment, r.mlflow_run_id, diffs)


def alias_best(results: list[PointResult]) -> None:
    """Point the registry's aliases best-bpd and best-fid at the versions of the points with the lowest bits/dim
    and FID-proxy (point estimates; the summary says which differences are resolved)."""
    ok = [r for r in results if r.status == "ok" and r.mlflow_run_id]
    best = {alias: [(r.metrics[key], r.mlflow_run_id) for r in ok if key in r.metrics]
            for alias, key in (("best-bpd", "bpd"), ("best-fid", "fid_proxy"))}
    for name, version in tracking.set_best_aliases(best).items():
        print(f"registry: {name} -> version {version}")


@flow(name="ddpm-sweep-point", log_prints=True)
def sweep_point(sweep: str, commit: str, axes: dict[str, Any], overrides: dict[str, Any] | None = None,
                parent_run_id: str = "") -> dict[str, Any]:
    """One point on a worker: check out `commit` in the worker's checkout ($DDPM_CHECKOUT), run the
    experiment, and push it to the Git remote `origin` and the default DVC remote."""
    point = Point(tuple(axes.items()), tuple(sorted((overrides or {}).items())))
    try:
        with interrupt.handling(f"point {point.exp_name(sweep)}"):  # a cancelled run stops its dvc processes
            return _point_in_checkout(Path(os.environ.get("DDPM_CHECKOUT") or ".").resolve(), sweep, commit, point,
                                      parent_run_id)
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
    ap.add_argument("--schedules", nargs="+", choices=["linear", "quadratic", "cosine", "sigmoid"],
                    help="shortcut for --grid diffusion.schedule=...")
    ap.add_argument("--T", nargs="+", type=int, help="shortcut for --grid diffusion.T=...")
    ap.add_argument("--seeds", nargs="+", type=int, help="training seeds: shortcut for --grid train.seed=...")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid key and its values (YAML; repeat for more keys)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other params for every point")
    ap.add_argument("--reference", nargs="*", default=[], metavar="KEY=VALUE",
                    help="the point the others are compared with (default: the first of the grid)")
    ap.add_argument("--concurrency", type=int, default=1, help="points at once (default 1)")
    ap.add_argument("--devices", metavar="0,1,...", help="GPUs: a point per free GPU, each with its own "
                    "CUDA_VISIBLE_DEVICES (a point with train.devices N holds N); instead of --concurrency")
    ap.add_argument("--deployment", help="run points on a work pool through this ddpm-sweep-point deployment")
    args = ap.parse_args(argv)
    try:
        overrides, reference = typed_overrides(parse_set(args.set)).flat(), parse_set(args.reference) or None
        grid = parse_grid(args.grid)
        devices = gpus.parse_devices(args.devices) if args.devices is not None else None
        make_grid(combine_axes(args.schedules, args.T, grid, args.seeds), overrides)
        check_sweep(Path.cwd(), args.name, args.concurrency, args.deployment, devices)
    except ParamsError as e:
        print(f"error: sweep: {e}", file=sys.stderr)
        return 2
    with interrupt.enabled():  # Ctrl-C / SIGTERM: stop the points now, keep what a rerun resumes from
        state = sweep(args.name, args.schedules, args.T, overrides, args.concurrency, args.deployment, grid=grid,
                      seeds=args.seeds, reference=reference, devices=devices, return_state=True)
    print(state.message)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
