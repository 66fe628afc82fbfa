"""The model in the MLflow registry (ddpm-<dataset>): a pyfunc that draws images.

    input   rows with a `seed` column (integer in [0, 2^32)): one image per row; a seed always gives the same image
    params  sampler ('ancestral' | 'ddim'), steps (respaced steps, 2..T), eta (DDIM's, >= 0; 0 for ancestral),
            clip_x0 (clip the predicted x_0 to [-1, 1]); each defaults to the run's `sample` settings
    output  uint8 array [N, C, H, W], pixels 0..255 (over HTTP: nested lists under "predictions")

Image i is `ddpm_core.sampling.sample(net, schedule, n=1, seed=seed_i, ...)` with the same settings on the
same device, however the rows are batched. The eps network, its schedule and the defaults travel as the
artifact `eps_model` (ddpm_core/serving.py's file, loaded with weights_only=True).

This file is the model's code (MLflow's "models from code"): MLflow runs it where the model is loaded or
served, so it imports only ddpm_core (logged with the model), torch, numpy, pandas and mlflow, and nothing
imports it.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd  # the input's type hint: MLflow takes the signature logged with the model, no inference
import torch

from ddpm_core.data import from_model_range
from ddpm_core.sampling import SAMPLERS, sample_seeds
from ddpm_core.serving import load_eps_model

ARTIFACT = "eps_model"
MAX_ROWS = 1024   # images per request
MAX_SEED = 2**32  # seeds in [0, MAX_SEED)


def check_settings(settings: dict[str, Any], T: int) -> dict[str, Any]:
    """The sampling params of one request, or MlflowException (HTTP 400) naming the one that is wrong."""
    sampler, steps, eta, clip = (settings[k] for k in ("sampler", "steps", "eta", "clip_x0"))
    problems = [
        (sampler not in SAMPLERS, f"sampler = {sampler!r}: must be one of {', '.join(SAMPLERS)}"),
        (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= T,
         f"steps = {steps!r}: must be an integer in [2, T = {T}]"),
        (not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0),
         f"eta = {eta!r}: must be a finite number >= 0"),
        (sampler == "ancestral" and eta != 0,
         f"eta = {eta!r} with sampler 'ancestral': eta is a DDIM setting, leave it at 0"),
        (not isinstance(clip, (bool, np.bool_)), f"clip_x0 = {clip!r}: must be true or false"),
    ]
    for bad, message in problems:
        if bad:
            raise MlflowException.invalid_parameter_value(message)
    return {"sampler": sampler, "steps": int(steps), "eta": float(eta), "clip_x0": bool(clip)}


def check_seeds(model_input: Any) -> list[int]:
    try:
        seeds = np.asarray(model_input["seed"]).reshape(-1)
    except (KeyError, TypeError, ValueError, IndexError):
        raise MlflowException.invalid_parameter_value("input must have a `seed` column: one row per image") from None
    if not 1 <= len(seeds) <= MAX_ROWS:
        raise MlflowException.invalid_parameter_value(f"{len(seeds)} rows: ask for 1 to {MAX_ROWS} images at once")
    if seeds.dtype.kind not in "iu" or seeds.min() < 0 or seeds.max() >= MAX_SEED:
        raise MlflowException.invalid_parameter_value(f"seed must be an integer in [0, {MAX_SEED})")
    return [int(s) for s in seeds]


class Generator(mlflow.pyfunc.PythonModel):
    """predict(rows with `seed`, params) -> uint8 images [N, C, H, W] (see the module docstring)."""

    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net, self.schedule, self.meta = load_eps_model(context.artifacts[ARTIFACT], self.device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        seeds = check_seeds(model_input)
        defaults = self.meta["sampling"]
        s = check_settings({**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}, self.schedule.T)
        m = self.meta
        with torch.no_grad():
            x = sample_seeds(self.net, self.schedule, seeds, tuple(m["image_shape"]), s["sampler"], s["steps"],
                             s["eta"], defaults["batch_size"], m["variance"], m["objective"], s["clip_x0"], self.device)
        return from_model_range(x).numpy()


mlflow.models.set_model(Generator())
