#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), the data and a headless browser, and run the whole test suite, slow tests
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
bash scripts/setup.sh
bash scripts/get-data.sh
bash scripts/get-browser.sh
# Two workers, a module each (--dist loadfile keeps a module's shared project in one process; in collection order,
# which tests/conftest.py starts with the longest modules): most of the suite
# is one-thread stage processes started by DVC, so a 2-core machine runs two modules side by side.
# DDPM_TEST_WORKERS=0 runs it in this process, one test after another.
exec .venv/bin/python -m pytest -n "${DDPM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=30 "$@"
