"""MLflow runs for a study's points reused from their records (flows/records.py).

A recorded point was computed in another checkout, whose MLflow store went with it; without a run here, the
study's parent run in this store would show only the points computed here, and the MLflow UI could not compare
the study. Each reused point gets one child run under the study's parent, once per parent: the point's params
(params.yaml with its settings), its recorded metrics and wall time (`point_seconds`: the run's own duration is
that of making it), its record.json and metrics.json as artifacts, and tags naming where it was computed (commit,
DVC experiment, the original run id). The summary's paired differences are
then logged to it like to any other point's run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import time

from .points import PointResult
from pipeline import tracking
from pipeline.params import load_params

RECORD_TAG = "record_of"  # the point's experiment name, on a run made from its record
SECONDS_METRIC = "point_seconds"  # the point's wall time where it was computed (its record's `seconds`)


def log_recorded(root: Path, parent: str, name: str, results: list[PointResult]) -> list[PointResult]:
    """`results` with each point read from a record given its run under `parent` (made now if the parent has
    none for it yet)."""
    import mlflow
    from mlflow.entities import Metric, Param

    todo = [i for i, r in enumerate(results) if r.record and not r.mlflow_run_id]
    if not todo:
        return results
    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`{tracking.PARENT}` = '{parent}'", max_results=10_000)
    made = {run.data.tags[RECORD_TAG]: run.info.run_id for run in children if RECORD_TAG in run.data.tags}
    defaults, out = load_params(root / "params.yaml").flat(), list(results)
    for i in todo:
        r, where = results[i], Path(results[i].record)
        if r.exp_name not in made:
            record = json.loads((where / "record.json").read_text())
            run_id = client.create_run(exp_id, run_name=r.exp_name, tags={
                tracking.PARENT: parent, "sweep": name, RECORD_TAG: r.exp_name, "git_commit": record["commit"],
                "dvc_experiment": record["exp_name"], "source_run_id": record.get("mlflow_run_id") or "",
                "featurizer_md5": record.get("featurizer") or "", "record": str(where)}).info.run_id
            now = int(time.time() * 1000)
            params = {**defaults, **record["settings"]}
            metrics = [Metric(k, float(v), now, 0) for k, v in record["metrics"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if record.get("seconds") is not None:  # this run lasts milliseconds; the point took this long
                metrics.append(Metric(SECONDS_METRIC, float(record["seconds"]), now, 0))
            client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
            for artifact in ("record.json", "metrics.json"):
                client.log_artifact(run_id, str(where / artifact))
            client.set_terminated(run_id, "FINISHED")
            made[r.exp_name] = run_id
        out[i] = dataclasses.replace(r, mlflow_run_id=made[r.exp_name])
    return out
