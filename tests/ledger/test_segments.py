"""Curvature segments: equal step splits (a documented departure from ESTIMATORS.md §4a), whose recurrence still
uses every recorded per-step learning rate, also where the rate changes within a segment (warmup)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_stage_attribution.estimators.curvature.layout import SegmentLayout
from hf_stage_attribution.estimators.curvature.propagation import _segment_ranges
from hf_stage_attribution.ledger import StageLedger
from hf_stage_attribution.ledger.segments import plan_segments

ROOT = Path(__file__).resolve().parents[2]


def test_segments_are_equal_step_splits():
    assert plan_segments(10, 3) == [(0, 3, 1), (3, 6, 4), (6, 10, 8)]
    assert plan_segments(2, 4) == [(0, 1, 0), (1, 2, 1)]
    assert plan_segments(None, 3) == [] and plan_segments(5, 0) == []


def test_the_departure_is_stated_in_the_module_and_the_docs():
    from hf_stage_attribution.ledger import segments

    assert "Departure from ESTIMATORS.md §4a" in segments.__doc__ and "equal step splits" in segments.__doc__
    internals = (ROOT / "docs" / "internals.md").read_text(encoding="utf-8")
    section = internals[internals.index("### Departures from ESTIMATORS.md") :]
    assert "equal step splits, not splits at learning-rate changes" in section


def test_a_segment_spanning_warmup_runs_the_recurrence_with_each_recorded_rate(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    pair = (lambda m, b: m(b[0]), lambda out, b: torch.nn.functional.cross_entropy(out, b[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 5))  # warmup over 5 steps
    ledger = StageLedger(tmp_path / "l")
    with ledger.record_stage("s", model=model, optimizer=opt, loss_fn=pair, num_steps=8, curvature_segments=2) as rec:
        for t in range(8):
            batch = (x[2 * t : 2 * t + 2], y[2 * t : 2 * t + 2])
            opt.zero_grad()
            pair[1](pair[0](model, batch), batch).backward()
            opt.step()
            rec.step(batch)
            sched.step()
    (stage,) = ledger.stages
    rates = [row[0] for row in stage.learning_rates]
    assert rates[:5] == pytest.approx([0.1 * (t + 1) / 5 for t in range(5)])  # segment 0: rates 0.02 .. 0.08
    ranges = [(start, end) for _, start, end in _segment_ranges(stage)]
    assert ranges == [(0, 4), (4, 8)]
    for seg, start, end in _segment_ranges(stage):
        layout = SegmentLayout(stage, seg, "sgd", start, end, continued=False, buffer_fresh=start == 0)
        assert layout.groups[0].lrs == rates[start:end]  # every step's own rate, not one per segment
