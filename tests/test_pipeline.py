"""The DVC pipeline end to end on a tiny digits configuration, in a temporary Git repository, with MLflow."""

import hashlib
import json
import re

import pytest

from pipeline import paths

from project import ROOT, make_project, mlflow_runs, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_project(tmp_path_factory.mktemp("project"))
    out = run("dvc repro", folder)
    (folder / "repro.log").write_text(out.stdout + out.stderr)
    return folder


@pytest.mark.slow
def test_repro_builds_every_result(project):
    metrics = json.loads((project / paths.METRICS).read_text())
    for key in ("bpd", "prior_bpd", "decoder_bpd", "fid_proxy", "fid_proxy_floor", "classifier_accuracy",
                "n_fid", "sample_seconds"):
        assert key in metrics, key
    assert metrics["n_fid"] == 40 and metrics["bpd"] > 0 and metrics["fid_proxy"] > 0
    assert metrics["bpd"] == pytest.approx(metrics["prior_bpd"] + sum(
        float(line.split(",")[1]) for line in (project / paths.BPD_PER_T).read_text().splitlines()[1:]), rel=1e-5)
    for png in (paths.SAMPLE_GRID, paths.LOSS_PLOT, paths.BPD_PLOT, *paths.FIGURE_FILES):
        assert (project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert len((project / paths.TRAIN_CURVE).read_text().splitlines()) == 31
    assert "| fid_proxy |" in (project / paths.SUMMARY).read_text()


def what_this_machine_resolves():
    from ddpm_core.compute import World, resolve

    return resolve("auto", "auto", world=World())


@pytest.mark.slow
def test_metrics_say_which_precision_and_machine_produced_them(project):
    """params say `auto`; metrics.json, the checkpoint and sample.json say what it resolved to on this machine."""
    from ddpm_core.checkpoint import load_checkpoint

    c = what_this_machine_resolves()
    metrics = json.loads((project / paths.METRICS).read_text())
    assert (metrics["train_precision"], metrics["sample_precision"], metrics["bound_precision"]) == \
        (c.precision, c.precision, "fp32")
    assert metrics["train_device_name"] == c.device_name == metrics["sample_device_name"]
    assert metrics["train_bf16_native"] == c.describe()["bf16_native"] and metrics["train_world_size"] == 1
    assert load_checkpoint(project / paths.MODEL)["meta"]["compute"] == c.describe()
    assert json.loads((project / paths.SAMPLE_STATS).read_text())["compute"]["precision"] == c.precision


@pytest.mark.slow
def test_mlflow_records_one_complete_run(project):
    client, runs = mlflow_runs(project)
    assert len(runs) == 1
    run_info = json.loads((project / paths.MLFLOW_RUN).read_text())
    r = runs[0]
    assert r.info.run_id == run_info["run_id"]
    assert r.data.params["train.steps"] == "30" and r.data.params["data.dataset"] == "digits"
    assert r.data.metrics["fid_proxy"] == json.loads((project / paths.METRICS).read_text())["fid_proxy"]
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 30
    assert r.data.tags["data_sha256"] == json.loads((project / paths.DATA_INFO).read_text())["sha256"]
    assert len(r.data.tags["git_commit"]) == 40
    c = what_this_machine_resolves()
    assert (r.data.tags["train_precision"], r.data.tags["sample_precision"], r.data.tags["bound_precision"],
            r.data.tags["train_device_name"]) == (c.precision, c.precision, "fp32", c.device_name)
    assert r.data.params["train.precision"] == "auto" and "train_precision" not in r.data.metrics
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"samples.png", "train_loss.png", "bpd_per_t.png", "summary.md"} <= names
    assert {p.name for p in paths.FIGURE_FILES} <= names
    versions = client.search_model_versions("name='ddpm-digits'")
    assert len(versions) == 1 and versions[0].run_id == r.info.run_id


@pytest.mark.slow
def test_the_registered_model_generates_with_the_trained_ema_weights(project, monkeypatch):
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from ddpm_core.checkpoint import load_checkpoint
    from ddpm_core.data import from_model_range
    from ddpm_core.sampling import sample
    from pipeline import tracking

    from helpers import as_served

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    run_info = json.loads((project / paths.MLFLOW_RUN).read_text())
    metrics = json.loads((project / paths.METRICS).read_text())
    v = mlflow.MlflowClient().get_model_version("ddpm-digits", run_info["model_version"])
    assert v.run_id == run_info["run_id"] and run_info["model_name"] == "ddpm-digits"
    assert v.description.startswith("DDPM generator for digits (1x8x8): linear schedule, T = 50, objective eps, "
                                    "variance fixed_small, loss simple, 30 training steps")
    assert f"Negative ELBO {metrics['bpd']:.3f} bits/dim" in v.description and "FID-proxy" in v.description
    assert f"Trained in {metrics['train_precision']} on cpu ({metrics['train_device_name']}; native bf16: " \
           f"{metrics['train_bf16_native']}; 1 process(es)); sampled in {metrics['sample_precision']}" in v.description
    assert v.tags["train_precision"] == metrics["train_precision"]
    assert (v.tags["schedule"], v.tags["T"], v.tags["variance"], v.tags["train_steps"]) == ("linear", "50", "fixed_small", "30")
    assert float(v.tags["bpd"]) == pytest.approx(metrics["bpd"], abs=1e-4) and len(v.tags["git_commit"]) == 40
    # the network inside is the EMA network that train wrote
    net, schedule, meta = tracking.load_eps_model(f"models:/ddpm-digits/{v.version}")
    ema = load_checkpoint(project / paths.MODEL)["ema"]
    assert all(torch.equal(w, ema[f"module.{k}"]) for k, w in net.state_dict().items())
    assert meta["sampling"] == {"sampler": "dpm_solver++", "steps": 10, "eta": 0.0, "order": 2, "clip_x0": True,
                                "batch_size": 40, "precision": "auto"}
    # predict: one image per seed, as the library samples with the run's settings
    images = mlflow.pyfunc.load_model(f"models:/ddpm-digits/{v.version}").predict(pd.DataFrame({"seed": [5, 6]}))
    expected = [from_model_range(sample(as_served(net), schedule, 1, (1, 8, 8), s, "dpm_solver++", 10, progress=False))
                for s in (5, 6)]  # at the precision `auto` resolves to here, as the server
    assert images.dtype == np.uint8 and np.array_equal(images, torch.cat(expected).numpy())


@pytest.mark.slow
def test_the_experiment_opens_on_its_runs_and_the_repro_prints_no_mlflow_warning(project):
    client, runs = mlflow_runs(project)
    assert client.get_experiment_by_name("ddpm").tags["mlflow.experimentKind"] == "custom_model_development"
    r = runs[0]  # one run from the first training step to evaluate
    loss = client.get_metric_history(r.info.run_id, "train_loss")
    assert r.info.start_time <= min(m.timestamp for m in loss) and r.info.end_time >= max(m.timestamp for m in loss)
    log = (project / "repro.log").read_text()
    assert "Warning" not in log and "WARNING" not in log, [ln for ln in log.splitlines() if "arning" in ln]


@pytest.mark.slow
def test_second_repro_does_nothing_and_says_so(project):
    out = run("dvc repro", project)
    assert "Data and pipelines are up to date" in out.stdout
    assert len(mlflow_runs(project)[1]) == 1


@pytest.mark.slow
def test_plots_render_offline(project):
    run("dvc plots show -o plots_html", project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "vega-embed 6.29.0" in html
    assert "bpd_per_t.csv" in html and "train_loss.csv" in html


def snapshot(folder):
    """sha256 of every result file (build/, reports/, dvc.lock); not check's marker build/params.ok, which DVC
    removes before check runs."""
    files = [p for d in ("build", "reports") for p in (folder / d).rglob("*") if p.is_file()] + [folder / "dvc.lock"]
    files = [p for p in files if p != folder / "build" / "params.ok"]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_bad_params_stop_before_any_output_is_touched(project):
    """`dvc repro` with a malformed params.yaml fails at check (or, for a file that is not UTF-8, in DVC's own
    reading of it) and leaves every earlier result byte-identical; DVC's own `-S train.lr=2e-5`, which it
    writes as `2e-05` (a string to YAML 1.1), passes."""
    before = snapshot(project)
    good = (project / "params.yaml").read_bytes()
    cases = [(good.replace(b"  lr: 0.001", b"  lr: .inf"), "error: check: train.lr = inf is not allowed: must be a finite number > 0"),
             (good.replace(b"  lr: 0.001", b"  lrr: 0.001"), "error: check: unknown key train.lrr = 0.001: allowed keys in train"),
             (good.replace(b"  T: 50", b"  T: 10"), "error: check: diffusion.T = 10 does not work with diffusion.schedule"),
             (good + b"# caf\xe9\n", "is not valid utf-8")]
    try:
        for text, message in cases:
            (project / "params.yaml").write_bytes(text)
            out = run("dvc repro", project, check=False)
            text = out.stdout + out.stderr
            assert out.returncode != 0 and message in text, (message, text)
            ours = [ln for ln in text.splitlines() if ln.startswith("error: ")]  # one line from check, if it ran
            assert len(ours) == (message.startswith("error: ")) and all(ln.startswith(message) for ln in ours), text
            assert snapshot(project) == before
    finally:
        (project / "params.yaml").write_bytes(good)
    out = run("dvc exp run --temp -S train.lr=2e-5 check", project)
    assert "check: params.yaml is valid" in out.stdout + out.stderr
    out = run("dvc repro", project)  # check writes its marker again; nothing else runs
    assert "Stage 'train' didn't change" in out.stdout and snapshot(project) == before


@pytest.mark.slow
def test_run_cache_restore_makes_no_duplicate_run(project):
    run("dvc exp run -S sample.seed=1", project)  # really computes sample + evaluate: one new run
    _, runs = mlflow_runs(project)
    assert len(runs) == 2
    out = run("dvc exp run -S sample.seed=0", project)  # back to the first result: restored from run-cache
    assert "Stage 'evaluate' is cached" in out.stdout + out.stderr
    _, runs_after = mlflow_runs(project)
    assert len(runs_after) == 2
    restored = json.loads((project / paths.MLFLOW_RUN).read_text())["run_id"]
    assert restored in {r.info.run_id for r in runs_after}


@pytest.mark.slow
def test_temp_experiment_logs_into_the_project_store(project):
    _, before = mlflow_runs(project)
    run("dvc exp run --temp -S evaluate.seed=3", project)
    _, after = mlflow_runs(project)
    assert len(after) == len(before) + 1
    assert not (project / "mlruns").exists()


def test_dvc_yaml_paths_match_the_code():
    text = (ROOT / "dvc.yaml").read_text()
    for name in ("DATA", "FEATURIZER", "MODEL", "SAMPLES", "METRICS", "BPD_PER_T", "SAMPLE_GRID", "TRAIN_CURVE",
                 "SUMMARY", "MLFLOW_RUN", "LOSS_PLOT", "BPD_PLOT", "SAMPLE_STATS"):
        assert str(getattr(paths, name)) in text, name


def test_project_root_is_found_from_a_dvc_experiment_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_PROJECT_ROOT", raising=False)
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    copy.mkdir(parents=True)
    assert paths.project_root(copy) == tmp_path / "proj"
    assert paths.project_root(tmp_path) == tmp_path


def test_unreachable_tracking_server_is_reported_before_training(monkeypatch):
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingError, match=r"MLflow tracking server at http://127.0.0.1:9 is unreachable"):
        tracking.check_reachable(timeout=2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri().startswith("sqlite:///") and tracking.tracking_uri().endswith("mlflow/mlflow.db")


def test_missing_inception_weights_stop_evaluate_first_in_one_line(tmp_path, monkeypatch, capsys):
    """evaluate.fid_features: inception without the weights (and without data.download): one line saying what is
    missing and where it looked, before the model, the data or the network are touched; nothing downloads."""
    import torch
    import yaml

    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["fid_features"] = "inception"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["evaluate"]) == 2
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert capsys.readouterr().err == (
        f"error: evaluate: FID Inception weights pt_inception-2015-12-05-6726825d.pth not found: "
        f"evaluate.inception_weights is null and torch hub's cache has no {cache}; copy the file there or name it "
        f"in evaluate.inception_weights, or set data.download: true to fetch it (internet)\n")
    params["evaluate"]["inception_weights"] = "weights/fid.pth"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["evaluate"]) == 2
    assert capsys.readouterr().err.startswith("error: evaluate: FID Inception weights not found at weights/fid.pth")


@pytest.mark.slow
def test_inception_fid_beside_the_proxy_on_the_same_samples(project, tmp_path, monkeypatch):
    """evaluate_samples with Inception weights (random, right shapes): fid and kid with intervals beside the
    unchanged fid_proxy, and the Inception features kept next to the classifier's."""
    import shutil

    import numpy as np
    import torch

    from helpers import random_inception_weights
    from pipeline import stages
    from pipeline.params import load_params

    for f in (paths.DATA, paths.DATA_INFO, paths.FEATURIZER, paths.SAMPLES):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / f, tmp_path / f)
    random_inception_weights(tmp_path / "inception.pth")
    monkeypatch.chdir(tmp_path)
    p = load_params(project / "params.yaml")
    report, _ = stages.evaluate_samples(p, stages.load_prepared(), torch.device("cpu"), tmp_path / "inception.pth")
    metrics = json.loads((project / paths.METRICS).read_text())
    # the same features: equal up to the path (evaluate at main ran this in feature space; n = 40 < 128 now
    # takes the sample-space path, exact too): 1e-7 relative seen
    assert report["fid_proxy"] == pytest.approx(metrics["fid_proxy"], rel=1e-6)
    assert report["fid_ci_low"] <= report["fid"] <= report["fid_ci_high"] and report["fid"] > 0
    assert report["fid_floor"] >= 0 and report["kid_stderr"] > 0 and report["n_fid"] == 40
    with np.load(paths.FID_FEATURES) as z:
        assert z["inception_gen"].shape == z["inception_test"].shape == (40, 2048) and z["gen"].shape[0] == 40


def test_damaged_prepared_data_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """One flipped byte in build/data.npz (in the arrays, in the zip directory, at the start) or a damaged
    build/data.json stops a stage with one line naming the file and `dvc repro prepare`, never a traceback."""
    import yaml

    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "digits"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare"]) == 0
    good = paths.DATA.read_bytes()
    for position in (0, 500, len(good) // 2, len(good) - 200, len(good) - 30):
        damaged = bytearray(good)
        damaged[position] ^= 0xFF
        paths.DATA.write_bytes(bytes(damaged))
        capsys.readouterr()
        assert main(["train"]) == 2, position
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and re.fullmatch(r"error: train: build/data.npz is damaged \(.+\); run `dvc repro "
                                              r"prepare`", err[0]), (position, err)
    paths.DATA.write_bytes(good)
    info = paths.DATA_INFO.read_text()
    paths.DATA_INFO.write_text(info[: len(info) // 2])
    assert main(["featurizer"]) == 2
    assert re.fullmatch(r"error: featurizer: build/data.json is damaged \(JSONDecodeError: .+\); run `dvc repro "
                        r"prepare`\n", capsys.readouterr().err)
    paths.DATA.unlink()
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "error: train: build/data.npz is missing; run `dvc repro prepare`\n"
    assert not paths.MODEL.exists()
