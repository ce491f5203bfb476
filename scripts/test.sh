#!/usr/bin/env bash
# Set up from nothing and run the whole test suite (this is what CI runs, through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser  # chromium: the demo test drives it headless
export HF_HUB_OFFLINE=1  # tests never download anything
exec .venv/bin/python -m pytest -q "$@"
