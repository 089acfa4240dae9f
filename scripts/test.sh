#!/usr/bin/env bash
# The test command (README, .ci/run): installs the project with its CPU backend, JAX (so the JAX tests run),
# the ONNX export extra and the test tools, checks the code with ruff (lint, then format), then runs the whole
# suite. Chromium (for the report-rendering tests) is installed when apt can; else those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[cpu,jax,onnx,test]"
if ! command -v chromium >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "note: chromium could not be installed; the report-rendering test will be skipped"
fi
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest -q "$@"
