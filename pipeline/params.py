"""params.yaml: the one place where parameters are read and validated, into typed frozen objects.

Every stage calls `load_params()` first; an unknown key, a wrong type, a value out of range or a choice that
does not exist raises ParamsError with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from ddpm_core.data import DATASETS
from ddpm_core.diffusion import OBJECTIVES, VARIANCES
from ddpm_core.elbo_mc import ESTIMATORS, BoundDesign
from ddpm_core.objectives import LOSS_WEIGHTINGS, LOSSES
from ddpm_core.resample import T_SAMPLERS
from ddpm_core.sampling import SAMPLERS
from ddpm_core.schedules import SCHEDULES, ScheduleError, make_betas

PARAMS_FILE = Path("params.yaml")  # stages run in the repository root (or its DVC experiment copy)


class ParamsError(ValueError):
    """One invalid parameter; str() is a single line naming the key, the value and what is allowed."""


# A rule: (type(s), check or None, what is allowed when the check fails)
Rule = tuple[type | tuple[type, ...], Callable[[Any], bool] | None, str]


def positive(kind: type = int) -> Rule:
    return (kind if kind is int else (int, float)), (lambda v: v > 0), "a number > 0" if kind is float else "an integer >= 1"


def non_negative(kind: type = int) -> Rule:
    return (kind if kind is int else (int, float)), (lambda v: v >= 0), "a number >= 0" if kind is float else "an integer >= 0"


def choice(options: tuple[str, ...]) -> Rule:
    return str, (lambda v: v in options), f"one of {', '.join(options)}"


def unit(lo_open: bool = False, hi_open: bool = True) -> Rule:
    def ok(v: float) -> bool:
        return (0 < v if lo_open else 0 <= v) and (v < 1 if hi_open else v <= 1)
    return (int, float), ok, f"a number in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"


def int_list(check: Callable[[int], bool], allowed: str, allow_empty: bool) -> Rule:
    def ok(v: list) -> bool:
        return (allow_empty or len(v) > 0) and all(isinstance(i, int) and not isinstance(i, bool) and check(i) for i in v)
    return list, ok, allowed


BOOL: Rule = (bool, None, "true or false")
SEED: Rule = non_negative()
STEPS: Rule = ((int, str), lambda v: v == "all" if isinstance(v, str) else v >= 2,
               "an integer >= 2, or 'all' (= diffusion.T)")

SCHEMA: dict[str, dict[str, Rule]] = {
    "data": {"dataset": choice(DATASETS), "root": ((str, type(None)), None, "a path or null"), "download": BOOL},
    "diffusion": {"T": (int, lambda v: 2 <= v <= 100_000, "an integer in [2, 100000]"),
                  "schedule": choice(SCHEDULES), "variance": choice(VARIANCES), "objective": choice(OBJECTIVES)},
    "model": {"channels": (int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, >= 8"),
              "channel_mults": int_list(lambda i: 1 <= i <= 16, "a non-empty list of integers in [1, 16]", False),
              "num_res_blocks": (int, lambda v: 1 <= v <= 8, "an integer in [1, 8]"),
              "attention_resolutions": int_list(lambda i: i >= 1, "a list of image sizes (integers >= 1)", True),
              "dropout": unit()},
    "train": {"steps": positive(), "batch_size": positive(), "lr": positive(float), "warmup_steps": non_negative(),
              "grad_clip": non_negative(float), "weight_decay": non_negative(float), "ema_decay": unit(),
              "ema_warmup": BOOL, "seed": SEED, "device": choice(("auto", "cpu", "cuda")),
              "precision": choice(("fp32", "bf16")), "compile": BOOL, "checkpoint_every": positive(),
              "threads": non_negative(), "loss": choice(LOSSES), "t_sampler": choice(T_SAMPLERS),
              "loss_weighting": choice(LOSS_WEIGHTINGS), "min_snr_gamma": positive(float)},
    "featurizer": {"epochs": positive(), "seed": SEED},
    "sample": {"n": positive(), "sampler": choice(SAMPLERS), "steps": STEPS, "clamp_steps": BOOL,
               "eta": non_negative(float), "clip_x0": BOOL, "seed": SEED, "batch_size": positive()},
    "evaluate": {"bpd_estimator": choice(ESTIMATORS), "bpd_passes": positive(), "bpd_exact_t": positive(),
                 "bpd_draws": positive(), "n_fid": (int, lambda v: v >= 20, "an integer >= 20"),
                 "fid_bootstrap": (int, lambda v: v >= 10, "an integer >= 10"), "seed": SEED,
                 "chunk_size": positive()},
    "mlflow": {"experiment": (str, lambda v: len(v.strip()) > 0, "a non-empty name"), "register_model": BOOL},
}


def _check_value(key: str, value: Any, rule: Rule) -> None:
    types, check, allowed = rule
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ParamsError(f"{key} = {value!r} has the wrong type: must be {allowed}")
    if not isinstance(value, types):
        raise ParamsError(f"{key} = {value!r} has the wrong type: must be {allowed}")
    if check is not None and not check(value):
        raise ParamsError(f"{key} = {value!r} is not allowed: must be {allowed}")


def _check_structure(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of sections ({', '.join(SCHEMA)}); got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ParamsError(f"unknown section '{section}' = {values!r}: allowed sections are {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ParamsError(f"{section} = {values!r} must be a mapping of keys ({', '.join(SCHEMA[section])})")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ParamsError(f"unknown key {section}.{key} = {value!r}: allowed keys in {section} are "
                                  f"{', '.join(SCHEMA[section])}")
            _check_value(f"{section}.{key}", value, SCHEMA[section][key])
    for section, rules in SCHEMA.items():
        missing = [k for k in rules if k not in raw.get(section, {})]
        if missing:
            raise ParamsError(f"missing key {section}.{missing[0]}: must be {rules[missing[0]][2]}")


def sample_steps(sample: dict[str, Any], T: int) -> int:
    """The respaced steps the sampler takes: 'all' = T, else sample.steps (at most T with clamp_steps)."""
    return T if sample["steps"] == "all" else min(sample["steps"], T) if sample["clamp_steps"] else sample["steps"]


def bound_design(evaluate: dict[str, Any], T: int) -> BoundDesign:
    e = evaluate
    return BoundDesign.named(e["bpd_estimator"], T, e["bpd_exact_t"], e["bpd_draws"])


def _check_bound_budget(e: dict[str, Any], T: int) -> None:
    per_image = bound_design(e, T).passes_per_image()
    if e["bpd_passes"] < 2 * per_image:
        raise ParamsError(f"evaluate.bpd_passes = {e['bpd_passes']} is not allowed: the {e['bpd_estimator']} "
                          f"estimator at diffusion.T = {T} needs {per_image} passes per image and an interval "
                          f"needs 2 images, so at least {2 * per_image}")


def _check_combinations(p: dict[str, dict[str, Any]]) -> None:
    """Constraints between keys, each reported against the key a user would change."""
    T = p["diffusion"]["T"]
    try:
        make_betas(p["diffusion"]["schedule"], T)
    except ScheduleError as e:
        raise ParamsError(f"diffusion.T = {T} does not work with diffusion.schedule = "
                          f"{p['diffusion']['schedule']!r}: {e}") from None
    steps = p["sample"]["steps"]
    if steps != "all" and steps > T and not p["sample"]["clamp_steps"]:
        raise ParamsError(f"sample.steps = {steps} is not allowed: must be in [2, diffusion.T = {T}], or 'all'; "
                          f"set sample.clamp_steps: true to sample min(steps, T) steps")
    _check_bound_budget(p["evaluate"], T)
    if p["sample"]["sampler"] == "ancestral" and p["sample"]["eta"] != 0:
        raise ParamsError(f"sample.eta = {p['sample']['eta']} is not allowed with sample.sampler = 'ancestral': "
                          f"eta is a DDIM setting, leave it at 0")
    if p["evaluate"]["n_fid"] > p["sample"]["n"]:
        raise ParamsError(f"evaluate.n_fid = {p['evaluate']['n_fid']} is not allowed: must be <= sample.n = "
                          f"{p['sample']['n']} (the FID-proxy scores the samples of the sample stage)")
    _check_objective(p)
    if p["train"]["precision"] == "bf16" and p["train"]["device"] == "cpu":
        raise ParamsError("train.precision = 'bf16' is not allowed with train.device = 'cpu': bf16 autocast "
                          "is for CUDA (measured ~9x slower on this CPU); use fp32")


def _check_objective(p: dict[str, dict[str, Any]]) -> None:
    """train.loss, diffusion.variance and train.loss_weighting: the combinations that train something."""
    loss, variance, weighting = p["train"]["loss"], p["diffusion"]["variance"], p["train"]["loss_weighting"]
    if loss in ("hybrid", "vlb") and variance != "learned_range":
        raise ParamsError(f"train.loss = {loss!r} is not allowed with diffusion.variance = {variance!r}: "
                          f"it trains the variance, set diffusion.variance = 'learned_range'")
    if loss == "simple" and variance == "learned_range":
        raise ParamsError("diffusion.variance = 'learned_range' is not allowed with train.loss = 'simple': "
                          "L_simple gives the variance no gradient, use train.loss = 'hybrid' or 'vlb'")
    if loss == "vlb" and weighting != "none":
        raise ParamsError(f"train.loss_weighting = {weighting!r} is not allowed with train.loss = 'vlb': "
                          f"the bound is never reweighted, use 'none'")


@dataclass(frozen=True)
class Params:
    """The validated params, by section (plain dicts, read-only by convention)."""

    data: dict[str, Any]
    diffusion: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    featurizer: dict[str, Any]
    sample: dict[str, Any]
    evaluate: dict[str, Any]
    mlflow: dict[str, Any]

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 0.001, ...}: how MLflow records them."""
        return {f"{f.name}.{k}": v for f in fields(self) for k, v in getattr(self, f.name).items()}


def validate(raw: Any) -> Params:
    _check_structure(raw)
    for section in ("train", "sample"):  # integers given as floats (1e3) are a type error above; floats
        for key in ("lr", "grad_clip", "weight_decay", "ema_decay", "eta", "min_snr_gamma"):  # may be ints
            if key in raw[section]:
                raw[section][key] = float(raw[section][key])
    raw["model"]["dropout"] = float(raw["model"]["dropout"])
    _check_combinations(raw)
    return Params(**{name: dict(raw[name]) for name in SCHEMA})


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"no params file at {path}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return validate(raw)
