"""The DVC pipeline end to end on a tiny digits configuration, in a temporary Git repository, with MLflow."""

import json
import re

import pytest

from pipeline import paths

from project import ROOT, make_project, mlflow_runs, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_project(tmp_path_factory.mktemp("project"))
    run("dvc repro", folder)
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
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"samples.png", "train_loss.png", "bpd_per_t.png", "summary.md"} <= names
    assert {p.name for p in paths.FIGURE_FILES} <= names
    versions = client.search_model_versions("name='ddpm-digits'")
    assert len(versions) == 1 and versions[0].run_id == r.info.run_id


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


@pytest.mark.slow
def test_bad_params_stop_before_any_output_is_touched(project):
    before = (project / paths.METRICS).read_bytes()
    model = (project / paths.MODEL).stat().st_mtime_ns
    out = run("dvc repro -S train.lr=-1 2>&1 || dvc exp run -S train.lr=-1", project, check=False)
    assert out.returncode != 0
    assert "train.lr = -1 is not allowed: must be a number > 0" in out.stdout + out.stderr
    assert (project / paths.METRICS).read_bytes() == before
    assert (project / paths.MODEL).stat().st_mtime_ns == model
    run("git checkout params.yaml", project)


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
