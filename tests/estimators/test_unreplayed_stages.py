"""Where the default budget buys no replayed step (the next stage is too short: one step from each of two starts costs
more than 25 % of its steps), partial replay is the propagation-only carry there, and nothing may present it as a
replay: ``auto`` falls back when that holds for every stage and says which stages it holds for otherwise, the
report's approximations name those stages, and the trust verdict checks them against task-vector negation instead
of strided replay (which, at the same budget, would be propagation too)."""

from __future__ import annotations

import torch

from hf_stage_attribution import StageAttributor, StageLedger, estimators
from hf_stage_attribution.behaviors import PerExample
from hf_stage_attribution.estimators.partial_plan import unreplayed_stages

X = torch.linspace(-1, 1, 12).reshape(4, 3)


def _pipeline(root, steps: dict[str, int]):
    """Adam stages of the given lengths on a small tanh model; stage functions in the step-limited and the
    gradient-reuse forms (so strided replay would be the usual check)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ledger = StageLedger(root)

    def train(m, k: int, n: int, grad_every: int = 1):
        opt, grads = torch.optim.Adam(m.parameters(), lr=0.05), None
        for t in range(n):
            if t % grad_every == 0:  # a fresh gradient every grad_every steps, re-used in between
                opt.zero_grad()
                ((m(X) - k) ** 2).mean().backward()
                grads = [p.grad.clone() for p in m.parameters()]
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()

    for k, (name, n) in enumerate(steps.items()):
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with ledger.record_stage(name, model=model, optimizer=opt, curvature_segments=0) as rec:
            for _ in range(n):
                opt.zero_grad()
                ((model(X) - k) ** 2).mean().backward()
                opt.step()
                rec.step()

    def fn(k: int, n: int):
        def replay(m, max_steps=None, grad_every=1):
            train(m, k, n if max_steps is None else max_steps, grad_every)

        return replay

    fns = {name: fn(k, n) for k, (name, n) in enumerate(steps.items())}
    return ledger, model, fns


def _behavior():
    return PerExample(lambda m, batch: m(torch.stack(batch))[:, 0], list(X), batch_size=4)


def test_a_stage_whose_next_stage_is_too_short_is_named_and_checked_by_replay(tmp_path):
    ledger, model, fns = _pipeline(tmp_path / "ledger", {"a": 8, "b": 16, "c": 2})
    assert unreplayed_stages(ledger, range(3), 0.25) == ["b"]  # a: 1 step of b from each start; b: c has 2 steps
    strided = "strided-replay"
    assert estimators.choose_second_opinion(ledger, "partial-replay", [0], fns, requested=strided)[0] == strided
    name, reason = estimators.choose_estimator(ledger, stage_fns=fns)
    assert name == "partial-replay" and "no step fits for ['b']" in reason
    second, why = estimators.choose_second_opinion(ledger, "partial-replay", stage_fns=fns, requested=strided)
    assert second == "delta-fd" and "['b']" in why  # strided replay buys no pass there either
    assert estimators.choose_second_opinion(ledger, "partial-replay", stage_fns=fns)[0] == "replay"  # the default
    report = StageAttributor(ledger, model, stage_fns=fns, show_progress=False).attribute({"out": _behavior()})
    assert report.estimator == "partial-replay"
    assert any("replayed no optimizer step for ['b']" in note for note in report.approximations)
    assert "replay" in report.trust("out")["evidence"] and report.fidelity is not None
    asked = StageAttributor(ledger, model, stage_fns=fns, show_progress=False, second_opinion=strided)
    assert asked.attribute({"out": _behavior()}).trust("out")["evidence"]["second_opinions"].keys() >= {"delta-fd"}


def test_auto_does_not_pick_partial_replay_where_it_would_replay_nothing(tmp_path):
    ledger, model, fns = _pipeline(tmp_path / "ledger", {"a": 4, "b": 2})
    name, reason = estimators.choose_estimator(ledger, stage_fns=fns)
    assert name != "partial-replay"
    assert "partial replay not used: at budget 0.25 it would replay no optimizer step for any stage" in reason
    with_more = _pipeline(tmp_path / "longer", {"a": 4, "b": 8})
    assert estimators.choose_estimator(with_more[0], stage_fns=with_more[2])[0] == "partial-replay"


def test_auto_judges_and_names_the_budget_it_is_given(tmp_path):
    """``auto`` with ``budget=1.0`` ran partial replay at 1.0 while its reason said "budget 0.25", and judged
    whether any step fits at 0.25."""
    ledger, model, fns = _pipeline(tmp_path / "ledger", {"a": 4, "b": 2})
    assert estimators.choose_estimator(ledger, stage_fns=fns)[0] != "partial-replay"  # at 0.25 no step fits
    name, reason = estimators.choose_estimator(ledger, stage_fns=fns, budget=1.0)
    assert name == "partial-replay" and "at budget 1 (100 % of replay's optimizer steps)" in reason
    attributor = StageAttributor(ledger, model, stage_fns=fns, show_progress=False, estimator_options={"budget": 1.0})
    report = attributor.attribute({"out": _behavior()})
    assert report.estimator == "partial-replay" and "at budget 1 (100 % of" in report.estimator_reason
    name, reason = estimators.choose_estimator(ledger, stage_fns=fns, budget=0.0)
    assert name != "partial-replay" and "at budget 0 it would replay no optimizer step" in reason
    assert "a budget of 0 buys none" in reason and "too short" not in reason  # the budget, not the stages' length
