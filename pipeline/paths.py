"""Where each stage reads and writes, relative to the repository root (dvc.yaml lists the same paths;
tests/test_pipeline.py checks that they agree)."""

from __future__ import annotations

import os
from pathlib import Path

BUILD = Path("build")
DATA = BUILD / "data.npz"                   # prepare: uint8 images and labels, both splits
DATA_INFO = BUILD / "data.json"             # prepare: sha256 of the arrays, shapes, source
FEATURIZER = BUILD / "featurizer.pt"        # featurizer: the FID-proxy classifier
FEATURIZER_INFO = BUILD / "featurizer.json"
TRAIN_STATE = BUILD / "train_state"         # train: scratch checkpoints under the project root (scratch_dir)
MODEL = BUILD / "model.pt"                  # train: the final checkpoint (model + EMA + config)
SAMPLES = BUILD / "samples.npz"             # sample: uint8 samples
FID_FEATURES = BUILD / "fid_features.npz"   # evaluate: featurizer features of samples, test and train images
REPORTS = Path("reports")
TRAIN_CURVE = REPORTS / "train_loss.csv"
SAMPLE_GRID = REPORTS / "samples.png"
SAMPLE_STATS = REPORTS / "sample.json"
METRICS = REPORTS / "metrics.json"
BPD_PER_T = REPORTS / "bpd_per_t.csv"
BPD_PER_IMAGE = REPORTS / "bpd_per_image.csv"  # evaluate: per test image, the bound and its t = T term (pairing)
BPD_PLOT = REPORTS / "bpd_per_t.png"
LOSS_PLOT = REPORTS / "train_loss.png"
SUMMARY = REPORTS / "summary.md"
MLFLOW_RUN = REPORTS / "mlflow_run.json"
FIGURES = REPORTS / "figures"               # figures: pictures of the process for docs/derivation*.md
NOISING_PLOT = FIGURES / "noising.png"
SCHEDULES_PLOT = FIGURES / "schedules.png"
WEIGHTS_PLOT = FIGURES / "loss_weights.png"
DENOISING_PLOT = FIGURES / "denoising.png"
FIGURE_FILES = (NOISING_PLOT, SCHEDULES_PLOT, WEIGHTS_PLOT, DENOISING_PLOT)


def project_root(cwd: Path | None = None) -> Path:
    """The user's project folder, also from inside a DVC experiment copy (<root>/.dvc/tmp/exps/...).

    DDPM_PROJECT_ROOT overrides it. MLflow's embedded store lives here, so runs made in temporary copies
    are not lost with them.
    """
    if os.environ.get("DDPM_PROJECT_ROOT"):
        return Path(os.environ["DDPM_PROJECT_ROOT"]).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 4] == (".dvc", "tmp", "exps", parts[i + 3]) and i > 0:
            return Path(*parts[:i])
    return cwd


def scratch_dir() -> Path:
    """Where train keeps its resumable checkpoints, by configuration fingerprint (not a DVC output): under the
    project root, so a DVC temporary copy, a retried Prefect task and a rerun sweep all find the same one."""
    return project_root() / TRAIN_STATE
