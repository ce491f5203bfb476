#!/usr/bin/env bash
# Set up from nothing: a local virtual environment (.venv) with mambazoo and its test tools.
# With --data, also the bundled real dataset: Fashion-MNIST from Debian's dataset-fashion-mnist package.
# With --browser, also Debian's chromium, the headless browser that the demo's test drives through Playwright.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# With --extras LIST, the package's optional dependencies LIST (comma-separated) instead of 'test' (everything the
# suite needs): the main job takes export,examples and skips the test tools (playwright, gradio, wandb, ...),
# about 40 s of a fresh set-up's 200 s on 2 cores.
WANT_DATA=0; WANT_BROWSER=0; EXTRAS=test
while [ $# -gt 0 ]; do
  case "$1" in
    --data) WANT_DATA=1 ;;
    --browser) WANT_BROWSER=1 ;;
    --extras) [ $# -ge 2 ] || { echo "setup: --extras needs a list (e.g. export,examples)" >&2; exit 2; }
              EXTRAS=$2; shift ;;
    *) echo "setup: unknown option $1 (options: --data, --browser, --extras LIST)" >&2; exit 2 ;;
  esac
  shift
done

# apt_install PACKAGE WHAT: install a Debian package as root (or through sudo); only a warning when that is impossible.
apt_install() {
  local SUDO=""
  [ "$(id -u)" = "0" ] || SUDO=$(command -v sudo || true)
  if command -v apt-get >/dev/null && { [ "$(id -u)" = "0" ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing $2 (Debian package $1)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$1" >/dev/null \
      || echo "setup: WARNING: could not install $1" >&2
  else
    echo "setup: WARNING: $2 needs Debian's apt (as root): apt-get install $1" >&2
  fi
}

if [ "$WANT_DATA" = 1 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist Fashion-MNIST
fi
# Playwright drives this system browser (executable_path); `playwright install` would need the internet.
if [ "$WANT_BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  apt_install chromium Chromium
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
# 3.11: the interpreter that constraints.txt's pinned set is tested with (the package itself supports >=3.10).
[ -n "$PYTHON" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# pyproject.toml declares the supported ranges (torch>=2.7, timm>=1.0.31, ...); constraints.txt pins the exact tested
# set (torch 2.14.1, torchvision 0.29.1, timm 1.0.31, and every other package), so CI and a fresh clone install the
# same versions. Packages already at the pinned versions are left alone, so a second run changes nothing.
# (pip byte-compiles every module as it installs: about a third of torch's install time, but where
# PYTHONDONTWRITEBYTECODE is set, as on our machines, nothing else would, and every command would compile torch's
# modules from source again: ~11 s each.)
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
echo "setup: $(.venv/bin/python -c 'import torch, timm, mambazoo; print(f"mambazoo {mambazoo.__version__}, torch {torch.__version__}, timm {timm.__version__}")')"
