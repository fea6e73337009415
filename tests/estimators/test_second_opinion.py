"""Which estimator checks a replaying estimate in the trust verdict (estimators.second_opinion): the other replay
family at the same budget where the later stages have the form it needs, else task-vector negation."""

from __future__ import annotations

import pytest

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.errors import EstimatorError
from hf_stage_attribution.estimators import choose_second_opinion
from hf_stage_attribution.estimators import partial_replay as pr
from hf_stage_attribution.estimators import strided_replay as sr
from tests.helpers.replaying import count_stage_runs, small_digits


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return small_digits(tmp_path_factory.mktemp("second-opinion"))["hf"]


def _without_keyword(fn, keyword):
    """``fn`` in a form without ``keyword`` (a stage function written before that form existed)."""
    if keyword == "grad_every":
        return lambda model, max_steps=None: fn(model, max_steps=max_steps)
    return lambda model, grad_every=1: fn(model, grad_every=grad_every)


def test_a_replaying_estimate_is_checked_by_the_other_replay_family(pipe):
    ledger, fns = pipe.ledger, pipe.stage_fns
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=fns)
    assert name == "strided-replay" and "same budget (0.25)" in reason
    assert choose_second_opinion(ledger, "partial-replay-linear", stage_fns=fns)[0] == "strided-replay"
    assert choose_second_opinion(ledger, "strided-replay", stage_fns=fns, budget=0.5)[0] == "partial-replay"
    for other in ("aa-linear", "aa-ggn", "delta-linear", "replay"):
        assert choose_second_opinion(ledger, other, stage_fns=fns)[0] == "delta-fd"


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_at_budget_zero_or_one_both_families_are_the_same_estimate(pipe, budget):
    name, reason = choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns, budget=budget)
    assert name == "delta-fd" and ("aa-fd" if budget == 0 else "replay") in reason


def test_a_later_stage_without_the_needed_form_falls_back_to_task_vector_negation(pipe):
    ledger, fns = pipe.ledger, dict(pipe.stage_fns)
    last = ledger.stages[-1].name
    no_reuse = {**fns, last: _without_keyword(fns[last], "grad_every")}
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=no_reuse)
    assert name == "delta-fd" and repr([last]) in reason and "grad_every" in reason
    no_limit = {**fns, last: _without_keyword(fns[last], "max_steps")}
    name, reason = choose_second_opinion(ledger, "strided-replay", stage_fns=no_limit)
    assert name == "delta-fd" and repr([last]) in reason and "max_steps" in reason
    assert choose_second_opinion(ledger, "partial-replay")[0] == "delta-fd"  # no stage functions at all
    # only the stages after the attributed ones matter: the terminal stage has none to re-run
    assert choose_second_opinion(ledger, "partial-replay", [len(ledger.stages) - 1], no_reuse)[0] == "strided-replay"


def test_a_budget_that_buys_no_strided_pass_falls_back(pipe):
    name, reason = choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns, budget=1e-4)
    assert name == "delta-fd" and "buys no pass" in reason


def test_the_attributor_checks_partial_replay_against_strided_replay_unless_replay_runs(pipe, monkeypatch):
    behaviors = {name: pipe.behaviors[name] for name in ("margin_7", "margin_3")}
    pr._MEMO.clear()
    sr._MEMO.clear()
    attributor = StageAttributor(pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False)
    report = attributor.attribute(behaviors)
    assert report.estimator == "partial-replay"
    for name in behaviors:
        verdict = report.trust(name)
        assert set(verdict["evidence"]["second_opinions"]) == {"partial-replay-linear", "strided-replay"}
        strided = verdict["evidence"]["second_opinions"]["strided-replay"]
        agrees = strided["top_stage_equal"] and strided["spearman"] >= 0.8 - 1e-9
        assert agrees or verdict["verdict"] == "unreliable", verdict
    # with validate, replay decides: the cheap task-vector negation is the evidence beside it, no second replay
    ran = count_stage_runs(monkeypatch, sr)
    checked = attributor.attribute(behaviors, validate=True)
    assert ran == [] and {checked.trust(n)["verdict"] for n in behaviors} <= {"verified", "unreliable"}
    assert all("replay" in checked.trust(n)["evidence"] for n in behaviors)


def test_the_second_opinion_can_be_chosen(pipe):
    ledger, fns = pipe.ledger, pipe.stage_fns
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=fns, requested="delta-fd")
    assert name == "delta-fd" and "as asked" in reason
    # a replay family checks a propagation-only estimate where it applies, and says what it costs
    name, reason = choose_second_opinion(ledger, "aa-linear", stage_fns=fns, requested="strided-replay")
    assert name == "strided-replay" and "validate=True" in reason and "second_opinion='delta-fd'" in reason
    # ... but never the estimate's own family (the same estimate), and not where it does not apply
    for estimator in ("partial-replay", "partial-replay-linear"):
        name, reason = choose_second_opinion(ledger, estimator, stage_fns=fns, requested="partial-replay")
        assert name == "delta-fd" and "own estimate" in reason
    assert choose_second_opinion(ledger, "aa-linear", requested="strided-replay")[0] == "delta-fd"  # no stage fns


@pytest.mark.parametrize("value", ["replay", "strided", None, 1])
def test_an_unknown_second_opinion_is_a_clear_error(pipe, value):
    with pytest.raises(EstimatorError, match="expected one of 'auto', 'delta-fd'") as err:
        StageAttributor(pipe.ledger, pipe.model, second_opinion=value, show_progress=False)
    assert ("validate=True" in str(err.value)) == (value == "replay")


def test_the_attributor_runs_the_second_opinion_asked_for(pipe, monkeypatch):
    behaviors = {"margin_7": pipe.behaviors["margin_7"]}
    pr._MEMO.clear()
    ran = count_stage_runs(monkeypatch, sr)
    attributor = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, second_opinion="delta-fd"
    )
    report = attributor.attribute(behaviors)
    assert report.estimator == "partial-replay" and ran == []  # no strided replay ran
    assert set(report.trust("margin_7")["evidence"]["second_opinions"]) == {"partial-replay-linear", "delta-fd"}


def test_the_trust_verdicts_replay_families_are_the_estimators_names():
    """report/trust.py names the replay families without importing the estimators; they must stay the same names."""
    from hf_stage_attribution.estimators.second_opinion import REPLAY_CHECKS, STRIDED_REPLAY
    from hf_stage_attribution.estimators.selection import PARTIAL_REPLAY
    from hf_stage_attribution.report.trust import REPLAY_FAMILIES

    assert REPLAY_FAMILIES == {PARTIAL_REPLAY, STRIDED_REPLAY} == set(REPLAY_CHECKS.values())
