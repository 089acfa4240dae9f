#!/usr/bin/env bash
# The main job on a fresh machine: install, make the synthetic demo dataset, run the smoke study on a
# local Ray (2 CPU cores are enough), and build its report. Outputs: results/demo/ and reports/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[cpu]"
[ -d demo-data ] || fer-study demo-data demo-data
fer-study run demo-data --space search_spaces/smoke.yaml --name demo --group-regex '^(S\d+)_' "$@"
fer-study report results/demo
