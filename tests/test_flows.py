"""Sweep flows: grid and params handling, the summary, and whole sweeps under Prefect's test harness."""

import csv
import json
import os
import re
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from flows import analysis, summary
from flows.points import (
    Point, PointError, PointResult, combine_axes, execute, failure_reason, hydra_value, make_grid, parse_grid,
    parse_set, point_params_error, tool_env,
)
from pipeline.params import ParamsError

from project import ROOT, free_port, make_project, run, wait_http

PNG = b"\x89PNG\r\n\x1a\n"


def pt(schedule, T, overrides=()):
    return Point((("diffusion.schedule", schedule), ("diffusion.T", T)), tuple(overrides))


# --- fast: the grid, params and the summary ---------------------------------------------------------------
def test_overrides_are_written_in_dvc_set_grammar():
    assert hydra_value([1, 2, 2]) == "[1,2,2]"
    assert hydra_value(True) == "true" and hydra_value(None) == "null" and hydra_value(0.0002) == "0.0002"
    assert hydra_value("cosine") == "cosine" and hydra_value("a b") == "'a b'"
    assert pt("cosine", 100, (("train.steps", 5),)).set_args() == [
        "-S", "train.steps=5", "-S", "diffusion.schedule=cosine", "-S", "diffusion.T=100"]


def test_set_values_are_yaml():
    assert parse_set(["train.steps=200", "model.channel_mults=[1, 2]", "data.root=null"]) == {
        "train.steps": 200, "model.channel_mults": [1, 2], "data.root": None}
    with pytest.raises(ParamsError, match="not key=value"):
        parse_set(["train.steps"])


def test_grid_is_the_cross_product_without_repeats():
    grid = make_grid(combine_axes(["linear", "cosine", "linear"], [100, 1000], None, None), {"train.steps": 5})
    assert [tuple(dict(p.axes).values()) for p in grid] == [
        ("linear", 100), ("linear", 1000), ("cosine", 100), ("cosine", 1000)]
    assert grid[0].exp_name("s1") == "s1-linear-t100" and grid[0].label == "linear, T = 100"
    assert grid[0].settings() == {"train.steps": 5, "diffusion.schedule": "linear", "diffusion.T": 100}
    with pytest.raises(ParamsError, match="diffusion.T is a sweep axis"):
        make_grid(combine_axes(["linear"], [100], None, None), {"diffusion.T": 5})


def test_a_grid_crosses_any_keys():
    grid_arg = parse_grid(["train.loss=simple,hybrid", "model.channel_mults=[1,2],[1,2,2]"])
    assert grid_arg == {"train.loss": ["simple", "hybrid"], "model.channel_mults": [[1, 2], [1, 2, 2]]}
    axes = combine_axes(None, [100], grid_arg, [0, 1])
    assert list(axes) == ["diffusion.T", "train.seed", "train.loss", "model.channel_mults"]
    grid = make_grid(axes, {})
    assert len(grid) == 8 and grid[-1].exp_name("g") == "g-t100-seed1-losshybrid-channel_mults_1_2_2_"
    assert grid[-1].label == "T = 100, seed = 1, loss = hybrid, channel_mults = [1, 2, 2]"
    assert len({p.exp_name("g") for p in grid}) == 8
    with pytest.raises(ParamsError, match="given twice"):
        combine_axes(None, [100], {"diffusion.T": [5]}, None)
    with pytest.raises(ParamsError, match="not key=value1,value2"):
        parse_grid(["train.loss"])
    with pytest.raises(ParamsError, match="same experiment name"):
        make_grid({"data.root": ["a/b", "a_b"]}, {})


def test_a_grid_over_samplers_passes_the_params_rules_and_dvc_set_grammar():
    """--grid sample.sampler=ddim,dpm_solver++: both points validate, and DVC's override parser (Hydra's) reads
    the value back as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    grid = make_grid(combine_axes(None, None, parse_grid(["sample.sampler=ddim,dpm_solver++"]), None), {})
    assert [dict(p.axes)["sample.sampler"] for p in grid] == ["ddim", "dpm_solver++"]
    assert all(point_params_error(ROOT, p) is None for p in grid)
    parsed = OverridesParser.create().parse_overrides(grid[1].set_args()[1::2])
    assert [(o.key_or_group, o.value()) for o in parsed] == [("sample.sampler", "dpm_solver++")]
    bad = Point((("sample.sampler", "dpm_solver++"), ("sample.order", 3)), (("sample.eta", 0.5),))
    assert "sample.eta = 0.5 is not allowed with sample.order = 3" in point_params_error(ROOT, bad)


def test_points_are_validated_with_the_pipeline_rules():
    assert point_params_error(ROOT, pt("cosine", 100)) is None
    reason = point_params_error(ROOT, pt("linear", 10))
    assert "diffusion.T = 10" in reason and "T >= 21" in reason
    assert "unknown key train.stepz" in point_params_error(ROOT, pt("linear", 100, (("train.stepz", 1),)))
    assert "train.lr = -1" in point_params_error(ROOT, pt("linear", 100, (("train.lr", -1),)))
    assert "sample.clamp_steps" in point_params_error(ROOT, pt("cosine", 10))  # 10 evaluations > T - 1
    assert point_params_error(ROOT, pt("cosine", 10, (("sample.clamp_steps", True),))) is None


def test_the_sweep_command_refuses_a_bad_override_in_one_line(tmp_path):
    """--set values are checked by params.yaml's model before anything runs (a subprocess: importing Prefect
    under capsys would bind its log handlers to a stream pytest closes)."""
    out = subprocess.run([sys.executable, "-m", "flows.sweep", "--name", "x", "--schedules", "linear", "--T", "100",
                          "--set", "train.lr=.inf"], cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: sweep: train.lr = inf is not allowed: must be a finite number > 0"]


def test_a_flow_leaves_the_tracking_uri_as_it_found_it(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ: a served process's next flow, for
    another project, logged into the first project's store (found when a study ran again in a clone)."""
    import mlflow

    from flows.sweep import project_root_env
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for project in (tmp_path / "a", tmp_path / "b"):
        with project_root_env(project):
            mlflow.set_tracking_uri(tracking.tracking_uri())  # as tracking.start_parent_run does
            assert tracking.tracking_uri() == f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
        assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a user's server stays theirs
    with project_root_env(tmp_path / "a"):
        mlflow.set_tracking_uri("sqlite:///elsewhere.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_expected_stage_errors_are_not_retried_and_crashes_are():
    e = failure_reason("Running stage 'train':\nerror: train: loss is nan at step 3\nERROR: failed to reproduce", 255)
    assert isinstance(e, PointError) and not e.transient and str(e) == "error: train: loss is nan at step 3"
    e = failure_reason("Running stage 'train':\nepoch 1\n", -9)
    assert e.transient and "killed by signal 9" in str(e)


def test_a_point_cancelled_on_its_worker_is_not_retried_and_a_crashed_one_is():
    from prefect.states import Cancelled, Crashed, Failed

    from flows.sweep import NO_RETRY, worker_point_error

    cancelled = worker_point_error("red-fox", Cancelled(message="sweep s interrupted by SIGINT"))
    assert not cancelled.transient and str(cancelled) == "flow run red-fox Cancelled: sweep s interrupted by SIGINT"
    assert not worker_point_error("red-fox", Failed(message=f"{NO_RETRY} error: train: loss is nan")).transient
    assert worker_point_error("red-fox", Crashed(message="Flow run infrastructure exited with status 1")).transient
    assert worker_point_error("red-fox", Failed()).transient


def result(schedule, T, bpd, fid, status="ok", seed=None, shift=0.0):
    """A point whose 40 per-image bounds are bpd + noise (common to all points: paired) and whose samples'
    features are the reference's shifted by `shift`."""
    rng = np.random.default_rng(0)
    axes = {"diffusion.schedule": schedule, "diffusion.T": T, **({"train.seed": seed} if seed is not None else {})}
    if status != "ok":
        return PointResult(axes, status, f"s-{schedule}-t{T}", seconds=10.0, reason="error: check: bad")
    common = rng.normal(0, 0.5, 40)
    own = np.random.default_rng([T, ord(schedule[0]), seed or 0])
    per_image = {i: bpd + c + 0.01 * own.normal() for i, c in enumerate(common)}
    ref = np.random.default_rng(1).normal(size=(300, 4))
    gen = np.random.default_rng(2 + int(shift * 10)).normal(size=(300, 4)) + np.array([shift, 0, 0, 0])
    values = np.array(list(per_image.values()))
    metrics = {"bpd": values.mean(), "bpd_ci_low": values.mean() - 0.15, "bpd_ci_high": values.mean() + 0.15,
               "prior_bpd": 1e-5, "decoder_bpd": 1.0, "fid_proxy": fid, "fid_proxy_ci_low": fid - 1,
               "fid_proxy_ci_high": fid + 1, "fid_proxy_floor": 2.0, "sample_seconds": 3.0, "n_fid": 300}
    return PointResult(axes, status, f"s-{schedule}-t{T}", metrics, 10.0, bpd_per_image=per_image,
                       fid_features={"gen": gen, "test": ref, "train": ref})


def test_summary_table_differences_verdicts_and_plot(tmp_path):
    results = [result("linear", 100, 3.6, 14.0), result("linear", 1000, 3.1, 10.0, shift=0.8),
               result("cosine", 100, 3.6, 12.0), result("cosine", 1000, 0, 0, status="failed")]
    out = summary.write_all(tmp_path, "s", results, "3 of 4 points succeeded")
    files = out["files"]
    rows = list(csv.DictReader(files["csv"].open()))
    assert [(r["schedule"], r["T"], r["status"], r["reference"]) for r in rows] == [
        ("linear", "100", "ok", "True"), ("linear", "1000", "ok", "False"), ("cosine", "100", "ok", "False"),
        ("cosine", "1000", "failed", "False")]
    assert rows[1]["reason"] == "" and rows[3]["reason"] == "error: check: bad" and rows[3]["bpd"] == ""
    for column in analysis.DIFF_COLUMNS:  # the reference and the failed point have no differences
        assert rows[0][column] == "" and rows[3][column] == ""
    # paired: the common per-image noise cancels, so the 0.5 bits/dim gap is resolved far below its sd
    assert float(rows[1]["bpd_diff"]) == pytest.approx(-0.5, abs=0.01)
    assert float(rows[1]["bpd_diff_ci_high"]) < 0 and float(rows[1]["bpd_diff_ci_high"]) - float(rows[1]["bpd_diff_ci_low"]) < 0.02
    assert float(rows[2]["bpd_diff_ci_low"]) < 0 < float(rows[2]["bpd_diff_ci_high"])
    assert float(rows[1]["fid_proxy_diff_ci_low"]) > 0
    md = files["md"].read_text()
    assert "3 of 4 points succeeded" in md and "Reference point: **linear, T = 100**" in md
    assert re.search(r"- linear, T = 1000 has 0\.50\d bits/dim less than linear, T = 100 \(95% CI 0\.49\d to 0\.5", md)
    assert "paired over 40 test images" in md
    assert "- No difference in bits/dim detected between cosine, T = 100 and linear, T = 100 at this budget" in md
    assert "- linear, T = 1000 has a FID-proxy" in md and "higher than linear, T = 100" in md
    assert files["plot"].read_bytes()[:8] == PNG and "seeds" not in files


def test_bits_per_dim_are_said_once_per_model_not_once_per_sampling_point(tmp_path):
    from dataclasses import replace

    # two models, each sampled at 10 and 100 steps: the bound is the model's, the FID-proxy each point's
    results = [replace(result(schedule, 100, bpd, fid, shift=shift), axes={
        "diffusion.schedule": schedule, "diffusion.T": 100, "sample.steps": steps})
        for schedule, bpd in (("linear", 3.6), ("cosine", 3.1))
        for steps, fid, shift in ((10, 20.0, 1.0), (100, 12.0, 0.0))]
    results[2] = replace(results[2], bpd_per_image=results[3].bpd_per_image)  # one model: one bound
    md = summary.write_all(tmp_path, "s", results, "4 of 4")["files"]["md"].read_text()
    bpd = [line for line in md.splitlines() if "bits/dim" in line and line.startswith("- ")]
    assert len(bpd) == 1 and bpd[0].startswith("- cosine, T = 100 has 0.5") and "than linear, T = 100 (95% CI" in bpd[0]
    fid = [line for line in md.splitlines() if "FID-proxy" in line and line.startswith("- ")]
    assert len(fid) == 3 and all("steps = " in line for line in fid)  # the reference is linear at 10 steps
    assert any(line.startswith("- linear, T = 100, steps = 100 has a FID-proxy") for line in fid), fid


def test_seeds_are_summarized_across_runs_and_the_reference_can_be_named(tmp_path):
    results = [result("linear", 100, 3.6 + 0.1 * s, 14.0 + s, seed=s) for s in (0, 1, 2)]
    results += [result("cosine", 100, 3.2 + 0.1 * s, 12.0, seed=s) for s in (0, 1, 2)]
    out = summary.write_all(tmp_path, "s", results, "6 of 6", reference={"diffusion.schedule": "cosine", "train.seed": 1})
    assert out["reference"] == 4
    seeds = list(csv.DictReader(out["files"]["seeds"].open()))
    assert [(r["schedule"], r["seeds"]) for r in seeds] == [("linear", "3"), ("cosine", "3")]
    assert float(seeds[0]["bpd_sd_across_seeds"]) == pytest.approx(0.1, abs=0.01)
    assert float(seeds[0]["fid_proxy_sd_across_seeds"]) == pytest.approx(1.0)
    assert "## Across training seeds" in out["files"]["md"].read_text()
    with pytest.raises(ParamsError, match="matches 3 points"):
        analysis.reference_index(results, {"diffusion.schedule": "cosine"})


# --- slow: whole sweeps on a tiny digits project -----------------------------------------------------------
@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sweep-project"))


def mlflow_client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def sweep_runs(client, sweep_name):
    exp = client.get_experiment_by_name("ddpm")
    parents = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep_name}'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def exp_refs(folder):
    refs = run("git for-each-ref --format='%(refname)' refs/exps", folder).stdout.split()
    return {r.rsplit("/", 1)[1]: r for r in refs}


def exp_names(folder):
    return set(exp_refs(folder))


def flow_run_log(flow_run_id) -> list[str]:
    """The messages of a flow run's log, as the Prefect UI shows them.

    Prefect sends log records to its API from a background worker in batches, so a flow that has just
    returned may still have its last lines queued (CI once read 2 of the 4 progress lines): send them
    first, as the UI would show them a moment later."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as pc:
        logs = pc.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [entry.message for entry in sorted(logs, key=lambda entry: entry.timestamp)]


@pytest.mark.slow
def test_two_by_two_sweep(harness, project, monkeypatch):
    from prefect.client.orchestration import get_client
    from flows.sweep import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = sweep("grid", ["linear", "cosine"], [50, 100], {"train.steps": 20}, concurrency=2,
                  project=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "4 of 4 points succeeded"
    out = summary.sweep_dir(project, "grid")
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" and float(r["bpd"]) > 0 for r in rows)
    # every point with its intervals; differences against the first point of the grid, empty for it
    for r in rows:
        assert float(r["bpd_ci_low"]) < float(r["bpd"]) < float(r["bpd_ci_high"])
        assert float(r["fid_proxy_ci_low"]) < float(r["fid_proxy"]) < float(r["fid_proxy_ci_high"])
    assert [r["reference"] for r in rows] == ["True", "False", "False", "False"]
    assert all(rows[0][c] == "" for c in analysis.DIFF_COLUMNS)
    for r in rows[1:]:
        assert float(r["bpd_diff_ci_low"]) <= float(r["bpd_diff"]) <= float(r["bpd_diff_ci_high"])
        assert float(r["bpd_diff"]) == pytest.approx(float(r["bpd"]) - float(rows[0]["bpd"]), abs=1e-6)
        assert r["fid_proxy_diff"] != ""
    assert "Reference point: **linear, T = 50**" in (out / "summary.md").read_text()
    assert {(r["schedule"], r["T"]) for r in rows} == {("linear", "50"), ("linear", "100"), ("cosine", "50"),
                                                       ("cosine", "100")}
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    assert exp_names(project) >= {"grid-linear-t50", "grid-linear-t100", "grid-cosine-t50", "grid-cosine-t100"}
    # every point is a DVC experiment with its own params, listed by DVC
    listed = run("dvc exp list --name-only", project).stdout.split()
    assert {"grid-linear-t50", "grid-cosine-t100"} <= set(listed)
    ref = exp_refs(project)["grid-cosine-t100"]
    exp_params = yaml.safe_load(run(f"git show {ref}:params.yaml", project).stdout)
    assert exp_params["diffusion"]["schedule"] == "cosine" and exp_params["diffusion"]["T"] == 100
    assert exp_params["train"]["threads"] == 1 and exp_params["train"]["steps"] == 20
    # one MLflow parent with four children, each with its point's params
    client = mlflow_client(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    parent, children = sweep_runs(client, "grid")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert {(c.data.params["diffusion.schedule"], c.data.params["diffusion.T"]) for c in children} == {
        ("linear", "50"), ("linear", "100"), ("cosine", "50"), ("cosine", "100")}
    assert {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    diffs = {c.info.run_id: c.data.metrics.get("bpd_diff") for c in children}
    assert sum(v is None for v in diffs.values()) == 1  # the reference's run has none
    # the registry's aliases point at the versions of the points with the lowest bits/dim and FID-proxy
    for alias, key in (("best-bpd", "bpd"), ("best-fid", "fid_proxy")):
        best = min(rows, key=lambda r: float(r[key]))["mlflow_run_id"]
        assert client.get_model_version_by_alias("ddpm-digits", alias).run_id == best, alias
    assert {"summary.csv", "summary.md", "sweep.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the table and the plot are Prefect artifacts
    with get_client(sync_client=True) as pc:
        keys = {a.key for a in pc.read_artifacts()}
    assert {"sweep-grid-table", "sweep-grid-summary"} <= keys

    # the same sweep again: every point is reused, nothing recomputed, no new MLflow child
    again = sweep("grid", ["linear", "cosine"], [50, 100], {"train.steps": 20}, concurrency=2,
                  project=str(project), return_state=True)
    assert again.is_completed()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert all(r["cached"] == "True" for r in rows)
    assert len(client.search_runs([parent.info.experiment_id], "tags.mlflow.parentRunId != ''")) == 4
    # the progress line as each point ends, in each flow run's log
    for ran, last in ((state, "4 of 4 points done (4 computed, 0 reused, 0 failed)"),
                      (again, "4 of 4 points done (0 computed, 4 reused, 0 failed)")):
        lines = [m for m in flow_run_log(ran.state_details.flow_run_id) if m.startswith("sweep grid: ")]
        done = [m for m in lines if " points done " in m]
        assert [m.split(" of ")[0] for m in done] == [f"sweep grid: {k}" for k in (1, 2, 3, 4)], lines
        assert done[-1].startswith(f"sweep grid: {last} in "), done


@pytest.mark.slow
def test_failing_points_leave_the_others_intact(harness, project, monkeypatch):
    from flows.sweep import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = sweep("bad", ["linear"], [10, 50], {"train.steps": 20}, project=str(project), return_state=True)
    assert state.is_failed() and state.message.startswith("1 of 2 points succeeded")
    rows = {r["T"]: r for r in csv.DictReader((summary.sweep_dir(project, "bad") / "summary.csv").open())}
    assert rows["50"]["status"] == "ok" and float(rows["50"]["bpd"]) > 0
    assert rows["10"]["status"] == "failed" and "diffusion.T = 10" in rows["10"]["reason"]
    assert "bad-linear-t50" in exp_names(project)


# a sweep command with one point running on a work pool (its flow run id in argv[1]), waiting to be interrupted
ON_WORKER = """import sys, time
from flows import interrupt
with interrupt.enabled(), interrupt.handling("sweep demo"), interrupt.on_worker("sweep demo", sys.argv[1]):
    print("running", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_stopping_a_sweep_cancels_its_points_on_the_work_pool(harness):
    """Ctrl-C (or Cancel in the UI) of a `--deployment` sweep: the points' flow runs, which run in workers'
    processes, go Cancelling (their workers then stop them); a flow run of another sweep is left alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Running

    @flow(name="ddpm-sweep-point")
    def point():
        pass

    with get_client(sync_client=True) as client:
        mine, other = (client.create_flow_run(point, state=Running()).id for _ in range(2))
        env = tool_env({"PREFECT_API_URL": PREFECT_API_URL.value()})
        sweep = subprocess.Popen([sys.executable, "-c", ON_WORKER, str(mine)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert sweep.stdout.readline() == "running\n", sweep.communicate()
        sweep.send_signal(signal.SIGINT)
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == 130, err
        assert "and cancelling 1 point flow run(s) on the work pool" in err
        cancelled = client.read_flow_run(mine).state
        assert cancelled.is_cancelling() and cancelled.message == "sweep demo interrupted by SIGINT"
        assert client.read_flow_run(other).state.is_running()


@pytest.mark.slow
def test_a_stage_failure_is_reported_once_with_its_reason(project, tmp_path):
    """A point that passes validation but fails in a stage: not retried, its output kept in the log."""
    point = pt("linear", 50, (("data.dataset", "mnist"), ("data.root", str(tmp_path / "nowhere"))))
    log = tmp_path / "point.log"
    with pytest.raises(PointError) as err:
        execute(project, point, "nodata", log, tool_env())
    assert not err.value.transient and str(err.value).startswith("error: prepare:")
    assert str(err.value) in log.read_text() and log.read_text().count("$ dvc") == 1


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")], env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, seconds=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_points_run_on_two_workers(harness, tmp_path, mlflow_server, monkeypatch):
    """A process work pool with two workers, each in its own clone; a bare Git remote and a DVC remote folder."""
    from prefect.settings import PREFECT_API_URL
    from flows.deploy import deploy_workers
    from flows.sweep import sweep

    project = make_project(tmp_path / "coordinator")
    remote = tmp_path / "remote.git"
    run(f"git init -q --bare -b main {remote}", tmp_path)
    run(f"dvc remote add -d shared {tmp_path / 'dvc-remote'} && git add -A && git commit -qm 'shared remotes' && "
        f"git remote add origin {remote} && git push -q origin main", project)
    checkouts = [tmp_path / "worker1", tmp_path / "worker2"]
    for c in checkouts:
        run(f"git clone -q {remote} {c}", tmp_path)
    deployment = deploy_workers("ddpm-test", f"file://{remote}", "main")
    env = tool_env({"PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": mlflow_server,
                    "PREFECT_WORKER_QUERY_SECONDS": "2"})
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ddpm-test",
                                 "--limit", "1"], env={**env, "DDPM_CHECKOUT": str(c)}, cwd=tmp_path,
                                stdout=open(tmp_path / f"w{i}.log", "w"), stderr=subprocess.STDOUT)
               for i, c in enumerate(checkouts)]
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        state = sweep("pool", ["linear", "cosine"], [50], {"train.steps": 20}, concurrency=2,
                      deployment=deployment, project=str(project), return_state=True)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:  # a worker's graceful shutdown can take a minute on a loaded 2-core machine
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(30)
    logs = "\n".join((tmp_path / f"w{i}.log").read_text()[-3000:] for i in range(2))
    assert state.is_completed(), f"{state.message}\n{logs}"
    ran = {c.name for c in checkouts for _ in (c / "reports" / "sweeps" / "pool" / "logs").glob("*.log")}
    assert ran == {"worker1", "worker2"}, logs
    # the experiments came back through the remotes, with their cached outputs
    assert {"pool-linear-t50", "pool-cosine-t50"} <= exp_names(project)
    rows = list(csv.DictReader((summary.sweep_dir(project, "pool") / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    parent, children = sweep_runs(mlflow_client(mlflow_server), "pool")
    assert len(children) == 2 and {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    assert not (project / "mlflow").exists()  # everything went to the server


# --- fast: what the served deployments need ------------------------------------------------------------------
def test_served_flows_validate_their_parameters_in_a_fresh_process(tmp_path):
    """A served deployment's runner sends the flow to a fresh process with cloudpickle, which pickles the flow's
    function by value with only the globals its code names: string annotations (`from __future__ import
    annotations`) then name types that process does not have, and every run fails validation before it starts."""
    pickled = tmp_path / "flows.pkl"
    dump = ("import cloudpickle, sys; from flows.sweep import sweep; from flows.study import study; "
            f"open({str(pickled)!r}, 'wb').write(cloudpickle.dumps([sweep, study]))")
    load = ("import json, pickle, sys; sweep, study = pickle.load(open(sys.argv[1], 'rb')); "
            "s = sweep.validate_parameters(json.loads(sys.argv[2])); t = study.validate_parameters({'path': 'x.yaml'}); "
            "print(s['schedules'], s['T'], s['overrides'].flat(), t['path'])")
    subprocess.run([sys.executable, "-c", dump], cwd=ROOT, env=tool_env(), check=True)
    form = {"name": "ui", "schedules": ["linear"], "T": [50], "overrides": {"train": {"steps": 10, "lr": None}}}
    out = subprocess.run([sys.executable, "-c", load, str(pickled), json.dumps(form)], cwd=ROOT,
                         env=tool_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "['linear'] [50] {'train.steps': 10} x.yaml"


@pytest.mark.parametrize("args, line", [
    (["serve", "--parameters", '{"name": "two words"}'],
     "error: deploy: --parameters: sweep name 'two words' is not allowed: letters, digits, '_', '.', '-' (at most 64)"),
    (["serve", "--parameters", '{"T": [10], "schedules": ["linear"]}'],
     "error: deploy: --parameters: the point linear, T = 10 cannot run: diffusion.T = 10 does not work with"),
    (["serve", "--parameters", '{"overrides": {"train": {"steps": 0}}}'],
     "error: deploy: --parameters: Flow run received invalid parameters: - overrides.train.steps: Input should be "
     "greater than or equal to 1"),
    (["serve", "--parameters", "[1]"], "error: deploy: --parameters must be a JSON object"),
    (["serve"], "error: deploy: PREFECT_API_URL is not set, so there is no Prefect server to serve into: start one "
                "with `bash scripts/prefect-server.sh`"),
    (["workers", "--source", "x"], "error: deploy: PREFECT_API_URL is not set"),
])
def test_deploy_says_what_to_do_next_in_one_line(args, line):
    env = tool_env()
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "flows.deploy", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(line), out.stderr


def test_deploy_names_an_unreachable_server():
    port = free_port()  # nothing listens there
    env = {**tool_env(), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    out = subprocess.run([sys.executable, "-m", "flows.deploy", "serve"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: deploy: no Prefect server answers at http://127.0.0.1:{port}/api ([Errno 111] Connection refused): "
        "start one with `bash scripts/prefect-server.sh` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"]


# --- points side by side: each runs once, on its own devices --------------------------------------------
def point_log_span(log: Path) -> tuple[float, float]:
    """(start, end) of a point's `dvc exp run`: the time stamp of its command line, and the log's last write."""
    stamp = re.search(r"# (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log.read_text()).group(1)
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")), log.stat().st_mtime


def test_devices_are_checked_before_anything_runs(monkeypatch, capsys):
    from flows import study, sweep

    monkeypatch.chdir(ROOT)
    for args, message in ((["--devices", "0,0"], "give distinct GPU numbers"),
                          (["--devices", "0,x"], "is not a list of GPU numbers"),
                          (["--devices", "0,1", "--concurrency", "2"], "give devices or concurrency, not both"),
                          (["--devices", "0", "--deployment", "d/w"], "workers of a pool own their GPUs")):
        assert sweep.main(["--name", "x", "--T", "100", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: sweep: ") and message in err and err.count("\n") == 1, err
    assert study.main(["flows/studies/schedule-T-objective.yaml", "--devices", "1,1"]) == 2
    assert "give distinct GPU numbers" in capsys.readouterr().err


TINY_POINT = {"train.steps": 2, "sample.n": 20, "sample.batch_size": 20, "evaluate.n_fid": 20,
              "evaluate.bpd_passes": 160, "mlflow.register_model": False}


@pytest.mark.slow
def test_points_side_by_side_run_once_each_on_its_own_device(harness, project, monkeypatch):
    """`--devices 0,1,2` on a CPU machine: three points at once, each with its own CUDA_VISIBLE_DEVICES, recorded
    in MLflow; a fourth takes over a freed device. Before flows/exp_one.py, `dvc exp run --temp` processes in one
    checkout popped each other's queue entries (a point run twice, or under another point's environment): here
    more run at once than the machine has cores, each under its own environment."""
    from flows.sweep import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name, seeds = "many", [30, 31, 32, 33]
    state = sweep(name, ["linear"], [50], TINY_POINT, grid={"train.seed": seeds}, devices=[0, 1, 2],
                  project=str(project), return_state=True)
    assert state.is_completed(), state.message
    client = mlflow_client(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    parent, children = sweep_runs(client, name)
    expected = {f"{name}-linear-t50-seed{s}" for s in seeds}
    assert len(children) == 4 and {c.data.tags["dvc_experiment"] for c in children} == expected
    assert parent.data.params["sweep.devices"] == "[0, 1, 2]"
    devices = [c.data.tags["cuda_visible_devices"] for c in children]
    assert set(devices) == {"0", "1", "2"}, devices
    logs = {p.stem: p for p in (summary.sweep_dir(project, name) / "logs").glob(f"{name}-*.log")}
    assert set(logs) == expected
    for exp, log in logs.items():  # each point ran its own stages, once, in its own process
        text = log.read_text()
        assert text.count("Running stage 'train'") == 1 and text.count("Running stage 'evaluate'") == 1, exp
    spans = [point_log_span(log) for log in logs.values()]
    third = sorted(s for s, _ in spans)[2]
    assert sum(s <= third < e for s, e in spans) == 3, spans  # three ran at the same time
