"""The model in the MLflow registry (ddpm-<dataset>): a pyfunc that draws images.

    input   rows with a `seed` column (integer in [0, 2^32)): one image per row; a seed always gives the same image
    params  sampler ('ancestral' | 'ddim' | 'dpm_solver++'), steps (network evaluations, 2..T; 2..T-1 for
            dpm_solver++), eta (ddim's noise, >= 0; dpm_solver++'s, in [0, 1]; 0 for ancestral), order
            (dpm_solver++'s, 1..3; 2 otherwise), clip_x0 (clip the predicted x_0 to [-1, 1]); each defaults to the
            run's `sample` settings
    output  uint8 array [N, C, H, W], pixels 0..255 (over HTTP: nested lists under "predictions")
    limits  1..1024 rows, and rows x steps network evaluations up to max_evals (refused at once, HTTP 400)

Image i is `ddpm_core.sampling.sample(net, schedule, n=1, seed=seed_i, ...)` with the same settings on the
same device, however the rows are batched. Device and precision are resolved on the serving machine by
ddpm_core.compute, from the run's sample.precision (`auto`: bf16 where that machine computes it natively). The eps network, its schedule and the defaults travel as the
artifact `eps_model` (ddpm_core/serving.py's file, loaded with weights_only=True).

This file is the model's code (MLflow's "models from code"): MLflow runs it where the model is loaded or
served, so it imports only ddpm_core (logged with the model), torch, numpy, pandas and mlflow, and nothing
imports it.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd  # the input's type hint: MLflow takes the signature logged with the model, no inference
import torch

from ddpm_core.compute import World, resolve
from ddpm_core.data import from_model_range
from ddpm_core.sampling import SAMPLERS, check_sampler, max_steps, sample_seeds
from ddpm_core.serving import load_eps_model

ARTIFACT = "eps_model"
MAX_ROWS = 1024   # images per request
MAX_SEED = 2**32  # seeds in [0, MAX_SEED)
PARAMS = ("sampler", "steps", "eta", "order", "clip_x0")
# A request's cost is rows x network evaluations (one per sampling step). Above this many it is refused at
# once instead of computing past the scoring server's 60 s timeout. CPU: measured (README, "Serving"); CUDA:
# an estimate. DDPM_SERVE_MAX_EVALS sets another limit for the machine that serves.
MAX_EVALS = {"cpu": 4_000, "cuda": 200_000}
MAX_EVALS_ENV = "DDPM_SERVE_MAX_EVALS"


def max_evals(device: torch.device) -> int:
    value = os.environ.get(MAX_EVALS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{MAX_EVALS_ENV} = {value!r}: must be a positive integer")
        return int(value)
    return MAX_EVALS.get(device.type, MAX_EVALS["cpu"])


def check_cost(rows: int, steps: int, limit: int) -> None:
    if rows * steps > limit:
        split = (f"split it into requests of at most {limit // steps} rows at {steps} steps" if limit >= steps
                 else f"use at most {limit} steps")
        raise MlflowException.invalid_parameter_value(
            f"{rows} rows x {steps} steps = {rows * steps:,} network evaluations is above this server's limit of "
            f"{limit:,} per request ({MAX_EVALS_ENV}); {split}")


def check_settings(settings: dict[str, Any], T: int) -> dict[str, Any]:
    """The sampling params of one request, or MlflowException (HTTP 400) naming the one that is wrong."""
    sampler, steps, eta, clip = (settings[k] for k in ("sampler", "steps", "eta", "clip_x0"))
    order = settings.get("order", 2)  # versions logged before DPM-Solver++ have no order
    top = max_steps(sampler, T) if sampler in SAMPLERS else T
    problems = [
        (sampler not in SAMPLERS, f"sampler = {sampler!r}: must be one of {', '.join(SAMPLERS)}"),
        (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= top,
         f"steps = {steps!r}: must be an integer in [2, {'T' if top == T else 'T - 1'} = {top}]"),
        (isinstance(eta, bool) or not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0),
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
        self.max_evals = max_evals(self.device)
        # one sampling at a time: concurrent requests queue instead of splitting the cores between them
        self.lock = threading.Lock()

    def check(self, model_input: Any, params: dict[str, Any] | None) -> tuple[list[int], dict[str, Any]]:
        """The request's seeds and sampling settings, or MlflowException (HTTP 400) in one line saying what
        is wrong: the rows, a param, or the cost."""
        seeds = check_seeds(model_input)
        defaults = self.meta["sampling"]
        given = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(given) - set(PARAMS))
        if unknown:
            raise MlflowException.invalid_parameter_value(
                f"unknown param {unknown[0]!r}: the params are {', '.join(PARAMS)}")
        asked = {**defaults, **given}
        if asked["sampler"] != "dpm_solver++" and asked.get("order") == defaults.get("order"):
            asked["order"] = 2  # MLflow fills in the default order; it belongs to dpm_solver++ alone
        settings = check_settings(asked, self.schedule.T)
        check_cost(len(seeds), settings["steps"], self.max_evals)
        return seeds, settings

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        seeds, s = self.check(model_input, params)
        m = self.meta
        with self.lock, torch.no_grad():
            x = sample_seeds(self.net, self.schedule, seeds, tuple(m["image_shape"]), s["sampler"], s["steps"],
                             s["eta"], m["sampling"]["batch_size"], m["variance"], m["objective"], s["clip_x0"],
                             self.device, order=s["order"])
        return from_model_range(x).numpy()


mlflow.models.set_model(Generator())
