"""The model in the MLflow registry (ddpm-<dataset>): a pyfunc that draws images.

    input   rows with a `seed` column (integer in [0, 2^32)): one image per row; a seed always gives the same image
    params  sampler ('ancestral' | 'ddim' | 'dpm_solver++'), steps (network evaluations, 2..T; 2..T-1 for
            dpm_solver++), eta (ddim's noise, >= 0; dpm_solver++'s, in [0, 1]; 0 for ancestral), order
            (dpm_solver++'s, 1..3; 2 otherwise), clip_x0 (clip the predicted x_0 to [-1, 1]); each defaults to the
            run's `sample` settings
    output  uint8 array [N, C, H, W], pixels 0..255 (over HTTP: nested lists under "predictions")

Image i is `ddpm_core.sampling.sample(net, schedule, n=1, seed=seed_i, ...)` with the same settings on the
same device, however the rows are batched. Device and precision are resolved on the serving machine by
ddpm_core.compute, from the run's sample.precision (`auto`: bf16 where that machine computes it natively). The eps network, its schedule and the defaults travel as the
artifact `eps_model` (ddpm_core/serving.py's file, loaded with weights_only=True).

This file is the model's code (MLflow's "models from code"): MLflow runs it where the model is loaded or
served, so it imports only ddpm_core (logged with the model), torch, numpy and mlflow, and nothing imports it.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import torch

from ddpm_core.compute import World, resolve
from ddpm_core.data import from_model_range
from ddpm_core.sampling import SAMPLERS, check_sampler, max_steps, sample_seeds
from ddpm_core.serving import load_eps_model

ARTIFACT = "eps_model"
MAX_ROWS = 1024   # images per request
MAX_SEED = 2**32  # seeds in [0, MAX_SEED)


def check_settings(settings: dict[str, Any], T: int) -> dict[str, Any]:
    """The sampling params of one request, or MlflowException (HTTP 400) naming the one that is wrong."""
    sampler, steps, eta, clip = (settings[k] for k in ("sampler", "steps", "eta", "clip_x0"))
    order = settings.get("order", 2)  # versions logged before DPM-Solver++ have no order
    top = max_steps(sampler, T) if sampler in SAMPLERS else T
    problems = [
        (sampler not in SAMPLERS, f"sampler = {sampler!r}: must be one of {', '.join(SAMPLERS)}"),
        (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= top,
         f"steps = {steps!r}: must be an integer in [2, {'T' if top == T else 'T - 1'} = {top}]"),
        (not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0),
         f"eta = {eta!r}: must be a finite number >= 0"),
        (isinstance(order, bool) or not isinstance(order, (int, np.integer)), f"order = {order!r}: must be 1, 2 or 3"),
        (not isinstance(clip, (bool, np.bool_)), f"clip_x0 = {clip!r}: must be true or false"),
    ]
    for bad, message in problems:
        if bad:
            raise MlflowException.invalid_parameter_value(message)
    try:
        check_sampler(sampler, float(eta), int(order))
    except ValueError as e:
        raise MlflowException.invalid_parameter_value(str(e)) from None
    return {"sampler": sampler, "steps": int(steps), "eta": float(eta), "order": int(order), "clip_x0": bool(clip)}


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
        net, self.schedule, self.meta = load_eps_model(context.artifacts[ARTIFACT], "cpu")
        setting = self.meta["sampling"].get("precision", "auto")  # files logged before it was recorded: auto
        self.compute = resolve("auto", setting, world=World(), section="sample")
        self.device = self.compute.device
        self.net = self.compute.network(net.to(self.device))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        seeds = check_seeds(model_input)
        defaults = self.meta["sampling"]
        asked = {**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        if asked["sampler"] != "dpm_solver++" and asked.get("order") == defaults.get("order"):
            asked["order"] = 2  # MLflow fills in the default order; it belongs to dpm_solver++ alone
        s = check_settings(asked, self.schedule.T)
        m = self.meta
        with torch.no_grad():
            x = sample_seeds(self.net, self.schedule, seeds, tuple(m["image_shape"]), s["sampler"], s["steps"],
                             s["eta"], defaults["batch_size"], m["variance"], m["objective"], s["clip_x0"], self.device,
                             order=s["order"])
        return from_model_range(x).numpy()


mlflow.models.set_model(Generator())
