#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), the data and a headless browser, and run the whole test suite, slow tests
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
bash scripts/setup.sh
bash scripts/get-data.sh
bash scripts/get-browser.sh
exec .venv/bin/python -m pytest --durations=30 "$@"
