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
        "stage_names": ["pre", "ft"],  # a report of some stages names the others
        "final_digests": ledger.final_digests,  # what a model card checks the weights beside it against
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


def test_markdown_says_units_once_sign_convention_and_is_not_a_decomposition():
    md = _report(approximations=["Adam: preconditioner frozen at stage end"]).to_markdown()
    assert "positive = the stage raised the behavior" in md and "not a decomposition" in md
    # units said once, in each table's caption; the headers carry none
    assert "Unit: nats. Positive = the stage raised toxicity." in md
    assert "Unit: logit. Positive = the stage raised margin." in md
    assert (
        md.count(
            "| # | stage | estimate | 95 % interval (example sampling) | share of Σ\\|effect\\| "
            "| most moved examples |"
        )
        == 2
    )
    assert "effect ÷ total change" not in md and "interval (nats)" not in md
    table_rows = [line for line in md.splitlines() if line.startswith("| 1 | sft |")]
    assert len(table_rows) == 2  # one table per behavior, one row per stage
    assert "interaction residual" in md.lower() and "Adam: preconditioner frozen at stage end" in md
    assert "Replay was not run" in md and "replay (ground truth)" not in md


def test_direction_sentence_says_which_stage_and_which_way():
    rep = _report()
    md = rep.to_markdown()
    sft = rep.rows_for("toxicity")[1]
    assert f"**sft** raised toxicity the most ({sft.effect:+.4g} nats, 95 % interval (example sampling) [" in md
    assert "**pretraining** raised margin the most" in md
    # toxicity: pretraining and sft raised it, dpo lowered it
    assert "Stages pushed toxicity in opposite directions: raised by **pretraining** (" in md
    assert "; lowered by **dpo** (" in md
    lowered = AttributionReport.build({"tox": {"sft": [0.2, 0.4], "dpo": [-38.0, -38.4]}}, estimator="x", versions={})
    assert lowered.to_markdown().count("**dpo** lowered tox the most (-38.2 behavior units") == 1
    same_way = AttributionReport.build({"tox": {"a": [1.0], "b": [2.0]}}, estimator="x", versions={})
    assert "opposite directions" not in same_way.to_markdown()
    assert "* b raised tox the most (+2" in same_way.table()


def test_shares_are_of_the_summed_absolute_effects_with_the_residual_beside_them():
    rep = AttributionReport.build(
        {"tox": {"a": [3.0, 3.0], "b": [-1.0, -1.0]}}, estimator="x", total_change={"tox": 0.5}, versions={}
    )
    md = rep.to_markdown()
    assert "| 0 | a | +3 | [+3, +3] | 75 % |" in md and "| 1 | b | -1 | [-1, -1] | 25 % |" in md
    assert "Interaction residual (total change − sum of effects): -1.5 behavior units." in md


def test_replay_values_sit_beside_the_estimates_in_markdown_table_and_json():
    rep = _report(
        replay={"toxicity": {"pretraining": [0.05, 0.15], "sft": [0.8, 1.0], "dpo": [-0.3]}},
        fidelity={"all": {"pearson": 0.9, "n_pairs": 3}},
    )
    assert [r.replay_effect for r in rep.rows_for("toxicity")] == pytest.approx([0.1, 0.9, -0.3])
    assert all(r.replay_effect is None for r in rep.rows_for("margin"))
    md = rep.to_markdown()
    assert "| # | stage | estimate | 95 % interval (example sampling) | replay (ground truth) |" in md
    assert "Replay = the effect measured by re-running the later stages without the stage." in md
    assert " | +0.9 | " in md
    table = rep.table()
    header = ["behavior", "#", "stage", "estimate", "95%", "interval", "(example", "sampling)", "replay", "share",
              "of", "Σ|effect|", "top"]  # fmt: skip
    assert table.splitlines()[0].split() == header
    assert json.loads(rep.to_json())["rows"][1]["replay_effect"] == pytest.approx(0.9)
    assert AttributionReport.from_json(rep.to_json()) == rep
    # replay given as an alternate estimator's results fills the same values
    again = _report(alternates={"replay": {"toxicity": {"sft": [0.9]}}})
    assert [r.replay_effect for r in again.rows_for("toxicity")] == [None, 0.9, None]


def test_fidelity_prints_as_a_plain_table():
    from hf_stage_attribution.report.text import render_fidelity_table

    rep = _report(fidelity={"all": {"n_pairs": 6, "pearson": 0.99}, "non_terminal": {"n_pairs": 4, "pearson": 0.9}})
    lines = render_fidelity_table(rep).splitlines()
    assert lines[0].split() == ["pairs", "of", "(stage,", "behavior)", "pairs", "Pearson", "r"]
    assert lines[2].split() == ["all", "pairs", "6", "0.99"] and lines[3].startswith("non-terminal pairs")
    assert render_fidelity_table(_report()) == ""


def test_terminal_table_marks_the_top_stage_and_neutralises_control_characters():
    rep = AttributionReport.build({"tox": {"a\x1b[31mred": [1.0], "b": [3.0]}}, estimator="aa-fd", versions={})
    text = rep.table()
    assert "\x1b" not in text and "a\\x1b[31mred" in text
    top_line = next(line for line in text.splitlines() if " b " in line)
    assert top_line.rstrip().endswith("*?") and "+3" in top_line  # nothing checked it: marked unreliable


def test_plot_has_one_panel_per_behavior_with_its_own_axis_units_and_replay_markers(tmp_path):
    from matplotlib.container import BarContainer
    from matplotlib.image import imread

    rep = _report(replay={"toxicity": {"pretraining": [0.1], "sft": [0.9], "dpo": [-0.3]}})
    path = rep.plot(tmp_path / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = figure_size(len(STAGES), 2)
    image = imread(path)
    assert image.shape[:2] == (round(height * DPI), round(width * DPI))
    # a light card on a transparent page: the corner is transparent, the inside opaque (light and dark themes)
    assert image.shape[2] == 4 and image[0, 0, 3] == 0.0 and image[image.shape[0] // 2, 10, 3] == 1.0
    fig = rep.plot_figure()
    panels = list(fig.axes)
    assert len(panels) == 2  # one panel per behavior
    assert [ax.get_title() for ax in panels] == ["toxicity\n(nats)", "margin\n(logit)"]  # units in the title
    for ax in panels:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 1 and len(bars[0].patches) == len(STAGES)
        assert [t.get_text() for t in ax.get_xticklabels()] == STAGES  # stages in ledger order
    tox, margin = panels
    assert tox.get_shared_y_axes().get_siblings(tox) == [tox]  # each panel has its own y-axis
    heights = [p.get_height() for c in tox.containers if isinstance(c, BarContainer) for p in c.patches]
    assert heights == pytest.approx([r.effect for r in rep.rows_for("toxicity")])
    markers = [line for line in tox.get_lines() if line.get_marker() == "D"]
    assert len(markers) == 1 and list(markers[0].get_ydata()) == pytest.approx([0.1, 0.9, -0.3])
    assert not [line for line in margin.get_lines() if line.get_marker() == "D"]  # no replay for margin
    assert rep.plot(tmp_path / "again.png").read_bytes() == data  # deterministic bytes
