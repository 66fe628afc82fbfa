"""Studies: the grid file, the contrasts, and a tiny digits study end to end through its command."""

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddpm_core.checkpoint import load_checkpoint, save_checkpoint
from flows import analysis, records, study_budget, study_report
from flows.points import PointResult, point_params_error
from flows.study import Study, load_study, model_key, model_order
from flows.sweep import next_ready
from pipeline.params import ParamsError

from project import ROOT, make_project, run

PNG = b"\x89PNG\r\n\x1a\n"
COMMITTED = ROOT / "flows" / "studies" / "schedule-T-objective.yaml"
SECOND = ROOT / "flows" / "studies" / "schedule-T-objective-budget.yaml"
STUDIES = ROOT / "reports" / "studies"  # the committed reports
BUNDLES = {"training": {"ho": {"diffusion.variance": "fixed_small", "train.loss": "simple"},
                        "improved": {"diffusion.variance": "learned_range", "train.loss": "hybrid"}}}


# --- fast: the grid file ---------------------------------------------------------------------------------
def test_the_committed_study_is_the_issue_grid_and_every_point_is_valid():
    spec = load_study(COMMITTED)
    points = spec.points()
    assert len(points) == 2 * 3 * 2 * 3 + 2 * 3  # schedule x T x training x steps, + seed 1 of linear T = 100
    settings = [p.settings() for p in points]
    assert {s["diffusion.T"] for s in settings} == {100, 1000, 4000}
    assert {(s["diffusion.variance"], s["train.loss"]) for s in settings} == {("fixed_small", "simple"),
                                                                             ("learned_range", "hybrid")}
    assert all(s["train.steps"] == settings[0]["train.steps"] for s in settings)  # one budget for all
    assert [s["sample.steps"] for s in settings[:3]] == [10, 25, 100]  # a model trains once, then samples
    assert len({p.exp_name(spec.name) for p in points}) == len(points)
    assert len({model_key(p) for p in points}) == 14  # trained networks: sampling keys do not train
    assert all(point_params_error(ROOT, p) is None for p in points)
    gpu = load_study(COMMITTED, gpu=True)
    assert gpu.name == "schedule-T-objective-gpu" and gpu.overrides["train.steps"] > spec.overrides["train.steps"]
    assert all(point_params_error(ROOT, p) is None for p in gpu.points())
    assert spec.reference_axes()["diffusion.variance"] == "fixed_small"



def test_points_run_model_by_model_each_after_the_point_that_trains_its_model():
    points = load_study(SECOND).points()
    order, after = model_order(points)
    assert sorted(order) == list(range(len(points)))
    keys = [model_key(points[i]) for i in order]
    changes = sum(a != b for a, b in zip(keys, keys[1:]))
    assert changes == len(set(keys)) - 1  # each model's points are together
    firsts = {pos for pos in range(len(order)) if pos not in after}
    assert len(firsts) == len(set(keys)) and all(keys[after[pos]] == keys[pos] for pos in after)
    assert all(after[pos] < pos and after[pos] in firsts for pos in after)
    # the grid's model order is kept: the first points come in grid order
    assert [order[pos] for pos in sorted(firsts)] == sorted(order[pos] for pos in firsts)


def test_a_free_slot_takes_a_trained_models_point_before_the_next_models_training():
    after = {1: 0, 2: 0, 4: 3, 5: 3}   # 0 trains model A (1, 2 sample it), 3 trains model B (4, 5)
    assert next_ready([1, 2, 3, 4, 5], after, {}, idle=False) == 3  # A training: B's training starts beside it
    assert next_ready([1, 2, 4, 5], after, {}, idle=False) is None  # both training: nothing else may start
    assert next_ready([1, 2, 4, 5], after, {3: "ended"}, idle=False) == 4
    assert next_ready([1, 2, 4, 5], after, {0: "ended", 3: "ended"}, idle=False) == 1
    assert next_ready([4, 5], {4: 9, 5: 9}, {}, idle=True) == 4  # a wait that cannot end does not stall

def test_the_second_edition_has_two_budgets_five_samplings_and_trains_each_model_once():
    spec = load_study(SECOND)
    points = spec.points()
    models = 2 * 2 * 2 + 1  # schedule x T x training, + seed 1 of linear T = 100 ho; per budget
    assert len(points) == 2 * models * 5 and len({model_key(p) for p in points}) == 2 * models
    assert len({p.exp_name(spec.name) for p in points}) == len(points)
    settings = [p.settings() for p in points]
    assert {s["train.steps"] for s in settings} == {400, 1600}
    samplings = {(s["sample.sampler"], s["sample.steps"]) for s in settings}
    assert samplings == {("ancestral", 10), ("ancestral", 25), ("ancestral", 100), ("dpm_solver++", 10),
                         ("dpm_solver++", 20)}
    # a model's points differ in sampling keys only; the two budgets differ in train.steps only, and share
    # the test images, noise and t draws of the bound and the FID-proxy's reference images
    for p in points:
        assert sum(model_key(q) == model_key(p) for q in points) == 5
    shared = ("evaluate.seed", "evaluate.bpd_passes", "evaluate.n_fid", "sample.n", "sample.seed")
    assert len({tuple(s.get(k) for k in shared) for s in settings}) == 1
    assert spec.overrides["evaluate.n_fid"] == spec.overrides["sample.n"] == 1000
    # one precision for all 90 points: `auto` would train a resumed run's later models in bf16 on a bf16 CPU
    assert spec.overrides["train.precision"] == spec.overrides["sample.precision"] == "fp32"
    by_budget = {}
    for s in settings:
        by_budget.setdefault(s["train.steps"], set()).add(tuple(sorted((k, repr(v)) for k, v in s.items()
                                                                       if k != "train.steps")))
    assert by_budget[400] == by_budget[1600]
    assert sum(s["train.seed"] == 1 for s in settings) == 2 * 5
    assert all(point_params_error(ROOT, p) is None for p in points)
    assert spec.reference_axes() == {"train.steps": 1600, "diffusion.schedule": "linear", "diffusion.T": 1000,
                                     "diffusion.variance": "fixed_small", "train.loss": "simple", "train.seed": 0,
                                     "sample.sampler": "ancestral", "sample.steps": 100}
    assert "python -m flows.study flows/studies/schedule-T-objective-budget.yaml" in SECOND.read_text()


def write(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "s.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = {"name": "s", "budget": {"train.steps": 5}, "bundles": BUNDLES,
        "grids": [{"diffusion.schedule": ["linear"], "training": ["ho", "improved"]}]}


@pytest.mark.parametrize("change, message", [
    ({"name": "a b"}, "name 'a b' is not allowed"),
    ({"colour": 1}, "unknown section 'colour'"),
    ({"grids": []}, "grids must be a non-empty list"),
    ({"grids": [{"diffusion.T": 100}]}, "diffusion.T needs a non-empty list"),
    ({"grids": [{"training": ["best"]}]}, "training = 'best' is not one of ho, improved"),
    ({"grids": [{"T": [100]}]}, "T is neither a params key"),
    ({"grids": [{"diffusion.T": [100]}, {"diffusion.schedule": ["cosine"]}]}, "same axes in the same order"),
    ({"budget": {"diffusion.variance": "fixed_large"}}, "diffusion.variance is both a grid axis and"),
    ({"reference": {"training": "best"}}, "reference training: 'best' is not a grid axis value"),
    ({"budget": [1]}, "budget must be a mapping"),
])
def test_a_bad_study_file_is_one_line_naming_the_problem(tmp_path, change, message):
    path = write(tmp_path, yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")) as e:
        load_study(path)
    assert "\n" not in str(e.value)


def test_unreadable_study_files_and_a_missing_gpu_budget(tmp_path):
    with pytest.raises(ParamsError, match="cannot read the study file"):
        load_study(write(tmp_path, b"name: \xff\xfe"))
    with pytest.raises(ParamsError, match="cannot read the study file"):
        load_study(write(tmp_path, "grids: [unclosed"))
    with pytest.raises(ParamsError, match="no gpu_budget"):
        load_study(write(tmp_path, yaml.safe_dump(GOOD)), gpu=True)
    assert len(load_study(write(tmp_path, yaml.safe_dump(GOOD))).points()) == 2


# --- fast: contrasts on made-up points -------------------------------------------------------------------
SPEC = Study("s", "", {}, BUNDLES, [{"diffusion.schedule": ["linear", "cosine"], "diffusion.T": [100, 1000],
                                     "training": ["ho", "improved"], "train.seed": [0],
                                     "sample.steps": [10, 100]},
                                    {"diffusion.schedule": ["linear"], "diffusion.T": [100],
                                     "training": ["ho", "improved"], "train.seed": [1],
                                     "sample.steps": [10, 100]}], {})
COMMON = np.random.default_rng(0).normal(0, 0.5, 60)  # per-image noise shared by every point: paired


def point_result(axes, per_image, shift, improved, **extra) -> PointResult:
    """A synthetic point: its per-image bits/dim, and FID-proxy features shifted by `shift` from the test set."""
    test = np.random.default_rng(1).normal(size=(400, 3))
    gen = np.random.default_rng([2, axes["sample.steps"], improved]).normal(size=(400, 3)) + [shift, 0, 0]
    values = np.array(list(per_image.values()))
    metrics = {"bpd": values.mean(), "bpd_ci_low": values.mean() - 0.1, "bpd_ci_high": values.mean() + 0.1,
               "fid_proxy": shift ** 2, "fid_proxy_ci_low": 0.0, "fid_proxy_ci_high": shift ** 2 + 1,
               "fid_proxy_floor": 0.01, "sample_steps": axes["sample.steps"], "n_fid": 400}
    return PointResult(axes, "ok", "x", metrics, bpd_per_image=per_image,
                       fid_features={"gen": gen, "test": test, "train": test}, **extra)


def fake(axes: dict) -> PointResult:
    """bits/dim 4 - 0.2 (cosine) - 0.3 (improved) - 0.1 (T 1000) + 0.05 (seed 1); FID-proxy features shifted
    more at 10 steps, less with improved."""
    improved = axes["diffusion.variance"] == "learned_range"
    bpd = 4 - 0.2 * (axes["diffusion.schedule"] == "cosine") - 0.3 * improved - 0.1 * (axes["diffusion.T"] == 1000) \
        + 0.05 * axes["train.seed"]
    own = np.random.default_rng([axes["diffusion.T"], axes["train.seed"], improved])
    per_image = {i: bpd + c + 0.005 * own.normal() for i, c in enumerate(COMMON)}
    shift = (1.5 if axes["sample.steps"] == 10 else 0.3) * (0.3 if improved else 1.0)
    return point_result(axes, per_image, shift, improved)


def fake_results() -> list[PointResult]:
    return [fake(dict(p.axes)) for p in SPEC.points()]


def test_a_record_gives_the_point_back_exactly_for_its_code_and_settings_only(tmp_path, monkeypatch):
    import dataclasses
    import io

    from flows.points import Point

    point = SPEC.points()[0]
    result = dataclasses.replace(fake(dict(point.axes)), exp_name=point.exp_name("s"), exp_rev="abc",
                                 mlflow_run_id="run", last_term_per_image={0: 1.25, 1: 1 / 3})
    images, buf = np.random.default_rng(0).integers(0, 256, (50, 1, 28, 28), dtype=np.uint8), io.BytesIO()
    np.savez(buf, images=images)
    files = {"build/samples.npz": buf.getvalue(), "reports/bpd_per_t.csv": "t,bpd\n1,0.5\n",
             "reports/metrics.json": '{"bpd": 4.0, "train_device_name": "cpu"}\n'}
    monkeypatch.setattr(records, "read_exp_file", lambda root, rev, path, binary=False: files[path])
    files["build/featurizer.pt"] = b"weights"
    lock = yaml.safe_dump({"stages": {"featurizer": {"outs": [{"path": "build/featurizer.json", "md5": "j1"},
                                                              {"path": "build/featurizer.pt", "md5": "f00d"}]}}})
    monkeypatch.setattr(records, "git", lambda root, *args: lock if args[0] == "show" else "c0ffee")
    where = records.write(tmp_path, tmp_path / "out", point, result, "code-1", 12.5)
    assert json.loads((where / "record.json").read_text())["seconds"] == 12.5
    assert (where / "metrics.json").read_text() == files["reports/metrics.json"]  # provenance, verbatim
    assert json.loads((where / "record.json").read_text())["featurizer"] == "f00d"  # the FID-proxy's instrument
    kept = tmp_path / "out" / "points" / "featurizer-f00d"
    assert [f.name for f in kept.iterdir()] == ["featurizer.pt"] and (kept / "featurizer.pt").read_bytes() == b"weights"
    back = records.read(tmp_path / "out", point, "s", "code-1")
    assert back.bpd_per_image == result.bpd_per_image and back.last_term_per_image == {0: 1.25, 1: 1 / 3}
    for key in ("gen", "test", "train"):  # float32 as evaluate saves them, read back as float64
        assert np.array_equal(back.fid_features[key], result.fid_features[key].astype(np.float32).astype(np.float64))
    assert back.metrics == result.metrics and back.cached and back.status == "ok"
    assert back.mlflow_run_id == "" and back.exp_rev == ""  # that run is in another checkout's store
    assert np.array_equal(records.sheet_images(tmp_path, back), images[:records.SHEET_IMAGES])
    assert records.bpd_per_t(tmp_path, back) == files["reports/bpd_per_t.csv"]
    assert records.read(tmp_path / "out", point, "s", "code-2") is None  # other code: computed again
    assert records.read(tmp_path / "out", point, "s", None) is None      # uncommitted code: never reused
    threads = Point(point.axes, (("train.threads", 1),))                 # --concurrency: the same point
    assert records.read(tmp_path / "out", threads, "s", "code-1") is not None
    assert records.read(tmp_path / "out", Point(point.axes, (("sample.n", 5),)), "s", "code-1") is None
    shared = tmp_path / "out" / "points" / json.loads((where / "record.json").read_text())["reference"]
    shared.unlink()  # copied without it: said, not a FileNotFoundError, and never computed again in silence
    with pytest.raises(ParamsError, match=f"names reference features {shared.name}, missing from"):
        records.read(tmp_path / "out", point, "s", "code-1")


def test_every_committed_record_has_the_reference_features_and_the_featurizer_it_names():
    """A record is read with two files its study's records share; one left behind when records were copied made
    the second run of the study command fail before it reused any point."""
    found = sorted(STUDIES.glob("*/points/*/record.json"))
    assert len([r for r in found if r.parts[-4] == "schedule-T-objective-budget"]) == 90
    for path in found:
        record, points = json.loads(path.read_text()), path.parent.parent
        assert (points / record["reference"]).is_file(), path
        assert (points / f"featurizer-{record['featurizer']}" / "featurizer.pt").is_file(), path


def test_a_featurizer_is_restored_only_from_one_intact_kept_copy(tmp_path, monkeypatch):
    """pin_featurizer refuses, before any command runs, records with two instruments or a damaged one."""
    ran = []
    monkeypatch.setattr(records, "run_logged", lambda root, log, cmd: ran.append(cmd) or 0)
    points = tmp_path / "out" / "points"
    assert records.pin_featurizer(tmp_path, tmp_path / "out", tmp_path / "log") is None  # no records: nothing
    weights = b"weights"
    kept = points / f"featurizer-{hashlib.md5(weights).hexdigest()}" / "featurizer.pt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(weights + b"!")  # damaged in the checkout
    with pytest.raises(ParamsError, match="is missing or damaged"):
        records.pin_featurizer(tmp_path, tmp_path / "out", tmp_path / "log")
    kept.write_bytes(weights)
    (points / ("featurizer-" + "0" * 32)).mkdir()
    with pytest.raises(ParamsError, match="measured with 2 FID-proxy featurizers"):
        records.pin_featurizer(tmp_path, tmp_path / "out", tmp_path / "log")
    assert ran == []


def test_a_points_wall_time_is_read_from_its_log(tmp_path):
    import os
    import time

    from flows import records

    log = tmp_path / "p.log"
    log.write_text("\n$ dvc exp run --temp -S a=1   # 2026-12-02 11:42:00\nfailed\n"
                   "\n$ dvc exp run --temp -S a=1   # 2026-12-02 11:50:00\ntrain: 100%\n")
    started = time.mktime(time.strptime("2026-12-02 11:50:00", "%Y-%m-%d %H:%M:%S"))  # the last attempt
    os.utime(log, (started + 754, started + 754))
    assert records.log_seconds(log) == 754
    assert records.log_seconds(tmp_path / "missing.log") is None


def test_contrasts_pair_points_that_differ_in_one_axis():
    frame = study_report.contrasts(SPEC, fake_results())
    bpd = frame[frame.metric == "bpd"]
    # bits/dim once per model: 2 schedules x 2 T x 2 trainings + 2 seed-1 models = 10 models
    assert set(bpd.axis) == {"schedule", "T", "training", "seed"}
    assert len(bpd[bpd.axis == "schedule"]) == 4 and len(bpd[bpd.axis == "training"]) == 5
    assert len(bpd[bpd.axis == "T"]) == 4 and len(bpd[bpd.axis == "seed"]) == 2
    for axis, expected in (("schedule", -0.2), ("training", -0.3), ("T", -0.1), ("seed", 0.05)):
        rows = bpd[bpd.axis == axis]
        assert np.allclose(rows["diff"], expected, atol=0.01), axis
        assert (rows["ci_high"] - rows["ci_low"] < 0.01).all()  # paired: the common noise cancels
        assert set(rows.verdict) == {"a lower" if expected < 0 else "a higher"}
    row = bpd[bpd.axis == "training"].iloc[0]
    assert (row.a, row.b, row.schedule, row["T"]) == ("improved", "ho", "linear", 100)
    assert row.isna()["steps"]  # bits/dim does not depend on the sampling steps
    fid = frame[frame.metric == "fid_proxy"]
    assert "steps" in set(fid.axis) and "steps" not in set(bpd.axis)
    few = fid[(fid.axis == "steps")]
    assert len(few) == 10 and (few["diff"] > 0).all() and set(few.verdict) == {"a higher"}  # 10 steps worse
    # improved has the smaller shift: lower FID at 10 steps, paired on the same reference features
    at10 = fid[(fid.axis == "training") & (fid.steps == 10)]
    assert len(at10) == 5 and set(at10.verdict) == {"a lower"}
    md = study_report.contrasts_markdown("s", frame)
    assert "## training: bpd" in md and "## steps: fid_proxy" in md
    assert "| schedule | T | seed | a - b | a | b | difference (95% CI) | verdict |" in md
    assert "| linear | 100 | 0 | improved - ho | " in md


def fake_reader(root, rev, path, binary=False):
    """read_exp_file's stand-in: sample images and a bits/dim-per-t curve."""
    if path.endswith(".npz"):
        import io
        buf = io.BytesIO()
        np.savez(buf, images=np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8))
        return buf.getvalue()
    return "t,bpd\n" + "\n".join(f"{t},{1 / t}" for t in range(1, 101))


def test_plots_and_sheets_without_experiments(tmp_path, monkeypatch):
    """write_all reads curves and samples from each point's experiment: here from a stand-in reader."""
    results = fake_results()
    monkeypatch.setattr(records, "read_exp_file", fake_reader)
    files = study_report.write_all(tmp_path, SPEC, results, tmp_path)
    sheets = sorted((tmp_path / "samples").glob("*.png"))
    assert len(sheets) == 10 and sheets[0].name == "cosine-100-ho-0.png"
    for key in ("bpd_vs_T", "fid_vs_steps", "bpd_per_t"):
        assert files[key].read_bytes()[:8] == PNG
    assert list(csv.DictReader(files["contrasts_csv"].open()))
    no_T = Study("s", "", {}, {}, [{"diffusion.schedule": ["linear", "cosine"], "sample.steps": [5, 10]}], {})
    one = [PointResult({"diffusion.schedule": s, "sample.steps": k}, "ok", f"s-{s}-{k}",
                       {**results[0].metrics, "sample_steps": k}, exp_rev="x") for s in ("linear", "cosine")
           for k in (5, 10)]
    (tmp_path / "no-T").mkdir()
    files = study_report.write_all(tmp_path, no_T, one, tmp_path / "no-T")  # no T axis: no bits/dim-against-T plot
    assert "bpd_vs_T" not in files and files["fid_vs_steps"].read_bytes()[:8] == PNG


# --- fast: two training budgets and two samplers, on made-up points -------------------------------------
BUDGETS = {"budget": {400: {"train.steps": 400}, 1600: {"train.steps": 1600}}}
AXES_B = {"budget": [400, 1600], "diffusion.schedule": ["linear", "cosine"], "training": ["ho", "improved"],
          "train.seed": [0]}
SPEC_B = Study("b", "", {}, {**BUDGETS, **BUNDLES}, [
    {**AXES_B, "sample.sampler": ["ancestral"], "sample.steps": [10, 100]},
    {**AXES_B, "sample.sampler": ["dpm_solver++"], "sample.steps": [10, 20]},
    {**AXES_B, "diffusion.schedule": ["linear"], "training": ["ho"], "train.seed": [1],
     "sample.sampler": ["ancestral"], "sample.steps": [10, 100]}], {})
LAST = np.random.default_rng(5).normal(0, 0.3, 60)  # per-image spread of the t = T term, shared
SHIFTS = {("ancestral", 10): 1.5, ("ancestral", 100): 0.3, ("dpm_solver++", 10): 0.6, ("dpm_solver++", 20): 0.3}


def fake_b(axes: dict) -> PointResult:
    """bits/dim 4 - 0.4 (1,600 steps) - 0.3 (improved; 0.5 at 1,600 steps) - 0.2 (cosine) + 0.05 (seed 1)
    + the t = T term, 2.0 + LAST for cosine, LAST for linear: cosine - linear is +1.8 with that term and -0.2
    without it, at both budgets. FID-proxy features shifted by SHIFTS x 0.3 (improved) x 0.5 (1,600 steps)."""
    late, improved = axes["train.steps"] == 1600, axes["diffusion.variance"] == "learned_range"
    cosine = axes["diffusion.schedule"] == "cosine"
    bpd = 4 - 0.4 * late - (0.5 if late else 0.3) * improved - 0.2 * cosine + 0.05 * axes["train.seed"]
    own = np.random.default_rng([axes["train.steps"], axes["train.seed"], improved, cosine])
    last = {i: 2.0 * cosine + c for i, c in enumerate(LAST)}
    per_image = {i: bpd + c + last[i] + 0.005 * own.normal() for i, c in enumerate(COMMON)}
    shift = SHIFTS[axes["sample.sampler"], axes["sample.steps"]] * (0.3 if improved else 1.0) * (0.5 if late else 1)
    return point_result(axes, per_image, shift, improved, last_term_per_image=last, exp_rev="x")


def test_a_budget_axis_trains_each_model_once_per_budget_and_samplings_are_sampling_axes():
    points = SPEC_B.points()
    assert len(points) == 2 * 2 * 2 * 4 + 2 * 2
    models = {model_key(p) for p in points}
    assert len(models) == 2 * 2 * 2 + 2  # budget x schedule x training, + seed 1 at each budget
    assert {dict(m)["train.steps"] for m in models} == {"400", "1600"}
    assert [study_report._is_sampling(SPEC_B, n) for n in study_report.axis_of(SPEC_B)] == \
        [False, False, False, False, True, True]
    assert study_budget.budget_axis(SPEC_B) == "budget" and study_budget.budget_steps(SPEC_B, 1600) == 1600
    assert study_budget.budget_axis(SPEC) is None  # the first edition: one budget
    # a bundle of sampling keys is a sampling axis too, and trains nothing
    sampling = {"sampling": {"anc": {"sample.sampler": "ancestral", "sample.steps": 100},
                             "dpm": {"sample.sampler": "dpm_solver++", "sample.steps": 10}}}
    spec = Study("c", "", {}, sampling, [{"diffusion.T": [100], "sampling": ["anc", "dpm"]}], {})
    assert study_report._is_sampling(spec, "sampling") and len({model_key(p) for p in spec.points()}) == 1


@pytest.fixture
def few_reps(monkeypatch):
    """40 bootstrap replicates for the FID-proxy intervals (200 in studies): enough for these signs."""
    monkeypatch.setattr(analysis, "BOOTSTRAP_REPS", 40)


def test_contrasts_at_each_budget_and_their_change_between_budgets(few_reps):
    results = [fake_b(dict(p.axes)) for p in SPEC_B.points()]
    pairs = study_report.contrast_pairs(SPEC_B, results)
    frame = study_report.contrasts(SPEC_B, results, pairs)
    assert "budget" in frame.columns
    bpd = frame[frame.metric == "bpd"]
    for axis, budget, expected in (("training", 400, -0.3), ("training", 1600, -0.5), ("schedule", 400, 1.8),
                                   ("schedule", 1600, 1.8), ("seed", 400, 0.05), ("budget", 1600, -0.4)):
        rows = bpd[(bpd.axis == axis) & ((bpd.budget == budget) if axis != "budget" else
                                         (bpd.a == budget) & (bpd.training == "ho"))]
        assert len(rows) and np.allclose(rows["diff"], expected, atol=0.01), (axis, budget)
        assert (rows.ci_high - rows.ci_low < 0.01).all()
    assert np.allclose(bpd[(bpd.axis == "budget") & (bpd.training == "improved")]["diff"], -0.6, atol=0.01)
    without = frame[(frame.metric == "bpd_without_last_term") & (frame.axis == "schedule")]
    assert len(without) == 4 and np.allclose(without["diff"], -0.2, atol=0.01) and set(without.verdict) == {"a lower"}
    fid = frame[frame.metric == "fid_proxy"]
    assert set(frame[frame.axis.isin(["sampler", "steps"])].metric) == {"fid_proxy"}  # sampling: samples only
    assert set(fid[fid.axis == "sampler"].steps) == {10}  # dpm_solver++ - ancestral where both sampled 10 steps
    steps = fid[fid.axis == "steps"]
    assert set(zip(steps.sampler, steps.a, steps.b)) == {("ancestral", 10, 100), ("dpm_solver++", 10, 20)}

    changes = study_budget.changes(SPEC_B, pairs)
    assert "budget" not in changes.columns and set(changes.budget_from) == {400} and set(changes.budget_to) == {1600}
    assert set(changes.axis) == {"schedule", "training", "seed", "sampler", "steps"}  # every contrast but the budget's
    row = lambda axis, metric, **k: changes[(changes.axis == axis) & (changes.metric == metric)  # noqa: E731
                                            & np.logical_and.reduce([changes[c] == v for c, v in k.items()])]
    improved = row("training", "bpd", schedule="linear")
    assert len(improved) == 1 and improved["change"].iloc[0] == pytest.approx(-0.2, abs=0.01)
    assert improved.change_ci_high.iloc[0] - improved.change_ci_low.iloc[0] < 0.01  # paired across budgets
    assert improved.diff_from.iloc[0] == pytest.approx(-0.3, abs=0.01) and improved.verdict.iloc[0] == "a - b falls"
    # the FID-proxy's change: the four points' covariance terms cancel in pairs (same sample noise at both
    # budgets), so the estimate is exactly sum_k w_k |mean(gen_k) - mean(reference)|^2
    fid10 = row("training", "fid_proxy", schedule="linear", sampler="ancestral", steps=10)
    points = {(r.axes["train.steps"], r.axes["diffusion.variance"]): r for r in results
              if r.axes["diffusion.schedule"] == "linear" and r.axes["train.seed"] == 0
              and (r.axes["sample.sampler"], r.axes["sample.steps"]) == ("ancestral", 10)}
    dist = {k: np.sum((r.fid_features["gen"].mean(0) - r.fid_features["test"].mean(0)) ** 2) for k, r in points.items()}
    expected = (dist[1600, "learned_range"] - dist[1600, "fixed_small"]) - (dist[400, "learned_range"]
                                                                           - dist[400, "fixed_small"])
    assert fid10["change"].iloc[0] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.225 ** 2 - 0.75 ** 2) - (0.45 ** 2 - 1.5 ** 2), abs=0.3)  # the shifts
    assert fid10.change_ci_low.iloc[0] > 0 and fid10.verdict.iloc[0] == "a - b rises"
    md = study_budget.changes_markdown(SPEC_B, changes)
    assert "## training: bpd, across budgets" in md and "| linear | 0 | improved - ho | 400 -> 1600 |" in md

    # the claim plot: a panel per metric and, for the FID-proxy, per sampling setting, each with a line per model
    groups = study_budget.by_budget(SPEC_B, pairs)
    panels = {(metric, setting): lines for metric, setting, contrast, lines in
              study_budget.claim_panels(SPEC_B, groups, "training") if contrast == "improved - ho"}
    assert set(panels) == {("bpd", ""), ("bpd_without_last_term", ""), ("fid_proxy", "sampler ancestral, steps 10"),
                           ("fid_proxy", "sampler ancestral, steps 100"), ("fid_proxy", "sampler dpm_solver++, steps 10"),
                           ("fid_proxy", "sampler dpm_solver++, steps 20")}
    for lines in panels.values():  # the same two models in every panel, at both budgets
        assert [label for label, _ in lines] == ["schedule linear, seed 0", "schedule cosine, seed 0"]
        assert all(sorted(at) == [400, 1600] for _, at in lines)
    steps = study_budget.claim_panels(SPEC_B, groups, "steps")
    assert {(setting, contrast) for _, setting, contrast, _ in steps} == {("sampler ancestral", "10 - 100"),
                                                                          ("sampler dpm_solver++", "10 - 20")}
    assert {label for *_, lines in steps for label, _ in lines} >= {"schedule linear, training ho, seed 0"}


def test_a_second_budget_writes_its_changes_and_a_plot_per_claim(tmp_path, monkeypatch, few_reps):
    monkeypatch.setattr(records, "read_exp_file", fake_reader)
    files = study_report.write_all(tmp_path, SPEC_B, [fake_b(dict(p.axes)) for p in SPEC_B.points()], tmp_path)
    for axis in ("schedule", "training", "seed", "sampler", "steps"):
        assert files[f"claim_{axis}"].read_bytes()[:8] == PNG
    assert "claim_budget" not in files and files["fid_vs_steps"].read_bytes()[:8] == PNG
    assert list(csv.DictReader(files["budget_changes_csv"].open()))
    assert "# Across training budgets" in files["contrasts_md"].read_text()
    assert len(list((tmp_path / "samples").glob("*.png"))) == 10  # a sheet per model, both samplers on it
    one = study_report.write_all(tmp_path, SPEC, fake_results(), tmp_path / "one") if (tmp_path / "one").mkdir() \
        is None else None
    assert "budget_changes_csv" not in one and "Across" not in one["contrasts_md"].read_text()


def test_an_interim_report_from_the_records_leaves_out_what_needs_a_point_not_run_yet(tmp_path, monkeypatch,
                                                                                     few_reps, capsys):
    """--report: a study part-way through, read from its records; nothing runs, pending points are named as such."""
    import flows.study as study_mod

    late_done = {("linear", "fixed_small", 0)}  # at 1,600 steps only linear ho (seed 0), and not ancestral 100
    done = lambda a: a["train.steps"] == 400 or (  # noqa: E731
        a["diffusion.schedule"], a["diffusion.variance"], a["train.seed"]) in late_done and a["sample.steps"] != 100
    read = lambda out, point, name, code: fake_b(dict(point.axes)) if done(dict(point.axes)) else None  # noqa: E731
    monkeypatch.setattr(records, "read_exp_file", fake_reader)
    monkeypatch.setattr(records, "read", read)
    monkeypatch.setattr(records, "code_id", lambda root: "code-1")
    monkeypatch.setattr(study_mod, "git", lambda root, *args: "c0ffee1234")
    n, files = study_mod.write_interim_report(tmp_path, SPEC_B)
    points = SPEC_B.points()
    assert n == sum(done(dict(p.axes)) for p in points) == 18 + 3 and len(points) == 36
    out = tmp_path / "reports" / "studies" / "b"
    summary_md = (out / "summary.md").read_text()
    assert "**Interim report: 21 of 36 points**" in summary_md and "code code-1, commit c0ffee1234" in summary_md
    assert "The reference point has not succeeded (or not run yet)" not in summary_md  # SPEC_B has no reference
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in table].count("pending") == 15
    assert {r["reason"] for r in table if r["status"] == "pending"} == {"no record yet"}
    assert "Interim report: 21 of 36 points" in (out / "contrasts.md").read_text()
    contrasts = list(csv.DictReader(files["contrasts_csv"].open()))
    assert {(r["axis"], r["a"], r["b"]) for r in contrasts if r["budget"] == "1600"} == \
        {("steps", "10", "20"), ("sampler", "dpm_solver++", "ancestral")}  # linear ho only
    budget = [r for r in contrasts if r["axis"] == "budget" and r["metric"] == "bpd"]  # the bound: any point of each
    assert len(budget) == 1 and float(budget[0]["diff"]) == pytest.approx(-0.4, abs=0.01)  # model stands for it
    changes = list(csv.DictReader(files["budget_changes_csv"].open()))
    assert changes and {r["axis"] for r in changes} == {"steps", "sampler"}  # the others need a pending point
    assert files["plot"].read_bytes()[:8] == PNG and len(list((out / "samples").glob("*.png"))) == 6
    monkeypatch.setattr(records, "read", lambda *a: None)
    with pytest.raises(ParamsError, match="no point of study b has a record"):
        study_mod.write_interim_report(tmp_path, SPEC_B)
    monkeypatch.setattr(records, "code_id", lambda root: None)
    with pytest.raises(ParamsError, match="uncommitted changes"):
        study_mod.write_interim_report(tmp_path, SPEC_B)
    monkeypatch.chdir(tmp_path)  # the command: one line, exit status 2, nothing written
    assert study_mod.main([str(write(tmp_path, yaml.safe_dump(GOOD))), "--report"]) == 2
    assert not (tmp_path / "reports" / "studies" / "s").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: study: ") and "uncommitted changes" in err and err.count("\n") == 1


# --- slow: a tiny digits study through its command -------------------------------------------------------
TINY_AXES = {"budget": [8, 16], "diffusion.schedule": ["linear"], "diffusion.T": [30], "training": ["ho"],
             "sample.sampler": ["ancestral"], "sample.steps": [4]}
TINY_STUDY = {  # per budget: linear ho and its three one-axis neighbours (cosine, improved, DPM-Solver++)
    "name": "tiny", "budget": {"sample.n": 24, "evaluate.n_fid": 24, "evaluate.bpd_passes": 240},
    "fixed": {"sample.clamp_steps": True, "mlflow.register_model": False},
    "bundles": {"budget": {8: {"train.steps": 8}, 16: {"train.steps": 16}}, **BUNDLES},
    "grids": [{**TINY_AXES, "diffusion.schedule": ["linear", "cosine"]}, {**TINY_AXES, "training": ["improved"]},
              {**TINY_AXES, "sample.sampler": ["dpm_solver++"]}],
    "reference": {"budget": 16, "diffusion.schedule": "linear", "diffusion.T": 30, "training": "ho",
                  "sample.sampler": "ancestral", "sample.steps": 4},
}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_a_tiny_study_end_to_end_and_again_from_its_records_in_a_fresh_clone(harness, tmp_path, monkeypatch, capsys):
    import mlflow
    from prefect.client.orchestration import get_client

    from flows.study import main

    project = make_project(tmp_path / "p")
    (project / "tiny.yaml").write_text(yaml.safe_dump(TINY_STUDY, sort_keys=False))
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # one point at a time, as the study runs: concurrent `dvc exp run --temp` in one checkout share DVC's temp
    # queue, and a process can pick up (and run again) another's experiment
    assert main(["tiny.yaml"]) == 0
    out = project / "reports" / "studies" / "tiny"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert [r["reference"] for r in rows].count("True") == 1
    ho, improved = ("fixed_small", "simple"), ("learned_range", "hybrid")
    assert {(r["train.steps"], r["schedule"], r["variance"], r["loss"], r["sampler"]) for r in rows} == {
        (b, *cell, "ancestral") for b in ("8", "16") for cell in (("linear", *ho), ("cosine", *ho), ("linear", *improved))
    } | {(b, "linear", *ho, "dpm_solver++") for b in ("8", "16")}
    for r in rows:  # the t = T term, measured by evaluate on the bound's own draws
        assert float(r["bpd"]) - float(r["bpd_without_last_term"]) == pytest.approx(float(r["bpd_last_term"]))
        assert float(r["bpd_last_term_ci_low"]) <= float(r["bpd_last_term"]) <= float(r["bpd_last_term_ci_high"])
    contrasts = list(csv.DictReader((out / "contrasts.csv").open()))
    bound = ("bpd", "bpd_without_last_term", "fid_proxy")
    assert {(c["axis"], c["metric"]) for c in contrasts} == {
        *((a, m) for a in ("budget", "schedule", "training") for m in bound), ("sampler", "fid_proxy")}
    assert all(float(c["ci_low"]) <= float(c["diff"]) <= float(c["ci_high"]) for c in contrasts)
    changes = list(csv.DictReader((out / "budget_changes.csv").open()))
    assert {(c["axis"], c["metric"]) for c in changes} == {
        *((a, m) for a in ("schedule", "training") for m in bound), ("sampler", "fid_proxy")}
    assert {(c["budget_from"], c["budget_to"]) for c in changes} == {("8", "16")}
    assert all(float(c["change_ci_low"]) <= float(c["change"]) <= float(c["change_ci_high"]) for c in changes)
    for name in ("summary.md", "contrasts.md"):
        assert (out / name).read_text().strip()
    for name in ("sweep.png", "bpd_vs_T.png", "fid_vs_steps.png", "bpd_per_t.png", "claim_schedule_vs_budget.png",
                 "claim_training_vs_budget.png", "claim_sampler_vs_budget.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert len(list((out / "samples").glob("*.png"))) == 6  # one sheet per trained model
    # a model trains once: its two sampling points share the trained network's bits/dim exactly
    by_model = {}
    for r in rows:
        by_model.setdefault((r["train.steps"], r["schedule"], r["variance"]), set()).add(r["bpd"])
    assert len(by_model) == 6 and all(len(v) == 1 for v in by_model.values())
    # MLflow: one parent run, a child per point; Prefect: the summary as artifacts
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddpm")
    parents = client.search_runs([exp.experiment_id], "tags.study = 'tiny'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 8
    with get_client(sync_client=True) as pc:
        assert {"sweep-tiny-table", "sweep-tiny-summary"} <= {a.key for a in pc.read_artifacts()}
    # a record per point (flows/records.py), the reference features every point shares once
    assert len(list((out / "points").glob("*/record.json"))) == 8
    assert len(list((out / "points").glob("reference-*.npz"))) == 1
    assert [f.name for f in (out / "points").glob("featurizer-*/*")] == ["featurizer.pt"]
    # --records writes what is missing, from the experiments, and runs nothing
    shutil.rmtree(next((out / "points").glob("*/")))
    assert main(["tiny.yaml", "--records"]) == 0 and capsys.readouterr().out.endswith(
        f"1 records written in {out / 'points'}\n")
    recorded = [json.loads(f.read_text()) for f in (out / "points").glob("*/record.json")]
    assert len(recorded) == 8 and all(r["seconds"] > 0 for r in recorded)  # as run, or from the point's log
    # again, in a fresh clone with the study's reports committed (no experiments, no DVC cache, no MLflow store):
    # every point reused from its record but one, computed again with the same featurizer; the same numbers,
    # contrasts and changes
    run("git add tiny.yaml reports/studies && git commit -qm study", project)
    clone = tmp_path / "clone"
    run(f"git clone -q {project} {clone}", tmp_path)
    monkeypatch.chdir(clone)
    again_out = clone / "reports" / "studies" / "tiny"
    dropped = next((again_out / "points").glob("tiny-*/"))  # this point is computed again, beside the records
    shutil.rmtree(dropped)
    kept = next((again_out / "points").glob("featurizer-*"))
    kept.rename(kept.with_name("featurizer-" + "0" * 32))  # weights whose md5 is not their name: damaged
    capsys.readouterr()
    assert main(["tiny.yaml"]) == 1  # refused before any point ran: they would not be measured like the records
    said = capsys.readouterr()
    assert "is missing or damaged" in said.out + said.err
    assert not list((clone / ".git" / "refs").glob("exps/**/tiny-*"))
    (again_out / "points" / ("featurizer-" + "0" * 32)).rename(kept)
    # this checkout trains another featurizer (as another machine would): the records' one is restored
    run("dvc repro featurizer", clone)
    other = load_checkpoint(clone / "build" / "featurizer.pt")
    first = next(iter(other["model"]))
    other["model"][first] = other["model"][first] + 1e-3
    (clone / "build" / "featurizer.pt").unlink()  # DVC may link it to its cache
    save_checkpoint(other, clone / "build" / "featurizer.pt")
    run("dvc commit -f featurizer", clone)
    assert main(["tiny.yaml"]) == 0
    md5 = kept.name.removeprefix("featurizer-")
    assert hashlib.md5((clone / "build" / "featurizer.pt").read_bytes()).hexdigest() == md5
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["featurizer"]["outs"]
    assert next(o["md5"] for o in lock if o["path"] == "build/featurizer.pt") == md5
    # (the recomputed point's FID-proxy below, equal to the first run's, is the proof it was measured with it)
    again = list(csv.DictReader((again_out / "summary.csv").open()))
    assert [r["exp_name"] for r in again if r["cached"] == "False"] == [dropped.name]
    assert (dropped / "record.json").exists()
    numbers = [k for k in rows[0] if k.startswith(("bpd", "fid_proxy", "kid_proxy"))]
    assert [[r[k] for k in numbers] for r in again] == [[r[k] for k in numbers] for r in rows]
    for name in ("contrasts.csv", "budget_changes.csv"):
        assert (again_out / name).read_text() == (out / name).read_text(), name
    assert len(list((again_out / "samples").glob("*.png"))) == 6
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow' / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("ddpm").experiment_id
    parents = client.search_runs([exp_id], "tags.study = 'tiny'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # every point has its run under the study's parent: the recorded ones a run made from their record
    kids = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    by_name = {r["exp_name"]: r for r in again}
    assert sorted(k.data.tags.get("record_of") or k.data.tags["dvc_experiment"] for k in kids) == sorted(by_name)
    from_records = [k for k in kids if k.data.tags.get("record_of")]
    assert len(from_records) == 7 and dropped.name not in {k.data.tags["record_of"] for k in from_records}
    for k in from_records:
        assert k.info.status == "FINISHED" and k.data.metrics["fid_proxy"] == float(by_name[k.info.run_name]["fid_proxy"])
        assert k.data.params["train.steps"] == by_name[k.info.run_name]["train.steps"]
        assert "fid_proxy_diff" in k.data.metrics or by_name[k.info.run_name]["reference"] == "True"
        seconds = json.loads((Path(k.data.tags["record"]) / "record.json").read_text())["seconds"]
        assert k.data.metrics.get("point_seconds") == seconds  # the point's time, not the run's milliseconds
    assert all(k.data.metrics.get("point_seconds", 0) > 0 for k in from_records)
    assert "error" not in run("dvc status", project).stdout.lower()


# --- the committed findings ------------------------------------------------------------------------------
EDITIONS = ["schedule-T-objective", "schedule-T-objective-budget"]  # committed, each with a findings.md
INTERVAL = re.compile(r"([+-]?\d+(?:\.\d+)?) \(([+-]?\d+(?:\.\d+)?) to ([+-]?\d+(?:\.\d+)?)[),]")


def _intervals_in(folder: Path) -> list[tuple[float, float, float]]:
    """Every (value, low, high) the study's CSV files hold: a column with its `_ci_low` / `_ci_high`, or the
    row's `ci_low` / `ci_high` (contrasts.csv's diff, last_term.csv's contrast); also negated, for "better by X"."""
    found = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    for lo, hi in ((f"{k}_ci_low", f"{k}_ci_high"), ("ci_low", "ci_high")):
                        try:
                            found.append((float(v), float(row[lo]), float(row[hi])))
                        except (KeyError, TypeError, ValueError):
                            pass
    return found + [(-v, -hi, -lo) for v, lo, hi in found]


def _rounds_to(stated: str, value: float) -> bool:
    decimals = len(stated.partition(".")[2])
    return abs(float(stated) - value) <= 0.5 * 10 ** -decimals + 1e-9


def _not_in(text: str, known: list[tuple[float, float, float]]) -> tuple[int, list[tuple[str, str, str]]]:
    """How many "x (low to high)" the text states, and those that no (value, low, high) of `known` rounds to."""
    stated = [m.groups() for m in INTERVAL.finditer(text)]
    return len(stated), [s for s in stated if not any(all(map(_rounds_to, s, k)) for k in known)]


@pytest.mark.parametrize("name", EDITIONS)
def test_every_interval_the_findings_state_is_in_the_studys_files(name):
    """Each "x (low to high)" in findings.md is a value and its 95% interval from summary.csv, contrasts.csv,
    budget_changes.csv or another of the study's tables, rounded as written: no number typed by hand."""
    n, missing = _not_in((STUDIES / name / "findings.md").read_text(), _intervals_in(STUDIES / name))
    assert n > 30 and missing == []


def test_every_interval_the_readme_states_about_the_study_is_in_its_files():
    """The README's study section quotes the findings: its intervals come from the same files."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The study:"):]
    section = section[:section.index("\n## ", 1)]
    n, missing = _not_in(section, [k for name in EDITIONS for k in _intervals_in(STUDIES / name)])
    assert n > 10 and missing == []
