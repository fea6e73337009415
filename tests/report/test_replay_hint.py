"""What would settle the verdicts: the attributor records what replay would re-run, the card and the terminal table
say it (or why replay cannot run from the ledger), and a report checked by replay says nothing more."""

from __future__ import annotations

import pytest

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.model_card import write_model_card
from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report.text import render_table, replay_hint
from hf_stage_attribution.testing.digits import build_digits_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_digits_pipeline("hf", tmp_path_factory.mktemp("hint"), steps_scale=0.05, base_steps_scale=0.05)


def _attribute(pipe, validate=False, **kwargs):
    attributor = StageAttributor(pipe.ledger, pipe.model, diagnostics=False, show_progress=False, **kwargs)
    return attributor.attribute({"margin_7": pipe.behaviors["margin_7"]}, validate=validate)


def _card(report, folder):
    folder.mkdir()
    return write_model_card(report, folder, plot=False).readme.read_text()


def test_an_unchecked_report_says_what_replay_would_re_run(pipe, tmp_path):
    report = _attribute(pipe, stage_fns=pipe.stage_fns)
    steps = [int(s.num_steps) for s in pipe.ledger.stages]
    expected = sum(sum(steps[k + 1 :]) for k in range(len(steps)))  # removing stage k re-runs every later stage
    names = [s.name for s in pipe.ledger.stages]
    needs = {"optimizer_steps": expected, "stages": names[1:], "problems": [], "by_function": names[1:]}
    assert report.ledger["replay_needs"] == needs
    assert AttributionReport.from_json(report.to_json()).ledger == report.ledger  # kept in the report's file
    card = _card(report, tmp_path / "card")
    assert "Replay was not run for this report" in card
    assert f"replay re-runs {expected} optimizer steps in all, of stage(s) {', '.join(names[1:])}." in card
    # the later stages are re-run by stage functions: the command must be given them again
    want = "run hf-stage-attribution validate with the same --stage-fn (or attribute(..., validate=True) with the same"
    assert f"{want} stage\\_fns)" in card


def test_a_ledger_replay_cannot_re_run_says_why_and_how_to_record_it(pipe, tmp_path):
    report = _attribute(pipe, estimator="aa-linear")  # no stage functions, and the digits ledger holds no replay data
    needs = report.ledger["replay_needs"]
    assert len(needs["problems"]) == len(pipe.ledger.stages) - 1
    card = _card(report, tmp_path / "card")
    assert "Replay cannot run from this ledger" in card and "validate" not in card.split("Replay cannot run")[1][:80]
    assert "StageRecorder" in card and "replay data" in card


def test_a_report_checked_by_replay_suggests_nothing(pipe, tmp_path):
    report = _attribute(pipe, validate=True, stage_fns=pipe.stage_fns)
    assert "replay_needs" not in report.ledger and replay_hint(report) == ""
    assert "Replay was not run" not in _card(report, tmp_path / "card")


def test_the_terminal_table_says_how_to_settle_an_unreliable_verdict():
    needs = {"optimizer_steps": 24, "stages": ["lora", "dpo"], "problems": []}
    effects = {"b": {"sft": [1.0, 1.1], "lora": [0.2, 0.3], "dpo": [-0.5, -0.4]}}
    report = AttributionReport.build(effects, estimator="partial-replay", versions={}, ledger={"replay_needs": needs})
    assert report.trust("b")["verdict"] == "unreliable"  # nothing to check it against
    table = render_table(report)
    assert "Unreliable verdict(s): To check these estimates against replay, run hf-stage-attribution validate" in table
    assert "replay re-runs 24 optimizer steps in all, of stage(s) lora, dpo." in table
    old = AttributionReport.build(effects, estimator="partial-replay", versions={})  # written before the field
    assert "Unreliable verdict(s)" not in render_table(old) and replay_hint(old) == ""
    # replay run apart (a recipe's separate replay report, ``verify_with_replay``) settles the verdict: no hint
    report.verify_with_replay({"b": {"sft": 0.1, "lora": 0.2, "dpo": -0.5}})
    assert report.trust("b")["label"].startswith("unreliable: replay disagrees")
    assert replay_hint(report) == "" and "Unreliable verdict(s)" not in render_table(report)
