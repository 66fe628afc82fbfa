"""params.yaml validation: every bad value stops with one line naming key, value and what is allowed."""

import copy
import re

import pytest
import yaml

from pipeline.params import (PARAMS_FILE, Overrides, Params, ParamsError, bound_design, load_params, overrides,
                             sample_steps, validate)
from pipeline.__main__ import main

DEFAULTS = yaml.safe_load(PARAMS_FILE.read_text())


def with_(section, key, value):
    raw = copy.deepcopy(DEFAULTS)
    raw[section][key] = value
    return raw


def test_the_shipped_params_are_valid():
    p = load_params()
    assert p.data["dataset"] == "fashion_mnist" and "train.lr" in p.flat()


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "lr", -1, r"train.lr = -1 is not allowed: must be a number > 0"),
    ("train", "steps", "many", r"train.steps = 'many' has the wrong type: must be an integer >= 1"),
    ("train", "steps", 1.5, r"train.steps = 1.5 has the wrong type"),
    ("train", "ema_warmup", "yes", r"train.ema_warmup = 'yes' has the wrong type: must be true or false"),
    ("train", "batch_size", True, r"train.batch_size = True has the wrong type"),
    ("train", "device", "tpu", r"train.device = 'tpu' is not allowed: must be one of auto, cpu, cuda"),
    ("sample", "precision", "half", r"sample.precision = 'half' is not allowed: must be one of auto, fp32, bf16"),
    ("train", "devices", 0, r"train.devices = 0 is not allowed: must be an integer in \[1, 1024\]"),
    ("data", "dataset", "svhn", r"data.dataset = 'svhn' is not allowed: must be one of fashion_mnist, mnist"),
    ("diffusion", "schedule", "cubic", r"diffusion.schedule = 'cubic' is not allowed: must be one of linear"),
    ("diffusion", "T", 10, r"diffusion.T = 10 does not work with diffusion.schedule = 'linear': .*T >= 21"),
    ("model", "channel_mults", [], r"model.channel_mults = \[\] is not allowed"),
    ("model", "dropout", 1.0, r"model.dropout = 1.0 is not allowed: must be a number in \[0, 1\)"),
    ("sample", "steps", 5000, r"sample.steps = 5000 is not allowed: must be in \[2, diffusion.T - 1 = 999 with dpm_solver\+\+\]"),
    ("sample", "sampler", "plms", r"sample.sampler = 'plms' is not allowed: must be one of ancestral, ddim"),
    ("evaluate", "n_fid", 10_000, r"evaluate.n_fid = 10000 is not allowed: must be <= sample.n"),
    ("sample", "steps", "most", r"sample.steps = 'most' is not allowed: must be an integer >= 2, or 'all'"),
    ("evaluate", "bpd_estimator", "exact", r"evaluate.bpd_estimator = 'exact' is not allowed: must be one of "
                                           r"importance, all_t"),
    ("evaluate", "bpd_passes", 10, r"evaluate.bpd_passes = 10 is not allowed: the importance estimator at "
                                   r"diffusion.T = 1000 needs 8 passes per image .* at least 16"),
    ("evaluate", "bpd_draws", 0, r"evaluate.bpd_draws = 0 is not allowed: must be an integer >= 1"),
    ("evaluate", "fid_bootstrap", 3, r"evaluate.fid_bootstrap = 3 is not allowed: must be an integer >= 10"),
])
def test_bad_values_name_key_value_and_allowed(section, key, value, message):
    with pytest.raises(ParamsError, match=message):
        validate(with_(section, key, value))


@pytest.mark.parametrize("changes,message", [
    ({"train": {"loss": "hybrid"}},
     r"^train.loss = 'hybrid' is not allowed with diffusion.variance = 'fixed_small': .*'learned_range'$"),
    ({"train": {"loss": "vlb"}, "diffusion": {"variance": "fixed_large"}},
     r"^train.loss = 'vlb' is not allowed with diffusion.variance = 'fixed_large'"),
    ({"diffusion": {"variance": "learned_range"}},
     r"^diffusion.variance = 'learned_range' is not allowed with train.loss = 'simple'"),
    ({"diffusion": {"variance": "learned_range"}, "train": {"loss": "vlb", "loss_weighting": "min_snr"}},
     r"^train.loss_weighting = 'min_snr' is not allowed with train.loss = 'vlb'"),
    ({"train": {"t_sampler": "importance"}}, r"train.t_sampler = 'importance' is not allowed: must be one of uniform"),
    ({"train": {"min_snr_gamma": 0}}, r"train.min_snr_gamma = 0 is not allowed: must be a number > 0"),
])
def test_objective_combinations_are_refused_in_one_line(changes, message):
    raw = copy.deepcopy(DEFAULTS)
    for section, values in changes.items():
        raw[section].update(values)
    with pytest.raises(ParamsError, match=message) as e:
        validate(raw)
    assert "\n" not in str(e.value)


def test_the_papers_combinations_are_accepted():
    for changes in ({"diffusion": {"variance": "learned_range"}, "train": {"loss": "hybrid"}},
                    {"diffusion": {"variance": "learned_range"}, "train": {"loss": "vlb", "t_sampler": "loss_second_moment"}},
                    {"train": {"loss_weighting": "min_snr", "min_snr_gamma": 5}}):
        raw = copy.deepcopy(DEFAULTS)
        for section, values in changes.items():
            raw[section].update(values)
        p = validate(raw)
        assert isinstance(p.train["min_snr_gamma"], float)


def test_unknown_and_missing_keys():
    raw = with_("train", "lrr", 0.1)
    with pytest.raises(ParamsError, match=r"unknown key train.lrr = 0.1: allowed keys in train are steps, "):
        validate(raw)
    raw = copy.deepcopy(DEFAULTS)
    del raw["sample"]["seed"]
    with pytest.raises(ParamsError, match=r"missing key sample.seed"):
        validate(raw)
    raw = copy.deepcopy(DEFAULTS)
    raw["optimizer"] = {}
    with pytest.raises(ParamsError, match=r"unknown section 'optimizer'"):
        validate(raw)


def test_cosine_accepts_small_T():
    raw = with_("diffusion", "schedule", "cosine")
    raw["diffusion"]["T"] = 10
    raw["sample"]["steps"] = 9
    assert validate(raw).diffusion["T"] == 10


def test_sample_steps_all_and_clamped():
    raw = with_("sample", "sampler", "ddim")
    raw["sample"]["steps"] = "all"
    assert sample_steps(validate(raw).sample, 1000) == 1000
    raw["sample"]["steps"] = 5000
    raw["sample"]["clamp_steps"] = True
    p = validate(raw)
    assert sample_steps(p.sample, 1000) == 1000 and sample_steps(p.sample, 10_000) == 5000
    assert sample_steps(validate(DEFAULTS).sample, 1000) == 10  # dpm_solver++ 2M's 10 score as DDIM's 30
    raw = with_("sample", "sampler", "dpm_solver++")
    raw["sample"]["steps"] = "all"
    assert sample_steps(validate(raw).sample, 1000) == 999  # its grid has at most T - 1 distinct steps
    raw["sample"].update(steps=5000, clamp_steps=True)
    assert sample_steps(validate(raw).sample, 1000) == 999


def test_bound_budget_falls_back_to_all_t_for_small_T():
    raw = with_("evaluate", "bpd_estimator", "all_t")
    with pytest.raises(ParamsError, match=r"all_t estimator at diffusion.T = 1000 needs 1000 passes per image"):
        validate(raw | {"evaluate": {**raw["evaluate"], "bpd_passes": 1999}})
    assert bound_design(validate(raw).evaluate, 1000).passes_per_image() == 1000
    small = validate(DEFAULTS).evaluate
    assert bound_design(small, 8).draws == 0 and bound_design(small, 8).exact_t == 8
    assert bound_design(small, 9).draws == 3
    assert bound_design(small, 1000).passes_per_image() == small["bpd_exact_t"] + 1 + small["bpd_draws"]  # + t = T


def test_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_("train", "lr", 0)))
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: check: train.lr = 0 is not allowed: must be a number > 0"]
    assert not (tmp_path / "build").exists()
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    assert main(["prepare"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# --- the malformed-params table: every case is one line from `python -m pipeline check` naming the key -------
def yaml_text(raw) -> str:
    """A params mapping as block-style YAML with each value on its key's line (lists in brackets)."""
    def value(v):
        return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()

    lines = []
    for section, values in raw.items():
        if not isinstance(values, dict):
            lines.append(f"{section}: {value(values)}")
            continue
        lines.append(f"{section}:")
        lines += [f"  {k}: {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def text_with(section=None, key=None, value=None, drop=None, extra=None):
    """params.yaml's text with one change (values written as YAML text, as a user would type them)."""
    raw = copy.deepcopy(DEFAULTS)
    if drop:
        raw[drop[0]].pop(drop[1]) if len(drop) == 2 else raw.pop(drop[0])
    raw.update(extra or {})
    text = yaml_text(raw)
    if section is not None:
        lines, inside = text.splitlines(), False
        for i, line in enumerate(lines):
            if not line.startswith(" "):
                inside = line == f"{section}:"
            elif inside and line.strip().startswith(f"{key}:"):
                lines[i] = f"  {key}: {value}"
        text = "\n".join(lines) + "\n"
    return text


def combo(**changes):
    raw = copy.deepcopy(DEFAULTS)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return yaml_text(raw)


MALFORMED = [
    # wrong types
    ("steps-word", text_with("train", "steps", "many"), r"train.steps = 'many' has the wrong type: must be an integer >= 1"),
    ("steps-float", text_with("train", "steps", "1.5"), r"train.steps = 1.5 has the wrong type: must be an integer >= 1"),
    ("steps-exp", text_with("train", "steps", "1e3"), r"train.steps = '1e3' has the wrong type"),
    ("batch-bool", text_with("train", "batch_size", "true"), r"train.batch_size = True has the wrong type"),
    ("flag-word", text_with("train", "ema_warmup", "yes please"), r"train.ema_warmup = 'yes please' has the wrong type: must be true or false"),
    ("lr-word", text_with("train", "lr", "fast"), r"train.lr = 'fast' has the wrong type: must be a number > 0"),
    ("lr-bool", text_with("train", "lr", "true"), r"train.lr = True has the wrong type"),
    ("lr-list", text_with("train", "lr", "[0.1]"), r"train.lr = \[0.1\] has the wrong type"),
    ("weights-number", text_with("evaluate", "inception_weights", "5"), r"evaluate.inception_weights = 5 has the wrong type: must be a path or null"),
    ("root-number", text_with("data", "root", "5"), r"data.root = 5 has the wrong type: must be a path or null"),
    ("mults-string", text_with("model", "channel_mults", "'1,2'"), r"model.channel_mults = '1,2' has the wrong type"),
    ("mults-item", text_with("model", "channel_mults", "[1, x]"), r"model.channel_mults = \[1, 'x'\] has the wrong type"),
    ("dataset-number", text_with("data", "dataset", "5"), r"data.dataset = 5 has the wrong type: must be one of fashion_mnist"),
    ("register-int", text_with("mlflow", "register_model", "1"), r"mlflow.register_model = 1 has the wrong type"),
    ("steps-null", text_with("sample", "steps", "null"), r"sample.steps = None has the wrong type"),
    # out of range or not a choice
    ("lr-negative", text_with("train", "lr", "-1"), r"train.lr = -1 is not allowed: must be a number > 0"),
    ("lr-zero", text_with("train", "lr", "0.0"), r"train.lr = 0.0 is not allowed: must be a number > 0"),
    ("lr-negative-exp", text_with("train", "lr", "-1e-4"), r"train.lr = '-1e-4' is not allowed: must be a number > 0"),
    ("T-one", text_with("diffusion", "T", "1"), r"diffusion.T = 1 is not allowed: must be an integer in \[2, 100000\]"),
    ("T-huge", text_with("diffusion", "T", "200000"), r"diffusion.T = 200000 is not allowed"),
    ("channels-12", text_with("model", "channels", "12"), r"model.channels = 12 is not allowed: must be a multiple of 8, >= 8"),
    ("mults-empty", text_with("model", "channel_mults", "[]"), r"model.channel_mults = \[\] is not allowed"),
    ("mults-big", text_with("model", "channel_mults", "[1, 32]"), r"model.channel_mults = \[1, 32\] is not allowed: must be a non-empty list"),
    ("res-blocks-0", text_with("model", "num_res_blocks", "0"), r"model.num_res_blocks = 0 is not allowed: must be an integer in \[1, 8\]"),
    ("dropout-1", text_with("model", "dropout", "1.0"), r"model.dropout = 1.0 is not allowed: must be a number in \[0, 1\)"),
    ("ema-negative", text_with("train", "ema_decay", "-0.1"), r"train.ema_decay = -0.1 is not allowed"),
    ("warmup-negative", text_with("train", "warmup_steps", "-1"), r"train.warmup_steps = -1 is not allowed: must be an integer >= 0"),
    ("device-tpu", text_with("train", "device", "tpu"), r"train.device = 'tpu' is not allowed: must be one of auto, cpu, cuda"),
    ("dataset-svhn", text_with("data", "dataset", "svhn"), r"data.dataset = 'svhn' is not allowed: must be one of"),
    ("order-4", text_with("sample", "order", "4"), r"sample.order = 4 is not allowed: must be 1, 2 or 3"),
    ("fid-features-clip", text_with("evaluate", "fid_features", "clip"),
     r"evaluate.fid_features = 'clip' is not allowed: must be one of classifier, inception"),
    ("sample-steps-1", text_with("sample", "steps", "1"), r"sample.steps = 1 is not allowed: must be an integer >= 2, or 'all'"),
    ("n-fid-small", text_with("evaluate", "n_fid", "10"), r"evaluate.n_fid = 10 is not allowed: must be an integer >= 20"),
    ("experiment-blank", text_with("mlflow", "experiment", "'  '"), r"mlflow.experiment = '  ' is not allowed: must be a non-empty name"),
    # non-finite numbers where a finite one is meant
    ("lr-inf", text_with("train", "lr", ".inf"), r"train.lr = inf is not allowed: must be a finite number > 0"),
    ("lr-nan", text_with("train", "lr", ".nan"), r"train.lr = nan is not allowed: must be a finite number > 0"),
    ("lr-overflow", text_with("train", "lr", "1e999"), r"train.lr = '1e999' is not allowed: must be a finite number > 0"),
    ("clip-minus-inf", text_with("train", "grad_clip", "-.inf"), r"train.grad_clip = -inf is not allowed: must be a finite number >= 0"),
    ("eta-inf", text_with("sample", "eta", ".inf"), r"sample.eta = inf is not allowed"),
    ("gamma-inf", text_with("train", "min_snr_gamma", ".inf"), r"train.min_snr_gamma = inf is not allowed"),
    ("dropout-nan", text_with("model", "dropout", ".nan"), r"model.dropout = nan is not allowed"),
    # unknown and missing keys and sections
    ("unknown-key", text_with(extra={}).replace("  lr: 0.001", "  lrr: 0.001"),
     r"unknown key train.lrr = 0.001: allowed keys in train are steps, batch_size, lr, "),
    ("missing-key", text_with(drop=("sample", "seed")), r"missing key sample.seed: must be an integer >= 0"),
    ("unknown-section", text_with(extra={"optimizer": {"name": "adam"}}), r"unknown section 'optimizer' = \{'name': 'adam'\}: allowed sections are data, "),
    ("missing-section", text_with(drop=("mlflow",)), r"missing section mlflow: it holds experiment, register_model"),
    ("section-scalar", text_with(extra={"train": 5}), r"train = 5 must be a mapping of keys \(steps, batch_size, "),
    ("section-null", text_with(extra={"featurizer": None}), r"featurizer = None must be a mapping of keys \(epochs, seed\)"),
    # rules between keys
    ("T-for-linear", combo(diffusion__T=10), r"diffusion.T = 10 does not work with diffusion.schedule = 'linear': .*T >= 21"),
    ("steps-over-T", combo(sample__sampler="ddim", sample__steps=5000), r"sample.steps = 5000 is not allowed: must be in \[2, diffusion.T = 1000\]"),
    ("bpd-budget", combo(evaluate__bpd_passes=10), r"evaluate.bpd_passes = 10 is not allowed: the importance estimator"),
    ("ancestral-eta", combo(sample__sampler="ancestral", sample__eta=0.5), r"sample.eta = 0.5 is not allowed with sample.sampler = 'ancestral'"),
    ("n-fid-over-n", combo(evaluate__n_fid=10_000), r"evaluate.n_fid = 10000 is not allowed: must be <= sample.n = 500"),
    ("hybrid-fixed", combo(train__loss="hybrid"), r"train.loss = 'hybrid' is not allowed with diffusion.variance = 'fixed_small'"),
    ("learned-simple", combo(diffusion__variance="learned_range"), r"diffusion.variance = 'learned_range' is not allowed with train.loss = 'simple'"),
    ("vlb-min-snr", combo(diffusion__variance="learned_range", train__loss="vlb", train__loss_weighting="min_snr"),
     r"train.loss_weighting = 'min_snr' is not allowed with train.loss = 'vlb'"),
    ("dpm-eta-over-1", combo(sample__sampler="dpm_solver++", sample__eta=1.5),
     r"sample.eta = 1.5 is not allowed with dpm_solver\+\+: must be in \[0, 1\]"),
    ("dpm-order3-sde", combo(sample__sampler="dpm_solver++", sample__order=3, sample__eta=0.5),
     r"sample.eta = 0.5 is not allowed with sample.order = 3: the SDE variant is built for orders 1 and 2"),
    ("ddim-order", combo(sample__sampler="ddim", sample__order=3), r"sample.order = 3 is not allowed with sample.sampler = 'ddim': order is a dpm_solver\+\+ setting"),
    ("dpm-steps-T", combo(sample__sampler="dpm_solver++", sample__steps=1000),
     r"sample.steps = 1000 is not allowed: must be in \[2, diffusion.T - 1 = 999 with dpm_solver\+\+\]"),
    ("precision-fp16", combo(train__precision="fp16"), r"train.precision = 'fp16' is not allowed: must be one of auto, fp32, bf16"),
    ("batch-over-devices", combo(train__devices=3), r"train.batch_size = 64 is not allowed with train.devices = 3: the global batch is split evenly"),
    # files that are not params
    ("empty", "", r"params.yaml is empty: it must hold the sections data, diffusion, "),
    ("comments-only", "# nothing here\n", r"params.yaml is empty"),
    ("not-yaml", "data: [unclosed\n", r"params.yaml is not valid YAML: "),
    ("tabs", "data:\n\tdataset: digits\n", r"params.yaml is not valid YAML: "),
    ("a-list", "- data\n- train\n", r"params must be a mapping of sections \(data, .*\); got list"),
    ("a-scalar", "hello\n", r"params must be a mapping of sections .*; got str"),
    ("latin-1", text_with().replace("ddpm", "ddpm caf\u00e9").encode("latin-1"),
     r"params.yaml is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"),
    ("utf-16", text_with().encode("utf-16"), r"params.yaml is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("binary", bytes(range(256)) * 4, r"params.yaml is not UTF-8 text \(byte 0x80 at offset 128\)"),
]


@pytest.mark.parametrize("text,message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_params_stop_check_with_one_line(text, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["check"]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: check: "), out.err
    assert re.search(message, lines[0]), lines[0]
    assert out.out == "" and not (tmp_path / "build").exists()


def test_the_table_covers_every_kind_of_mistake():
    assert len(MALFORMED) >= 40 and len({c[0] for c in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("written,value", [("1e-4", 1e-4), ("2.0e-4", 2e-4), ("0.0002", 2e-4), ("1E-3", 1e-3),
                                           ("'5e-4'", 5e-4), ("1", 1.0), (".5", 0.5), ("+3e+2", 300.0)])
def test_learning_rates_are_read_as_people_write_them(written, value, tmp_path):
    (tmp_path / "params.yaml").write_text(text_with("train", "lr", written))
    p = load_params(tmp_path / "params.yaml")
    assert p.train.lr == value and type(p.train.lr) is float and p.flat()["train.lr"] == value


def test_validate_leaves_its_input_alone_and_the_result_is_frozen():
    raw = with_("train", "lr", "1e-4")
    before = copy.deepcopy(raw)
    p = validate(raw)
    assert raw == before and p.train.lr == 1e-4
    with pytest.raises(Exception, match="frozen"):
        p.train.lr = 0.5


def test_json_schema_has_every_key_with_its_type_and_range():
    schema = Params.model_json_schema()
    train = schema["$defs"]["Train"]
    assert set(train["properties"]) == set(DEFAULTS["train"]) and set(train["required"]) == set(DEFAULTS["train"])
    assert train["properties"]["lr"] == {"description": "a number > 0", "exclusiveMinimum": 0, "title": "Lr",
                                         "type": "number"}
    assert train["properties"]["device"]["enum"] == ["auto", "cpu", "cuda"] and not train["additionalProperties"]
    assert {s for s in schema["properties"]} == set(DEFAULTS)
    steps = schema["$defs"]["Sample"]["properties"]["steps"]["anyOf"]
    assert {"type": "integer", "minimum": 2, "description": "an integer >= 2"} in steps and {"const": "all", "type": "string"} in steps


def test_library_configs_take_every_params_key_they_have_a_field_for():
    """TrainConfig and FeaturizerConfig are filled from the params by name: every train key is a TrainConfig
    field except the stage's own (device, devices, threads), and every value arrives; the precision arrives resolved
    (auto -> what ddpm_core.compute decided)."""
    from dataclasses import asdict, fields

    from ddpm_core.fid import FeaturizerConfig
    from ddpm_core.train import TrainConfig
    from pipeline.stages import featurizer_config, train_compute, train_config

    p = validate(with_("train", "lr", "3e-4"))
    c = train_compute(p)
    cfg = asdict(train_config(p, c))
    assert set(DEFAULTS["train"]) - set(cfg) == {"device", "devices", "threads"}
    assert p.train.precision == "auto" and cfg["precision"] == c.precision in ("fp32", "bf16")
    assert {k: cfg[k] for k in DEFAULTS["train"] if k in cfg and k != "precision"} == \
        {k: v for k, v in p.train.model_dump().items() if k in cfg and k != "precision"}
    assert cfg["lr"] == 3e-4 and cfg["objective"] == "eps" and cfg["variance"] == "fixed_small"
    assert set(f.name for f in fields(TrainConfig)) - set(DEFAULTS["train"]) == {"objective", "variance"}
    f = featurizer_config(p)
    assert isinstance(f, FeaturizerConfig) and (f.epochs, f.seed) == (1, 0)


def test_overrides_are_typed_by_the_same_model():
    o = overrides({"train.steps": 300, "train.lr": "1e-4", "data.root": None, "sample": None})
    assert o.flat() == {"train.steps": 300, "train.lr": 1e-4}  # None: as params.yaml has it
    assert overrides(o.model_dump()).flat() == o.flat() and overrides(o) is o
    assert overrides({"train": {"steps": 5}}).flat() == {"train.steps": 5} and overrides({}).flat() == {}
    for bad, message in [({"train.stepz": 1}, r"^unknown key train.stepz = 1: allowed keys in train are steps"),
                         ({"train.lr": float("inf")}, r"^train.lr = inf is not allowed: must be a finite number > 0$"),
                         ({"diffusion.T": 2.5}, r"^diffusion.T = 2.5 has the wrong type"),
                         ({"optimizer.lr": 1}, r"^unknown section 'optimizer'")]:
        with pytest.raises(ParamsError, match=message):
            overrides(bad)
    schema = Overrides.model_json_schema()
    lr = schema["$defs"]["TrainOverrides"]["properties"]["lr"]
    assert {"type": "number", "exclusiveMinimum": 0} in lr["anyOf"] and lr["default"] is None
