#!/usr/bin/env bash
# The test suite (fast + distributed tiers, and the package's docstring examples: pyproject's testpaths and
# --doctest-modules; `-m slow` runs the full-size checks separately).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
