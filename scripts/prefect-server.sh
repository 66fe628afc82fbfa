#!/usr/bin/env bash
# Start a local Prefect server (UI and API) at http://127.0.0.1:4200, telemetry off. Its database lives in
# ~/.prefect (PREFECT_HOME). In another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
PORT=${PORT:-4200}
export PREFECT_UI_API_URL=${PREFECT_UI_API_URL:-http://127.0.0.1:$PORT/api}   # the UI calls the API on this port
exec .venv/bin/prefect server start --host 127.0.0.1 --port "$PORT"
