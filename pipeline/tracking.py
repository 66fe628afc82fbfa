"""MLflow: where runs go, a reachability check before training, and one run per trained and evaluated result.

Default store: sqlite at <project>/mlflow/mlflow.db with artifacts in <project>/mlflow/artifacts, found from
the project root also inside DVC's temporary experiment copies. MLFLOW_TRACKING_URI points it elsewhere.

A run's life: `train` creates it before its first step (or reopens the one its scratch checkpoint names) and
streams train_loss and lr into it; `evaluate` completes that same run (metrics, plots, model, FINISHED). A run is
RUNNING exactly while a stage process works on it: each carries its process as owner (pipeline/owner.py), and
a run whose owner is gone is marked KILLED by the next train, evaluate or sweep (`mark_orphans`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import threading
import time
from typing import Any
import urllib.error
import urllib.request

from . import owner
from .paths import project_root

# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says it holds model training runs
# (the values are the ones the installed UI bundle reads).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
OWNER, HEARTBEAT, PHASE = "ddpm.owner", "ddpm.heartbeat", "ddpm.phase"  # phase: train, trained, evaluate, evaluated
EVALUATION = "ddpm.evaluation"      # which evaluation (a hash of its params) completes a training run
TRAIN_RUN = "ddpm.train_run_id"     # on a run that evaluates a model trained in another run
PARENT = "mlflow.parentRunId"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached."""


def store_dir() -> Path:
    return project_root() / "mlflow"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


def _quiet_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def check_reachable(timeout: float = 5.0) -> str:
    """Fail fast (before training) when an HTTP tracking server does not answer /health."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered /health with HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server at {uri} is unreachable ({e}); start it (see README) "
                                f"or unset MLFLOW_TRACKING_URI to use the project's local store") from None
    return uri


@contextlib.contextmanager
def store_lock():
    """One process at a time in the project (creating the sqlite store, claiming a training run)."""
    store_dir().mkdir(parents=True, exist_ok=True)
    with open(store_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _connect(experiment: str):
    """Set the tracking URI and experiment, created with its kind tag; the sqlite store is created once, under
    a file lock (concurrent first-time migrations of one db fail)."""
    import mlflow

    _quiet_env()
    uri = check_reachable()
    mlflow.set_tracking_uri(uri)
    local = uri.startswith("sqlite:///")
    with store_lock() if local else contextlib.nullcontext():
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            where = {"artifact_location": (store_dir() / "artifacts").as_uri()} if local else {}
            mlflow.create_experiment(experiment, tags=EXPERIMENT_KIND, **where)
        elif not any(k in exp.tags for k in EXPERIMENT_KIND):  # a store from before the tag: open it on its runs
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    mlflow.set_experiment(experiment)
    return mlflow


class LiveRun:
    """A run this process works on. It names this process as its owner and keeps a heartbeat; metrics given to
    `log` are sent by a background thread every `interval` seconds (MlflowClient.log_batch), so training never
    waits on the store, and a store that stops answering costs points of the curve (retried), not the run.
    Steps up to `after_step` are dropped: the run already has them (a resumed training redoes a few steps)."""

    def __init__(self, client, run_id: str, after_step: int = 0, interval: float = 2.0):
        self.client, self.run_id, self.after_step, self.interval = client, run_id, after_step, interval
        self._pending: list = []
        self._cond = threading.Condition()
        self._stop = self._urgent = False
        self._failed: str | None = None
        self._attempts = 0  # sends tried so far (flush waits for one after its call)
        client.set_tag(run_id, OWNER, owner.me())
        self._beat()
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.after_step:
            return
        ms = int(time.time() * 1000)
        with self._cond:
            self._pending.extend(Metric(k, float(v), ms, int(step)) for k, v in values.items())
            del self._pending[:-100_000]  # a store down for days: keep the newest points

    def flush(self, timeout: float = 60.0) -> bool:
        """Send what is queued now; False if the store did not take it (then it is retried later)."""
        with self._cond:
            self._urgent, tried = True, self._attempts
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pending or (self._attempts > tried and self._failed), timeout)
            return not self._pending

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=120)

    def _beat(self) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._urgent, self.interval)
                batch, stop, self._urgent = list(self._pending[:1000]), self._stop, False
            sent = not batch or self._send(batch)
            if time.monotonic() - last_beat > owner.HEARTBEAT_S:
                with contextlib.suppress(Exception):
                    self._beat()
                last_beat = time.monotonic()
            with self._cond:
                if sent and batch:
                    del self._pending[:len(batch)]
                self._attempts += bool(batch)
                self._cond.notify_all()
                if stop and (not self._pending or not sent):
                    return

    def _send(self, batch: list) -> bool:
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # the store is down or refused: training goes on
            if self._failed is None:
                print(f"warning: MLflow logging failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                      f"training goes on and the points are sent again when the store answers", file=sys.stderr)
            self._failed = str(e)
            return False
        self._failed = None
        return True


def _live_owner_alive(run, now: float) -> bool:
    tags = run.data.tags
    beat = tags.get(HEARTBEAT)
    return owner.alive(tags[OWNER], float(beat) if beat else None, now)


def image_steps(live: LiveRun, key: str) -> set[int]:
    """The steps at which the run has a `key` image (MLflow names them images/KEY+step+N+timestamp+...; '%'
    before 3.x); empty where the store cannot say."""
    prefix = "images/" + key.replace("/", "~")
    try:
        paths = [a.path for a in live.client.list_artifacts(live.run_id, "images")]
    except Exception:
        return set()
    found = (re.fullmatch(re.escape(prefix) + r"[+%]step[+%](\d+)[+%].*\.png", p) for p in paths)
    return {int(m.group(1)) for m in found if m}


def log_image(live: LiveRun, image, key: str, step: int) -> None:
    """An image of the run at a step (the UI shows them with a step slider); a store that is down costs the image."""
    try:
        live.client.log_image(live.run_id, image, key=key, step=step)
    except Exception as e:
        print(f"warning: MLflow did not take the {key} image of step {step} ({type(e).__name__})", file=sys.stderr)


def mark_orphans(experiment: str) -> list:
    """Mark KILLED every RUNNING run of the experiment whose owner process is gone (a killed training that is
    not being resumed, a killed evaluate or sweep), ending it at its last heartbeat. Returns those runs."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    now, orphans = time.time(), []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        if OWNER in run.data.tags and not _live_owner_alive(run, now):
            beat = run.data.tags.get(HEARTBEAT)
            end = max(int(float(beat) * 1000), run.info.start_time) if beat else None  # None: now
            client.set_terminated(run.info.run_id, "KILLED", end_time=end)
            orphans.append(run)
    return orphans


def _usable_run(client, run_id: str | None, experiment_id: str):
    """The run, if it exists in this store and experiment and was not deleted."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # not in this store (another tracking URI)
        return None
    ok = run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id
    return run if ok else None


def _params_batch(client, run_id: str, params: dict[str, Any], logged: dict[str, str]) -> None:
    """Log the params the run does not have yet (a value MLflow has once cannot change)."""
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()
             if k not in logged]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def open_training_run(experiment: str, record: Path, run_name: str, params: dict[str, Any],
                      tags: dict[str, str]) -> LiveRun:
    """The run of a training, created before its first step (a child of DDPM_PARENT_RUN_ID in a sweep), or the
    run `record` names when that exists here: a resumed, retried or rerun training continues its own run and
    curve (then `after_step` is the last step the curve has). The run's id is written to `record`."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    mark_orphans(experiment)
    parent = os.environ.get("DDPM_PARENT_RUN_ID") or ""
    known = json.loads(record.read_text()).get("run_id") if record.exists() else None
    run = _usable_run(client, known, exp_id)
    if run is None:
        all_tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **env_tags(),
                    **tags, **({PARENT: parent} if parent else {})}
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": tracking_uri()}) + "\n")
        after = 0
    else:
        client.set_tag(run.info.run_id, OWNER, owner.me())  # first, so no one takes it for an orphan again
        client.update_run(run.info.run_id, "RUNNING")
        if parent and run.data.tags.get(PARENT) != parent:  # rerun by another sweep: shown under that one
            client.set_tag(run.info.run_id, PARENT, parent)
        after = max((m.step for m in client.get_metric_history(run.info.run_id, "train_loss")), default=0)
    _params_batch(client, run.info.run_id, params, run.data.params)
    client.set_tag(run.info.run_id, PHASE, "train")
    return LiveRun(client, run.info.run_id, after)


def end_training_run(live: LiveRun, status: str) -> None:
    """Training over: FINISHED (evaluate reopens it), FAILED on an error, KILLED on Ctrl-C. A store that is
    down now costs the status, not the training: the run is left to mark_orphans and evaluate."""
    live.close()
    try:
        if status == "FINISHED":
            live.client.set_tag(live.run_id, PHASE, "trained")
        live.client.set_terminated(live.run_id, status)
    except Exception as e:
        print(f"warning: MLflow run {live.run_id} could not be set {status} ({type(e).__name__}); the next train, "
              f"evaluate or sweep marks it", file=sys.stderr)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_tags() -> dict[str, str]:
    """Tags a run takes from the environment its stage sees: the GPUs a sweep placed it on."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"cuda_visible_devices": devices} if devices is not None else {}


def log_run(experiment: str, params: dict[str, Any], metrics: dict[str, float], loss: tuple[list, list],
            artifacts: list[Path], model: Path, tags: dict[str, str], registered_name: str | None,
            parent_run_id: str | None = None, description: str = "", model_tags: dict[str, Any] | None = None,
            train_run_id: str | None = None, evaluation: str = "") -> dict[str, str]:
    """Complete the training run `train_run_id` with params, metrics, artifacts and the generator built from
    `model` (ddpm_core.serving's eps-model file), registered with `description` and the run's tags plus
    `model_tags` on the version; status FINISHED. A training run that another evaluation (other params: another
    `evaluation` key) completed before, or none at all, gets a new run instead, which names the training run and
    copies its curve (or logs `loss`, (steps, values)). Returns its ids (and the registered version, if any)."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    mark_orphans(experiment)
    all_tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **env_tags(),
                **tags}
    parent = parent_run_id or os.environ.get("DDPM_PARENT_RUN_ID") or ""
    run_id = _claim(client, train_run_id, evaluation, exp_id)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=tags.get("run_name"), tags={
            **all_tags, EVALUATION: evaluation, **({TRAIN_RUN: train_run_id} if train_run_id else {})}).info.run_id
        _copy_curve(client, train_run_id, run_id, exp_id) or _log_curve(client, run_id, loss)
    for key, value in {**all_tags, **({PARENT: parent} if parent else {}), PHASE: "evaluate"}.items():
        client.set_tag(run_id, key, value)
    _fill_curve(client, run_id, loss, int(params.get("train.log_every") or 1))
    live = LiveRun(client, run_id)
    try:
        with mlflow.start_run(run_id=run_id) as run:  # RUNNING again; FINISHED (end time now) when done
            _params_batch(client, run_id, params, client.get_run(run_id).data.params)
            mlflow.log_metrics(metrics)
            for path in artifacts:
                mlflow.log_artifact(str(path))
            version = log_generator(mlflow, model, registered_name, description, {**all_tags, **(model_tags or {})})
            client.set_tag(run_id, PHASE, "evaluated")
            ids = {"run_id": run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}
    finally:
        live.close()
    return ids | ({"model_name": registered_name, "model_version": version} if version else {})


def _claim(client, train_run_id: str | None, evaluation: str, experiment_id: str) -> str | None:
    """The run this evaluation completes: the training run, unless another evaluation claimed it; else the run
    an earlier attempt of this same evaluation made (it was killed, or is forced to run again); else None."""
    from mlflow.entities import RunTag

    local = tracking_uri().startswith("sqlite:///")
    with store_lock() if local else contextlib.nullcontext():  # two points that restored one training
        run = _usable_run(client, train_run_id, experiment_id)
        if run is None:
            return None
        if run.data.tags.get(EVALUATION, evaluation) == evaluation:
            client.log_batch(run.info.run_id, tags=[RunTag(EVALUATION, evaluation)])
            return run.info.run_id
        earlier = client.search_runs([experiment_id], f"tags.`{TRAIN_RUN}` = '{train_run_id}' and "
                                     f"tags.`{EVALUATION}` = '{evaluation}'", max_results=1)
        return earlier[0].info.run_id if earlier else None


def _log_curve(client, run_id: str, loss: tuple[list, list]) -> None:
    from mlflow.entities import Metric

    ms = int(time.time() * 1000)
    points = [Metric("train_loss", float(v), ms, int(step)) for step, v in zip(*loss)]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])


def _fill_curve(client, run_id: str, loss: tuple[list, list], every: int) -> None:
    """Steps of the streamed curve (every `every`-th and the last) that the run lacks, from `loss`: the points
    a tracking store that was down during training did not take."""
    steps, values = loss
    if not len(steps):
        return
    have = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    missing = [(s, v) for s, v in zip(steps, values) if (s % every == 0 or s == steps[-1]) and int(s) not in have]
    if missing:
        _log_curve(client, run_id, tuple(zip(*missing)))


def _copy_curve(client, source: str | None, run_id: str, experiment_id: str) -> bool:
    """The training run's train_loss and lr histories, as they were streamed, into another run."""
    if _usable_run(client, source, experiment_id) is None:
        return False
    points = [m for key in ("train_loss", "lr") for m in client.get_metric_history(source, key)]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])
    return bool(points)


MODEL_ABOUT = ("DDPM generators from this project's pipeline, one version per evaluated run; each version's "
               "description gives its settings and scores. A sweep points the aliases best-bpd and best-fid at its "
               "best versions. Serve: mlflow models serve -m 'models:/{name}@best-fid' --env-manager local")


def generator_signature(meta: dict[str, Any]):
    """rows with a `seed` column -> uint8 [N, C, H, W]; the sampling params with the run's defaults."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    s = meta["sampling"]
    return ModelSignature(
        inputs=Schema([ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *meta["image_shape"]))]),
        params=ParamSchema([ParamSpec("sampler", "string", s["sampler"]), ParamSpec("steps", "long", s["steps"]),
                            ParamSpec("eta", "double", float(s["eta"])),
                            ParamSpec("order", "long", int(s.get("order", 2))),
                            ParamSpec("clip_x0", "boolean", s["clip_x0"])]))


def log_generator(mlflow, model: Path, registered_name: str | None, description: str = "",
                  tags: dict[str, str] | None = None) -> str | None:
    """The generator (pipeline/generator.py, with ddpm_core as its code and `model` as its artifact) as the
    run's `model`; registered as `registered_name` with `description` and `tags` on the version."""
    import pandas as pd
    import torch

    from ddpm_core.checkpoint import load_checkpoint
    from ddpm_core.serving import KIND

    here = Path(__file__).resolve().parent
    meta = load_checkpoint(model)["meta"]
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(here / "generator.py"), artifacts={"eps_model": str(model)},
        code_paths=[str(here.parent / "ddpm_core")], signature=generator_signature(meta),
        input_example=(pd.DataFrame({"seed": [0, 1]}), {"steps": meta["sampling"]["steps"]}),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
        registered_model_name=registered_name, tags={"ddpm_kind": KIND})
    if not registered_name:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    if not client.get_registered_model(registered_name).description:
        client.update_registered_model(registered_name, MODEL_ABOUT.format(name=registered_name))
    if description:
        client.update_model_version(registered_name, version, description)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version


def load_eps_model(model_uri: str, device: str = "cpu"):
    """(eps network, NoiseSchedule, meta) of a logged generator, e.g. "models:/ddpm-fashion-mnist@best-bpd":
    the network itself, for Python users who sample, score or fine-tune it with ddpm_core."""
    import mlflow

    from ddpm_core.serving import load_eps_model as load_file

    _quiet_env()
    mlflow.set_tracking_uri(tracking_uri())
    folder = Path(mlflow.artifacts.download_artifacts(model_uri))
    artifact = mlflow.models.Model.load(folder).flavors["python_function"]["artifacts"]["eps_model"]["path"]
    return load_file(folder / artifact, device)


def set_best_aliases(best: dict[str, list[tuple[float, str]]]) -> dict[str, str]:
    """For each alias ("best-bpd": [(value, run_id), ...]), point it at the registered version of the run
    with the lowest value, per registered model. Returns {"ddpm-digits@best-bpd": version}."""
    import mlflow

    _quiet_env()
    mlflow.set_tracking_uri(check_reachable())
    client, done = mlflow.MlflowClient(), {}
    for alias, scored in best.items():
        lowest: dict[str, tuple[float, str]] = {}
        for value, run_id in scored:
            for v in client.search_model_versions(f"run_id = '{run_id}'"):
                if v.name not in lowest or value < lowest[v.name][0]:
                    lowest[v.name] = (value, str(v.version))
        for name, (_, version) in lowest.items():
            client.set_registered_model_alias(name, alias, version)
            done[f"{name}@{alias}"] = version
    return done


_PARENTS: dict[str, LiveRun] = {}  # parent runs this process owns, until finish_parent_run


def start_parent_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                     reuse: str | None = None) -> str:
    """A parent run (one per sweep or study) that child runs name through DDPM_PARENT_RUN_ID, RUNNING with this
    process as its owner until finish_parent_run. `reuse`: an earlier parent run to reopen instead (a rerun of
    the same sweep reports under the same parent; its `tags` are updated)."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    run = _usable_run(client, reuse, exp_id)
    if run is None:
        run = client.create_run(exp_id, run_name=run_name, tags={"git_commit": git_commit(), **tags})
    else:
        client.set_tag(run.info.run_id, OWNER, owner.me())
        client.update_run(run.info.run_id, "RUNNING")
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
    _params_batch(client, run.info.run_id, params, run.data.params)
    _PARENTS[run.info.run_id] = LiveRun(client, run.info.run_id)
    return run.info.run_id


def find_run(experiment: str, tags: dict[str, str]) -> str | None:
    """The latest run of the experiment that carries all of `tags`."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], query,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_metrics_to(experiment: str, run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to an existing run (e.g. a sweep's paired differences to each point's run)."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))


def finish_parent_run(experiment: str, run_id: str, metrics: dict[str, float], artifacts: list[Path],
                      status: str, tags: dict[str, str] | None = None) -> None:
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    live = _PARENTS.pop(run_id, None)
    if live is not None:
        live.close()
    client.set_terminated(run_id, status=status)
