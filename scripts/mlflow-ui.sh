#!/usr/bin/env bash
# Open the MLflow UI on the project's local store at http://127.0.0.1:5000 (one worker: this is a 2-core box).
# With MLFLOW_TRACKING_URI set to a server, open that server's address instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
mkdir -p mlflow
# MLflow 3.17's UI starts in its GenAI view (traces, token usage) until its switch says "Model training";
# this address opens the training runs (the switch is then one click, and the browser remembers it).
echo "MLflow UI: http://127.0.0.1:${PORT:-5000}/#/experiments?workflowType=machine_learning"
exec .venv/bin/mlflow ui --backend-store-uri "sqlite:///$PWD/mlflow/mlflow.db" \
    --default-artifact-root "file://$PWD/mlflow/artifacts" --host 127.0.0.1 --port "${PORT:-5000}" --workers 1
