"""What a report built by hand may claim: replay given beside the estimates is evidence for the verdict, only a
replay report verifies, shares need a total change that is not rounding, and intervals need enough resamples."""

from __future__ import annotations

import pytest

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.errors import ReportError, StageAttributionError
from hf_stage_attribution.report import AttributionReport
from tests.helpers.tiny import linear_ledger

EFFECTS = {"f": {"a": [0.2, 0.2], "b": [1.0, 1.0], "c": [0.01, 0.01]}}
REPLAY = {"f": {"a": [2.0, 2.0], "b": [-0.5, -0.5], "c": [0.0, 0.0]}}


def test_replay_given_beside_the_estimates_decides_the_verdict():
    second = {"delta-fd": {"f": {"a": [0.21, 0.21], "b": [1.02, 1.02], "c": [0.01, 0.01]}}}
    report = AttributionReport.build(EFFECTS, estimator="aa-linear", alternates=second, replay=REPLAY, versions={})
    assert [r.replay_effect for r in report.rows_for("f")] == [2.0, -0.5, 0.0]
    assert report.trust("f")["label"].startswith("unreliable: replay disagrees")
    same = AttributionReport.build(
        EFFECTS, estimator="aa-linear", alternates={**second, "replay": REPLAY}, versions={}
    )
    assert same.trust("f") == report.trust("f")
    with pytest.raises(ReportError, match="replay once"):
        AttributionReport.build(EFFECTS, estimator="x", alternates={"replay": EFFECTS}, replay=REPLAY, versions={})


def test_only_a_replay_report_verifies():
    estimate = AttributionReport.build(EFFECTS, estimator="aa-linear", versions={})
    other = AttributionReport.build(EFFECTS, estimator="delta-fd", versions={})
    before = estimate.trust("f")
    with pytest.raises(ReportError, match="exact replay.*'delta-fd'.*nothing was changed"):
        estimate.verify_with_replay(other)
    assert estimate.trust("f") == before
    estimate.verify_with_replay(AttributionReport.build(EFFECTS, estimator="replay", versions={}))
    assert estimate.trust("f")["verdict"] == "verified"


def test_shares_are_none_when_the_total_change_is_rounding():
    report = AttributionReport.build(
        {"f": {"a": [1.5], "b": [-1.5]}}, estimator="x", total_change={"f": 1e-16}, versions={}
    )
    assert [r.share for r in report.rows_for("f")] == [None, None]
    fine = AttributionReport.build(
        {"f": {"a": [1.5], "b": [-0.5]}}, estimator="x", total_change={"f": 1.0}, versions={}
    )
    assert [r.share for r in fine.rows_for("f")] == [1.5, -0.5]


def test_too_few_resamples_are_refused(tmp_path):
    with pytest.raises(ReportError, match=r"n_resamples` >= 40 for a 95 % interval"):
        AttributionReport.build(EFFECTS, estimator="x", n_resamples=1, versions={})
    with pytest.raises(ReportError, match=r">= 20 for a 90 % interval"):
        AttributionReport.build(EFFECTS, estimator="x", n_resamples=19, confidence=0.9, versions={})
    with pytest.raises(StageAttributionError, match="n_resamples to be at least 40"):
        StageAttributor(*linear_ledger(tmp_path), n_resamples=1)
