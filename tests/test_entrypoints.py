"""The ways users enter the project, entered as they enter them, on a tiny digits project:

- the Prefect UI: a real server (scripts/prefect-server.sh), the deployments served by the README's command
  (`python -m flows.deploy serve`), runs created with the API call the UI's Run button makes and with the
  parameters its form sends; a sweep, a study, a scheduled sweep, and the Custom run form in a real browser;
- the MLflow UI (scripts/mlflow-ui.sh) in the same browser, showing a sweep's children with their intervals.

The browser is Debian's chromium driven by Playwright; where it is missing the browser tests are skipped with the
reason, unless DDPM_REQUIRE_BROWSER=1 (set by .ci/run), where that is an error.
"""

import contextlib
import csv
from datetime import datetime, timedelta, timezone
import json
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import yaml

from flows.points import tool_env

from project import ROOT, free_port, make_project, mlflow_runs, run, wait_http

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TINY_STUDY = {"name": "tiny", "budget": {"train.steps": 8},  # not the sweep's model: its points would come from the run-cache
              "grids": [{"diffusion.schedule": ["linear"], "sample.steps": [5, 10]}],
              "reference": {"sample.steps": 10}}
SECTIONS = yaml.safe_load((ROOT / "params.yaml").read_text())
# the sweep deployment's defaults here (--parameters): what the Custom run form starts from, one tiny point
FORM_DEFAULTS = {"name": "form", "schedules": ["linear"], "T": [50]}


def form_overrides(**given):
    """`overrides` as the Custom run form sends it: every section, null where left alone; a section that was
    opened sends all its keys, null but the ones filled in."""
    out = {}
    for section, keys in SECTIONS.items():
        filled = given.get(section)
        out[section] = None if filled is None else {k: filled.get(k) for k in keys}
    return out


def as_json_field(value):
    """A dict parameter as the form's JSON editor sends it."""
    return {"__prefect_kind": "json", "value": json.dumps(value)}


# --- processes ---------------------------------------------------------------------------------------------
def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (the served process pauses its schedules on the way out), then the whole group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


class Served:
    """`python -m flows.deploy serve ARGS` in the tiny project, and the ids of the deployments it serves."""

    def __init__(self, project: Path, api: str, log: Path, *args: str):
        self.project, self.api, self.log = project, api, log
        self.proc = start([sys.executable, "-m", "flows.deploy", "serve", *args], project, env(api), log)
        self.ids: dict[str, str] = {}
        end = time.time() + 180
        while len(self.ids) < 2 and time.time() < end:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            if "being served" in log.read_text():
                self.ids = {d["name"]: d["id"] for d in call(api, "POST", "/deployments/filter", {})}
            time.sleep(1)
        assert {"ddpm-sweep", "ddpm-study"} <= set(self.ids), log.read_text()[-3000:]

    def stop(self) -> None:
        stop(self.proc)


def env(api: str | None = None, **more: str) -> dict[str, str]:
    e = tool_env({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2", **more})
    e.pop("MLFLOW_TRACKING_URI", None)  # the tiny project's own store
    if api:
        e["PREFECT_API_URL"] = api
    return e


# --- the Prefect REST API, as the UI calls it -------------------------------------------------------------
BUSY = {429, 502, 503}  # what Prefect's own client retries: a busy server (its SQLite locked under load) says 503


def call(api: str, method: str, path: str, body=None, tries: int = 6):
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(tries):
        req = urllib.request.Request(api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code in BUSY and attempt < tries - 1:
                time.sleep(2 ** attempt)  # as the UI's client backs off; a busy answer changed nothing
                continue
            e.msg = f"{e.msg}: {e.read().decode(errors='replace')[:2000]}"  # the server's reason, in the failure
            raise


def wait_run(api: str, run_id: str, log: Path, seconds: float = 900) -> dict:
    end = time.time() + seconds
    while time.time() < end:
        fr = call(api, "GET", f"/flow_runs/{run_id}")
        if fr["state"]["type"] in TERMINAL:
            return fr
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not end in {seconds} s\n{log.read_text()[-3000:]}")


def artifact_keys(api: str, run_id: str) -> set[str]:
    found = call(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"] for a in found if a.get("key")}


def children_of(project: Path, tag: str, value: str):
    """(parent, children) of the MLflow parent run tagged tag = value in the project's store."""
    client, runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get(tag) == value and not r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1, [r.data.tags.get("mlflow.runName") for r in runs]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], kids


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny digits project with the scripts a user starts servers with and a tiny study, committed."""
    project = make_project(tmp_path_factory.mktemp("entry"))
    shutil.copytree(ROOT / "scripts", project / "scripts")
    (project / "flows" / "studies" / "tiny.yaml").write_text(yaml.safe_dump(TINY_STUDY, sort_keys=False))
    run("git add -A && git commit -qm 'scripts, tiny study'", project)
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)  # scripts/*.sh run .venv/bin/...
    with open(project / ".git" / "info" / "exclude", "a") as f:
        f.write(".venv\n")
    return project


@pytest.fixture(scope="module")
def prefect_api(tiny, tmp_path_factory):
    """A Prefect server started as the README starts it, on a free port; its scheduler looks every 5 s."""
    port, log = free_port(), tmp_path_factory.mktemp("logs") / "prefect-server.log"
    proc = start(["bash", "scripts/prefect-server.sh"], tiny, env(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")), PORT=str(port),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5"), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(tiny, prefect_api, tmp_path_factory):
    s = Served(tiny, prefect_api, tmp_path_factory.mktemp("logs") / "serve.log", "--parameters",
               json.dumps(FORM_DEFAULTS))
    yield s
    s.stop()


def create_run(served: Served, deployment: str, parameters: dict) -> str:
    fr = call(served.api, "POST", f"/deployments/{served.ids[deployment]}/create_flow_run",
              {"parameters": parameters, "state": {"type": "SCHEDULED"}, "enforce_parameter_schema": True})
    return fr["id"]


# --- the Prefect UI: deployments run ----------------------------------------------------------------------
def test_the_deployments_show_typed_forms_and_their_defaults(served):
    """What the Custom run page renders: overrides as a form of params.yaml's sections and keys, each typed with
    its range (not a free JSON box); the study by its grid file."""
    sweep = call(served.api, "GET", f"/deployments/{served.ids['ddpm-sweep']}")
    schema, props = sweep["parameter_openapi_schema"], sweep["parameter_openapi_schema"]["properties"]
    assert {"name", "schedules", "T", "overrides", "concurrency", "deployment", "grid", "seeds", "reference",
            "devices"} <= set(props)
    assert {"type": "array", "items": {"type": "integer"}} in props["devices"]["anyOf"]  # typed GPU numbers
    assert {"$ref": "#/definitions/Overrides"} in props["overrides"]["anyOf"]
    assert set(schema["definitions"]["Overrides"]["properties"]) == set(SECTIONS)
    train = schema["definitions"]["TrainOverrides"]["properties"]
    assert set(train) == set(SECTIONS["train"]) and train["lr"]["description"] == "a number > 0"
    assert {"type": "number", "exclusiveMinimum": 0} in train["lr"]["anyOf"]
    assert {"type": "integer", "minimum": 1} in train["steps"]["anyOf"]
    grid = json.dumps(props["grid"])  # a mapping of keys to lists of params values
    assert '"type": "array"' in grid and '"integer"' in grid and '"string"' in grid
    assert {k: sweep["parameters"][k] for k in FORM_DEFAULTS} == FORM_DEFAULTS  # as --parameters gave them
    assert sweep["enforce_parameter_schema"] is True
    study = call(served.api, "GET", f"/deployments/{served.ids['ddpm-study']}")
    assert study["parameters"]["path"] == "flows/studies/schedule-T-objective.yaml"
    assert {"path", "gpu", "concurrency", "devices"} <= set(study["parameter_openapi_schema"]["properties"])


def test_a_sweep_runs_from_its_deployment_with_the_form_parameters(tiny, served):
    run_id = create_run(served, "ddpm-sweep", {
        "name": "ui", "schedules": ["linear", "cosine"], "T": [50], "concurrency": 1,
        "overrides": form_overrides(train={"steps": 10}), "grid": as_json_field({}), "seeds": None,
        "reference": as_json_field({"diffusion.schedule": "cosine"}), "deployment": None, "project": None})
    fr = wait_run(served.api, run_id, served.log)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]["message"]
    assert fr["state"]["message"] == "2 of 2 points succeeded"
    assert {"sweep-ui-table", "sweep-ui-summary"} <= artifact_keys(served.api, run_id)
    rows = list(csv.DictReader((tiny / "reports" / "sweeps" / "ui" / "summary.csv").open()))
    assert [(r["schedule"], r["status"], r["reference"]) for r in rows] == [
        ("linear", "ok", "False"), ("cosine", "ok", "True")]  # the reference the form named
    parent, kids = children_of(tiny, "sweep", "ui")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    assert {(k.data.params["diffusion.schedule"], k.data.params["train.steps"]) for k in kids} == {
        ("linear", "10"), ("cosine", "10")}
    assert all(k.info.status == "FINISHED" and "bpd_ci_low" in k.data.metrics for k in kids)


def test_a_study_runs_from_its_deployment(tiny, served):
    run_id = create_run(served, "ddpm-study", {"path": "flows/studies/tiny.yaml", "gpu": False, "concurrency": 1,
                                               "project": None})
    fr = wait_run(served.api, run_id, served.log)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]["message"]
    assert fr["state"]["message"] == "2 of 2 points succeeded"
    assert {"sweep-tiny-table", "sweep-tiny-summary"} <= artifact_keys(served.api, run_id)
    out = tiny / "reports" / "studies" / "tiny"
    assert {"summary.csv", "contrasts.csv", "fid_vs_steps.png"} <= {p.name for p in out.iterdir()}
    parent, kids = children_of(tiny, "study", "tiny")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    assert {k.data.params["sample.steps"] for k in kids} == {"5", "10"}


def test_runs_that_cannot_work_are_refused_in_one_line(served):
    """A value out of its range never becomes a run (the server checks the form's schema); a run the flow
    cannot do ends Failed with one line saying why."""
    with pytest.raises(urllib.error.HTTPError) as err:
        create_run(served, "ddpm-sweep", {"name": "x", "T": [50], "overrides": form_overrides(train={"steps": 0})})
    assert err.value.code == 409 and "steps" in err.value.msg
    run_id = create_run(served, "ddpm-sweep", {"name": "two words", "schedules": ["linear"], "T": [50]})
    fr = wait_run(served.api, run_id, served.log, 300)
    assert fr["state"]["type"] == "FAILED"
    message = fr["state"]["message"]
    assert message.startswith("error: sweep: sweep name 'two words' is not allowed") and "\n" not in message
    # Prefect's engine reports every Failed flow run with a traceback of its own FailedRun, whose last line is
    # that one line; nothing of the project's code raised
    log = served.log.read_text()
    assert "flows/sweep.py" not in log and "pipeline/" not in log
    assert all(part.split("prefect.exceptions.FailedRun: ")[1].startswith("error: sweep: ")
               for part in log.split("Traceback (most recent call last):")[1:])


# --- a real browser on the Custom run form ----------------------------------------------------------------
def browser():
    """Playwright's chromium from Debian's package, or a skip with the reason (an error where CI requires it)."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (requirements.txt pins it)"
    if not reason and not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)"
    if reason:
        if os.environ.get("DDPM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DDPM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright()


# Waits for what the test reads, not for "networkidle": the UIs poll their servers, so on a loaded 2-core machine
# the network need not fall quiet for 500 ms within goto's 30 s (CI: Page.goto timed out on the MLflow UI).
UI_WAIT_MS = 120_000


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_the_custom_run_form_starts_a_sweep_in_a_browser(tiny, served, tmp_path):
    ui = served.api.removesuffix("/api")
    with browser() as p:
        b = launch(p)
        page = b.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(UI_WAIT_MS)
        page.goto(f"{ui}/deployments/deployment/{served.ids['ddpm-sweep']}/run", wait_until="load")
        page.get_by_role("button", name="TrainOverrides", exact=True).click()
        steps = page.get_by_text("Steps (Optional)", exact=True).locator(
            "xpath=ancestor::*[.//button[normalize-space()='int']][1]")
        steps.get_by_role("button", name="int", exact=True).click()
        steps.locator("input").first.fill("12")
        with page.expect_response(lambda r: r.url.endswith("/create_flow_run")) as created:
            page.get_by_role("button", name="Submit").click()
        assert created.value.status == 201, created.value.text()
        run_id = created.value.json()["id"]
        fr = wait_run(served.api, run_id, served.log)
        assert fr["state"]["type"] == "COMPLETED", fr["state"]["message"]
        assert fr["parameters"]["overrides"]["train"]["steps"] == 12
        page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="load")
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(tmp_path / "flow-run.png"), full_page=True)
        b.close()
    _, kids = children_of(tiny, "sweep", fr["parameters"]["name"])
    assert {k.data.params["train.steps"] for k in kids} == {"12"}


# --- the MLflow UI ----------------------------------------------------------------------------------------
def test_the_mlflow_ui_lists_a_sweeps_children_with_their_intervals(tiny, served, tmp_path):
    """The experiment's runs table as a user gets there: model-training view, the interval columns added with
    *Columns*, the sweep's parent run expanded to its children."""
    parent, kids = children_of(tiny, "sweep", "ui")  # made by the first sweep of this module
    port, log = free_port(), tmp_path / "mlflow-ui.log"
    proc = start(["bash", "scripts/mlflow-ui.sh"], tiny, env(PORT=str(port)), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        with browser() as p:
            b = launch(p)
            page = b.new_page(viewport={"width": 1600, "height": 700})
            page.set_default_timeout(UI_WAIT_MS)
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}/runs"
                      "?workflowType=machine_learning", wait_until="load")
            page.get_by_text("sweep-ui").first.wait_for(timeout=120_000)
            assistant = page.get_by_role("button", name="Close")
            if assistant.count():
                assistant.first.click()
            # the first *Columns* button: the table's dropdown (the page can show a second, e.g. an "add columns" link)
            page.get_by_role("button", name="Columns").first.click()
            for metric in ("bpd", "bpd_ci_low", "bpd_ci_high"):
                page.get_by_text(metric, exact=True).last.click()
            page.keyboard.press("Escape")
            page.get_by_role("row").filter(has_text="sweep-ui").first.get_by_role("button").first.click()
            names = [k.data.tags["mlflow.runName"] for k in kids]
            for name in names:
                page.get_by_text(name).first.wait_for(timeout=60_000)
            rows = [r.inner_text().split("\n") for r in page.get_by_role("row").all()]
            page.screenshot(path=str(tmp_path / "mlflow-sweep.png"))
            b.close()
    finally:
        stop(proc)
    header = next(r for r in rows if "bpd_ci_low" in r)
    assert {"bpd", "bpd_ci_low", "bpd_ci_high"} <= set(header)
    cells = [c for r in rows for c in r]
    assert all(name in cells for name in names)
    for k in kids:  # every child's bound and its interval, as the table rounds them
        for metric in ("bpd", "bpd_ci_low", "bpd_ci_high"):
            value = k.data.metrics[metric]
            assert any(c.replace(".", "", 1).isdigit() and abs(float(c) - value) < 0.01 for c in cells), (metric, value)


# --- the Prefect UI: Cancel -------------------------------------------------------------------------------
def point_processes(project: Path) -> list[str]:
    """The `dvc exp run` and stage processes working in the project (its temporary copies included)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            line = " ".join(p.info["cmdline"] or [])
            if (p.status() != psutil.STATUS_ZOMBIE and p.cwd().startswith(str(project))
                    and ("exp run" in line or "-m pipeline" in line)):
                found.append(line[:100])
    return found


def test_a_run_cancelled_in_training_stops_its_points_and_runs_again_from_the_checkpoint(tiny, served):
    """The UI's Cancel: the runner SIGTERMs the flow run's process alone (and SIGKILLs it 30 s later), which
    left the point's `dvc exp run` and stage processes running on to the end of the point. Now they stop with
    the flow run, the MLflow runs end KILLED, and running the deployment again continues the training."""
    params = {"name": "cancelled", "schedules": ["linear"], "T": [50], "concurrency": 1,
              "overrides": form_overrides(train={"steps": 300, "checkpoint_every": 20})}
    states = tiny / "build" / "train_state"
    before = set(states.glob("*.pt")) if states.exists() else set()
    run_id = create_run(served, "ddpm-sweep", params)
    end = time.time() + 600
    while not (set(states.glob("*.pt")) - before if states.exists() else None):  # trained 20 steps or more
        assert time.time() < end and call(served.api, "GET", f"/flow_runs/{run_id}")["state"]["type"] not in TERMINAL
        time.sleep(1)
    assert point_processes(tiny)
    call(served.api, "POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}})
    fr = wait_run(served.api, run_id, served.log, 120)
    assert fr["state"]["type"] == "CANCELLED"
    assert not point_processes(tiny)  # stopped by the flow (its line below), not orphaned by the runner's SIGKILL
    assert "sweep cancelled: SIGTERM: stopping 1 running point process(es)" in served.log.read_text()
    parent, kids = children_of(tiny, "sweep", "cancelled")
    assert parent.info.status == "KILLED" and [k.info.status for k in kids] == ["KILLED"]
    assert not list((tiny / ".dvc" / "tmp" / "exps" / "standalone").glob("tmp*"))  # DVC removed its copy

    fr = wait_run(served.api, create_run(served, "ddpm-sweep", params), served.log)
    assert fr["state"]["type"] == "COMPLETED" and fr["state"]["message"] == "1 of 1 points succeeded"
    log = (tiny / "reports" / "sweeps" / "cancelled" / "logs").glob("*.log")
    assert re.search(r"train: resumed from step [1-9]\d*0\b", "".join(f.read_text() for f in log))
    parent, kids = children_of(tiny, "sweep", "cancelled")  # the same runs, continued
    assert parent.info.status == "FINISHED" and [k.info.status for k in kids] == ["FINISHED"]


# --- the Prefect UI: a scheduled sweep --------------------------------------------------------------------
def test_a_scheduled_sweep_is_created_and_completes(tiny, served, tmp_path):
    """Served again as the README says, now with a schedule and default parameters: the scheduler creates a run
    from them and it completes. (The served process above stops first: one process serves a deployment.)"""
    served.stop()
    # steps 11: not a model of an earlier sweep here (a point restored whole from DVC's run-cache makes no run)
    defaults = {"name": "nightly", "schedules": ["linear"], "T": [50], "overrides": {"train": {"steps": 11}}}
    # one scheduled time, two minutes ahead (UTC, Prefect's default): "* * * * *" started a second run a minute
    # later, which reopened the same MLflow parent (same sweep, same commit) and was killed by stop() while running
    at = datetime.now(timezone.utc) + timedelta(minutes=2)
    cron = f"{at.minute} {at.hour} {at.day} {at.month} *"
    again = Served(tiny, served.api, tmp_path / "serve-cron.log", "--cron", cron,
                   "--parameters", json.dumps(defaults))
    try:
        assert ("ddpm-sweep/ddpm-sweep was stored with other default parameters (name, overrides); serving "
                "replaces them" in again.log.read_text())
        deployment = again.ids["ddpm-sweep"]
        end, scheduled = time.time() + 300, []
        while not scheduled and time.time() < end:
            scheduled = call(again.api, "POST", "/flow_runs/filter", {
                "deployments": {"id": {"any_": [deployment]}},
                "flow_runs": {"state": {"type": {"any_": ["RUNNING", "COMPLETED", "FAILED", "CRASHED"]}}}})
            scheduled = [r for r in scheduled if r["auto_scheduled"]]
            time.sleep(2)
        assert scheduled, again.log.read_text()[-3000:]
        fr = wait_run(again.api, scheduled[0]["id"], again.log)
    finally:
        again.stop()
    assert fr["state"]["type"] == "COMPLETED", fr["state"]["message"]
    assert fr["parameters"]["name"] == "nightly" and fr["state"]["message"] == "1 of 1 points succeeded"
    parent, kids = children_of(tiny, "sweep", "nightly")
    assert parent.info.status == "FINISHED" and len(kids) == 1
