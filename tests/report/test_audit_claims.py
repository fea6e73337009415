"""What users see is no more certain than its evidence (the audit of 2026-12-06, problems 1-11 and 13).

Each test builds a small report through the public API and checks the console table, report.md, the verdict or the
JSON for one claim: a sign claimed only where it is settled, replay's values and answer shown once replay ran, no
interval for one example, shares and intervals named for what they are, no top stage for a behavior nothing moved.
"""

from __future__ import annotations

import json
import warnings

import pytest

from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report import trust as T
from hf_stage_attribution.report.text import headline, opposite_directions

STAGES = ["pretraining", "sft", "lora", "dpo"]


def _build(effects, **kwargs) -> AttributionReport:
    return AttributionReport.build(effects, estimator=kwargs.pop("estimator", "aa-linear"), versions={},
                                   n_resamples=200, **kwargs)  # fmt: skip


# --- 10: "verified by replay" covers the sizes too --------------------------------------------------------------


def test_replay_with_the_same_top_stage_signs_and_ranking_but_a_4_fold_size_does_not_verify():
    est = {"f": {"pretraining": [-9.2, -9.3], "sft": [0.47, 0.48], "dpo": [-1.9, -2.0]}}
    rep = _build(est, replay={"f": {"pretraining": [-8.0, -8.05], "sft": [2.0, 2.01], "dpo": [-1.95, -1.96]}})
    t = rep.trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"].startswith("unreliable: replay disagrees — sft's size is 0.24× replay's (+0.475 vs +2.005)")
    assert t["evidence"]["replay_size_ratios_off"] == {"sft": pytest.approx(0.2369, abs=1e-3)}
    within = _build(est, replay={"f": {"pretraining": [-8.0, -8.05], "sft": [0.9, 0.91], "dpo": [-1.95, -1.96]}})
    assert within.trust("f")["label"] == "verified by replay"
    assert "within a factor of 2 of replay's" in within.trust("f")["reason"]


def test_the_trust_module_docstring_states_the_size_bar_of_replay():
    assert "size is N× replay's" in T.__doc__ and "SIZE_RATIO_MAX" in T.__doc__.split('"verified"')[1][:400]


# --- 3: replay's top stage is the answer when replay ran ---------------------------------------------------------


def test_headline_states_replays_top_stage_when_the_estimate_names_another():
    rep = _build(
        {"tox": {"pretraining": [-0.036, -0.037], "sft": [-0.048, -0.049], "dpo": [0.005, 0.0052]}},
        replay={"tox": {"pretraining": [-0.0407, -0.0408], "sft": [-0.0277, -0.0278], "dpo": [0.005, 0.0052]}},
        behaviors={"tox": {"unit": "score"}},
    )
    text = headline(rep, "tox", escape=str)
    assert text.startswith("Replay (ground truth): pretraining lowered tox the most (-0.04075 score).")
    assert "The estimate named sft instead (-0.0485 score, 95 % interval (example sampling) [" in text
    assert "sft lowered tox the most" not in rep.table() and "sft** lowered tox the most" not in rep.to_markdown()
    top_rows = [line for line in rep.table().splitlines() if line.rstrip().endswith("*?")]
    assert len(top_rows) == 1 and " pretraining " in top_rows[0]  # the console marks replay's top stage


def test_headline_says_when_replay_gives_the_top_stage_the_other_sign():
    rep = _build({"f": {"a": [3.0, 3.1], "b": [0.5, 0.6]}}, replay={"f": {"a": [-2.5, -2.6], "b": [0.5, 0.6]}})
    text = headline(rep, "f", escape=str)
    assert text.startswith("Replay (ground truth): a lowered f the most (-2.55 behavior units).")
    assert "The estimate gave it the other sign (+3.05" in text


def test_headline_does_not_name_a_top_stage_replays_own_examples_do_not_separate():
    """Replay is exact for the examples it ran on, not for the behavior they sample: MiniLM's two stages replayed to
    +2.648 and +2.650 (intervals ±0.1) and the headline said "stage2 raised margin the most"."""
    est = {"m": {"stage1": [3.0, 3.2, 3.1, 2.9], "stage2": [1.9, 2.1, 2.0, 2.2]}}
    tied = {"m": {"stage1": [2.5, 2.8, 2.6, 2.69], "stage2": [2.8, 2.5, 2.7, 2.6]}}
    rep = _build(est, replay=tied, behaviors={"m": {"unit": "logits"}})
    sep = rep.trust("m")["evidence"]["replay"]["top_separation"]
    assert (sep["top"], sep["runner_up"], sep["separated"]) == ("stage2", "stage1", False)
    assert sep["interval"][0] < 0 < sep["interval"][1]
    text = headline(rep, "m", escape=str)
    assert text.startswith("Replay (ground truth): stage2 and stage1 moved m about as much (+2.65 and +2.647 logits;")
    assert "replay does not tell which moved it more). The estimate named stage1 (+3.05 logits" in text
    assert "stage2 raised m the most" not in text
    # nor is the estimate that names the runner-up "contradicted" by replay (it said "unreliable: replay disagrees")
    t = rep.trust("m")
    assert t["verdict"] == "verified"
    assert t["label"] == "verified by replay — replay does not separate stage2 and stage1"
    assert t["evidence"]["replay_top_tie"] == ["stage2", "stage1"]
    assert "Spearman" not in t["reason"]  # two stages: a ranking of two tied stages says nothing
    marked = [line for line in rep.table().splitlines() if line.rstrip().endswith("*v")]
    assert len(marked) == 2  # the console marks both stages replay cannot rank
    assert "top = replay's top stage (its top two where replay's examples do not separate them)" in rep.table()
    from hf_stage_attribution.model_card.writer import card_metadata

    entry = card_metadata(rep)["behaviors"][0]
    assert (entry["top_stage"], entry["top_stage_tied_with"], entry["estimated_top_stage"]) == ("stage2", "stage1",
                                                                                                 "stage1")  # fmt: skip
    assert entry["top_stage_trust"] == "verified"
    # a replay report run apart carries its examples: verify_with_replay sees the same tie
    apart_est = _build(est, behaviors={"m": {"unit": "logits"}})
    apart_est.verify_with_replay(_build(tied, estimator="replay", behaviors={"m": {"unit": "logits"}}))
    t = apart_est.trust("m")
    assert t["label"] == "verified by replay — replay does not separate stage2 and stage1"
    assert t["evidence"]["replay"]["top_separation"]["separated"] is False
    assert "stage2 and stage1 moved m about as much" in headline(apart_est, "m", escape=str)
    # replay given as means only carries no sampling: the point top stages must agree, as before
    means_only = _build(est, behaviors={"m": {"unit": "logits"}})
    means_only.verify_with_replay({"m": {"stage1": 2.6475, "stage2": 2.65}})
    assert means_only.trust("m")["label"].startswith("unreliable: replay disagrees — replay names stage2")
    apart = {"m": {"stage1": [1.0, 1.1, 0.9, 1.05], "stage2": [2.8, 2.5, 2.7, 2.6]}}  # separated: named as before
    rep = _build(est, replay=apart, behaviors={"m": {"unit": "logits"}})
    assert rep.trust("m")["evidence"]["replay"]["top_separation"]["separated"] is True
    assert headline(rep, "m", escape=str).startswith("Replay (ground truth): stage2 raised m the most (+2.65 logits).")
    assert rep.trust("m")["label"].startswith("unreliable: replay disagrees — replay names stage2 as the top stage")
    assert "top_stage_tied_with" not in card_metadata(rep)["behaviors"][0]


# --- 2: replay run apart shows replay's values -------------------------------------------------------------------


def test_verify_with_replay_fills_the_replay_column_and_names_the_stage_of_the_wrong_sign(tmp_path):
    est = _build({"f": {"fine-tuning": [1.6, 1.64], "data-refresh": [2.08, 2.09], "lora": [-0.73, -0.74]}},
                 estimator="partial-replay")  # fmt: skip
    truth = _build({"f": {"fine-tuning": [-0.67, -0.68], "data-refresh": [2.08, 2.09], "lora": [-0.73, -0.74]}},
                   estimator="replay")  # fmt: skip
    est.verify_with_replay(truth)
    assert [r.replay_effect for r in est.rows_for("f")] == pytest.approx([-0.675, 2.085, -0.735])
    label = est.trust("f")["label"]
    assert "disagree on the sign of 1 of 3 stages (fine-tuning: +1.62 vs -0.675)" in label
    assert "replay (ground truth)" in est.to_markdown() and "replay" in est.table().splitlines()[0].split()
    back = AttributionReport.from_json(est.to_json(tmp_path / "r.json"))
    assert back.rows_for("f")[0].replay_effect == pytest.approx(-0.675)
    # the plot draws replay markers (a second artist per panel: the bars and the replay line)
    assert any(line.get_label() == "replay" for line in est.plot_figure().axes[0].get_lines())


# --- 1: no unhedged sign claim -----------------------------------------------------------------------------------


def test_opposite_directions_takes_replays_sign_and_says_the_estimate_had_the_other():
    rep = _build({"f": {"ft": [1.6, 1.64], "refresh": [2.08, 2.09], "lora": [-0.73, -0.74]}},
                 replay={"f": {"ft": [-0.67, -0.68], "refresh": [2.08, 2.09], "lora": [-0.73, -0.74]}})  # fmt: skip
    text = opposite_directions(rep, "f", escape=str)
    assert "raised by ft" not in text
    assert "lowered by ft (replay -0.675; the estimate, +1.62, has the other sign)" in text


def test_opposite_directions_hedges_a_sign_the_verdict_calls_unsettled():
    rep = _build({"pred": {"base": [-0.09, -0.096], "tune": [0.061, 0.0612], "noop": [0.0, 0.0]}},
                 alternates={"delta-fd": {"pred": {"base": [-0.27], "tune": [0.06], "noop": [0.0]}}})  # fmt: skip
    assert "differ more than 2-fold on base" in rep.trust("pred")["label"]
    text = opposite_directions(rep, "pred", escape=str)
    assert "lowered by base" not in text
    assert "base (-0.093, sign not settled: delta-fd's size differs more than 2-fold)" in text
    assert "raised by tune (+0.0611)" in text
    assert "lowered base" not in headline(rep, "pred", escape=str) and "its sign is not settled" in headline(
        rep, "pred", escape=str
    )


def test_opposite_directions_hedges_a_stage_whose_interval_includes_zero():
    rep = _build({"g": {"sft": [-0.05, -0.047, -0.049], "dpo": [0.04, -0.03, 0.006]}})
    assert "raised by dpo" not in opposite_directions(rep, "g", escape=str)
    assert "dpo (+0.005333, sign not settled: its interval includes 0)" in opposite_directions(rep, "g", escape=str)


# --- 4: one example, no interval ---------------------------------------------------------------------------------


def test_one_example_prints_no_interval_and_the_interval_check_does_not_pass():
    rep = _build({"tox": {"pre": [0.5], "sft": [2.0], "dpo": [-1.0]}},
                 alternates={"delta-fd": {"tox": {"pre": [0.55], "sft": [1.9], "dpo": [-1.0]}}})  # fmt: skip
    row = rep.rows_for("tox")[1]
    assert row.ci_low is None and row.ci_high is None
    assert "[+2, +2]" not in rep.table() + rep.to_markdown()
    assert "one example: no sampling interval" in headline(rep, "tox", escape=str)
    assert "| 1 | sft | +2 | n/a (1 example) |" in rep.to_markdown()
    assert "### Behavior: tox (1 example)" in rep.to_markdown()
    t = rep.trust("tox")
    assert t["evidence"]["top_two_intervals_overlap"] is None
    assert "clear of the runner-up" not in t["reason"] and "the interval check did not apply" in t["reason"]
    assert AttributionReport.from_json(rep.to_json()) == rep
    assert T.intervals_overlap({"a": 2.0, "b": 1.0}, {"a": None, "b": None}) == (None, "a", "b")


def test_an_old_one_example_report_with_a_zero_width_interval_prints_none():
    rep = _build({"tox": {"pre": [0.5], "sft": [2.0]}})
    data = rep.to_dict()
    for row in data["rows"]:
        row["ci_low"] = row["ci_high"] = row["effect"]  # as written before one example got no interval
    old = AttributionReport.from_json(json.dumps(data))
    assert "[+2, +2]" not in old.table() + old.to_markdown()


# --- 5: two shares, two names ------------------------------------------------------------------------------------


def test_json_carries_the_shown_share_under_its_own_name_and_the_labels_differ():
    rep = _build({"t": {"a": [3.0, 3.0], "b": [-1.0, -1.0]}}, total_change={"t": 0.5})
    rows = json.loads(rep.to_json())["rows"]
    assert [r["share_of_abs_effects"] for r in rows] == pytest.approx([0.75, 0.25])
    assert [r["share"] for r in rows] == pytest.approx([6.0, -2.0])  # kept: effect ÷ total change
    assert rep.table().splitlines()[0].split()[-3:] == ["of", "Σ|effect|", "top"]
    assert "share_of_abs_effects" in rep.table() and "`share_of_abs_effects`" in rep.to_markdown()
    # an older report without the field still reads, and gets it from its effects
    data = rep.to_dict()
    for row in data["rows"]:
        del row["share_of_abs_effects"]
    old = AttributionReport.from_json(json.dumps(data))
    assert [r.share_of_abs_effects for r in old.rows] == pytest.approx([0.75, 0.25])


def test_no_total_change_does_not_say_the_filled_share_column_is_na():
    md = _build({"t": {"a": [3.0, 3.1], "b": [-1.0, -1.1]}}).to_markdown()
    assert "so shares and the interaction residual are n/a" not in md
    assert "the share of Σ\\|effect\\| above does not need it" in md


# --- 6: every interval says what it covers -----------------------------------------------------------------------


def test_every_printed_interval_says_it_covers_example_sampling_only():
    rep = _build({"t": {"a": [3.0, 3.2], "b": [-1.0, -1.1]}})
    assert rep.trust("t")["verdict"] == "unreliable"
    assert "95% interval (example sampling)" in rep.table().splitlines()[0]
    assert "intervals cover example sampling only" in rep.table()
    md = rep.to_markdown()
    assert "| 95 % interval (example sampling) |" in md
    assert "The intervals cover example sampling only, not the estimator's own error" in md  # unreliable too
    assert "95 % interval (example sampling) [" in headline(rep, "t", escape=str)
    assert "(example sampling only)" in rep.plot_figure()._suptitle.get_text()


# --- 7: the overlap reason says what it compares -----------------------------------------------------------------


def test_the_overlap_reason_names_the_size_ranges_it_compares():
    rep = _build({"t": {"sft": [1.5, 10.4, 6.0], "dpo": [-1.13, -1.65, -1.4]}},
                 alternates={"delta-fd": {"t": {"sft": [6.0], "dpo": [-1.4]}}})  # fmt: skip
    label = rep.trust("t")["label"]
    assert "top two stages' intervals overlap" not in label
    assert "the sizes of sft and dpo overlap within their intervals (|sft| ≥ " in label and ", |dpo| ≤ " in label


# --- 8: nothing moved, no top stage ------------------------------------------------------------------------------


def test_a_behavior_no_stage_moved_has_no_top_stage_mark_nor_ranking_reason():
    zero = {"pre": [0.0, 0.0], "sft": [0.0, 0.0], "dpo": [0.0, 0.0]}
    rep = _build({"zero": zero}, alternates={"delta-fd": {"zero": zero}})
    assert not any(line.rstrip().endswith(("*?", "*a", "*v")) for line in rep.table().splitlines()[2:5])
    t = rep.trust("zero")
    assert t["evidence"]["top_stage"] is None and "overlap" not in t["label"]
    assert "No stage moved zero" in headline(rep, "zero", escape=str)
    assert "none (every example's effect is 0)" in rep.to_markdown()


# --- 11: long names in the plot ----------------------------------------------------------------------------------


def test_long_names_are_shortened_in_the_plot_and_the_layout_applies():
    long_stage, long_behavior = "stage_" + "x" * 150, "behavior-" + "y" * 200
    rep = _build({long_behavior: {long_stage: [0.1, 0.2], "b": [1.0, 1.2]}, "t": {long_stage: [0.1], "b": [0.3]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" was a UserWarning
        fig = rep.plot_figure()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert max(len(label) for label in labels) <= 18 and labels[0].endswith("…")
    assert len(fig.axes[0].get_title().split("\n")[0]) <= 32


# --- 13: cosmetics -----------------------------------------------------------------------------------------------


def test_zero_effect_bars_are_not_coloured_as_raised():
    from matplotlib.colors import to_hex

    from hf_stage_attribution.report.plot import RAISED

    rep = _build({"t": {"a": [0.0, 0.0], "b": [1.0, 1.2]}})
    bars = fig_bars = rep.plot_figure().axes[0].patches
    assert to_hex(bars[0].get_facecolor()) != RAISED and to_hex(fig_bars[1].get_facecolor()) == RAISED


def test_a_replay_report_is_the_ground_truth_not_verified_by_itself():
    rep = _build({"t": {"a": [1.0, 1.1], "b": [0.2, 0.3]}}, estimator="replay")
    assert rep.trust("t")["label"] == "replay (ground truth)" and rep.trust("t")["verdict"] == "verified"
    assert "verified by replay" not in rep.table()
    rep.diagnostics["t"].trust["label"] = "verified by replay"  # as stored by an earlier release
    assert rep.trust("t")["label"] == "replay (ground truth)"


def test_an_older_report_checked_by_replay_apart_claims_no_sign_it_cannot_name():
    rep = _build({"f": {"ft": [1.6, 1.64], "refresh": [2.08, 2.09], "lora": [-0.73, -0.74]}})
    rep.verify_with_replay({"f": {"ft": -0.675, "refresh": 2.085, "lora": -0.735}})
    for row in rep.rows:
        row.replay_effect = None  # as verify_with_replay left it before it kept replay's values
    text = opposite_directions(rep, "f", escape=str)
    assert "raised by" not in text and "replay gives the other sign for 1 of these 3 stages" in text
