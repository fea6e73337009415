"""Trust verdicts on constructed per-example effects: each verdict, each reason, the JSON round trip, old reports."""

from __future__ import annotations

import numpy as np
import pytest

from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report import trust as T
from hf_stage_attribution.report.text import claimed_top_stage

STAGES = ["pretraining", "sft", "lora", "dpo"]


def _effects(means, sd=0.05, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {stage: rng.normal(mu, sd, n) for stage, mu in zip(STAGES, means)}


def _report(means, alternates=None, sd=0.05, estimator="aa-linear", **kwargs) -> AttributionReport:
    alt = {name: {"f": _effects(m, sd=0.0)} for name, m in (alternates or {}).items()}
    return AttributionReport.build(
        {"f": _effects(means, sd)}, estimator=estimator, stages=STAGES, alternates=alt, versions={}, **kwargs
    )


OURS = [0.2, 2.0, -0.6, 0.1]


def test_replay_that_agrees_verifies_the_claim():
    rep = _report(OURS, {"replay": [0.25, 1.8, -0.5, 0.12], "aa-fd": [3.0, 0.1, 0.1, 0.1]})
    t = rep.trust("f")
    assert (t["verdict"], t["label"]) == ("verified", "verified by replay")  # replay outranks any second opinion
    assert t["evidence"]["replay"]["top_stage_equal"] and t["evidence"]["replay"]["spearman"] == pytest.approx(1.0)
    assert t["evidence"]["intervals"] == T.INTERVAL_SCOPE and "example sampling only" in t["reason"]
    assert rep.top_stage_claim("f") == {"stage": "sft", "effect": rep.rows[1].effect, "verdict": "verified",
                                        "label": "verified by replay", "source": "replay", "estimated_stage": "sft",
                                        "replay_effect": 1.8}  # fmt: skip


def test_the_claimed_top_stage_is_replays_where_replay_ran():
    """``top_stage_claim`` names what the headline and the card name: replay's top stage where it ran for every
    stage (it returned the estimate's while the card named replay's)."""
    rep = _report(OURS, {"replay": [2.5, 1.8, -0.5, 0.1]})
    claim = rep.top_stage_claim("f")
    assert (claim["stage"], claim["source"], claim["estimated_stage"]) == ("pretraining", "replay", "sft")
    assert claim["replay_effect"] == 2.5 and claim["effect"] == rep.rows[0].effect
    assert claim["verdict"] == "unreliable"
    assert claimed_top_stage(rep, "f") == claim["stage"]
    still = _report([0.0, 0.0, 0.0, 0.0], sd=0.0)
    assert still.top_stage_claim("f")["stage"] is None  # no stage moved it: none is named


@pytest.mark.parametrize(
    ("replay", "why"),
    [
        ([2.5, 1.8, -0.5, 0.1], "replay names pretraining as the top stage, the estimate sft"),
        ([0.25, 1.8, 0.5, 0.12], "disagree on the sign of 1 of 4 stages"),
        ([-0.5, 1.8, 0.4, 0.3], "replay ranks the stages differently (Spearman 0.20)"),
    ],
)
def test_replay_that_disagrees_makes_it_unreliable(replay, why):
    t = _report(OURS, {"replay": replay}).trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"].startswith("unreliable: replay disagrees — ") and why in t["label"]


def test_a_top_stage_replay_ties_with_its_own_is_not_contradicted_but_every_other_check_still_holds():
    """Replay is exact for the examples it ran on; where they do not separate its top two stages, an estimate naming
    the runner-up is verified (with a label that says so) if signs, ranking and sizes agree — and only then."""
    est, replay = {"a": 0.2, "b": 2.0, "c": 1.9}, {"a": 0.25, "b": 1.8, "c": 1.81}
    plain = T.assess_trust(est, estimator="aa-linear", replay=replay)
    assert plain["label"] == ("unreliable: replay disagrees — replay names c as the top stage, the estimate b; replay "
                              "ranks the stages differently (Spearman 0.50)")  # fmt: skip
    tied = T.assess_trust(est, estimator="aa-linear", replay=replay, replay_tie=["c", "b"])
    assert (tied["verdict"], tied["label"]) == ("verified", "verified by replay — replay does not separate c and b")
    assert tied["evidence"]["replay_top_tie"] == ["c", "b"]
    assert tied["evidence"]["replay"]["spearman"] == pytest.approx(0.5)  # the point ranking stays in the evidence
    assert tied["evidence"]["replay_tie_spearman"] == pytest.approx(np.sqrt(0.75))  # ranks (1, 3, 2) vs (1, 2.5, 2.5)
    assert "Spearman over 3 stages 0.87 with those two as tied" in tied["reason"]
    other = T.assess_trust(est, estimator="aa-linear", replay=replay, replay_tie=["c", "a"])  # not the estimate's top
    assert other["verdict"] == "unreliable" and "replay_top_tie" not in other["evidence"]
    wrong_sign = T.assess_trust({**est, "a": -0.3}, estimator="aa-linear", replay=replay, replay_tie=["c", "b"])
    assert wrong_sign["label"].startswith(
        "unreliable: replay disagrees — the estimate and replay disagree on the sign"
    )
    assert "names c as the top stage" not in wrong_sign["label"]  # the tie is not a reason; the sign is
    too_big = T.assess_trust({**est, "b": 4.0}, estimator="aa-linear", replay=replay, replay_tie=["c", "b"])
    assert too_big["label"] == "unreliable: replay disagrees — b's size is 2.2× replay's (+4 vs +1.8)"
    same_top = T.assess_trust({**est, "c": 2.1}, estimator="aa-linear", replay=replay, replay_tie=["c", "b"])
    assert same_top["label"] == "verified by replay" and "replay_top_tie" not in same_top["evidence"]


def test_one_adjacent_swap_meets_the_ranking_bar():
    # sizes within 2-fold of replay (problem 10 of the audit: "verified" covers sizes too)
    assert _report(OURS, {"replay": [0.11, 1.8, -0.5, 0.12]}).trust("f")["verdict"] == "verified"  # Spearman 0.8


def test_a_negligible_stage_may_have_either_sign():
    # dpo moves the behavior by < 5 % of the largest effect on both sides: its sign is not a claim
    t = _report(OURS, {"replay": [0.25, 1.8, -0.5, -0.01]}).trust("f")
    assert t["verdict"] == "verified" and t["evidence"]["replay"]["signs_compared"] == 3


def test_estimators_that_agree_without_replay():
    rep = _report(OURS, {"aa-fd": [0.21, 1.9, -0.58, 0.1], "delta-fd": [0.3, 1.7, -0.4, 0.12]})
    t = rep.trust("f")
    assert (t["verdict"], t["label"]) == ("agree", "estimated — estimators agree")
    assert set(t["evidence"]["second_opinions"]) == {"aa-fd", "delta-fd"}
    assert t["evidence"]["max_relative_linearisation_gap"] == pytest.approx(0.1 / 2.0, abs=0.02)
    assert t["evidence"]["top_two_intervals_overlap"] is False


def test_estimators_naming_different_top_stages_are_unreliable():
    t = _report(OURS, {"aa-fd": [2.5, 1.9, -0.58, 0.1]}).trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"].startswith("estimated — unreliable: aa-linear and aa-fd name different top stages (sft and "
                                 "pretraining)")  # fmt: skip


def test_a_large_linearisation_gap_is_unreliable_even_when_the_top_stage_agrees():
    t = _report(OURS, {"aa-fd": [0.2, 2.0, 0.3, 0.1]}).trust("f")  # lora: -0.6 linear, +0.3 fd
    assert t["verdict"] == "unreliable"
    assert "relative linearisation gap 0.45 on stage lora" in t["label"]
    assert "aa-linear and aa-fd disagree on the sign of 1 of 4 stages" in t["label"]


def test_the_last_stage_of_a_finite_difference_estimate_is_exact_so_its_linear_reading_is_no_check():
    """f(θ_K) − f(θ_K − Δ_K) is replay itself for the ledger's last stage: there the linear sibling's reading (and
    its gap) measures the linear read-out's own error, not the estimate's. The same numbers with the linear
    read-out as the estimate keep that gap: it *is* the estimate's error then."""
    ours, linear = [0.2, 0.6, -0.3, 2.0], [0.21, 0.58, -0.29, -0.9]  # dpo read linearly: wrong sign, not the top
    strided = [0.22, 0.55, -0.31, 2.0]  # the independent check of a replaying estimate
    opinions = {"partial-replay-linear": linear, "strided-replay": strided}
    fd = _report(ours, opinions, sd=0.0, estimator="partial-replay")
    t = fd.trust("f")
    assert t["verdict"] == "agree" and t["evidence"]["exact_stages"] == ["dpo"]
    assert fd.diagnostics["f"].linearisation_gap["dpo"]["fd_exact"] is True  # still shown, marked
    assert "fd_exact" not in fd.diagnostics["f"].linearisation_gap["sft"]
    lin = _report(linear, {"partial-replay": ours}, sd=0.0, estimator="partial-replay-linear").trust("f")
    assert lin["verdict"] == "unreliable" and "exact_stages" not in lin["evidence"]
    assert "relative linearisation gap 1.45 on stage dpo" in lin["label"]
    # without the ledger's last stage among the stages the effects cover, no stage is exact
    sub = AttributionReport.build(
        {"f": _effects(ours, 0.0)}, estimator="partial-replay", stages=STAGES + ["later"], versions={},
        alternates={"partial-replay-linear": {"f": _effects(linear, sd=0.0)}},
    )  # fmt: skip
    assert sub.trust("f")["verdict"] == "unreliable" and "exact_stages" not in sub.trust("f")["evidence"]


def test_a_second_opinion_more_than_twofold_off_on_a_stage_leaves_its_sign_unsettled():
    """The MiniLM recipe's case: partial and strided replay at one budget agreed on the top stage, the signs and the
    ranking (+1.62 and +0.79 on the first stage) while replay said −0.68 there. A second opinion that is more than
    twice (or under half) the estimate on a stage that moved the behavior does not settle that stage's sign; the
    linear sibling's own disagreement is judged by the linearisation gap instead."""
    ours, linear = [1.62, 2.09, -0.73, 0.3], [1.55, 2.0, -0.34, 0.3]  # lora read linearly: −0.34, gap 0.19 < 0.25
    strided = [0.79, 2.08, -0.73, 0.3]

    def verdict(second):
        alt = {"partial-replay-linear": linear, "strided-replay": second}
        return _report(ours, alt, sd=0.0, estimator="partial-replay").trust("f")

    t = verdict(strided)
    assert t["verdict"] == "unreliable"
    assert t["label"] == ("estimated — unreliable: partial-replay and strided-replay differ more than 2-fold on "
                          "pretraining (+1.62 vs +0.79), so the sign is not settled")  # fmt: skip
    assert t["evidence"]["unsettled_signs"] == {"strided-replay": ["pretraining"]}  # not the sibling (lora 2.1-fold)
    assert t["evidence"]["second_opinions"]["strided-replay"]["top_stage_equal"]  # the other checks all pass
    ok = verdict([0.85, 2.08, -0.73, 0.3])  # 1.9-fold: within the factor
    assert ok["verdict"] == "agree" and ok["evidence"]["unsettled_signs"] == {"strided-replay": []}
    assert "strided-replay also put(s) every stage that moved the behavior within a factor of 2" in ok["reason"]
    # a stage that moved nothing on either side (under 5 % of the largest effect) is not a sign claim
    assert T.unsettled_signs({"a": 2.0, "b": 0.09}, {"a": 2.0, "b": 0.01}) == []
    assert T.unsettled_signs({"a": 2.0, "b": 0.3}, {"a": 2.0, "b": -0.9}) == []  # opposite signs: the sign check's


def test_the_gap_of_a_replaying_fd_estimate_checked_by_the_other_replay_family_is_not_a_reason():
    """SmolLM2's case: partial replay read by finite difference, strided replay agreeing on everything, and a
    linearisation gap of about half the largest effect — replay verified the claims. The gap is the linear
    read-out's error there; with task-vector negation as the check, or for the linear read-out itself, it counts."""
    ours, linear = [0.2, 2.0, -0.6, 0.1], [0.2, 1.0, -0.6, 0.1]  # sft read linearly: 1.0, gap 0.5 of the largest
    strided = [0.25, 1.8, -0.55, 0.1]

    def verdict(estimator, sibling, second_name, second=strided):
        alt = {sibling: linear, second_name: second}
        return _report(ours, alt, sd=0.0, estimator=estimator).trust("f")

    t = verdict("partial-replay", "partial-replay-linear", "strided-replay")
    assert t["verdict"] == "agree", t["label"]
    assert t["evidence"]["linearisation_gap_counted"] is False
    assert t["evidence"]["max_relative_linearisation_gap"] == pytest.approx(0.5)  # still in the evidence
    assert "The linearisation gap (0.50 of the largest effect, on sft) is the linear read-out's error" in t["reason"]
    # the other replay family must itself agree: a disagreement on the ranking is still unreliable
    bad = verdict("partial-replay", "partial-replay-linear", "strided-replay", second=[0.25, 1.8, 0.6, -0.9])
    assert bad["verdict"] == "unreliable" and "linearisation gap" not in bad["label"]
    # task-vector negation shares none of the replay: the gap still counts
    neg = verdict("partial-replay", "partial-replay-linear", "delta-fd")
    assert neg["verdict"] == "unreliable" and "relative linearisation gap 0.50 on stage sft" in neg["label"]
    assert neg["evidence"]["linearisation_gap_counted"] is True
    # the linear read-out as the estimate: the gap is its own error
    lin = _report(linear, {"partial-replay": ours, "strided-replay": strided}, sd=0.0,
                  estimator="partial-replay-linear").trust("f")  # fmt: skip
    assert lin["verdict"] == "unreliable" and "relative linearisation gap 0.50 on stage sft" in lin["label"]


def test_overlapping_intervals_of_the_top_two_stages_are_unreliable():
    close = [0.2, 2.0, -1.95, 0.1]
    rep = _report(close, {"aa-fd": close}, sd=1.0)
    t = rep.trust("f")
    assert t["verdict"] == "unreliable" and t["evidence"]["top_two_intervals_overlap"] is True
    assert "the sizes of sft and lora overlap within their intervals (|sft| ≥ " in t["label"]  # |effect| ranges
    # the same means with tight intervals agree
    assert _report(close, {"aa-fd": close, "delta-fd": close}, sd=0.01).trust("f")["verdict"] == "agree"


def test_a_second_opinion_with_the_same_numbers_is_not_counted_as_a_check():
    """``aa-fd`` and task-vector negation coincide where the later stages carry an update unchanged (Adam without
    weight decay: five of the six benchmark pipelines); the agreement of a computation with itself is no evidence."""
    same = {"delta-fd": OURS}
    alone = _report(OURS, same, sd=0.0, estimator="aa-fd").trust("f")
    assert alone["verdict"] == "unreliable" and alone["evidence"]["same_as_estimate"] == ["delta-fd"]
    assert alone["label"] == "estimated — unreliable: nothing to check it against (no replay, no second estimate)"
    with_sibling = _report(OURS, {**same, "aa-linear": [0.21, 1.9, -0.58, 0.1]}, sd=0.0, estimator="aa-fd")
    t = with_sibling.trust("f")
    # the sibling reads the same stage embeddings: it checks the read-out, not the propagation (an auditor's case:
    # the card said "estimators agree" with nothing independent behind it)
    assert t["verdict"] == "unreliable" and t["evidence"]["same_as_estimate"] == ["delta-fd"]
    assert t["label"] == (
        "estimated — unreliable: no independent second opinion (delta-fd gave the same numbers as aa-fd; aa-linear "
        "read(s) the same stage embeddings)"
    )
    independent = {**same, "aa-linear": [0.21, 1.9, -0.58, 0.1], "aa-ggn-fd": [0.25, 1.8, -0.5, 0.12]}
    t = _report(OURS, independent, sd=0.0, estimator="aa-fd").trust("f")
    assert t["verdict"] == "agree" and t["evidence"]["same_as_estimate"] == ["delta-fd"]
    assert "aa-linear, aa-ggn-fd, linearisation gap agree(s) with aa-fd" in t["reason"]
    assert "delta-fd gave the same numbers as aa-fd" in t["reason"]
    nearly = _report(OURS, {"delta-fd": [0.2, 2.0, -0.6, 0.1001]}, sd=0.0, estimator="aa-fd").trust("f")
    assert "same_as_estimate" not in nearly["evidence"] and nearly["verdict"] == "agree"  # a real, if small, change


def test_nothing_to_check_against_is_not_presented_as_agreement():
    t = _report(OURS).trust("f")
    assert t["verdict"] == "unreliable"
    assert t["label"] == "estimated — unreliable: nothing to check it against (no replay, no second estimate)"


def test_replay_as_the_estimator_is_verified_and_verdicts_survive_json(tmp_path):
    assert _report(OURS, estimator="replay").trust("f")["verdict"] == "verified"
    rep = _report(OURS, {"aa-fd": [2.5, 1.9, -0.58, 0.1]})
    back = AttributionReport.from_json(rep.to_json(tmp_path / "r.json"))
    assert back == rep and back.diagnostics["f"].trust["verdict"] == "unreliable"
    assert "Verdict: estimated — unreliable: aa-linear and aa-fd name different top stages" in rep.to_markdown()
    assert "Evidence:" not in rep.to_markdown()  # an unreliable label says why itself
    verified = _report(OURS, estimator="replay").to_markdown().split("\n\n")
    claim = next(i for i, block in enumerate(verified) if "Verdict: replay (ground truth)." in block)
    assert verified[claim + 1].startswith("Evidence: The effects are exact replay (ground truth).")
    top_line = next(line for line in rep.table().splitlines() if " sft " in line)
    assert top_line.rstrip().endswith("*?")


def test_a_report_without_a_verdict_is_assessed_from_its_stored_figures():
    rep = _report(OURS, {"aa-fd": [0.21, 1.9, -0.58, 0.1]})
    rep.diagnostics["f"].trust = {}  # as written before verdicts existed
    t = rep.trust("f")
    # such a report stored the linearisation pair's two readings, no independent second opinion
    assert t["verdict"] == "unreliable" and "assessed_from" in t["evidence"]
    assert "no independent second opinion (no second estimate ran; aa-fd read(s) the same" in t["label"]
    for row, truth in zip(rep.rows, [2.5, 1.8, -0.5, 0.1]):
        row.replay_effect = truth
    assert rep.trust("f")["label"].startswith("unreliable: replay disagrees — replay names pretraining")
    for row in rep.rows:
        row.replay_effect = None
    rep.fidelity = {"all": {"n_pairs": 4, "spearman": 1.0, "sign_agreement": 1.0, "top_stage_agreement": 1.0,
                            "scale_free_error_per_behavior": {"f": 0.1}}}  # fmt: skip
    # a one-behavior fidelity is this behavior's; it holds no per-stage sizes, so it cannot verify
    assert rep.trust("f")["label"].startswith("estimated — unreliable: replay's stored figures agree on the top stage")
    rep.fidelity["all"]["scale_free_error_per_behavior"] = {"f": 0.1, "g": 0.2}
    assert rep.trust("f") == t  # pooled over behaviors: not this behavior's, so the stored figures decide


def test_compare_and_spearman_match_their_definitions():
    assert T.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert T.spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)  # one adjacent swap: the bar
    assert T.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254037844387)  # tied ranks averaged
    c = T.compare({"a": 1.0, "b": -0.2}, {"a": 0.0, "b": 0.0})
    assert c["top_stage_equal"] and c["sign_agreement"] == 0.0 and c["signs_compared"] == 2
    assert T.intervals_overlap({"a": 1.0, "b": -0.5}, {"a": (0.4, 1.6), "b": (-0.6, -0.4)}) == (True, "a", "b")
    assert T.intervals_overlap({"a": 1.0, "b": -0.5}, {"a": (0.7, 1.3), "b": (-0.6, -0.4)})[0] is False
    assert T.intervals_overlap({"a": 1.0, "b": 0.1}, {"a": (-0.2, 2.0), "b": (0.0, 0.2)})[0] is True  # a spans 0


def test_the_attributor_gives_every_behavior_a_verdict_from_the_evidence_it_ran(tmp_path):
    from hf_stage_attribution import StageAttributor, estimators
    from tests.helpers.attributor import behaviors_for, record_pipeline, stage_fns

    ledger, model = record_pipeline(tmp_path / "ledger")
    fns = stage_fns()
    plain = StageAttributor(ledger, model, estimator="aa-linear", stage_fns=fns, show_progress=False)
    report = plain.attribute(behaviors_for())
    for name in ("target-logit", "logit-0"):
        t = report.trust(name)
        assert t["verdict"] in ("agree", "unreliable") and "replay" not in t["evidence"]
        assert set(t["evidence"]["second_opinions"]) == {"aa-fd", "delta-fd"}  # the pair and task-vector negation
        assert t["evidence"]["linearisation_pair"] == ["aa-linear", "aa-fd"]
    validated = plain.attribute(behaviors_for(), validate=True)
    for name in ("target-logit", "logit-0"):
        t = validated.trust(name)
        result = estimators.get("replay").estimate(ledger, model, behaviors_for()[name], stage_fns=fns)
        replay = {stage: float(v.mean()) for stage, v in result.per_example.items()}
        expected = T.compare({r.stage: r.effect for r in validated.rows_for(name)}, replay)
        evidence = dict(t["evidence"]["replay"])
        assert evidence.pop("top_separation")["top"] == max(replay, key=lambda s: abs(replay[s]))
        assert evidence == pytest.approx(expected)
        agrees = not T._disagreements(expected, "the estimate", "replay")
        assert t["verdict"] == ("verified" if agrees else "unreliable")
    no_diagnostics = StageAttributor(ledger, model, estimator="aa-linear", diagnostics=False, show_progress=False)
    assert (
        no_diagnostics.attribute(behaviors_for())
        .trust("logit-0")["label"]
        .startswith("estimated — unreliable: nothing to check it against")
    )


def test_replay_run_separately_replaces_the_estimated_verdict():
    rep = _report(OURS, {"aa-fd": [0.21, 1.9, -0.58, 0.1], "delta-fd": [0.3, 1.7, -0.4, 0.12]})
    assert rep.trust("f")["verdict"] == "agree"
    truth = AttributionReport.build({"f": _effects([2.5, 1.8, -0.5, 0.1])}, estimator="replay", stages=STAGES,
                                    versions={})  # fmt: skip
    rep.verify_with_replay(truth)
    t = rep.trust("f")
    assert t["label"].startswith(
        "unreliable: replay disagrees — replay names pretraining as the top stage, the estimate sft"
    )
    assert t["evidence"]["without_replay"] == {"verdict": "agree", "label": "estimated — estimators agree"}
    rep.verify_with_replay({"other": {"sft": 1.0}})  # a behavior replay does not cover keeps its verdict
    assert rep.trust("f") == t
