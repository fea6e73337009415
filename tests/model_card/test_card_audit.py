"""The card's claims follow the evidence (audit of 2026-12-06): replay's top stage in the YAML and the text, no top
stage for a behavior nothing moved, no interval for one example, intervals labelled as example sampling only."""

from __future__ import annotations

import yaml

from hf_stage_attribution import write_model_card
from hf_stage_attribution.report import AttributionReport


def _card(tmp_path, report, name="m"):
    folder = tmp_path / name
    folder.mkdir()
    text = write_model_card(report, folder / "README.md", plot=False).readme.read_text("utf-8")
    return text, yaml.safe_load(text.split("---")[1])["stage_attribution"]


def test_yaml_and_text_give_replays_top_stage_when_the_estimate_names_another(tmp_path):
    report = AttributionReport.build(
        {"tox": {"pretraining": [-0.036, -0.037], "sft": [-0.048, -0.049], "dpo": [0.005, 0.0052]}},
        replay={"tox": {"pretraining": [-0.0407, -0.0408], "sft": [-0.0277, -0.0278], "dpo": [0.005, 0.0052]}},
        estimator="partial-replay", versions={}, n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, report)
    entry = meta["behaviors"][0]
    assert entry["top_stage"] == "pretraining" and entry["estimated_top_stage"] == "sft"
    assert entry["direction"] == "lowered" and entry["top_stage_replay_effect"] == report.rows[0].replay_effect
    assert "Replay (ground truth): **pretraining** lowered tox the most" in text
    assert "**sft** lowered tox the most" not in text


def test_a_behavior_no_stage_moved_has_no_top_stage_in_the_yaml(tmp_path):
    zero = {"pre": [0.0, 0.0], "sft": [0.0, 0.0]}
    _, meta = _card(tmp_path, AttributionReport.build({"flat": zero}, estimator="aa-linear", versions={}))
    entry = meta["behaviors"][0]
    assert "top_stage" not in entry and "top_stage_effect" not in entry and entry["direction"] == "did not change"


def test_one_example_card_has_no_interval_and_says_one_example(tmp_path):
    report = AttributionReport.build({"tox": {"pre": [0.5], "sft": [2.0]}}, estimator="aa-linear", versions={})
    text, meta = _card(tmp_path, report)
    assert "#### tox (1 example)" in text and "(1 examples)" not in text
    assert "[+2, +2]" not in text and "n/a (1 example)" in text
    assert "ci_low" not in meta["behaviors"][0]


def test_the_card_table_and_plot_caption_say_the_interval_covers_example_sampling(tmp_path):
    report = AttributionReport.build({"t": {"a": [3.0, 3.2], "b": [-1.0, -1.1]}}, estimator="x", versions={},
                                     n_resamples=200)  # fmt: skip
    folder = tmp_path / "p"
    folder.mkdir()
    text = write_model_card(report, folder / "README.md").readme.read_text("utf-8")
    assert "| 95 % interval (example sampling) |" in text
    assert "![Stage effects per behavior, with 95 % intervals (example sampling only)]" in text
    assert "The intervals cover example sampling only" in text  # beside an unreliable verdict too
