"""The card qualifies its "most accountable stage" with the trust verdict: never unqualified when it is unreliable."""

from __future__ import annotations

import numpy as np
import yaml

from hf_stage_attribution import write_model_card
from hf_stage_attribution.report import AttributionReport

STAGES = ["pretraining", "sft", "dpo"]


def _card(tmp_path, alternates) -> str:
    rng = np.random.default_rng(0)
    means = {"pretraining": 0.3, "sft": 2.0, "dpo": -0.5}
    per_example = {"toxicity": {s: rng.normal(mu, 0.05, 30) for s, mu in means.items()}}
    report = AttributionReport.build(
        per_example, estimator="aa-ggn", stages=STAGES, behaviors={"toxicity": {"unit": "nats"}},
        alternates={name: {"toxicity": dict(zip(STAGES, v))} for name, v in alternates.items()}, versions={},
    )  # fmt: skip
    files = write_model_card(report, tmp_path / "README.md", plot=False)
    return files.readme.read_text(encoding="utf-8")


def _claim(card: str) -> str:
    (line,) = [line for line in card.splitlines() if " the most (" in line and " Verdict: " in line]
    return line


def test_estimators_that_disagree_on_the_top_stage_make_the_card_say_unreliable(tmp_path):
    card = _card(tmp_path, {"aa-ggn-fd": [[2.6], [1.9], [-0.4]]})  # the finite-difference reading names pretraining
    claim = _claim(card)
    assert claim.startswith("**sft** raised toxicity the most (+2.0")
    assert (
        "Verdict: estimated — unreliable: aa-ggn and aa-ggn-fd name different top stages (sft and pretraining)"
        in claim
    )
    assert "relative linearisation gap 0.89 on stage pretraining" in claim
    meta = yaml.safe_load(card.split("---")[1])["stage_attribution"]
    assert meta["behaviors"][0]["top_stage"] == "sft" and meta["behaviors"][0]["top_stage_trust"] == "unreliable"


def test_agreeing_estimators_and_replay_are_labelled_as_such(tmp_path):
    agree = _card(tmp_path, {"aa-ggn-fd": [[0.32], [1.95], [-0.5]], "delta-fd": [[0.25], [1.8], [-0.45]]})
    assert _claim(agree).endswith("Verdict: estimated — estimators agree.")
    verified = _card(tmp_path, {"aa-ggn-fd": [[2.6], [1.9], [-0.4]], "replay": [[0.2], [1.7], [-0.6]]})
    assert _claim(verified).endswith("Verdict: verified by replay.")


def _replay_family_card(tmp_path, strided: list[float], replay: list[float] | None = None) -> str:
    """SmolLM2's shape: partial replay's finite-difference reading, its linear read-out 46 % off on `sft`, and
    strided replay as the second opinion (values per stage sft, lora, dpo)."""
    rng = np.random.default_rng(0)
    stages = ["sft", "lora", "dpo"]
    means = {"sft": 4.8, "lora": -0.2, "dpo": -1.1}
    per_example = {"toxicity": {s: rng.normal(mu, 0.05, 20) for s, mu in means.items()}}
    alternates = {
        "partial-replay-linear": {"toxicity": {"sft": [2.6], "lora": [-0.2], "dpo": [-1.0]}},
        "strided-replay": {"toxicity": {s: [v] for s, v in zip(stages, strided)}},
    }
    if replay is not None:
        alternates["replay"] = {"toxicity": {s: [v] for s, v in zip(stages, replay)}}
    report = AttributionReport.build(
        per_example, estimator="partial-replay", stages=stages, behaviors={"toxicity": {"unit": "nats"}},
        alternates=alternates, versions={},
    )  # fmt: skip
    files = write_model_card(report, tmp_path / "README.md", plot=False)
    return files.readme.read_text(encoding="utf-8")


def _after_claim(card: str) -> str:
    lines = card.splitlines()
    at = lines.index(_claim(card))
    return lines[at + 2] if lines[at + 1] == "" else lines[at + 1]


def test_the_card_says_what_supports_a_verdict_that_is_not_unreliable(tmp_path):
    """The card says what supports "estimators agree" (which checks agreed, on what) and "verified by replay"; an
    unreliable verdict's label already says why, so no evidence line follows it."""
    agree = _replay_family_card(tmp_path, strided=[4.0, -0.25, -1.1])
    assert _claim(agree).endswith("Verdict: estimated — estimators agree.")
    evidence = _after_claim(agree)
    assert evidence.startswith(
        "Evidence: Not checked by replay; partial-replay-linear, strided-replay agree(s) with partial-replay on the "
        "top stage (sft), the signs and the ranking"
    )
    assert "within a factor of 2" in evidence and "the intervals cover example sampling only" in evidence
    verified = _card(tmp_path, {"aa-ggn-fd": [[2.6], [1.9], [-0.4]], "replay": [[0.2], [1.7], [-0.6]]})
    assert _after_claim(verified).startswith("Evidence: Exact replay agrees: it names sft as the top stage too")
    unreliable = _card(tmp_path, {"aa-ggn-fd": [[2.6], [1.9], [-0.4]]})
    assert "Evidence:" not in unreliable


def test_the_gap_diagnostic_says_when_the_verdict_does_not_count_it(tmp_path):
    """Where the other replay family checked partial replay's embedding, the gap line says it is not counted and
    why (instead of "not trustworthy" beside an "agree"); with task-vector negation as the check it still warns."""
    checked = _replay_family_card(tmp_path, strided=[4.0, -0.25, -1.1])
    (gap,) = [line for line in checked.splitlines() if line.startswith("- Linearisation gap")]
    assert "(share of the largest effect): sft +2.19" in gap and "(46 %)" in gap
    assert gap.endswith(
        "Not counted in the verdict: partial-replay reads the embedding it replayed exactly, and strided-replay "
        "checked that embedding by another route, so the gap is the linear read-out's error."
    )
    assert "not trustworthy" not in gap
    # no curvature in partial replay's aa-linear carry: no "unstable curvature modes: 0" line suggesting some
    assert "Unstable curvature modes" not in checked
    assert "- Unstable curvature modes damped to zero: 0." in _card(tmp_path, {"aa-ggn-fd": [[2.6], [1.9], [-0.4]]})
    rng = np.random.default_rng(0)
    means = {"sft": 4.8, "lora": -0.2, "dpo": -1.1}
    report = AttributionReport.build(
        {"toxicity": {s: rng.normal(mu, 0.05, 20) for s, mu in means.items()}}, estimator="partial-replay",
        stages=["sft", "lora", "dpo"], behaviors={"toxicity": {"unit": "nats"}}, versions={},
        alternates={"partial-replay-linear": {"toxicity": {"sft": [2.6], "lora": [-0.2], "dpo": [-1.0]}},
                    "delta-fd": {"toxicity": {"sft": [4.0], "lora": [-0.25], "dpo": [-1.1]}}},
    )  # fmt: skip
    (tmp_path / "negation").mkdir()
    card = write_model_card(report, tmp_path / "negation" / "README.md", plot=False).readme.read_text("utf-8")
    (gap,) = [line for line in card.splitlines() if line.startswith("- Linearisation gap")]
    assert gap.endswith("A large gap means the first-order step in f is not trustworthy for that stage.")
    assert "relative linearisation gap 0.46 on stage sft" in _claim(card)
    verified = _replay_family_card(tmp_path, strided=[4.0, -0.25, -1.1], replay=[4.9, -0.21, -1.1])
    assert _claim(verified).endswith("Verdict: verified by replay.")
    (gap,) = [line for line in verified.splitlines() if line.startswith("- Linearisation gap")]
    assert gap.endswith("not trustworthy for that stage; the verdict rests on replay, not on this reading.")
