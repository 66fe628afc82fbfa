"""Sweep flows: grid and params handling, the summary, and whole sweeps under Prefect's test harness."""

import csv
from pathlib import Path
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from flows import summary
from flows.points import (
    Point, PointError, PointResult, execute, failure_reason, hydra_value, make_grid, parse_set, point_params_error,
    tool_env,
)
from pipeline.params import ParamsError

from project import ROOT, make_project, run

PNG = b"\x89PNG\r\n\x1a\n"


# --- fast: the grid, params and the summary ---------------------------------------------------------------
def test_overrides_are_written_in_dvc_set_grammar():
    assert hydra_value([1, 2, 2]) == "[1,2,2]"
    assert hydra_value(True) == "true" and hydra_value(None) == "null" and hydra_value(0.0002) == "0.0002"
    assert hydra_value("cosine") == "cosine" and hydra_value("a b") == "'a b'"
    assert Point("cosine", 100, (("train.steps", 5),)).set_args() == [
        "-S", "train.steps=5", "-S", "diffusion.schedule=cosine", "-S", "diffusion.T=100"]


def test_set_values_are_yaml():
    assert parse_set(["train.steps=200", "model.channel_mults=[1, 2]", "data.root=null"]) == {
        "train.steps": 200, "model.channel_mults": [1, 2], "data.root": None}
    with pytest.raises(ParamsError, match="not key=value"):
        parse_set(["train.steps"])


def test_grid_is_the_cross_product_without_repeats():
    grid = make_grid(["linear", "cosine", "linear"], [100, 1000], {"train.steps": 5})
    assert [(p.schedule, p.T) for p in grid] == [("linear", 100), ("linear", 1000), ("cosine", 100), ("cosine", 1000)]
    assert grid[0].exp_name("s1") == "s1-linear-t100"
    with pytest.raises(ParamsError, match="diffusion.T is a sweep axis"):
        make_grid(["linear"], [100], {"diffusion.T": 5})


def test_points_are_validated_with_the_pipeline_rules():
    assert point_params_error(ROOT, Point("cosine", 100)) is None
    reason = point_params_error(ROOT, Point("linear", 10))
    assert "diffusion.T = 10" in reason and "T >= 21" in reason
    assert "unknown key train.stepz" in point_params_error(ROOT, Point("linear", 100, (("train.stepz", 1),)))
    assert "train.lr = -1" in point_params_error(ROOT, Point("linear", 100, (("train.lr", -1),)))


def test_expected_stage_errors_are_not_retried_and_crashes_are():
    e = failure_reason("Running stage 'train':\nerror: train: loss is nan at step 3\nERROR: failed to reproduce", 255)
    assert isinstance(e, PointError) and not e.transient and str(e) == "error: train: loss is nan at step 3"
    e = failure_reason("Running stage 'train':\nepoch 1\n", -9)
    assert e.transient and "killed by signal 9" in str(e)


def result(schedule, T, bpd, fid, status="ok"):
    metrics = {"bpd": bpd, "prior_bpd": 1e-5, "decoder_bpd": 1.0, "fid_proxy": fid, "fid_proxy_floor": 2.0,
               "sample_seconds": 3.0} if status == "ok" else {}
    return PointResult(schedule, T, status, f"s-{schedule}-t{T}", metrics, 10.0,
                       reason="" if status == "ok" else "error: check: bad")


def test_summary_table_and_plot(tmp_path):
    results = [result("linear", 1000, 3.1, 10.0), result("cosine", 100, 3.5, 12.0), result("linear", 100, 3.6, 14.0),
               result("cosine", 1000, 0, 0, status="failed")]
    files = summary.write_all(tmp_path, "s", results, "3 of 4 points succeeded")
    rows = list(csv.DictReader(files["csv"].open()))
    assert [(r["schedule"], r["T"], r["status"]) for r in rows] == [
        ("cosine", "100", "ok"), ("cosine", "1000", "failed"), ("linear", "100", "ok"), ("linear", "1000", "ok")]
    assert rows[3]["bpd"] == "3.1" and rows[1]["reason"] == "error: check: bad" and rows[1]["bpd"] == ""
    md = files["md"].read_text()
    assert "| linear | 1000 | ok | 3.1 |" in md and "3 of 4 points succeeded" in md
    assert files["plot"].read_bytes()[:8] == PNG


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


@pytest.mark.slow
def test_a_stage_failure_is_reported_once_with_its_reason(project, tmp_path):
    """A point that passes validation but fails in a stage: not retried, its output kept in the log."""
    point = Point("linear", 50, (("data.dataset", "mnist"), ("data.root", str(tmp_path / "nowhere"))))
    log = tmp_path / "point.log"
    with pytest.raises(PointError) as err:
        execute(project, point, "nodata", log, tool_env())
    assert not err.value.transient and str(err.value).startswith("error: prepare:")
    assert str(err.value) in log.read_text() and log.read_text().count("$ dvc") == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, seconds=120):
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, f"{url}: server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds} s")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")], env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
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


@pytest.mark.slow
def test_serve_puts_the_sweep_in_the_ui_with_editable_parameters_and_a_schedule(harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = tool_env({"PREFECT_API_URL": PREFECT_API_URL.value()})
    proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "serve", "--interval", "3600"], cwd=ROOT,
                            env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        deployment, end = None, time.time() + 120
        with get_client(sync_client=True) as client:
            while deployment is None and time.time() < end:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                found = [d for d in client.read_deployments() if d.name == "ddpm-sweep"]
                deployment = found[0] if found else time.sleep(1)
            assert deployment is not None, (tmp_path / "serve.log").read_text()[-2000:]
            schedules = client.read_deployment_schedules(deployment.id)
    finally:
        proc.terminate()
        proc.wait(60)
    props = deployment.parameter_openapi_schema["properties"]
    assert {"name", "schedules", "T", "overrides", "concurrency", "deployment"} <= set(props)
    assert deployment.parameters["schedules"] == ["linear", "cosine"] and deployment.parameters["T"] == [100, 1000]
    assert [s.schedule.interval.total_seconds() for s in schedules] == [3600]
