#!/usr/bin/env bash
# Create .venv with the pinned requirements and install this project in it (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required, found {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pinned requirements into .venv (torch is large; this takes a few minutes)" >&2
    .venv/bin/python -m pip install --progress-bar off -q -r requirements.txt
    .venv/bin/python -m pip install --progress-bar off -q --no-deps -e .
    echo "$want" > "$stamp"
fi
