#!/usr/bin/env bash
# Fresh machine to results: set up .venv, get Fashion-MNIST (Debian package, offline), run `dvc repro`.
# Extra arguments go to dvc repro (e.g. `scripts/run.sh evaluate`).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/setup.sh
bash scripts/get-data.sh
export PATH="$PWD/.venv/bin:$PATH"   # stage commands run `python` from the venv
exec dvc repro "$@"
