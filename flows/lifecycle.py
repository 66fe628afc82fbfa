"""What a sweep (or study) does about an earlier one that was killed: its MLflow runs and Prefect flow runs.

A sweep process killed with kill -9 leaves its MLflow parent run and the point's run RUNNING and its Prefect
flow run Running with nothing behind them. The next sweep marks those runs KILLED (their owner process is gone,
pipeline/tracking.mark_orphans), sets the flow runs they name to Crashed, and reports under the same MLflow parent
when it is the same sweep command at the same commit. The killed point's training continues from its scratch
checkpoint in its own run (pipeline/scratch.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import re
from typing import Any

from pipeline import tracking

FLOW_RUN_TAG = "prefect_flow_run_id"


def sweep_parent(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], commit: str) -> str:
    """The sweep's MLflow parent run: the one of an earlier run of this same sweep (same params, same commit),
    reopened, or a new one. Runs and flow runs that killed sweeps left running are ended first."""
    crash_flow_runs(tracking.mark_orphans(experiment))
    key = hashlib.sha256(json.dumps([params, commit], sort_keys=True, default=str).encode()).hexdigest()[:16]
    tags = {**tags, "sweep_key": key, "sweep_commit": commit, FLOW_RUN_TAG: current_flow_run() or ""}
    earlier = tracking.find_run(experiment, {"sweep": tags["sweep"], "sweep_key": key})
    return tracking.start_parent_run(experiment, run_name, params, tags, reuse=earlier)


def current_flow_run() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


KILLED_MESSAGE = "its process was killed; marked Crashed when the sweep ran again"


def crash_flow_runs(runs: list, message: str = KILLED_MESSAGE, announce: bool = True) -> list[str]:
    """Set the Prefect flow runs that orphaned MLflow parent runs name (and their task runs) to Crashed, if they
    are not final yet, saying so in a line each (`announce`). Returns their ids."""
    ids = [r.data.tags[FLOW_RUN_TAG] for r in runs if r.data.tags.get(FLOW_RUN_TAG)]
    if not ids:
        return []
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed

    done = []
    with get_client(sync_client=True) as client:
        for flow_run_id in map(UUID, ids):
            try:
                flow_run = client.read_flow_run(flow_run_id)
            except Exception:  # another Prefect server, or deleted: nothing to end here
                continue
            pending = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            for task_run in pending:
                if task_run.state is not None and not task_run.state.is_final():
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            if flow_run.state is not None and not flow_run.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                if announce:
                    print(f"sweep: flow run {flow_run.name} ({flow_run_id}) of a killed sweep marked Crashed")
                done.append(str(flow_run_id))
    return done


RESUMED = re.compile(r"^train: resumed from step (\d+)$", re.M)


def resumed_step(log: Path) -> int | None:
    """The step the point's training resumed from in its last attempt (its `dvc exp run` log), if it did."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    found = RESUMED.findall(text[text.rfind("\n$ "):])
    return int(found[-1]) if found else None
