"""Which estimator checks a replaying estimate in the trust verdict (estimators.second_opinion): replay itself where
every later stage can be re-run, else task-vector negation; the other replay family at the same budget on request,
where the later stages have the form it needs."""

from __future__ import annotations

import pytest

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.errors import EstimatorError
from hf_stage_attribution.estimators import choose_second_opinion
from hf_stage_attribution.estimators import partial_replay as pr
from hf_stage_attribution.estimators import strided_replay as sr
from tests.helpers.replaying import count_stage_runs, small_digits

STRIDED = "strided-replay"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return small_digits(tmp_path_factory.mktemp("second-opinion"))["hf"]


def _without_keyword(fn, keyword):
    """``fn`` in a form without ``keyword`` (a stage function written before that form existed)."""
    if keyword == "grad_every":
        return lambda model, max_steps=None: fn(model, max_steps=max_steps)
    return lambda model, grad_every=1: fn(model, grad_every=grad_every)


def test_a_replaying_estimate_is_checked_by_replay_where_every_later_stage_replays(pipe):
    ledger, fns = pipe.ledger, pipe.stage_fns
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=fns)
    assert name == "replay" and "second_opinion='delta-fd'" in reason
    for estimator in ("partial-replay-linear", "strided-replay"):
        assert choose_second_opinion(ledger, estimator, stage_fns=fns, budget=0.5)[0] == "replay"
    for other in ("aa-linear", "aa-ggn", "delta-linear", "replay"):  # estimates that were not asked to replay
        assert choose_second_opinion(ledger, other, stage_fns=fns)[0] == "delta-fd"
    # replay on request checks any estimator where it can run, but never replay itself
    assert choose_second_opinion(ledger, "aa-linear", stage_fns=fns, requested="replay")[0] == "replay"
    assert choose_second_opinion(ledger, "replay", stage_fns=fns, requested="replay")[0] == "delta-fd"


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_at_budget_zero_or_one_the_estimate_is_aa_fd_or_replay(pipe, budget):
    name, reason = choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns, budget=budget)
    assert name == "delta-fd" and ("aa-fd" if budget == 0 else "replay itself") in reason
    for family in ("strided-replay", "partial-replay"):  # the same estimate as the other family at that budget
        asked = choose_second_opinion(
            pipe.ledger, "aa-linear", stage_fns=pipe.stage_fns, budget=budget, requested=family
        )
        assert asked[0] == "delta-fd" and "same estimate" in asked[1]
    asked = choose_second_opinion(
        pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns, budget=budget, requested="replay"
    )
    # asked for, replay checks the propagation-only estimate too; at budget 1 the estimate is replay already
    assert asked[0] == ("replay" if budget == 0 else "delta-fd")


def test_a_later_stage_that_replay_cannot_run_falls_back_to_task_vector_negation(pipe):
    ledger, fns = pipe.ledger, dict(pipe.stage_fns)
    last = ledger.stages[-1].name
    without_last = {name: fn for name, fn in fns.items() if name != last}
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=without_last)
    assert name == "delta-fd" and f"stage {last!r} has no function in stage_fns" in reason
    assert choose_second_opinion(ledger, "partial-replay")[0] == "delta-fd"  # no stage functions at all
    # only the stages after the attributed ones matter: the terminal stage has none to re-run
    assert choose_second_opinion(ledger, "partial-replay", [len(ledger.stages) - 1], without_last)[0] == "replay"


def test_a_later_stage_without_the_form_a_replay_family_needs_falls_back(pipe):
    ledger, fns = pipe.ledger, dict(pipe.stage_fns)
    last = ledger.stages[-1].name
    no_reuse = {**fns, last: _without_keyword(fns[last], "grad_every")}
    name, reason = choose_second_opinion(ledger, "partial-replay", stage_fns=no_reuse, requested="strided-replay")
    assert name == "delta-fd" and repr([last]) in reason and "grad_every" in reason
    assert choose_second_opinion(ledger, "partial-replay", stage_fns=no_reuse)[0] == "replay"  # replay needs neither
    no_limit = {**fns, last: _without_keyword(fns[last], "max_steps")}
    name, reason = choose_second_opinion(ledger, "strided-replay", stage_fns=no_limit, requested="partial-replay")
    assert name == "delta-fd" and repr([last]) in reason and "max_steps" in reason
    one = [len(ledger.stages) - 1]
    assert choose_second_opinion(ledger, "partial-replay", one, no_reuse, requested="strided-replay")[0] == (
        "strided-replay"
    )


def test_a_budget_that_buys_no_strided_pass_falls_back(pipe):
    fns = pipe.stage_fns
    name, reason = choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=fns, budget=1e-4, requested=STRIDED)
    assert name == "delta-fd" and "buys no pass" in reason


def test_the_attributor_checks_partial_replay_against_replay_and_strided_replay_when_asked(pipe, monkeypatch):
    behaviors = {name: pipe.behaviors[name] for name in ("margin_7", "margin_3")}
    pr._MEMO.clear()
    sr._MEMO.clear()
    # the default: replay checks it, as with validate=True (no strided replay, no linear sibling)
    ran = count_stage_runs(monkeypatch, sr)
    report = StageAttributor(pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False).attribute(
        behaviors
    )
    assert report.estimator == "partial-replay" and ran == [] and report.fidelity is not None
    validated = StageAttributor(pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False).attribute(
        behaviors, validate=True
    )
    for name in behaviors:
        verdict = report.trust(name)
        assert verdict["verdict"] in {"verified", "unreliable"} and "replay" in verdict["evidence"], verdict
        assert verdict == validated.trust(name)  # the same verdict validate=True gives
        replayed = [r.replay_effect for r in report.rows_for(name)]
        assert None not in replayed and replayed == [r.replay_effect for r in validated.rows_for(name)]
    monkeypatch.undo()
    # strided replay, asked for: the verdict is the agreement of the two estimates
    attributor = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, second_opinion=STRIDED
    )
    report = attributor.attribute(behaviors)
    assert report.fidelity is None
    for name in behaviors:
        verdict = report.trust(name)
        assert set(verdict["evidence"]["second_opinions"]) == {"partial-replay-linear", STRIDED}
        strided = verdict["evidence"]["second_opinions"][STRIDED]
        agrees = strided["top_stage_equal"] and strided["spearman"] >= 0.8 - 1e-9
        assert agrees or verdict["verdict"] == "unreliable", verdict
    # with validate, replay decides: no second opinion runs beside it (the report would not use its values)
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
    assert name == "strided-replay" and "second_opinion='replay'" in reason and "second_opinion='delta-fd'" in reason
    # ... but never the estimate's own family (the same estimate), and not where it does not apply
    for estimator in ("partial-replay", "partial-replay-linear"):
        name, reason = choose_second_opinion(ledger, estimator, stage_fns=fns, requested="partial-replay")
        assert name == "delta-fd" and "own estimate" in reason
    assert choose_second_opinion(ledger, "aa-linear", requested="strided-replay")[0] == "delta-fd"  # no stage fns


@pytest.mark.parametrize("value", ["validate", "strided", None, 1])
def test_an_unknown_second_opinion_is_a_clear_error(pipe, value):
    with pytest.raises(EstimatorError, match="expected one of 'auto', 'delta-fd', 'replay'"):
        StageAttributor(pipe.ledger, pipe.model, second_opinion=value, show_progress=False)


def test_the_attributor_runs_the_second_opinion_asked_for(pipe, monkeypatch):
    behaviors = {"margin_7": pipe.behaviors["margin_7"]}
    pr._MEMO.clear()
    ran = count_stage_runs(monkeypatch, sr)
    attributor = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, second_opinion="delta-fd"
    )
    report = attributor.attribute(behaviors)
    assert report.estimator == "partial-replay" and ran == [] and report.fidelity is None  # no replay of any kind
    assert set(report.trust("margin_7")["evidence"]["second_opinions"]) == {"partial-replay-linear", "delta-fd"}


def test_the_trust_verdicts_replay_families_are_the_estimators_names():
    """report/trust.py names the replay families without importing the estimators; they must stay the same names."""
    from hf_stage_attribution.estimators.second_opinion import REPLAY_CHECKS, STRIDED_REPLAY
    from hf_stage_attribution.estimators.selection import PARTIAL_REPLAY
    from hf_stage_attribution.report.trust import REPLAY_FAMILIES

    assert REPLAY_FAMILIES == {PARTIAL_REPLAY, STRIDED_REPLAY} == set(REPLAY_CHECKS.values())
