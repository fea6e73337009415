"""Recording holds at most one extra copy of the trainable parameters (benchmarks/recording_memory.py): peak RSS of a
~25M-parameter GPT-2 Trainer run with StageRecorder (with curvature capture, with a stage boundary that stores the
optimizer state) minus the plain run's, in units of one float32 copy of the trainable parameters."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_recording_holds_at_most_one_extra_copy_of_the_trainable_parameters():
    from benchmarks import recording_memory

    rows = {row["config"]: row for row in recording_memory.measure(steps=4)}
    for config in ("recorder", "recorder+curvature", "recorder+boundary"):
        extra = rows[config]["extra_in_trainable_copies"]
        # The stage-start snapshot is one copy; everything else is streamed one tensor at a time.
        assert 0.8 <= extra <= 1.25, (config, extra)
