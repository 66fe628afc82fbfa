"""Put the sweep in the Prefect UI.

    python -m flows.deploy serve [--cron "0 3 * * *" | --interval 86400]
        Serve the `ddpm-sweep` flow from this checkout as deployment `ddpm-sweep/ddpm-sweep`: it appears in
        the UI with editable parameters; press Run, or add a schedule there (or give one here).
        Runs execute in this process's checkout, so keep it running (Ctrl-C stops it).

    python -m flows.deploy workers --pool ddpm --source GIT_URL [--branch main]
        Create the process work pool (if missing) and deploy `ddpm-sweep-point` from GIT_URL to it as
        `ddpm-sweep-point/worker`. Each worker (`prefect worker start --pool ddpm`, with DDPM_CHECKOUT set to
        its own clone) runs points there and pushes them to the Git and DVC remotes; a sweep started with
        deployment "ddpm-sweep-point/worker" collects them.

Both need a Prefect server: `bash scripts/prefect-server.sh` starts one on 127.0.0.1:4200.
"""

from __future__ import annotations

import argparse
import sys

import flows  # noqa: E402,F401  (telemetry off, server start-up time: before prefect is imported)

DEFAULT_PARAMETERS = {"name": "schedules-vs-T", "schedules": ["linear", "cosine"], "T": [100, 1000],
                      "overrides": {}, "concurrency": 1, "grid": {}}


def serve(cron: str | None, interval: float | None, limit: int | None) -> None:
    from prefect.deployments.runner import EntrypointType

    from flows.sweep import sweep

    sweep.serve(name="ddpm-sweep", cron=cron, interval=interval, parameters=DEFAULT_PARAMETERS, limit=limit,
                description="Cross beta schedules with T; every point is one DVC experiment of this project.",
                tags=["ddpm", "sweep"], entrypoint_type=EntrypointType.MODULE_PATH)


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
    s = sub.add_parser("serve", help="serve the sweep flow from this checkout")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cron", help="e.g. '0 3 * * *' (every day at 03:00)")
    when.add_argument("--interval", type=float, help="seconds between runs")
    s.add_argument("--limit", type=int, default=1, help="sweeps at once in this process (default 1)")
    w = sub.add_parser("workers", help="deploy the point flow to a process work pool")
    w.add_argument("--pool", default="ddpm")
    w.add_argument("--source", required=True, help="Git URL the workers clone the flow code from")
    w.add_argument("--branch", default="main")
    args = ap.parse_args(argv)
    if args.command == "serve":
        serve(args.cron, args.interval, args.limit)
    else:
        deploy_workers(args.pool, args.source, args.branch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
