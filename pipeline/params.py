"""params.yaml: one typed model (pydantic v2) that is the only place its keys, types, ranges and cross-key
rules are written.

Every stage calls `load_params()` first. An unknown or missing key, a wrong type, a value out of range, a
non-finite number or a combination that trains nothing raises ParamsError with one line naming the key, the
value and what is allowed. From the same model come the JSON schema (`Params.model_json_schema()`), the
library's configs (`library_config`) and the typed overrides of a sweep (`Overrides`, the Prefect form).
params.yaml's comments stay the user's documentation; each field's description here is what it allows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError
import yaml

from ddpm_core.compute import DEVICES, PRECISIONS
from ddpm_core.data import DATASETS
from ddpm_core.diffusion import OBJECTIVES, VARIANCES
from ddpm_core.elbo_mc import ESTIMATORS, BoundDesign
from ddpm_core.objectives import LOSS_WEIGHTINGS, LOSSES, check_objective
from ddpm_core.resample import T_SAMPLERS
from ddpm_core.sampling import SAMPLERS, check_sampler, max_steps
from ddpm_core.schedules import SCHEDULES, ScheduleError, make_betas

PARAMS_FILE = Path("params.yaml")  # stages run in the repository root (or its DVC experiment copy)


class ParamsError(ValueError):
    """One invalid parameter; str() is a single line naming the key, the value and what is allowed."""


# --- value types: each carries what it allows, as the error message and the JSON schema both say it ------
# YAML 1.1 (PyYAML, and `dvc exp run -S`) reads 1e-4 as a string; people and YAML 1.2 read a number.
NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and NUMBER.fullmatch(value.strip()) else value


def integer(ge: int, le: int | None = None, text: str | None = None, **more: Any) -> Any:
    text = text or (f"an integer >= {ge}" if le is None else f"an integer in [{ge}, {le}]")
    return Annotated[int, Field(ge=ge, le=le, description=text, **more)]


def number(text: str, **bounds: float) -> Any:
    """A finite float (ints and numeric strings such as '1e-4' accepted) within `bounds` (gt, ge, lt)."""
    return Annotated[float, Field(allow_inf_nan=False, description=text, **bounds), BeforeValidator(_number)]


def choice(options: tuple[str, ...]) -> Any:
    return Annotated[Literal[options], Field(description=f"one of {', '.join(options)}")]


FLAG = Annotated[bool, Field(description="true or false")]
COUNT = integer(1)
SEED = integer(0)
POSITIVE = number("a number > 0", gt=0)
NON_NEGATIVE = number("a number >= 0", ge=0)
FRACTION = number("a number in [0, 1)", ge=0, lt=1)


class Section(BaseModel):
    """One params section: frozen, its keys fixed, values strictly typed (1.5 is not an integer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __getitem__(self, key: str) -> Any:  # p.train["lr"], as the sections were read when they were dicts
        return getattr(self, key)


class Data(Section):
    dataset: choice(DATASETS)
    root: Annotated[Optional[str], Field(description="a path or null")]
    download: FLAG


class Diffusion(Section):
    T: integer(2, 100_000)
    schedule: choice(SCHEDULES)
    variance: choice(VARIANCES)
    objective: choice(OBJECTIVES)


class Model(Section):
    channels: integer(8, text="a multiple of 8, >= 8", multiple_of=8)
    channel_mults: Annotated[list[Annotated[int, Field(ge=1, le=16)]],
                             Field(min_length=1, description="a non-empty list of integers in [1, 16]")]
    num_res_blocks: integer(1, 8)
    attention_resolutions: Annotated[list[Annotated[int, Field(ge=1)]],
                                     Field(description="a list of image sizes (integers >= 1)")]
    dropout: FRACTION


class Train(Section):
    steps: COUNT
    batch_size: COUNT
    lr: POSITIVE
    warmup_steps: SEED
    grad_clip: NON_NEGATIVE
    weight_decay: NON_NEGATIVE
    ema_decay: FRACTION
    ema_warmup: FLAG
    seed: SEED
    device: choice(DEVICES)
    devices: integer(1, 1024, text="an integer in [1, 1024]: processes (GPUs) of one training run")
    precision: choice(PRECISIONS)
    compile: FLAG
    checkpoint_every: COUNT
    log_every: COUNT
    threads: SEED
    loss: choice(LOSSES)
    t_sampler: choice(T_SAMPLERS)
    loss_weighting: choice(LOSS_WEIGHTINGS)
    min_snr_gamma: POSITIVE


class Featurizer(Section):
    epochs: COUNT
    seed: SEED


class Sample(Section):
    n: COUNT
    sampler: choice(SAMPLERS)
    order: integer(1, 3, text="1, 2 or 3 (dpm_solver++'s order; 2 for the other samplers)")
    steps: Annotated[integer(2) | Literal["all"],
                     Field(description="an integer >= 2, or 'all' (= diffusion.T; T - 1 for dpm_solver++)")]
    clamp_steps: FLAG
    eta: NON_NEGATIVE
    clip_x0: FLAG
    seed: SEED
    batch_size: COUNT
    precision: choice(PRECISIONS)


class Evaluate(Section):
    bpd_estimator: choice(ESTIMATORS)
    bpd_passes: COUNT
    bpd_exact_t: COUNT
    bpd_draws: COUNT
    n_fid: integer(20)
    fid_bootstrap: integer(10)
    seed: SEED
    chunk_size: COUNT
    fid_features: choice(("classifier", "inception"))
    inception_weights: Annotated[Optional[str], Field(description="a path or null")]


class Mlflow(Section):
    experiment: Annotated[str, Field(pattern=r"\S", description="a non-empty name")]
    register_model: FLAG


def sample_steps(sample: Sample, T: int) -> int:
    """The network evaluations the sampler takes: 'all' = the most it takes (T; T - 1 for dpm_solver++), else
    sample.steps (at most that with clamp_steps)."""
    top = max_steps(sample.sampler, T)
    return top if sample.steps == "all" else min(sample.steps, top) if sample.clamp_steps else sample.steps


def bound_design(evaluate: Evaluate, T: int) -> BoundDesign:
    return BoundDesign.named(evaluate.bpd_estimator, T, evaluate.bpd_exact_t, evaluate.bpd_draws)


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("cross_key", "{message}", {"message": message})


class Params(BaseModel):
    """The validated params, by section: `p.train.lr`; `p.flat()` as MLflow records them."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    data: Data
    diffusion: Diffusion
    model: Model
    train: Train
    featurizer: Featurizer
    sample: Sample
    evaluate: Evaluate
    mlflow: Mlflow

    @model_validator(mode="after")
    def _combinations(self) -> Params:
        """Constraints between keys, each reported against the key a user would change."""
        d, s, e, t = self.diffusion, self.sample, self.evaluate, self.train
        try:
            make_betas(d.schedule, d.T)
        except ScheduleError as err:
            raise _refuse(f"diffusion.T = {d.T} does not work with diffusion.schedule = {d.schedule!r}: "
                          f"{err}") from None
        top = max_steps(s.sampler, d.T)
        if s.steps != "all" and s.steps > top and not s.clamp_steps:
            bound = f"diffusion.T = {d.T}" if top == d.T else f"diffusion.T - 1 = {top} with {s.sampler}"
            raise _refuse(f"sample.steps = {s.steps} is not allowed: must be in [2, {bound}], or 'all'; "
                          f"set sample.clamp_steps: true to sample min(steps, {top}) steps")
        per_image = bound_design(e, d.T).passes_per_image()
        if e.bpd_passes < 2 * per_image:
            raise _refuse(f"evaluate.bpd_passes = {e.bpd_passes} is not allowed: the {e.bpd_estimator} estimator at "
                          f"diffusion.T = {d.T} needs {per_image} passes per image and an interval needs 2 images, "
                          f"so at least {2 * per_image}")
        try:  # the library's rule for sampler, eta and order, in the words of these keys
            check_sampler(s.sampler, s.eta, s.order, names=SAMPLER_KEYS)
        except ValueError as err:
            raise _refuse(str(err)) from None
        if e.n_fid > s.n:
            raise _refuse(f"evaluate.n_fid = {e.n_fid} is not allowed: must be <= sample.n = {s.n} (the FID-proxy "
                          f"scores the samples of the sample stage)")
        try:  # the library's rule, in the words of these keys
            check_objective(t.loss, d.variance, t.loss_weighting, names=OBJECTIVE_KEYS)
        except ValueError as err:
            raise _refuse(str(err)) from None
        if t.batch_size % t.devices:
            raise _refuse(f"train.batch_size = {t.batch_size} is not allowed with train.devices = {t.devices}: the "
                          f"global batch is split evenly over the processes, use a multiple of {t.devices}")
        return self

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 0.001, ...}: how MLflow records them."""
        return {f"{section}.{k}": v for section, values in self.model_dump().items() for k, v in values.items()}


SECTIONS: dict[str, type[Section]] = {name: f.annotation for name, f in Params.model_fields.items()}
OBJECTIVE_KEYS = {"loss": "train.loss", "variance": "diffusion.variance", "weighting": "train.loss_weighting"}
SAMPLER_KEYS = {"sampler": "sample.sampler", "eta": "sample.eta", "order": "sample.order"}


# --- one line per error -----------------------------------------------------------------------------------
def _wrong_type(e: dict[str, Any]) -> bool:
    kind = e["type"]
    return (kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "none_required")
            or (kind == "literal_error" and not isinstance(e["input"], str)))


def _keys(section: str) -> str:
    return ", ".join(SECTIONS[section].model_fields)


def one_line(error: ValidationError, raw: Any) -> str:
    """The first problem of a validation, as one line naming the key (an unknown key before the missing
    one it probably misspells)."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc, kind = first["loc"], first["type"]
    if kind == "cross_key":
        return first["ctx"]["message"]
    if not loc:
        got = "nothing" if raw is None else type(raw).__name__
        return f"params must be a mapping of sections ({', '.join(SECTIONS)}); got {got}"
    section = str(loc[0])
    if len(loc) == 1:
        if kind == "extra_forbidden":
            return f"unknown section '{section}' = {first['input']!r}: allowed sections are {', '.join(SECTIONS)}"
        if kind == "missing":
            return f"missing section {section}: it holds {_keys(section)}"
        return f"{section} = {first['input']!r} must be a mapping of keys ({_keys(section)})"
    key = f"{section}.{loc[1]}"
    if kind == "extra_forbidden":
        return f"unknown key {key} = {first['input']!r}: allowed keys in {section} are {_keys(section)}"
    allowed = SECTIONS[section].model_fields[str(loc[1])].description
    if kind == "missing":
        return f"missing key {key}: must be {allowed}"
    try:
        value = raw[section][loc[1]]  # the whole value, also when one item of a list is wrong
    except (KeyError, TypeError, IndexError):
        value = first["input"]
    same = [e for e in errors if e["loc"][:2] == loc[:2]]
    if any(e["type"] == "finite_number" for e in same):
        return f"{key} = {value!r} is not allowed: must be {allowed.replace('a number', 'a finite number', 1)}"
    if all(_wrong_type(e) for e in same):
        return f"{key} = {value!r} has the wrong type: must be {allowed}"
    return f"{key} = {value!r} is not allowed: must be {allowed}"


def validate(raw: Any) -> Params:
    """The typed params of a parsed params.yaml (`raw` is not modified); ParamsError with one line if invalid."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(one_line(e, raw)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"no params file at {path}") from None
    except OSError as e:
        raise ParamsError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raise ParamsError(f"{path} is empty: it must hold the sections {', '.join(SECTIONS)}")
    return validate(raw)


# --- what is built from the model ---------------------------------------------------------------------------
def library_config(cls: type, *sections: Section) -> Any:
    """cls (a dataclass of ddpm_core, e.g. TrainConfig) from the keys of `sections` that are its fields: a
    key is written once, here, and a field once, in the library. Keys the library does not take (e.g.
    train.device) are the stage's."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for s in sections for k, v in s.model_dump().items() if k in names})


def _partial(section: type[Section]) -> type[BaseModel]:
    """The section with every key optional (None = not given), each keeping its type, range and description."""
    def optional(f: Any) -> Any:
        return Optional[Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation]

    fields = {name: (optional(f), Field(None, description=f.description)) for name, f in section.model_fields.items()}
    return create_model(f"{section.__name__}Overrides", __config__=Section.model_config, **fields)


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, raw: Any) -> Any:
        """{"train.steps": 300} -> {"train": {"steps": 300}}, as the command line and the flows write them."""
        if not isinstance(raw, dict) or not any("." in str(k) for k in raw):
            return raw
        nested: dict[Any, Any] = {}
        for key, value in raw.items():
            section, dot, name = str(key).partition(".")
            if dot and isinstance(nested.get(section, {}), dict):
                nested.setdefault(section, {})[name] = value
            else:
                nested[key] = value
        return nested

    def flat(self) -> dict[str, Any]:
        """{'train.steps': 300}: the keys given, as `dvc exp run -S` sets them. None means "as params.yaml has
        it" (forms and Prefect's stored parameters send every field), so an override cannot set a key to null."""
        return {f"{section}.{k}": v for section, values in self.model_dump(exclude_none=True).items()
                for k, v in values.items()}


# params keys set for every point of a sweep, typed by section: a form in Prefect's UI, not a JSON box
Overrides = create_model("Overrides", __base__=_Overrides, __doc__="params.yaml keys set for every point of a sweep",
                         **{name: (Optional[_partial(cls)], Field(None, description=f"keys of params.yaml's {name}"))
                            for name, cls in SECTIONS.items()})


def overrides(flat: dict[str, Any] | _Overrides) -> _Overrides:
    """Overrides from {'train.steps': 300} (or {'train': {'steps': 300}}); ParamsError with one line naming the
    key if one is invalid."""
    if isinstance(flat, _Overrides):
        return flat
    try:
        return Overrides.model_validate(flat)
    except ValidationError as e:
        raise ParamsError(one_line(e, _Overrides._nest(flat))) from None
