"""One sweep point = one DVC experiment of the project's pipeline (`dvc exp run --temp -S ...`).

A point is reproducible and restorable with DVC's own commands (`dvc exp show`, `dvc exp apply NAME`), and its
stages come from DVC's run-cache when an identical configuration ran before. Results are read back from the
experiment's commit, never from the workspace, so points running side by side cannot mix their files.
"""

from __future__ import annotations

import copy
import csv
import itertools
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import threading
import time
from typing import Any

import yaml

from . import interrupt
from pipeline.params import ParamsError, validate

SAMPLE_PREFIX = "sample."  # params keys that only change how a trained model is sampled

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EXPECTED_ERROR = re.compile(r"^error: (check|prepare|featurizer|train|sample|evaluate): .*$", re.M)
METRIC_KEYS = ("bpd", "bpd_stderr", "bpd_ci_low", "bpd_ci_high", "prior_bpd", "decoder_bpd", "n_bpd",
               "bpd_network_passes", "fid_proxy", "fid_proxy_ci_low", "fid_proxy_ci_high", "fid_proxy_floor",
               "fid_proxy_floor_ci_low", "fid_proxy_floor_ci_high", "kid_proxy", "kid_proxy_stderr",
               "classifier_accuracy", "n_fid", "sample_steps", "sample_seconds", "final_train_loss")
LAST_TERM_KEYS = ("bpd_last_term", "bpd_last_term_ci_low", "bpd_last_term_ci_high", "bpd_without_last_term",
                  "bpd_without_last_term_ci_low", "bpd_without_last_term_ci_high")  # evaluate writes them since #23
_READ_LOCK = threading.Lock()  # dvc.api and `dvc exp pull` share the repository's index


class PointError(RuntimeError):
    """A point failed. `transient` says whether running it again may help (crash, kill) or not (bad params)."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason)
        self.transient = transient


AXIS_TOKENS = {"diffusion.schedule": "", "diffusion.T": "t"}  # experiment names as before: SWEEP-linear-t100


def short_key(key: str, keys: tuple[str, ...] = ()) -> str:
    """'diffusion.T' -> 'T', unless another key of `keys` ends the same way (then the full key)."""
    last = key.rpartition(".")[2]
    return key if sum(k.rpartition(".")[2] == last for k in keys) > 1 else last


@dataclass(frozen=True)
class Point:
    """One point of a grid: its value of every grid key (`axes`, in grid order) and the fixed overrides."""

    axes: tuple[tuple[str, Any], ...]
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.axes)

    @property
    def label(self) -> str:
        """'cosine, T = 100, seed = 1': the schedule by its name, every other axis as key = value."""
        return self.label_of(self.keys)

    @property
    def model_label(self) -> str:
        """The label without the sampling axes (sample.*): the trained model, which the bound measures."""
        return self.label_of([k for k in self.keys if not k.startswith(SAMPLE_PREFIX)])

    def label_of(self, keys) -> str:
        """The label of these axes only, each named as in the whole label."""
        return ", ".join(str(v) if k == "diffusion.schedule" else f"{short_key(k, self.keys)} = {v}"
                         for k, v in self.axes if k in keys)

    def exp_name(self, sweep: str) -> str:
        tokens = [AXIS_TOKENS.get(k, short_key(k, self.keys).replace(".", "_")) + str(hydra_value(v)) for k, v in self.axes]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join([sweep, *tokens]))

    def settings(self) -> dict[str, Any]:
        """Every params key this point sets, as `dvc exp run -S` gets them."""
        return {**dict(self.overrides), **dict(self.axes)}

    def set_args(self) -> list[str]:
        return [arg for k, v in self.settings().items() for arg in ("-S", f"{k}={hydra_value(v)}")]


@dataclass
class PointResult:
    """What the summary shows for one point, and what its paired comparisons need."""

    axes: dict[str, Any]
    status: str                      # "ok" | "failed"
    exp_name: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0             # wall time of this point, orchestration included
    cached: bool = False             # the experiment already existed: nothing was recomputed
    mlflow_run_id: str = ""
    exp_rev: str = ""
    reason: str = ""
    bpd_per_image: dict[int, float] = field(default_factory=dict, repr=False)   # test image id -> bits/dim
    last_term_per_image: dict[int, float] = field(default_factory=dict, repr=False)  # id -> its t = T term
    fid_features: dict[str, Any] = field(default_factory=dict, repr=False)      # gen, test, train: [n, D]
    record: str = ""                 # read from this record directory (flows/records.py), not from an experiment

    @property
    def label(self) -> str:
        return Point(tuple(self.axes.items())).label

    @property
    def model_label(self) -> str:
        return Point(tuple(self.axes.items())).model_label

    def row(self) -> dict[str, Any]:
        keys = tuple(self.axes)
        m = {k: self.metrics.get(k) for k in METRIC_KEYS}
        m |= {k: self.metrics[k] for k in LAST_TERM_KEYS if k in self.metrics}  # absent in older experiments
        return {**{short_key(k, keys): v for k, v in self.axes.items()}, "status": self.status, **m,
                "seconds": round(self.seconds, 1), "cached": self.cached, "exp_name": self.exp_name,
                "mlflow_run_id": self.mlflow_run_id, "reason": self.reason}


def hydra_value(v: Any) -> str:
    """A Python value as DVC's `-S key=value` override grammar (Hydra's) reads it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9_./-]+", v):
        return "'" + v.replace("'", "\\'") + "'"
    return str(v)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (values in YAML, as `dvc exp run -S` takes them) to a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r} is not key=value (e.g. train.steps=200)")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2,...` strings (each value YAML, lists in brackets: `model.channel_mults=[1,2],[1,2,2]`)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            parsed = yaml.safe_load(f"[{values}]") if sep and values.strip() else None
        except yaml.YAMLError:
            parsed = None
        if not key.strip() or not isinstance(parsed, list) or not parsed:
            raise ParamsError(f"--grid {item!r} is not key=value1,value2,... (e.g. diffusion.T=100,1000)")
        grid.setdefault(key.strip(), []).extend(parsed)
    return grid


def combine_axes(schedules: list[str] | None, Ts: list[int] | None, grid: dict[str, list[Any]] | None,
                 seeds: list[int] | None) -> dict[str, list[Any]]:
    """The grid's keys in order: the --schedules / --T / --seeds shortcuts first, then --grid keys."""
    axes: dict[str, list[Any]] = {}
    for key, values in (("diffusion.schedule", schedules), ("diffusion.T", Ts), ("train.seed", seeds)):
        if values:
            axes[key] = list(values)
    for key, values in (grid or {}).items():
        if key in axes:
            raise ParamsError(f"{key} is given twice: as a shortcut (--schedules / --T / --seeds) and in --grid")
        axes[key] = list(values)
    return axes


def make_grid(axes: dict[str, list[Any]], overrides: dict[str, Any]) -> list[Point]:
    """The cross product of the axes (first key slowest), repeated values dropped; a key is an axis or an
    override, never both; two points may not share an experiment name."""
    if not axes or any(not v for v in axes.values()):
        raise ParamsError("a sweep needs at least one value for every grid key (e.g. --schedules linear --T 100)")
    for key in axes:
        if key in overrides:
            raise ParamsError(f"{key} is a sweep axis: give it in the grid, not as an override")
    extra = tuple(sorted(overrides.items()))
    uniq = {k: list({json.dumps(v, sort_keys=True): v for v in vs}.values()) for k, vs in axes.items()}
    grid = [Point(tuple(zip(uniq, combo)), extra) for combo in itertools.product(*uniq.values())]
    names = [p.exp_name("x") for p in grid]
    if len(set(names)) < len(names):
        raise ParamsError("two grid values give the same experiment name; write them differently")
    return grid


def point_params_error(root: Path, point: Point) -> str | None:
    """Validate params.yaml with this point's settings applied: the reason it cannot run, or None."""
    raw = copy.deepcopy(yaml.safe_load((root / "params.yaml").read_text()))
    try:
        for key, value in point.settings().items():
            section, _, name = key.partition(".")
            if not name or section not in raw or not isinstance(raw[section], dict) or name not in raw[section]:
                raise ParamsError(f"unknown key {key} (see params.yaml)")
            raw[section][name] = value
        validate(raw)
    except ParamsError as e:
        return str(e)
    return None


# --- git and dvc -----------------------------------------------------------------------------------------
def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of stage commands: this interpreter's `python` first on PATH, this code's `flows` importable
    (flows.exp_one), telemetry off."""
    code = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.update(extra or {})
    return env


def git(root: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise PointError(f"git {' '.join(args)} failed: {out.stderr.strip()[-500:]}", transient=False)
    return out.stdout.strip()


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_logged(root: Path, log: Path, cmd: list[str]) -> int:
    """`cmd` in the checkout with the stage environment, its output appended to `log`; its exit status (an
    interrupt stops it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        return interrupt.run(cmd, cwd=root, env=tool_env(), stdout=f, stderr=subprocess.STDOUT)


def repro_shared(root: Path, log: Path, *stages: str) -> int:
    """`dvc repro STAGES` (waiting for DVC's lock), output in `log`: the stages every point of a sweep shares,
    built once in the checkout so that points restore them from the run-cache. Its exit status."""
    return run_logged(root, log, dvc_cmd("--wait-for-lock", "repro", *stages))


def own_exp_cmd(*args: str) -> list[str]:
    """`dvc ARGS` through flows/exp_one.py: an `exp run --temp` that runs only the entry it queued."""
    return [sys.executable, "-m", "flows.exp_one", *args]


def exp_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def existing_exp(root: Path, baseline: str, name: str) -> str | None:
    """The commit of experiment `name` of this baseline, when it already exists (a cached point)."""
    rev = git(root, "rev-parse", "-q", "--verify", exp_ref(baseline, name) + "^{commit}", check=False)
    return rev or None


def failure_reason(log: str, returncode: int) -> PointError:
    """Our stages print one `error: STAGE: ...` line for expected failures: those are not retried."""
    expected = [m.group(0) for m in EXPECTED_ERROR.finditer(log)]
    if expected:
        return PointError(expected[-1], transient=False)
    tail = [ln for ln in log.splitlines() if ln.strip()][-3:]
    killed = f" (killed by signal {-returncode})" if returncode < 0 else ""
    return PointError(f"dvc exp run exited with {returncode}{killed}: {' | '.join(tail)[-600:]}", transient=True)


def run_experiment(root: Path, point: Point, name: str, log_path: Path, env: dict[str, str]) -> None:
    """`dvc exp run --temp` for one point, running only this point's queue entry (flows/exp_one.py: points side
    by side in one checkout never run each other's); its whole output goes to log_path (appended per attempt)."""
    cmd = own_exp_cmd("--wait-for-lock", "exp", "run", "--temp", "--name", name, *point.set_args())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ dvc {' '.join(cmd[3:])}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        try:
            returncode = interrupt.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        except interrupt.Interrupted as e:
            raise PointError(str(e), transient=False) from None
    if returncode != 0:
        text = log_path.read_text()
        raise failure_reason(text[text.rfind("\n$ "):], returncode)


def read_exp_file(root: Path, rev: str, path: str, binary: bool = False) -> str | bytes:
    """A file of an experiment commit, from Git or from the DVC cache (cached outputs)."""
    import dvc.api

    with _READ_LOCK:
        return dvc.api.read(path, repo=str(root), rev=rev, mode="rb" if binary else "r")


def collect(root: Path, point: Point, name: str, rev: str, cached: bool, seconds: float) -> PointResult:
    """The point's metrics, MLflow run, per-image bits/dim and FID features, from its experiment commit."""
    import io

    import numpy as np

    metrics = json.loads(read_exp_file(root, rev, "reports/metrics.json"))
    run = json.loads(read_exp_file(root, rev, "reports/mlflow_run.json"))
    rows = list(csv.DictReader(io.StringIO(read_exp_file(root, rev, "reports/bpd_per_image.csv"))))
    per_image = {int(r["image"]): float(r["bpd"]) for r in rows}
    last = {int(r["image"]): float(r["last_term"]) for r in rows if r.get("last_term")}
    with np.load(io.BytesIO(read_exp_file(root, rev, "build/fid_features.npz", binary=True))) as z:
        features = {k: z[k].astype(np.float64) for k in ("gen", "test", "train")}
    return PointResult(dict(point.axes), "ok", name,
                       {k: metrics[k] for k in (*METRIC_KEYS, *LAST_TERM_KEYS) if k in metrics}, seconds, cached,
                       run.get("run_id", ""), rev, bpd_per_image=per_image, last_term_per_image=last,
                       fid_features=features)


def execute(root: Path, point: Point, sweep: str, log_path: Path, env: dict[str, str]) -> PointResult:
    """Run (or reuse) the point's experiment in the checkout at root, and read its results."""
    start = time.perf_counter()
    baseline = git(root, "rev-parse", "HEAD")
    name = point.exp_name(sweep)
    rev = existing_exp(root, baseline, name)
    cached = rev is not None
    if not cached:
        run_experiment(root, point, name, log_path, env)
        rev = existing_exp(root, baseline, name)
        if rev is None:
            raise PointError(f"dvc exp run finished but made no experiment {name}", transient=True)
    return collect(root, point, name, rev, cached, time.perf_counter() - start)
