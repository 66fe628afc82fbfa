"""Put the sweep and the study in the Prefect UI.

    python -m flows.deploy serve [--cron "0 3 * * *" | --interval 86400] [--parameters JSON] [--keep-parameters]
        Serve from this checkout the deployments `ddpm-sweep/ddpm-sweep` (a grid of params keys) and
        `ddpm-study/ddpm-study` (a study's grid file): both appear in the UI with editable parameters; press
        Run, or add a schedule there (or give the sweep one here, with its default parameters in --parameters).
        Runs execute in this process's checkout, so keep it running (Ctrl-C stops it and pauses its schedules).

    python -m flows.deploy workers --pool ddpm --source GIT_URL [--branch main]
        Create the process work pool (if missing) and deploy `ddpm-sweep-point` from GIT_URL to it as
        `ddpm-sweep-point/worker`. Each worker (`prefect worker start --pool ddpm`, with DDPM_CHECKOUT set to
        its own clone) runs points there and pushes them to the Git and DVC remotes; a sweep started with
        deployment "ddpm-sweep-point/worker" collects them.

Both need a Prefect server: `bash scripts/prefect-server.sh` starts one on 127.0.0.1:4200, and
PREFECT_API_URL=http://127.0.0.1:4200/api tells this command where it is. What goes wrong is one line that says
what to do next: no server, a deployment stored with other parameters, default parameters a run would refuse.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
import sys
from typing import Any
import urllib.error
import urllib.request

import flows  # noqa: E402,F401  (telemetry off, server start-up time: before prefect is imported)

SWEEP_DEFAULTS = {"name": "schedules-vs-T", "schedules": ["linear", "cosine"], "T": [100, 1000],
                  "overrides": {}, "concurrency": 1, "grid": {}}
STUDY_DEFAULTS = {"path": "flows/studies/schedule-T-objective.yaml", "gpu": False, "concurrency": 1}
START_SERVER = ("start one with `bash scripts/prefect-server.sh` and "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")


class DeployError(RuntimeError):
    """One line: what is wrong and what to do next."""


def check_server(timeout: float = 5.0) -> str:
    """The Prefect API URL this command talks to, after its /health answered."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise DeployError(f"PREFECT_API_URL is not set, so there is no Prefect server to serve into: {START_SERVER}")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise DeployError(f"the Prefect server at {url} answered /health with HTTP {r.status}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DeployError(f"no Prefect server answers at {url} ({reason}): {START_SERVER}") from None
    return url


def parse_parameters(text: str | None) -> dict[str, Any]:
    """--parameters: a JSON object, or @FILE holding one."""
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        raise DeployError(f"--parameters {text[:60]!r} is not a JSON object or @FILE with one ({e})") from None
    if not isinstance(value, dict):
        raise DeployError("--parameters must be a JSON object, e.g. '{\"name\": \"nightly\", \"T\": [100]}'")
    return value


def check_defaults(flow, parameters: dict[str, Any]) -> None:
    """Refuse default parameters that runs of the deployment would fail on, before serving them: the types, the
    sweep's name and grid, and every point's params (the same checks a run makes first)."""
    from prefect.exceptions import ParameterTypeError

    from flows.points import combine_axes, make_grid, point_params_error
    from flows.sweep import check_sweep
    from pipeline.params import ParamsError, overrides

    quiet = logging.getLogger("prefect.flows")  # it logs the whole pydantic error before raising it
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        checked = flow.validate_parameters(parameters)
    except ParameterTypeError as e:
        raise DeployError(f"--parameters: {' '.join(str(e).split())}") from None
    finally:
        quiet.level = level
    root = Path(checked.get("project") or ".").resolve()
    try:
        check_sweep(root, checked["name"], checked["concurrency"], checked.get("deployment"))
        points = make_grid(combine_axes(checked.get("schedules"), checked.get("T"), checked.get("grid"),
                                        checked.get("seeds")), overrides(checked.get("overrides") or {}).flat())
    except ParamsError as e:
        raise DeployError(f"--parameters: {e}") from None
    for point in points:
        reason = point_params_error(root, point)
        if reason:
            raise DeployError(f"--parameters: the point {point.label} cannot run: {reason}")


def stored_parameters(name: str) -> dict[str, Any] | None:
    """The default parameters the server holds for deployment `name` ('flow/deployment'), or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return dict(client.read_deployment_by_name(name).parameters)
        except ObjectNotFound:
            return None


def choose_parameters(name: str, given: dict[str, Any], keep: bool) -> dict[str, Any]:
    """What to serve `name` with: `given`, or with --keep-parameters the stored ones; says so in one line when
    the stored ones differ."""
    stored = stored_parameters(name)
    if stored is None or stored == given:
        return given
    if keep:
        print(f"deploy: {name} keeps the default parameters stored on the server ({', '.join(sorted(stored))})")
        return stored
    changed = sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))
    print(f"deploy: {name} was stored with other default parameters ({', '.join(changed)}); serving replaces "
          f"them with this command's; add --keep-parameters to keep the stored ones")
    return given


def sweep_defaults(text: str | None) -> dict[str, Any]:
    """The sweep deployment's default parameters: ours, updated by --parameters, checked as a run checks them."""
    from flows.sweep import sweep

    parameters = {**SWEEP_DEFAULTS, **parse_parameters(text)}
    check_defaults(sweep, parameters)
    return parameters


def serve(cron: str | None, interval: float | None, limit: int | None, parameters: dict[str, Any],
          keep: bool) -> None:
    from prefect import serve as serve_all
    from prefect.deployments.runner import EntrypointType

    from flows.study import study
    from flows.sweep import sweep

    sweep_defaults = choose_parameters("ddpm-sweep/ddpm-sweep", parameters, keep)
    study_defaults = choose_parameters("ddpm-study/ddpm-study", STUDY_DEFAULTS, keep)
    deployments = [
        sweep.to_deployment(
            name="ddpm-sweep", cron=cron, interval=interval, parameters=sweep_defaults,
            description="Cross params keys (schedules, T, any grid key); every point is one DVC experiment of "
                        "this project, compared with a reference point by paired differences.",
            tags=["ddpm", "sweep"], entrypoint_type=EntrypointType.MODULE_PATH),
        study.to_deployment(
            name="ddpm-study", parameters=study_defaults,
            description="Run a study's grid file (flows/studies/) as one sweep, with its contrasts, plots and "
                        "sample sheets under reports/studies/NAME/.",
            tags=["ddpm", "study"], entrypoint_type=EntrypointType.MODULE_PATH),
    ]
    serve_all(*deployments, limit=limit)


def ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created process work pool {pool!r}")


def deploy_workers(pool: str, source: str, branch: str) -> str:
    """Deploy the point flow from the Git remote to the pool; returns the deployment's name."""
    from prefect.runner.storage import GitRepository

    from flows.sweep import sweep_point

    ensure_pool(pool)
    remote = sweep_point.from_source(GitRepository(url=source, branch=branch), "flows/sweep.py:sweep_point")
    remote.deploy(name="worker", work_pool_name=pool, print_next_steps=False,
                  description="One sweep point in the worker's checkout ($DDPM_CHECKOUT)", tags=["ddpm", "sweep"])
    print(f"deployed ddpm-sweep-point/worker to pool {pool!r} from {source} ({branch}); start workers with\n"
          f"  DDPM_CHECKOUT=/path/to/clone prefect worker start --pool {pool} --limit 1")
    return "ddpm-sweep-point/worker"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the sweep and study flows from this checkout")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cron", help="the sweep's schedule, e.g. '0 3 * * *' (every day at 03:00)")
    when.add_argument("--interval", type=float, help="seconds between scheduled sweeps")
    s.add_argument("--limit", type=int, default=1, help="runs at once in this process (default 1)")
    s.add_argument("--parameters", metavar="JSON", help="the sweep's default parameters (what a Quick run and "
                   "scheduled runs use), a JSON object or @FILE, e.g. '{\"name\": \"nightly\", \"T\": [100]}'")
    s.add_argument("--keep-parameters", action="store_true",
                   help="keep the default parameters the server already holds (e.g. edited in the UI)")
    w = sub.add_parser("workers", help="deploy the point flow to a process work pool")
    w.add_argument("--pool", default="ddpm")
    w.add_argument("--source", required=True, help="Git URL the workers clone the flow code from")
    w.add_argument("--branch", default="main")
    args = ap.parse_args(argv)
    try:
        defaults = sweep_defaults(args.parameters) if args.command == "serve" else {}
        check_server()
        if args.command == "serve":
            serve(args.cron, args.interval, args.limit, defaults, args.keep_parameters)
        else:
            deploy_workers(args.pool, args.source, args.branch)
    except DeployError as e:
        print(f"error: deploy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
