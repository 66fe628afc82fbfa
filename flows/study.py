"""A study: a committed grid file run as one sweep, with the comparisons it exists for written beside the table.

    python -m flows.study flows/studies/schedule-T-objective.yaml [--gpu] [--concurrency N | --devices 0,1,...]
    python -m flows.study FILE --records | --report     (runs nothing: write records / a report from the records)

The grid file names the study, its budget (params keys every point gets; `gpu_budget` replaces them with
--gpu), bundles (one grid value that sets several keys, e.g. `training: improved` = learned_range + hybrid;
a bundle that sets train.steps is a budget axis: see flows/study_budget.py) and a list of grids whose cross
products are joined (e.g. one grid per sampler, each with its own sample.steps). Every point is one DVC experiment of the pipeline, as
in a sweep (flows/sweep.py): a second run reuses every finished point (its record in reports/studies/NAME/points/,
which a fresh clone has too: flows/records.py; else its experiment, else DVC's run-cache), and points that differ
only in sampling keys train once. Results go to reports/studies/NAME/ (NAME-gpu with
--gpu): the sweep summary, the study's contrasts (flows/study_report.py), plots and a sample sheet per model.
The MLflow parent run `study-NAME` has a child run per point (not a point reused from its record in a fresh clone:
its run is in the store of the checkout that computed it); the Prefect flow run carries the summary.
"""

import argparse
import dataclasses
from dataclasses import dataclass
import itertools
from pathlib import Path
import sys
import time
from typing import Any

import yaml

import flows  # noqa: F401  (telemetry off, server start-up time: before prefect is imported)

from prefect import flow, get_run_logger  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from flows import devices as gpus, interrupt, record_runs, records, summary  # noqa: E402
from flows.lifecycle import FLOW_RUN_TAG, crash_flow_runs, current_flow_run  # noqa: E402
from flows.points import NAME_RE, SAMPLE_PREFIX, Point, PointResult, git  # noqa: E402
from flows.progress import Progress  # noqa: E402
from flows.sweep import (  # noqa: E402
    check_sweep, log_differences, project_root_env, refused, submit_points, threads_per_point,
)
from pipeline import tracking  # noqa: E402
from pipeline.params import ParamsError, load_params  # noqa: E402

STUDY_KEYS = {"name", "description", "budget", "gpu_budget", "fixed", "bundles", "grids", "reference"}


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    overrides: dict[str, Any]                     # budget (or gpu_budget) and fixed keys: every point
    bundles: dict[str, dict[str, dict[str, Any]]]  # axis -> value name -> the params keys it sets
    grids: list[dict[str, list[Any]]]             # axis -> values, in axis order; joined in list order
    reference: dict[str, Any]                     # the summary's reference point, in grid terms

    def points(self) -> list[Point]:
        """Every grid's cross product (first axis slowest), bundles expanded to their keys, in order."""
        seen: dict[str, Point] = {}
        extra = tuple(sorted(self.overrides.items()))
        for grid in self.grids:
            for combo in itertools.product(*grid.values()):
                axes: list[tuple[str, Any]] = []
                for key, value in zip(grid, combo):
                    axes += list(self.bundles[key][value].items()) if key in self.bundles else [(key, value)]
                point = Point(tuple(axes), extra)
                seen.setdefault(point.exp_name(self.name), point)
        return list(seen.values())

    def reference_axes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.reference.items():
            out.update(self.bundles[key][value] if key in self.bundles else {key: value})
        return out


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ParamsError(f"{what} must be a mapping of params keys to values")
    return value


def load_study(path: Path, gpu: bool = False) -> Study:
    """The grid file, checked: one ParamsError line naming the problem (each point's params are checked by
    params.py when it runs)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ParamsError(f"cannot read the study file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} is not a study file (a mapping with name, budget, grids)")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ParamsError(f"{path}: unknown section {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(STUDY_KEYS))})")
    name = str(raw.get("name", ""))
    if not NAME_RE.match(name):
        raise ParamsError(f"{path}: name {name!r} is not allowed: letters, digits, '_', '.', '-' (at most 64)")
    if gpu and "gpu_budget" not in raw:
        raise ParamsError(f"{path} has no gpu_budget: --gpu has nothing to apply")
    budget = {**_mapping(raw.get("budget", {}), "budget"), **(_mapping(raw["gpu_budget"], "gpu_budget") if gpu else {})}
    bundles = {k: {n: _mapping(v, f"bundle {k}: {n}") for n, v in _mapping(b, f"bundle {k}").items()}
               for k, b in _mapping(raw.get("bundles", {}), "bundles").items()}
    grids = raw.get("grids")
    if not isinstance(grids, list) or not grids:
        raise ParamsError(f"{path}: grids must be a non-empty list of mappings (axis: [values])")
    grids = [_check_grid(g, i, bundles) for i, g in enumerate(grids)]
    if any(list(g) != list(grids[0]) for g in grids):
        raise ParamsError(f"{path}: every grid must have the same axes in the same order")
    overrides = {**_mapping(raw.get("fixed", {}), "fixed"), **budget}
    axis_keys = {k for g in grids for a in g for k in (_bundle_keys(bundles[a]) if a in bundles else [a])}
    clash = sorted(axis_keys & set(overrides))
    if clash:
        raise ParamsError(f"{path}: {clash[0]} is both a grid axis and a budget/fixed key")
    reference = _mapping(raw.get("reference", {}), "reference")
    study = Study(name + ("-gpu" if gpu else ""), str(raw.get("description", "")).strip(), overrides, bundles,
                  grids, reference)
    for key, value in reference.items():
        if key not in grids[0] or (key in bundles and value not in bundles[key]):
            raise ParamsError(f"{path}: reference {key}: {value!r} is not a grid axis value")
    return study


def _bundle_keys(bundle: dict[str, dict[str, Any]]) -> list[str]:
    keys = [list(v) for v in bundle.values()]
    return keys[0] if keys else []


def _check_grid(grid: Any, i: int, bundles: dict) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ParamsError(f"grid {i + 1} must be a mapping of axes to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ParamsError(f"grid {i + 1}: {key} needs a non-empty list of values")
        if key in bundles:
            missing = [v for v in values if v not in bundles[key]]
            if missing:
                raise ParamsError(f"grid {i + 1}: {key} = {missing[0]!r} is not one of {', '.join(bundles[key])}")
            if len({tuple(b) for b in bundles[key].values()}) != 1:
                raise ParamsError(f"bundle {key}: every value must set the same keys")
        elif "." not in key:
            raise ParamsError(f"grid {i + 1}: {key} is neither a params key (section.key) nor a bundle")
    return grid


def study_dir(root: Path, name: str) -> Path:
    return root / "reports" / "studies" / name


@flow(name="ddpm-study", log_prints=True, validate_parameters=True)
def study(path: str, gpu: bool = False, concurrency: int = 1, project: str | None = None,
          devices: list[int] | None = None):
    """Run the study a grid file describes (see flows/studies/), or reuse its finished points, and write its
    summary, contrasts, plots and sample sheets to reports/studies/NAME/. gpu: the file's larger gpu_budget.
    devices: GPU numbers; up to that many points at once, each with its own CUDA_VISIBLE_DEVICES."""
    root = Path(project or ".").resolve()
    try:
        spec = load_study(root / path if not Path(path).is_absolute() else Path(path), gpu)
        check_sweep(root, spec.name, concurrency, None, devices)
        experiment = load_params(root / "params.yaml").mlflow.experiment
    except ParamsError as e:
        return refused("study", e)
    at_once = len(devices) if devices else concurrency
    if at_once > 1 and "train.threads" not in spec.overrides:
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "train.threads": threads_per_point(at_once)})
    with project_root_env(root), interrupt.handling(f"study {spec.name}"):
        return _run_study(root, spec, concurrency, experiment, devices)


def _run_study(root: Path, spec: Study, concurrency: int, experiment: str, devices: list[int] | None = None):
    from flows import study_report

    start, points = time.perf_counter(), spec.points()
    commit = git(root, "rev-parse", "HEAD")
    crash_flow_runs(tracking.mark_orphans(experiment))  # what a killed study left running
    parent = tracking.start_parent_run(
        experiment, f"study-{spec.name}", {"study.grids": spec.grids, "study.overrides": spec.overrides,
                                           "study.bundles": spec.bundles, "study.points": len(points)},
        {"study": spec.name, "sweep": spec.name, "study_commit": commit, FLOW_RUN_TAG: current_flow_run() or ""},
        reuse=earlier_parent_run(experiment, spec.name, commit))
    results: list[PointResult] = []
    files: dict[str, Path] = {}
    try:
        results = run_models_first(root, spec.name, points, parent, concurrency, devices)
    finally:
        ok = sum(r.status == "ok" for r in results)
        message = f"{ok} of {len(points)} points succeeded"
        header = (f"{message} in {time.perf_counter() - start:.0f} s; commit {git(root, 'rev-parse', 'HEAD')[:10]}; "
                  f"every point: {spec.overrides}; MLflow parent run {parent}")
        out = study_dir(root, spec.name)
        summary_ = summary.write_all(root, spec.name, results, header, spec.reference_axes(), out, "Study") if results else None
        if summary_:
            files = {**summary_["files"], **study_report.write_all(root, spec, results, out)}
            summary.publish_prefect(spec.name, summary_, header)
            log_differences(experiment, results, summary_["frame"])
        tracking.finish_parent_run(
            experiment, parent, {"points_ok": ok, "points_failed": len(points) - ok}, list(files.values()),
            "FINISHED" if results and ok == len(points) else "FAILED", {"summary": message})
    print(f"study {spec.name}: {message}; results in {study_dir(root, spec.name)}")
    if ok == len(points):
        return Completed(message=message)
    return Failed(message=message + "; failed: " + "; ".join(f"{r.label}: {r.reason}" for r in results
                                                             if r.status != "ok"))


def model_key(point: Point) -> tuple:
    """What a point trains: its settings without the sampling keys (points that share it share the network)."""
    return tuple(sorted((k, repr(v)) for k, v in point.settings().items() if not k.startswith(SAMPLE_PREFIX)))


def run_models_first(root: Path, name: str, points: list[Point], parent: str, concurrency: int,
                     devices: list[int] | None = None) -> list[PointResult]:
    """The points without a record made by this code (flows/records.py), model by model: a model's first point
    trains it, its other points start once that one has ended (DVC's run-cache restores their train stage, so
    points side by side never train the same model twice), and a free slot takes the next model's first point
    only when no trained model has points left. So few models are ever half done: a run stopped for good loses
    at most the models in progress. Each point's record is written as it ends; each point reused from its record
    gets its MLflow run under `parent` first (flows/record_runs.py). Results in grid order."""
    logger, out, code = get_run_logger(), study_dir(root, name), records.code_id(root)
    progress = Progress(f"study {name}", len(points), logger, on_end=record_keeper(root, name, points, code))
    recorded = {i: r for i, p in enumerate(points) if (r := records.read(out, p, name, code))}
    recorded = dict(zip(recorded, record_runs.log_recorded(root, parent, name, list(recorded.values()))))
    for r in recorded.values():
        progress.ended(r, log=False)
    if recorded:
        logger.info("%d of %d points reused from their records in %s", len(recorded), len(points), out / "points")
    if code is None:
        logger.warning("%s has uncommitted changes: no point records are read or written",
                       ", ".join(records.CODE_PATHS))
    todo = [i for i in range(len(points)) if i not in recorded]
    if todo and code is not None:
        if said := records.pin_featurizer(root, out, summary.sweep_dir(root, name) / "logs" / "shared-stages.log"):
            logger.info("%s", said)
    order, after = model_order([points[i] for i in todo])
    ran = submit_points(root, name, [points[todo[j]] for j in order], parent, concurrency, None, devices, progress,
                        after) if todo else []
    done = recorded | {todo[j]: r for j, r in zip(order, ran)}
    return [done[i] for i in range(len(points))]


def record_keeper(root: Path, name: str, points: list[Point], code: str | None):
    """on_end for the study's progress: the record of each point computed or reused from its experiment."""
    by_name = {p.exp_name(name): p for p in points}

    def keep(result: PointResult) -> None:
        if result.status != "ok" or result.record or code is None:
            return
        try:
            records.write(root, study_dir(root, name), by_name[result.exp_name], result, code,
                          None if result.cached else result.seconds)
        except Exception as e:  # noqa: BLE001  (the point's result stands; only its record is missing)
            get_run_logger().warning("no record for %s: %s", result.exp_name, e)

    return keep


def model_order(points: list[Point]) -> tuple[list[int], dict[int, int]]:
    """The points model by model (grid order within a model and between models' first points), and for each
    position in that order that is not a model's first point, the position of its model's first point."""
    models: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        models.setdefault(model_key(p), []).append(i)
    order = [i for group in models.values() for i in group]
    after = {order.index(i): order.index(group[0]) for group in models.values() for i in group[1:]}
    return order, after


def earlier_parent_run(experiment: str, name: str, commit: str) -> str | None:
    """The parent run of an earlier run of this study at this commit: its points' child runs are under it,
    and reused points log no new ones, so a second run reports there instead of in an empty new parent."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.study = '{name}' and tags.study_commit = '{commit}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def write_records(root: Path, spec: Study) -> int:
    """The records of the points that have an experiment at this checkout's commit but no record made by this
    code (e.g. of a run started before points had records); runs nothing. Returns how many it wrote."""
    from flows.points import collect, existing_exp

    code, out, baseline, written = records.code_id(root), study_dir(root, spec.name), git(root, "rev-parse", "HEAD"), 0
    if code is None:
        raise ParamsError(f"{', '.join(records.CODE_PATHS)} have uncommitted changes: a record could not say "
                          "which code made its point")
    for point in spec.points():
        name = point.exp_name(spec.name)
        rev = existing_exp(root, baseline, name)
        if rev and records.read(out, point, spec.name, code) is None:
            seconds = records.log_seconds(summary.sweep_dir(root, spec.name) / "logs" / f"{name}.log")
            records.write(root, out, point, collect(root, point, name, rev, True, 0.0), code, seconds)
            written += 1
    return written


def write_interim_report(root: Path, spec: Study) -> tuple[int, dict[str, Path]]:
    """The study's summary, contrasts, plots and sheets from its records alone, e.g. to read and commit the
    answers so far of a study that takes several sessions: a point without a record stands as not run yet
    (status "pending"), and every contrast or change that needs it is left out. Runs nothing; a later run of the
    study writes the whole report over it. Returns how many points had a record, and the files."""
    from flows import study_report

    code, out, points = records.code_id(root), study_dir(root, spec.name), spec.points()
    if code is None:
        raise ParamsError(f"{', '.join(records.CODE_PATHS)} have uncommitted changes: the records could not be "
                          "matched to the code that made them")
    results = [records.read(out, p, spec.name, code)
               or PointResult(dict(p.axes), summary.PENDING, p.exp_name(spec.name), reason="no record yet")
               for p in points]
    done = sum(r.status == "ok" for r in results)
    if not done:
        raise ParamsError(f"no point of study {spec.name} has a record in {out / 'points'} for this code ({code})")
    note = (f"**Interim report: {done} of {len(points)} points**, read from their records in points/ (code {code}, "
            f"commit {git(root, 'rev-parse', 'HEAD')[:10]}); the others have not run yet, so every contrast that "
            "needs one of them is missing here. A run of the study writes the whole report over this one.")
    header = f"{note} Every point: {spec.overrides}."
    files = summary.write_all(root, spec.name, results, header, spec.reference_axes(), out, "Study")["files"]
    return done, {**files, **study_report.write_all(root, spec, results, out, note)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="the study's grid file, e.g. flows/studies/schedule-T-objective.yaml")
    ap.add_argument("--gpu", action="store_true", help="the file's gpu_budget (train.device: auto uses the GPU)")
    ap.add_argument("--concurrency", type=int, default=1, help="points at once (default 1)")
    ap.add_argument("--devices", metavar="0,1,...", help="GPUs: a point per free GPU, each with its own "
                    "CUDA_VISIBLE_DEVICES; instead of --concurrency")
    ap.add_argument("--records", action="store_true", help="only write the records of the points finished in "
                    "this checkout (reports/studies/NAME/points/), e.g. to commit a study's progress; runs nothing")
    ap.add_argument("--report", action="store_true", help="only write the report (summary, contrasts, plots, "
                    "sheets) from the points that have a record, the others marked not run yet; runs nothing")
    args = ap.parse_args(argv)
    try:
        devices = gpus.parse_devices(args.devices) if args.devices is not None else None
        gpus.check_devices(devices, args.concurrency, None)
        spec = load_study(Path(args.path), args.gpu)
        print(f"study {spec.name}: {len(spec.points())} points")
        if args.records:
            print(f"study {spec.name}: {write_records(Path.cwd(), spec)} records written in "
                  f"{study_dir(Path.cwd(), spec.name) / 'points'}")
            return 0
        if args.report:
            done, files = write_interim_report(Path.cwd(), spec)
            print(f"study {spec.name}: interim report from {done} of {len(spec.points())} points in "
                  f"{study_dir(Path.cwd(), spec.name)} ({len(files)} files)")
            return 0
    except ParamsError as e:
        print(f"error: study: {e}", file=sys.stderr)
        return 2
    with interrupt.enabled():  # Ctrl-C / SIGTERM: stop the points now, keep what a rerun resumes from
        state = study(args.path, args.gpu, args.concurrency, devices=devices, return_state=True)
    print(state.message)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
