"""AttributionReport: means, bootstrap intervals, shares, diagnostics, JSON round trip, markdown, table, plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_stage_attribution.errors import ReportError
from hf_stage_attribution.report import AttributionReport, StageSummary
from hf_stage_attribution.report.plot import DPI, figure_size

STAGES = ["pretraining", "sft", "dpo"]


def _report(**kwargs) -> AttributionReport:
    rng = np.random.default_rng(3)
    tox = {"pretraining": (0.1, 0.2), "sft": (1.0, 0.3), "dpo": (-0.4, 0.1)}
    margin = {"pretraining": (2.0, 1.0), "sft": (-0.2, 0.5), "dpo": (0.0, 0.1)}
    per_example = {
        "toxicity": {stage: rng.normal(mu, sd, 40) for stage, (mu, sd) in tox.items()},
        "margin": {stage: rng.normal(mu, sd, 25) for stage, (mu, sd) in margin.items()},
    }
    defaults = dict(
        estimator="aa-linear",
        estimator_reason="the ledger holds no curvature material",
        stages=STAGES,
        behaviors={"toxicity": {"unit": "nats"}, "margin": {"unit": "logit"}},
        total_change={"toxicity": 0.9, "margin": rng.normal(1.5, 0.5, 25)},
        versions={"hf-stage-attribution": "0.1.0"},
    )
    defaults.update(kwargs)
    return AttributionReport.build(per_example, **defaults)


def test_means_shares_and_residual_follow_the_definitions():
    rep = _report()
    rows = rep.rows_for("toxicity")
    assert [r.stage for r in rows] == STAGES and [r.stage_index for r in rows] == [0, 1, 2]
    for row in rows:
        assert row.effect == pytest.approx(float(np.mean(row.per_example)), abs=1e-15)
        assert row.ci_low <= row.effect <= row.ci_high
        assert row.share == pytest.approx(row.effect / 0.9)
        assert row.estimator == "aa-linear" and len(row.per_example) == 40
    diag = rep.diagnostics["toxicity"]
    assert diag.total_change == 0.9
    assert diag.sum_of_effects == pytest.approx(sum(r.effect for r in rows))
    assert diag.interaction_residual == pytest.approx(0.9 - diag.sum_of_effects)
    per_example_total = AttributionReport.build(
        {"f": {"a": [1.0]}}, estimator="x", total_change={"f": [1.0, 2.0, 6.0]}
    )
    assert per_example_total.diagnostics["f"].total_change == 3.0  # a per-example total change is averaged
    assert rep.top_stage("toxicity") == "sft"
    assert rep.top_stage("toxicity", by="lower") == "dpo"
    assert rep.top_stage("margin") == "pretraining"
    assert rep.behavior("toxicity").unit == "nats" and rep.behavior("margin").num_examples == 25


def test_bootstrap_interval_is_deterministic_paired_and_has_the_textbook_width():
    a, b = _report(), _report()
    assert a == b  # fixed-seed generator: same inputs, same intervals
    assert _report(seed=1).rows[0].ci_low != a.rows[0].ci_low
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, 400)
    rep = AttributionReport.build({"f": {"s": x, "constant": np.full(400, 0.25)}}, estimator="aa-fd", versions={})
    row, const = rep.rows_for("f")
    expected_half_width = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert (row.ci_high - row.ci_low) / 2 == pytest.approx(expected_half_width, rel=0.15)
    assert const.ci_low == const.ci_high == const.effect == 0.25
    assert rep.interval == {"method": rep.interval["method"], "confidence": 0.95, "resamples": 1000, "seed": 0}
    narrow = AttributionReport.build({"f": {"s": x}}, estimator="aa-fd", versions={}, confidence=0.5)
    assert narrow.rows[0].ci_high - narrow.rows[0].ci_low < row.ci_high - row.ci_low


def test_tensors_and_the_linearisation_gap():
    per = {"f": {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.5], dtype=torch.bfloat16)}}
    alt = {"aa-fd": {"f": {"a": [1.5, 2.5], "b": [0.0, 0.0]}}}
    rep = AttributionReport.build(per, estimator="aa-linear", alternates=alt, versions={}, unstable_modes=2)
    diag = rep.diagnostics["f"]
    assert diag.linearisation_pair == ["aa-linear", "aa-fd"]
    assert diag.linearisation_gap["a"] == {"linear": 1.5, "fd": 2.0, "gap": 0.5, "relative_gap": 0.25}
    assert diag.linearisation_gap["b"]["gap"] == -0.5 and diag.unstable_modes == 2
    assert diag.total_change is None and diag.interaction_residual is None and rep.rows[0].share is None
    only_a = AttributionReport.build({"f": {"a": [1.0]}}, estimator="x", stages=["a", "b"], total_change={"f": 2.0})
    assert only_a.diagnostics["f"].interaction_residual is None  # not every stage was estimated


def test_stage_summaries_come_from_a_real_ledger(tmp_path):
    from hf_stage_attribution import StageLedger

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ledger = StageLedger(tmp_path / "ledger")
    x = torch.randn(8, 3)
    for name, opt in (
        ("pre", torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)),
        ("ft", torch.optim.SGD(model.parameters(), lr=0.05)),
    ):
        meta = {"datasets": [{"name": f"{name}-data", "size": 8, "fingerprint": "0123456789abcdef"}]}
        with ledger.record_stage(name, kind="fine-tuning", model=model, optimizer=opt, metadata=meta) as rec:
            for _ in range(3):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
                rec.step()
    ledger = StageLedger.load(tmp_path / "ledger")
    rep = AttributionReport.build({"f": {"pre": [1.0, 2.0], "ft": [0.0, 1.0]}}, estimator="aa-linear", ledger=ledger)
    first = rep.stages[0]
    assert first == StageSummary(
        0,
        "pre",
        "fine-tuning",
        3,
        "AdamW, weight decay 0.01",
        0.1,
        0.1,
        {"datasets": [{"name": "pre-data", "size": 8, "fingerprint": "0123456789abcdef"}]},
    )
    assert rep.stages[1].optimizer == "SGD" and rep.stages[1].lr_max == 0.05
    assert rep.ledger == {
        "name": "ledger",
        "fingerprint": ledger.fingerprint,
        "final_hash": ledger.final_hash,
        "num_stages": 2,
    }
    assert "torch" in rep.versions and "hf-stage-attribution" in rep.versions


def test_from_estimates_reads_real_estimate_results():
    from hf_stage_attribution.estimators.base import EstimateResult

    res = EstimateResult(
        "aa-ggn",
        {"sft": torch.tensor([1.0, 3.0], dtype=torch.float64)},
        diagnostics={"unstable_modes": 3, "krylov_size": 8, "factors": torch.zeros(5000)},
        approximations=["Gauss-Newton curvature"],
        reason="curvature material present",
    )
    rep = AttributionReport.from_estimates({"toxicity": res}, versions={})
    assert rep.estimator == "aa-ggn" and rep.estimator_reason == "curvature material present"
    assert rep.rows[0].effect == 2.0 and rep.approximations == ["Gauss-Newton curvature"]
    assert rep.diagnostics["toxicity"].unstable_modes == 3
    assert rep.diagnostics["toxicity"].notes == {"krylov_size": 8}  # large tensors stay out of the report


def test_json_round_trip_is_exact(tmp_path):
    awkward = [0.1 + 0.2, 1e-300, -123456.789e10, 5e-324, 2.0**60]
    rep = _report(
        fidelity={"all pairs": {"pearson": 0.5, "num_pairs": 6}}, ledger={"fingerprint": "ab", "final_hash": "cd"}
    )
    rep.rows[0].per_example[:5] = awkward
    back = AttributionReport.from_json(rep.to_json())
    assert back == rep and back.rows[0].per_example[:5] == awkward
    path = tmp_path / "report.json"
    rep.to_json(path)
    assert AttributionReport.from_json(path) == rep == AttributionReport.from_json(str(path))
    assert json.loads(path.read_text())["format_version"] == 1


def test_bad_inputs_are_refused_clearly(tmp_path):
    with pytest.raises(ReportError, match="at least one behavior"):
        AttributionReport.build({}, estimator="aa-linear")
    with pytest.raises(ReportError, match="stages among"):
        AttributionReport.build({"f": {"nope": [1.0]}}, estimator="x", stages=["a"])
    with pytest.raises(ReportError, match="as many examples"):
        AttributionReport.build({"f": {"a": [1.0], "b": [1.0, 2.0]}}, estimator="x")
    with pytest.raises(ReportError, match="finite"):
        AttributionReport.build({"f": {"a": [1.0, float("nan")]}}, estimator="x")
    with pytest.raises(ReportError, match="distinct stage names"):
        AttributionReport.build({"f": {"a": [1.0]}}, estimator="x", stages=["a", "a"])
    with pytest.raises(ReportError, match="Known behaviors: toxicity, margin"):
        _report().top_stage("nope")
    good = json.loads(_report().to_json())
    with pytest.raises(ReportError, match="newer"):
        AttributionReport.from_json(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ReportError, match="format"):
        AttributionReport.from_json(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(ReportError, match="invalid JSON"):
        AttributionReport.from_json("{not json")
    with pytest.raises(ReportError, match="finite numbers"):
        bad_rows = [{**good["rows"][0], "effect": float("nan")}] + good["rows"][1:]
        AttributionReport.from_json(json.dumps({**good, "rows": bad_rows}))
    with pytest.raises(ReportError, match="Expected a report JSON file"):
        AttributionReport.from_json(tmp_path / "missing.json")
    with pytest.warns(UserWarning, match="unknown report keys"):
        assert AttributionReport.from_json(json.dumps({**good, "future_key": 1})) == _report()


def test_markdown_says_units_sign_convention_and_is_not_a_decomposition():
    md = _report(approximations=["Adam: preconditioner frozen at stage end"]).to_markdown()
    assert "positive = the stage raised the behavior" in md and "not a decomposition" in md
    assert "| # | stage | effect (nats) | 95 % interval (nats) |" in md
    assert "| # | stage | effect (logit) | 95 % interval (logit) |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| 1 | sft |")]
    assert len(table_rows) == 2  # one table per behavior, one row per stage
    assert "interaction residual" in md and "Adam: preconditioner frozen at stage end" in md
    assert "Replay was not run" in md


def test_terminal_table_marks_the_top_stage_and_neutralises_control_characters():
    rep = AttributionReport.build({"tox": {"a\x1b[31mred": [1.0], "b": [3.0]}}, estimator="aa-fd", versions={})
    text = rep.table()
    assert "\x1b" not in text and "a\\x1b[31mred" in text
    top_line = next(line for line in text.splitlines() if " b " in line)
    assert top_line.rstrip().endswith("*?") and "+3" in top_line  # nothing checked it: marked unreliable


def test_plot_is_a_png_with_one_bar_group_per_stage(tmp_path):
    from matplotlib.container import BarContainer
    from matplotlib.image import imread

    rep = _report()
    path = rep.plot(tmp_path / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = figure_size(len(STAGES))
    assert imread(path).shape[:2] == (round(height * DPI), round(width * DPI))
    fig = rep.plot_figure()
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and all(len(c.patches) == len(STAGES) for c in bars)  # 2 behaviors x 3 stage groups
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0: pretraining", "1: sft", "2: dpo"]
    centres = sorted(p.get_x() + p.get_width() / 2 for c in bars for p in c.patches)
    groups = [centres[i : i + 2] for i in range(0, 6, 2)]  # the two bars of a stage sit around its tick
    assert all(abs(sum(g) / 2 - k) < 1e-9 for k, g in enumerate(groups))
    assert rep.plot(tmp_path / "again.png").read_bytes() == data  # deterministic bytes
