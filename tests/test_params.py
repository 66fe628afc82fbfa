"""params.yaml validation: every bad value stops with one line naming key, value and what is allowed."""

import copy

import pytest
import yaml

from pipeline.params import PARAMS_FILE, ParamsError, bound_design, load_params, sample_steps, validate
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
    ("data", "dataset", "svhn", r"data.dataset = 'svhn' is not allowed: must be one of fashion_mnist, mnist"),
    ("diffusion", "schedule", "cubic", r"diffusion.schedule = 'cubic' is not allowed: must be one of linear"),
    ("diffusion", "T", 10, r"diffusion.T = 10 does not work with diffusion.schedule = 'linear': .*T >= 21"),
    ("model", "channel_mults", [], r"model.channel_mults = \[\] is not allowed"),
    ("model", "dropout", 1.0, r"model.dropout = 1.0 is not allowed: must be a number in \[0, 1\)"),
    ("sample", "steps", 5000, r"sample.steps = 5000 is not allowed: must be in \[2, diffusion.T = 1000\]"),
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
    raw["sample"]["steps"] = 10
    assert validate(raw).diffusion["T"] == 10


def test_sample_steps_all_and_clamped():
    raw = with_("sample", "steps", "all")
    assert sample_steps(validate(raw).sample, 1000) == 1000
    raw = with_("sample", "steps", 5000)
    raw["sample"]["clamp_steps"] = True
    p = validate(raw)
    assert sample_steps(p.sample, 1000) == 1000 and sample_steps(p.sample, 10_000) == 5000
    assert sample_steps(validate(DEFAULTS).sample, 1000) == 30


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
