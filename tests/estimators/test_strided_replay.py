"""Strided replay (``estimators.strided_replay``): its exact limits (budget 0 = ``aa-fd``, budget 1 = replay), its
plan, gradient reuse in stage functions and Trainers (exact where the gradient does not change), and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import tests.helpers.recording as F
import tests.helpers.replaying as H
from hf_stage_attribution import estimators
from hf_stage_attribution.errors import BudgetError, PartialReplayError, ReplayError
from hf_stage_attribution.estimators import strided_replay as sr
from hf_stage_attribution.estimators.replay import can_replay
from hf_stage_attribution.integrations.replay import with_gradient_reuse

QUIET = {"check_model": False, "prepare_behavior": False}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small 3-stage digits pipeline per configuration (AdamW + warmup/decay; SGD momentum/nesterov + decay)."""
    return H.small_digits(tmp_path_factory.mktemp("digits"))


def _estimate(name, pipe, stage_fns=None, **options):
    sr._MEMO.clear()
    fns = pipe.stage_fns if stage_fns is None else stage_fns
    return estimators.get(name).estimate(pipe.ledger, pipe.model, H.joint(pipe), stage_fns=fns, **QUIET, **options)


@pytest.mark.parametrize("config", ["hf", "decay"])
def test_budget_one_equals_replay_and_budget_zero_equals_aa_fd(digits, config):
    pipe = digits[config]
    truth = _estimate("replay", pipe)
    one = _estimate("strided-replay", pipe, budget=1.0)
    zero = _estimate("strided-replay", pipe, budget=0.0)
    aa = _estimate("aa-fd", pipe)
    for stage in truth.per_example:
        torch.testing.assert_close(one.per_example[stage], truth.per_example[stage], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zero.per_example[stage], aa.per_example[stage], rtol=0, atol=0)
    assert one.diagnostics["strided_replay"]["cost_fraction"] == 1.0
    assert zero.diagnostics["strided_replay"]["passes_run"] == 0


def test_an_intermediate_budget_stays_within_it_and_the_last_stage_stays_exact(digits):
    pipe = digits["hf"]
    truth = _estimate("replay", pipe)
    for budget in (0.25, 0.5):
        result = _estimate("strided-replay", pipe, budget=budget)
        diag = result.diagnostics["strided_replay"]
        assert 0 < diag["passes_run"] <= budget * diag["replay_passes"]
        assert diag["strides"]["digits-clean"] == 0 and all(s >= 2 for s in list(diag["strides"].values())[:-1])
        last = pipe.ledger.stages[-1].name
        torch.testing.assert_close(result.per_example[last], truth.per_example[last], rtol=1e-5, atol=1e-5)
        assert any("fresh gradient every" in note for note in result.approximations)


def test_the_plan_picks_the_smallest_stride_whose_two_branches_fit():
    stages = [SimpleNamespace(index=i, num_steps=n, learning_rates=[[0.1]] * n) for i, n in enumerate((50, 30, 10))]
    ledger = SimpleNamespace(stages=stages)
    for budget in (0.1, 0.25, 0.5, 0.9):
        plan = sr.plan_strided_replay(ledger, 0, budget)
        cost = lambda s: 2 * (math.ceil(30 / s) + math.ceil(10 / s))  # noqa: E731
        assert plan.replay_passes == 40 and plan.cost_passes == cost(plan.stride) <= budget * 40
        assert plan.stride == 2 or cost(plan.stride - 1) > budget * 40
    assert sr.plan_strided_replay(ledger, 0, 0.05).stride == 0  # not one pass per stage fits: aa-linear
    assert sr.plan_strided_replay(ledger, 2, 0.5).stride == 0  # the terminal stage: nothing to replay


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan"), "half"])
def test_a_budget_outside_zero_one_is_refused(digits, budget):
    with pytest.raises(BudgetError, match="budget"):
        _estimate("strided-replay", digits["hf"], budget=budget)


def test_a_stage_function_without_the_gradient_reuse_form_is_refused_before_anything_runs(digits):
    pipe = digits["hf"]
    calls = []

    def plain(name):
        def fn(model, max_steps=None):  # step-limited, but no grad_every
            calls.append(name)
            return pipe.stage_fns[name](model, max_steps=max_steps)

        return fn

    fns = {name: plain(name) for name in pipe.stage_fns}
    with pytest.raises(PartialReplayError, match=r"grad_every") as err:
        _estimate("strided-replay", pipe, stage_fns=fns, budget=0.25)
    assert "with_gradient_reuse" in str(err.value) and not calls
    exact = _estimate("strided-replay", pipe, stage_fns=fns, budget=1.0)  # exact replay needs no reuse form
    assert set(exact.per_example) == {s.name for s in pipe.ledger.stages}
    with pytest.raises(PartialReplayError, match="replay data"):
        _estimate("strided-replay", pipe, stage_fns={}, budget=0.25)


def test_generating_trainer_stages_cannot_be_replayed_with_gradient_reuse():
    stage = SimpleNamespace(name="grpo", kind="grpo", num_steps=4, learning_rates=[[0.1]] * 4, replay_dir="x",
                            optimizer_state_policy="fresh")  # fmt: skip
    rewards = {"grpo": [len]}  # a GRPO stage replays only with its reward functions
    assert can_replay(stage, {}, reward_funcs=rewards) and not can_replay(
        stage, {}, grad_reuse=True, reward_funcs=rewards
    )
    assert not can_replay(stage, {})


# --- gradient reuse in a Trainer ---------------------------------------------------------------------------------


class _LinearLoss(torch.nn.Module):
    """``loss = −w · x`` (+ a bias term): its gradient does not depend on the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.zeros(()))
        self.forwards = 0

    def forward(self, x, labels=None):
        self.forwards += 1
        return {"loss": -(x * self.w).sum(-1).mean() - 0.5 * self.b}


def _train(trainer_cls, out):
    from transformers import Trainer  # noqa: F401  (the class under test derives from it)

    model = _LinearLoss()
    rows = [{"x": torch.tensor([1.0, -2.0, 0.5, 3.0]), "labels": torch.tensor(0)} for _ in range(32)]
    schedule = {"lr_scheduler_type": "linear", "warmup_steps": 2, "max_grad_norm": 1.0, "weight_decay": 0.1}
    args = F.training_args(str(out), max_steps=9, per_device_train_batch_size=4, learning_rate=0.05, **schedule)
    trainer_cls(model=model, args=args, train_dataset=rows).train()
    return model


@pytest.mark.parametrize("every", [2, 3, 4])
def test_gradient_reuse_is_exact_where_the_gradient_does_not_change_and_skips_the_passes(tmp_path, every):
    from transformers import Trainer

    full = _train(Trainer, tmp_path / "full")
    reused = _train(with_gradient_reuse(Trainer, every), tmp_path / "reused")
    for p, q in zip(full.parameters(), reused.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert full.forwards == 9 and reused.forwards == math.ceil(9 / every)


def test_with_gradient_reuse_refuses_a_stride_below_one():
    from transformers import Trainer

    with pytest.raises(ReplayError, match="grad_every"):
        with_gradient_reuse(Trainer, 0)


@pytest.fixture(scope="module")
def trainer_ledger(tmp_path_factory):
    """Two Trainer stages (warmup + linear decay, AdamW) of a tiny GPT-2, recorded with replay data."""
    return H.trainer_stages(tmp_path_factory.mktemp("strided-trainer"), ("first", "second", "third"))


def test_strided_replay_of_trainer_stages_matches_replay_at_budget_one_and_runs_within_budget(trainer_ledger):
    ledger, model, behavior = trainer_ledger
    sr._MEMO.clear()
    truth = estimators.get("replay").estimate(ledger, model, behavior, **QUIET)
    full = estimators.get("strided-replay").estimate(ledger, model, behavior, budget=1.0, **QUIET)
    H.assert_same_effects(full, truth, rtol=1e-4, atol=1e-4)
    part = estimators.get("strided-replay").estimate(ledger, model, behavior, budget=0.75, **QUIET)
    diag = part.diagnostics["strided_replay"]
    assert diag["strides"] == {"first": 3, "second": 3, "third": 0}  # 2·(2+2) ≤ 9 of 12; 2·2 ≤ 4.5 of 6
    assert diag["passes_run"] == 8 + 4 and all(torch.isfinite(v).all() for v in part.per_example.values())


def test_the_attributor_runs_strided_replay_and_calls_budget_one_verified_by_replay(digits):
    from hf_stage_attribution import StageAttributor

    pipe = digits["hf"]
    behaviors = {name: pipe.behaviors[name] for name in ("margin_7", "margin_3")}
    sr._MEMO.clear()
    report = StageAttributor(
        pipe.ledger, pipe.model, estimator="strided-replay", stage_fns=pipe.stage_fns, show_progress=False,
        estimator_options={"budget": 0.25}, second_opinion="partial-replay",
    ).attribute(behaviors)  # fmt: skip
    assert report.estimator == "strided-replay"
    evidence = report.diagnostics["margin_7"].trust["evidence"]
    assert "partial-replay" in evidence["second_opinions"]  # the other replay family checks it, as asked
    sr._MEMO.clear()
    exact = StageAttributor(
        pipe.ledger, pipe.model, estimator="strided-replay", stage_fns=pipe.stage_fns, show_progress=False,
        estimator_options={"budget": 1.0},
    ).attribute(behaviors)  # fmt: skip
    assert {exact.trust(name)["verdict"] for name in behaviors} == {"verified"}
