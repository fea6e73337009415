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
