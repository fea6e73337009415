#!/usr/bin/env bash
# Create .venv (if missing) and install hf-stage-attribution with its test and recipe extras.
# torch is installed first, pinned to the CPU build this project is developed against: installing
# accelerate/peft/trl into an environment without torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "hf-stage-attribution installed in $(pwd)/.venv"
