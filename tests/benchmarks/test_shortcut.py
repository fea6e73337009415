"""The shortcut pipelines (4 stages, mixed optimizers; first stage accountable), trust calibration, new targets."""

from __future__ import annotations

import pytest

from benchmarks import fidelity, pipelines, render, targets
from benchmarks.common import Settings


@pytest.mark.parametrize(
    ("name", "optimizers"),
    [("digits-undo", ["SGD", "Adam", "RMSprop", "AdamW"]), ("digits-first", ["Adagrad", "SGD", "AdamW"])],
)
def test_shortcut_pipelines_record_mixed_optimizers_and_replay_exactly(tmp_path, name, optimizers):
    settings = Settings.make(quick=True)
    settings.digits_steps_scale, settings.timing_min_seconds = 0.1, 0.0
    pipe = pipelines.build(name, 0, settings, tmp_path)
    assert [s.optimizer["type"] for s in pipe.ledger.stages] == optimizers
    rates = [[lr for step in s.learning_rates for lr in step] for s in pipe.ledger.stages]
    assert any(len(set(r)) > 1 for r in rates), "the stages' schedules must change the learning rate"
    run = fidelity.measure(pipe, settings)
    assert run["replay_gap"] < 1e-5, "replay with nothing removed must reproduce θ_K"
    assert "aa-ggn-fd" in run["times"] and run["default"]["name"] == "aa-ggn-fd"
    calibration = fidelity.trust_calibration([run])[name]
    cells = calibration["estimators"]["aa-ggn-fd"]
    assert sum(c["n"] for c in cells.values()) == len(run["behaviors"])  # one verdict per behavior
    assert all(0 <= c["right"] <= c["n"] and 0 <= c["verified"] <= c["n"] for c in cells.values())
    assert set(cells) <= {"agree", "unreliable"}  # no replay in the verdict: never "verified"
    summary = fidelity.summarise([run])
    results = {"fidelity": {"summary": summary, "trust": {name: calibration},
                            "pipelines": {name: {"default": run["default"]}}}}  # fmt: skip
    rows = [r for r in targets.evaluate(results) if r["scope"].startswith(name)]
    negation = next(r for r in rows if "task-vector negation" in r["target"])
    worst, _ = targets.not_worse_than(summary[name], "aa-ggn-fd", "delta-fd")
    assert negation["measured"] == worst and negation["met"] == (worst >= 0)
    assert {r["scope"] for r in rows} == {name, f"{name}, all pairs"}
    text = "\n".join(render._trust(calibration))
    assert "| **aa-ggn-fd** (default) |" in text and "replay verifies" in text


def test_the_reason_counts_know_the_overlap_reason_in_both_wordings():
    from hf_stage_attribution.report.trust import size_overlap_text

    new = size_overlap_text("sft", "dpo", {"sft": (1.462, 10.49), "dpo": (-1.655, -1.128)})
    for why in (new, "top two stages' intervals overlap (sft and dpo)"):
        assert fidelity._reason_kind(why) == "top two intervals overlap"
