"""A tiny digits copy of the project in a temporary Git repository, for end-to-end tests."""

import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

TINY = {
    "data": {"dataset": "digits"},
    "diffusion": {"T": 50},
    "model": {"channels": 16, "channel_mults": [1, 2], "attention_resolutions": [4]},
    "train": {"steps": 30, "batch_size": 32, "checkpoint_every": 10, "log_every": 1, "threads": 1},
    "featurizer": {"epochs": 1},
    "sample": {"n": 40, "steps": 10, "batch_size": 40},
    "evaluate": {"bpd_passes": 600, "bpd_exact_t": 4, "bpd_draws": 6, "n_fid": 40, "chunk_size": 100},
}


def run(cmd, cwd, check=True, env=None):
    full_env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if not (env or {}).get("MLFLOW_TRACKING_URI") else None
    out = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=full_env)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def make_project(folder: Path) -> Path:
    for name in ("ddpm_core", "pipeline", "flows"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q -b main && git config user.email t@t && git config user.name t && dvc init -q", folder)
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", folder / ".dvc" / "plots")
    run("git add -A && git commit -qm init", folder)
    return folder


def mlflow_runs(folder: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddpm")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path | None = None, seconds: float = 180) -> None:
    """Until `url` answers; fails at once if the server process `proc` exits (with the end of its `log`)."""
    tail = lambda: "\n" + log.read_text()[-3000:] if log else ""  # noqa: E731
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, f"{url}: server exited with {proc.returncode}{tail()}"
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds} s{tail()}")
