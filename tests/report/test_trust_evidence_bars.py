"""Verdicts that claimed more than their evidence (audit of the trust verdicts): each test builds the case the audit
found and checks the verdict no longer outruns what was checked."""

from __future__ import annotations

import json

from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report import trust as T


def test_a_second_opinion_that_moved_a_behavior_the_estimate_puts_at_zero_is_no_agreement():
    """An estimate of 0 at every stage (a piecewise-constant behavior read to first order) beside a second opinion
    that moved it was "estimated — estimators agree": with no top stage the disagreements were skipped."""
    zero = {"acc": {"pre": [0.0, 0.0, 0.0], "sft": [0.0, 0.0, 0.0], "dpo": [0.0, 0.0, 0.0]}}
    moved = {"acc": {"pre": [0.3, 0.4, 0.5], "sft": [-2.0, -2.2, -1.8], "dpo": [0.1, 0.1, 0.1]}}
    t = AttributionReport.build(zero, estimator="lora-exact", alternates={"delta-fd": moved}, versions={}).trust("acc")
    assert t["verdict"] == "unreliable"
    assert t["label"] == (
        "estimated — unreliable: delta-fd moved it (pre +0.4, sft -2, dpo +0.1) where lora-exact put every effect at 0"
    )
    assert t["evidence"]["sign_disagreements"] == {"delta-fd": ["pre", "sft", "dpo"]}
    # a second opinion that also put every effect at 0 does not contradict it (it is the same numbers: no check)
    zeros = {"delta-fd": {"a": 0.0, "b": 0.0}}
    still = T.assess_trust({"a": 0.0, "b": 0.0}, estimator="lora-exact", second_opinions=zeros)
    assert "moved it" not in still["label"]


def test_a_second_opinion_that_leaves_stages_out_is_no_check_of_them():
    """A second opinion of the top stage alone gave "agree ... on the signs and the ranking" with the other stages
    never checked; it is no check now, and what it covers can still contradict the estimate."""
    est = {"f": {"pre": [0.1, 0.12, 0.11], "sft": [2.0, 2.1, 1.9], "dpo": [-1.0, -1.1, -0.9]}}
    only_sft = {"delta-fd": {"f": {"sft": [2.0, 2.1, 1.9]}}}
    t = AttributionReport.build(est, estimator="lora-exact", alternates=only_sft, versions={}).trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"] == (
        "estimated — unreliable: nothing to check it against (no replay; delta-fd gave no effect for pre, dpo (not "
        "counted as a check))"
    )
    assert t["evidence"]["second_opinions_partial"] == {"delta-fd": ["pre", "dpo"]}
    effects = {"pre": 0.1, "sft": 2.0, "dpo": -1.0}
    full = {"pre": 0.11, "sft": 1.9, "dpo": -0.9}
    both = T.assess_trust(effects, estimator="lora-exact", second_opinions={"delta-fd": full, "tv": {"sft": 1.9}})
    assert both["verdict"] == "agree" and "tv gave no effect for pre, dpo (not counted as a check)" in both["reason"]
    wrong = T.assess_trust(effects, estimator="lora-exact", second_opinions={"delta-fd": full, "tv": {"sft": -1.9}})
    assert (
        wrong["verdict"] == "unreliable"
        and "lora-exact and tv disagree on the sign of 1 of 1 stages" in wrong["label"]
    )


def test_a_second_opinion_that_ties_the_top_stage_with_another_does_not_confirm_it():
    """A second opinion giving the top two stages exactly the same size had its tie broken by stage order and counted
    as agreeing on the top stage (one example: no interval check either)."""
    est = {"f": {"pre": [0.1], "sft": [2.0], "dpo": [-1.99]}}
    tied = {"delta-fd": {"f": {"pre": [0.1], "sft": [1.9], "dpo": [-1.9]}}}
    t = AttributionReport.build(est, estimator="lora-exact", alternates=tied, versions={}).trust("f")
    assert t["verdict"] == "unreliable"
    assert (
        t["label"] == "estimated — unreliable: delta-fd gives sft, dpo the same size (1.9), so it does not confirm sft"
    )
    assert t["evidence"]["second_opinion_top_ties"] == {"delta-fd": ["sft", "dpo"]}
    # the estimate's top stage first, by a margin: agreement as before
    ahead = T.assess_trust({"pre": 0.1, "sft": 2.0, "dpo": -1.0}, estimator="lora-exact",
                           second_opinions={"delta-fd": {"pre": 0.1, "sft": 1.9, "dpo": -1.1}})  # fmt: skip
    assert ahead["verdict"] == "agree"


def test_replay_of_some_stages_is_evidence_there_and_verifies_nothing():
    """Replay given for some stages only was dropped from the verdict: "estimators agree" beside a replay column that
    gave the headline's top stage the other sign."""
    est = {"f": {"pre": [0.1, 0.12, 0.11], "sft": [2.0, 2.1, 1.9], "dpo": [-1.0, -1.1, -0.9]}}
    fd = {"delta-fd": {"f": {"pre": [0.1] * 3, "sft": [1.9] * 3, "dpo": [-0.9] * 3}}}
    opposite = {"f": {"sft": [-2.0] * 3, "dpo": [-0.9] * 3}}
    t = AttributionReport.build(est, estimator="lora-exact", alternates=fd, replay=opposite, versions={}).trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"] == (
        "unreliable: replay disagrees — on the stages it ran for (sft, dpo): the estimate and replay disagree on the "
        "sign of 1 of 2 stages (sft: +2 vs -2)"
    )
    assert t["evidence"]["replay_some_stages"]["not_run"] == ["pre"]
    agreeing = {"f": {"sft": [1.8] * 3, "dpo": [-0.9] * 3}}
    t = AttributionReport.build(est, estimator="lora-exact", alternates=fd, replay=agreeing, versions={}).trust("f")
    assert (t["verdict"], t["label"]) == ("agree", "estimated — estimators agree")  # the second opinion's verdict
    assert t["reason"].startswith("Checked by replay on sft, dpo only (it agrees there on the top stage among them")
    assert "not on pre, so not verified" in t["reason"]


REPLAY_TIE = {"f": {"pre": [0.1, 0.12, 0.11, 0.1], "sft": [2.6, 2.7, 2.65, 2.9], "dpo": [-2.7, -2.6, -2.66, -2.8]}}


def test_ground_truth_whose_examples_do_not_separate_its_top_two_says_so():
    """Effects that are replay itself were "replay (ground truth)" with no look at whether replay's examples separate
    its top two stages, while the same numbers validating an estimate said replay does not tell which moved it more."""
    rep = AttributionReport.build(REPLAY_TIE, estimator="replay", versions={}, n_resamples=200)
    t = rep.trust("f")
    assert (t["verdict"], t["label"]) == (
        "verified",
        "replay (ground truth) — its examples do not separate sft and dpo",
    )
    sep = t["evidence"]["replay"]["top_separation"]
    assert (sep["top"], sep["runner_up"], sep["separated"]) == ("sft", "dpo", False)
    assert t["evidence"]["replay_top_tie"] == ["sft", "dpo"]
    # the same separation as where this replay validates an estimate
    validated = AttributionReport.build(
        REPLAY_TIE, estimator="aa-linear", replay=REPLAY_TIE, versions={}, n_resamples=200
    )
    assert validated.trust("f")["evidence"]["replay"]["top_separation"] == sep
    # a report stored without it (no verdict, or a verdict without the separation) gets it from its examples
    old = json.loads(rep.to_json())
    old["diagnostics"]["f"]["trust"] = {}
    assert AttributionReport.from_json(json.dumps(old)).trust("f")["label"] == t["label"]
    old["diagnostics"]["f"]["trust"] = {
        "verdict": "verified",
        "label": "replay (ground truth)",
        "reason": "",
        "evidence": {},
    }
    assert AttributionReport.from_json(json.dumps(old)).trust("f")["label"] == t["label"]
    separated = {"f": {"pre": [0.1, 0.12, 0.11, 0.1], "sft": [2.6, 2.7, 2.65, 2.9], "dpo": [-1.0, -1.1, -0.9, -1.0]}}
    apart = AttributionReport.build(separated, estimator="replay", versions={}, n_resamples=200).trust("f")
    assert apart["label"] == "replay (ground truth)" and apart["evidence"]["replay"]["top_separation"]["separated"]


def test_replay_fidelity_figures_without_sizes_do_not_verify():
    """A report stored without a verdict, with one behavior's replay fidelity figures, was "verified by replay" from
    top stage, signs and Spearman alone, with every estimate 10× replay's size (scale-free error 4.5 ignored)."""
    rep = AttributionReport.build(
        {"f": {"pre": [0.1, 0.12, 0.11], "sft": [2.0, 2.1, 1.9], "dpo": [-1.0, -1.1, -0.9]}},
        estimator="aa-linear", versions={},
    )  # fmt: skip
    rep.diagnostics["f"].trust = {}  # as written before verdicts existed
    figures = {"n_pairs": 3, "spearman": 1.0, "sign_agreement": 1.0, "top_stage_agreement": 1.0}
    rep.fidelity = {"all": {**figures, "scale_free_error": 4.5, "scale_free_error_per_behavior": {"f": 4.5}}}
    t = rep.trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"].startswith("unreliable: replay disagrees — sizes: the median stage's error is 4.5× replay's")
    rep.fidelity = {"all": {**figures, "scale_free_error": 0.05, "scale_free_error_per_behavior": {"f": 0.05}}}
    t = rep.trust("f")
    assert t["verdict"] == "unreliable" and "hold no per-stage sizes" in t["label"]


def _edited(report: AttributionReport, **trust) -> AttributionReport:
    data = json.loads(report.to_json())
    data["diagnostics"]["f"]["trust"] = trust
    return AttributionReport.from_json(json.dumps(data))


def test_a_stored_verdict_must_be_backed_by_what_the_report_stores():
    """A report.json edited to say "verified" with no replay anywhere rendered "verified by replay"; a stored verdict
    without a label rendered none. Now an unbacked verdict is assessed again from the stored figures and a missing
    label is rebuilt from the verdict."""
    est = {"f": {"pre": [0.1, 0.12, 0.11], "sft": [2.0, 2.1, 1.9], "dpo": [-1.0, -1.1, -0.9]}}
    rep = AttributionReport.build(est, estimator="aa-linear", versions={})
    original = rep.trust("f")
    claimed = _edited(rep, **{**original, "verdict": "verified", "label": "verified by replay", "reason": "Agrees."})
    t = claimed.trust("f")
    assert t["verdict"] == "unreliable" and t["label"] == original["label"]
    assert t["evidence"]["stored_verdict_unsupported"]["verdict"] == "verified"
    assert "Verdict: verified by replay" not in claimed.to_markdown()
    agree = _edited(rep, **{**original, "verdict": "agree", "label": "estimated — estimators agree"})
    assert agree.trust("f")["verdict"] == "unreliable"  # no second opinion stored
    unlabelled = _edited(rep, verdict="unreliable")
    assert unlabelled.trust("f")["label"] == "estimated — unreliable: the stored verdict gives no reason"
    assert "Verdict: estimated — unreliable" in unlabelled.to_markdown()
    # a verdict backed by what is stored stays as written, its lost label rebuilt
    fd = {"delta-fd": {"f": {"pre": [0.1] * 3, "sft": [1.9] * 3, "dpo": [-0.9] * 3}}}
    agreed = AttributionReport.build(est, estimator="aa-linear", alternates=fd, versions={})
    assert agreed.trust("f")["verdict"] == "agree"
    kept = _edited(agreed, **{**agreed.trust("f"), "label": ""})
    assert (kept.trust("f")["verdict"], kept.trust("f")["label"]) == ("agree", "estimated — estimators agree")
    replayed = AttributionReport.build(est, estimator="aa-linear", replay=est, versions={})
    assert _edited(replayed, **replayed.trust("f")).trust("f") == replayed.trust("f")


def test_ground_truth_headline_and_card_name_neither_of_two_stages_its_examples_do_not_separate():
    from hf_stage_attribution.model_card.writer import card_metadata
    from hf_stage_attribution.report.text import headline

    rep = AttributionReport.build(REPLAY_TIE, estimator="replay", versions={}, n_resamples=200)
    line = headline(rep, "f", escape=str)
    assert line.startswith("Replay (ground truth): sft and dpo moved f about as much (+2.713 and -2.69")
    assert "the most" not in line
    assert card_metadata(rep)["behaviors"][0]["top_stage_tied_with"] == "dpo"


def test_the_console_footer_says_replay_names_the_top_stage_only_where_it_ran_for_every_stage():
    estimate = {"f": {"pre": [0.1, 0.1], "sft": [2.0, 2.1], "dpo": [-1.0, -1.0]}}
    some = AttributionReport.build(estimate, estimator="x", replay={"f": {"sft": -2.0, "dpo": -0.9}}, versions={})
    every = AttributionReport.build(estimate, estimator="x", replay={"f": {"pre": 3.0, "sft": -2.0, "dpo": -0.9}},
                                    versions={})  # fmt: skip
    assert "top = replay's top stage where it ran for every stage (else the estimate's)" in some.table()
    assert "replay = ground truth, and top = replay's top stage;" in every.table()
