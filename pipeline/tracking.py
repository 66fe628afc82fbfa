"""MLflow: where runs go, a reachability check before training, and one run per evaluated result.

Default store: sqlite at <project>/mlflow/mlflow.db with artifacts in <project>/mlflow/artifacts, found from
the project root also inside DVC's temporary experiment copies. MLFLOW_TRACKING_URI points it elsewhere.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
import subprocess
from typing import Any
import urllib.error
import urllib.request

from .paths import project_root


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


def _connect(experiment: str):
    """Set the tracking URI and experiment; the sqlite store is created once, under a file lock."""
    import mlflow

    _quiet_env()
    uri = check_reachable()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        store_dir().mkdir(parents=True, exist_ok=True)
        with open(store_dir() / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first-time migrations of one db fail
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                mlflow.create_experiment(experiment, artifact_location=(store_dir() / "artifacts").as_uri())
    elif mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment)
    mlflow.set_experiment(experiment)
    return mlflow


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
            parent_run_id: str | None = None, description: str = "",
            model_tags: dict[str, Any] | None = None) -> dict[str, str]:
    """One MLflow run: params, metrics, the loss per step, artifacts and the generator built from `model`
    (ddpm_core.serving's eps-model file), registered with `description` and the run's tags plus
    `model_tags` on the version. Returns its ids (and the registered version, if any)."""
    mlflow = _connect(experiment)
    from mlflow.entities import Metric

    all_tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **env_tags(),
                **tags}
    parent = parent_run_id or os.environ.get("DDPM_PARENT_RUN_ID")
    with mlflow.start_run(run_name=tags.get("run_name"), tags=all_tags, parent_run_id=parent or None) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
        mlflow.log_metrics(metrics)
        client, ts = mlflow.MlflowClient(), int(run.info.start_time)
        points = [Metric("train_loss", float(v), ts, int(s)) for s, v in zip(*loss)]
        for i in range(0, len(points), 1000):
            client.log_batch(run.info.run_id, metrics=points[i:i + 1000])
        for path in artifacts:
            mlflow.log_artifact(str(path))
        version = log_generator(mlflow, model, registered_name, description, {**all_tags, **(model_tags or {})})
        ids = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}
        return ids | ({"model_name": registered_name, "model_version": version} if version else {})


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


def start_parent_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """A parent run (e.g. one per sweep) that child runs name through DDPM_PARENT_RUN_ID; left RUNNING."""
    mlflow = _connect(experiment)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={"git_commit": git_commit(), **tags})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
    return run.info.run_id


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
    client.set_terminated(run_id, status=status)
