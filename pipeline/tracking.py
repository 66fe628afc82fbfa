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


def log_run(experiment: str, params: dict[str, Any], metrics: dict[str, float], loss: tuple[list, list],
            artifacts: list[Path], model, tags: dict[str, str], registered_name: str | None,
            parent_run_id: str | None = None) -> dict[str, str]:
    """One MLflow run: params, metrics, the loss per step, artifacts and the model. Returns its ids."""
    mlflow = _connect(experiment)
    from mlflow.entities import Metric

    all_tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **tags}
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
        log_model(mlflow, model, registered_name)
        return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}


def log_model(mlflow, model, registered_name: str | None) -> None:
    """The EMA network as MLflow's PyTorch flavour (a state-dict-backed pickle of our own module), with an
    input example and explicit requirements so logging takes about a second."""
    import numpy as np
    import torch

    example = np.zeros((2, model.input_size), dtype=np.float32)
    mlflow.pytorch.log_model(
        model, name="model", input_example=example, serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        code_paths=[str(Path(__file__).resolve().parents[1] / "ddpm_core")],
        registered_model_name=registered_name,
    )


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
