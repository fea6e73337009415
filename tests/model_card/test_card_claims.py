"""The card's claims follow their evidence (the trust audit: H1, M2, M5, M7): a top stage among some of the
ledger's stages says so in the prose and the YAML, replay values in the rows count as replay having run, the YAML
states no sign the prose withholds, and a "verified" headline gives replay's measured size beside the estimate's."""

from __future__ import annotations

import yaml

from hf_stage_attribution import write_model_card
from hf_stage_attribution.report import AttributionReport

LEDGER = {"name": "ledger", "num_stages": 3, "stage_names": ["base", "clean", "patch"]}


def _card(tmp_path, report: AttributionReport) -> tuple[str, dict]:
    files = write_model_card(report, tmp_path / "README.md", plot=False)
    text = files.readme.read_text(encoding="utf-8")
    return text, yaml.safe_load(text.split("---")[1])["stage_attribution"]


def test_card_of_a_subset_names_the_stages_left_out_in_the_prose_and_the_yaml(tmp_path):
    report = AttributionReport.build(
        {"loss": {"base": [0.1, 0.12, 0.11], "clean": [-0.46, -0.47, -0.45]}}, estimator="aa-linear",
        stages=["base", "clean"], replay={"loss": {"base": [0.1] * 3, "clean": [-0.46] * 3}}, ledger=LEDGER,
        versions={}, n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, report)
    intro = "**Only 2 of the ledger's 3 stages were attributed (not attributed: patch): each top stage and share"
    assert intro in text
    (claim,) = [line for line in text.splitlines() if " the most (" in line]
    assert claim.startswith("**clean** lowered loss the most (")
    assert "Among the 2 attributed stages of 3 only (not attributed: patch)" in claim
    assert claim.endswith("Verdict: verified by replay.")
    assert meta["stages_not_attributed"] == ["patch"]
    assert meta["behaviors"][0]["top_stage"] == "clean"
    assert meta["behaviors"][0]["top_stage_not_compared_with"] == ["patch"]


def test_card_of_every_stage_has_no_coverage_keys(tmp_path):
    report = AttributionReport.build(
        {"loss": {"base": [0.1, 0.1], "clean": [-0.5, -0.5], "patch": [-1.6, -1.6]}}, estimator="aa-linear",
        ledger=LEDGER, versions={}, n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, report)
    assert "stages_not_attributed" not in meta and "top_stage_not_compared_with" not in meta["behaviors"][0]
    assert "attributed stage" not in text and "were attributed" not in text


# --- M2: replay values beside every estimate are replay having run -----------------------------------------------


def _estimate() -> AttributionReport:
    return AttributionReport.build(
        {"f": {"pre": [0.1, 0.12, 0.11], "sft": [2.0, 2.1, 1.9], "dpo": [-1.0, -1.1, -0.9]}}, estimator="aa-linear",
        versions={}, n_resamples=200,
    )  # fmt: skip


def test_card_after_verify_with_replay_does_not_say_replay_was_not_run(tmp_path):
    report = _estimate()
    report.verify_with_replay({"f": {"pre": 0.1, "sft": 1.8, "dpo": -0.9}})
    assert report.fidelity is None  # replay ran apart: no fidelity figures, its values are in the rows
    text, meta = _card(tmp_path, report)
    assert "Verdict: verified by replay." in text
    assert "Replay was not run" not in text and "not been checked against ground truth" not in text
    assert (
        "Replay re-ran the later stages without each stage: its measured effects are the replay (ground truth)" in text
    )
    assert meta["replay_validated"] is True and meta["behaviors"][0]["top_stage_trust"] == "verified"
    assert "Replay was not run" not in report.to_markdown()


def test_card_without_replay_still_says_it_was_not_run(tmp_path):
    text, meta = _card(tmp_path, _estimate())
    assert "Replay was not run for this report: the effects above have not been checked against ground truth." in text
    assert meta["replay_validated"] is False


# --- M5: the YAML states no sign the prose withholds --------------------------------------------------------------


def test_yaml_direction_is_not_settled_where_the_prose_withholds_the_sign(tmp_path):
    across_zero = AttributionReport.build(
        {"f": {"pre": [0.05, -0.05, 0.04, -0.03], "sft": [3.0, -1.0, 2.5, -0.9]}}, estimator="aa-linear",
        versions={}, n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, across_zero)
    assert "Its interval includes 0: the examples cannot tell this effect from none." in text
    entry = meta["behaviors"][0]
    assert entry["direction"] == "not settled" and entry["direction_not_settled_because"] == "its interval includes 0"
    size_off = AttributionReport.build(
        {"f": {"pre": [0.1, 0.1, 0.1], "sft": [2.0, 2.1, 1.9]}}, estimator="lora-exact",
        alternates={"delta-fd": {"f": {"pre": [0.1, 0.1, 0.1], "sft": [0.5, 0.6, 0.4]}}}, versions={}, n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, size_off)
    assert "**sft** moved f the most (" in text and "its sign is not settled" in text
    assert meta["behaviors"][0]["direction"] == "not settled"
    settled = _estimate()
    assert _card(tmp_path, settled)[1]["behaviors"][0]["direction"] == "raised"


# --- M7: replay's measured size beside a "verified" estimate, in the prose and the YAML --------------------------


def test_card_gives_replays_size_beside_a_verified_estimate(tmp_path):
    report = AttributionReport.build(
        {"f": {"pre": [0.1, 0.12, 0.11, 0.1], "sft": [1.9, 1.95, 1.85, 1.9], "dpo": [-0.5, -0.55, -0.45, -0.5]}},
        estimator="aa-linear", replay={"f": {"pre": [0.1] * 4, "sft": [1.0] * 4, "dpo": [-0.5] * 4}}, versions={},
        n_resamples=200,
    )  # fmt: skip
    text, meta = _card(tmp_path, report)
    (claim,) = [line for line in text.splitlines() if " the most (" in line]
    assert claim.startswith("**sft** raised f the most (+1.9 behavior units")
    assert claim.endswith("; replay measured +1). Verdict: verified by replay.")
    entry = meta["behaviors"][0]
    assert entry["top_stage_effect"] == 1.9 and entry["top_stage_replay_effect"] == 1.0
