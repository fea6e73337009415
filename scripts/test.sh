#!/usr/bin/env bash
# The test suite (fast + distributed tiers, and the package's docstring examples: pyproject's testpaths and
# --doctest-modules; `-m slow` runs the full-size checks separately).
# Two pytest-xdist workers, a test file each at a time (`--dist loadfile`: a module's fixtures and its tests stay in one
# process), one torch thread each: most tests are small models that keep one core busy, so one worker left the
# second core idle (CI on 2 cores: 705-921 s serially, 582 s with two workers). TEST_WORKERS=0 runs in this process
# (for a debugger); a later `-n N` on the command line overrides the default.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${TEST_WORKERS:-2}
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -q -m "not slow" "${parallel[@]}" "$@"
