#!/usr/bin/env bash
# Set up from nothing: a local virtual environment (.venv) with mambazoo and its test tools.
# With --data, also the bundled real dataset: Fashion-MNIST from Debian's dataset-fashion-mnist package.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--data" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" = "0" ] || SUDO=$(command -v sudo || true)
  if command -v apt-get >/dev/null && { [ "$(id -u)" = "0" ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: WARNING: could not install dataset-fashion-mnist" >&2
  else
    echo "setup: WARNING: Fashion-MNIST needs Debian's apt (as root): apt-get install dataset-fashion-mnist" >&2
  fi
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml; pip takes them from the local wheel index.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "setup: $(.venv/bin/python -c 'import torch, timm, mambazoo; print(f"mambazoo {mambazoo.__version__}, torch {torch.__version__}, timm {timm.__version__}")')"
