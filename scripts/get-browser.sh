#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_entrypoints.py drives the Prefect and MLflow UIs with
# Playwright and this browser): Debian's chromium package, installed when missing. Playwright itself comes
# from requirements.txt; it never downloads a browser of its own here.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "get-browser: installing Debian's chromium for the browser tests" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
else
    echo "get-browser: no apt-get here; install Chromium at /usr/bin/chromium, or the browser tests are skipped" >&2
fi
