"""Replay: reproduces θ_K with nothing removed, runs counterfactuals, and the first-order response."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import estimators
from hf_stage_attribution._internal.params import iter_merged_state
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.estimators.replay import replay_model
from hf_stage_attribution.ledger import StageLedger
from tests.helpers.frozen import frozen_layer_then_lora

STEPS = 8


def make_pipeline(tmp_path, seed=0):
    """Three stages on a tiny MLP (cross-entropy on shifting labels, SGD momentum then AdamW), with replay fns."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(32, 4)
    labels = [torch.randint(0, 3, (32,)) for _ in range(3)]
    makers = [
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, nesterov=True, momentum=0.5),
    ]

    def train(m, i, ledger=None):
        torch.manual_seed(100 + i)  # a stage's own randomness: dropout-free here, but seeds as a recipe would
        opt = makers[i](m.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3))
        ctx = ledger.record_stage(f"s{i + 1}", model=m, optimizer=opt) if ledger is not None else None
        rec = ctx.__enter__() if ctx else None
        for _ in range(STEPS):
            batch = torch.randperm(32)[:16]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[batch]), labels[i][batch]).backward()
            opt.step()
            if rec:
                rec.step()
            sched.step()
        if ctx:
            ctx.__exit__(None, None, None)

    ledger = StageLedger(tmp_path / "ledger")
    for i in range(3):
        train(model, i, ledger)
    fns = {f"s{i + 1}": (lambda m, i=i: train(m, i)) for i in range(3)}
    behavior = lambda m: torch.log_softmax(m(x), -1)[:, 0]  # noqa: E731
    return ledger, model, fns, behavior


def test_replay_with_nothing_removed_reproduces_final_state(tmp_path):
    ledger, model, fns, _ = make_pipeline(tmp_path)
    assert estimators.replay_gap(ledger, model, stage_fns=fns) < 1e-5
    again = replay_model(ledger, model, 1, stage_fns=fns, scale=1.0)  # re-run s3 from θ_2
    final = dict(iter_merged_state(model))
    assert max(float((t - final[n]).abs().max()) for n, t in iter_merged_state(again)) < 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    replay_model(ledger, model, 0, stage_fns=fns)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the final model is untouched


def test_replay_counterfactual_and_estimator(tmp_path):
    ledger, model, fns, behavior = make_pipeline(tmp_path)
    result = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    assert list(result.per_example) == ["s1", "s2", "s3"]
    assert result.diagnostics["stages_replayed"] == 3  # 2 for s1, 1 for s2, 0 for the last stage
    # the last stage needs no replay: its effect is f(θ_K) − f(θ_{K−1})
    prev = replay_model(ledger, model, 2)
    with torch.no_grad():
        assert torch.allclose(result.per_example["s3"], (behavior(model) - behavior(prev)).double(), atol=1e-6)
    # removing s1 and re-running s2, s3 differs from task-vector negation (later stages re-learn)
    delta = estimators.get("delta-fd").estimate(ledger, model, behavior, stages=["s1"])
    assert abs(delta.mean["s1"] - result.mean["s1"]) > 1e-3


def test_first_order_response_approaches_the_linear_estimate(tmp_path):
    ledger, model, fns, behavior = make_pipeline(tmp_path)
    last = estimators.first_order_response(ledger, model, behavior, "s3", eps=1e-3)
    linear = estimators.get("aa-linear").estimate(ledger, model, behavior, stages=["s3"])
    assert torch.allclose(last, linear.per_example["s3"], atol=2e-3)  # the last stage: first-order = ∇f·Δ_K
    response = estimators.first_order_response(ledger, model, behavior, "s1", eps=1e-2, stage_fns=fns)
    assert response.shape == (32,) and bool(torch.isfinite(response).all())


def test_replay_without_stage_functions_or_replay_data(tmp_path):
    ledger, model, fns, behavior = make_pipeline(tmp_path)
    with pytest.raises(ReplayError, match=r"s2.*stage_fns.*save_replay_data=True"):
        estimators.get("replay").estimate(ledger, model, behavior, stages=["s1"], stage_fns={"s3": fns["s3"]})


def test_stage_functions_may_return_a_new_model_and_receive_info(tmp_path):
    ledger, model, fns, behavior = make_pipeline(tmp_path)
    seen = []

    def s3(m, info):
        seen.append((info["stage"].name, info["removed"], info["scale"]))
        fns["s3"](m)
        return m

    out = replay_model(ledger, model, 1, stage_fns={**fns, "s3": s3})
    assert isinstance(out, torch.nn.Module) and seen == [("s3", 1, 0.0)]


def test_replay_copies_do_not_run_the_original_models_wrapped_forward(tmp_path):
    """Trainer/Accelerate leave ``model.forward`` as a closure over the original; replay must not use it."""
    import types

    from hf_stage_attribution.estimators.replay import load_state, working_copy

    model = torch.nn.Linear(2, 1)
    original_forward = model.forward
    model.forward = types.MethodType(lambda self, x: original_forward(x), model)  # what a wrapper looks like
    work = working_copy(model)
    load_state(work, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
    assert float(work(torch.ones(1, 2))) == 0.0
    assert float(model(torch.ones(1, 2))) != 0.0


def test_a_replayed_stage_leaves_no_gradients_and_its_moments_are_not_copied():
    """After a stage runs, its gradients are released; a step-limited stage's optimizer moments are handed on as the
    optimizer's own CPU tensors, not as a second copy."""
    from hf_stage_attribution.estimators.replay import run_stage

    kept = {}

    def fn(model, max_steps=None):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        for _ in range(max_steps or 3):
            opt.zero_grad()
            model(torch.ones(2, 4)).pow(2).sum().backward()
            opt.step()
        kept["opt"] = opt
        return model, opt

    class S:
        name, index, num_steps, learning_rates = "s", 0, 3, [[0.01]] * 3

    model = torch.nn.Linear(4, 2)
    model, state = run_stage(S(), model, {"s": fn}, {}, max_steps=2)
    assert all(p.grad is None for p in model.parameters())
    moments = kept["opt"].state[model.weight]
    assert state["weight"]["exp_avg"].data_ptr() == moments["exp_avg"].data_ptr()
    assert torch.equal(state["bias"]["exp_avg_sq"], kept["opt"].state[model.bias]["exp_avg_sq"])
    model, state = run_stage(S(), model, {"s": fn}, {})
    assert state is None and all(p.grad is None for p in model.parameters())


def test_replay_trains_only_what_each_stage_trained(tmp_path):
    """A copy of a final ``PeftModel`` is unloaded with every parameter trainable; replay gives each dense stage the
    flags the ledger recorded for it, so a layer the user froze stays frozen and nothing removed reproduces θ_K."""
    from hf_stage_attribution.estimators.replay import run_stage, working_copy

    ledger, model, fns, _ = frozen_layer_then_lora(tmp_path)
    s1 = ledger.stages[0]
    assert "0.weight" not in s1.trainable_parameters and "2.weight" in s1.trainable_parameters
    work = working_copy(model)
    before = work[0].weight.detach().clone()
    run_stage(s1, work, fns, {"stage": s1, "removed": None, "scale": 1.0})
    assert torch.equal(work[0].weight, before) and not work[0].weight.requires_grad
    assert estimators.replay_gap(ledger, model, stage_fns=fns) < 1e-5


def test_a_parameter_the_training_code_edits_without_grad_stays_untrained_in_replay(tmp_path):
    """A parameter without ``requires_grad`` that the training code edits in place is listed among the stage's
    trainable parameters (its change is in the delta) and, separately, as changed without grad: replay leaves it to the
    stage function's edit instead of training it, and reproduces θ_K."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model[0].bias.requires_grad_(False)

    def train(m, ledger=None):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
        ctx = ledger.record_stage("s1", model=m, optimizer=opt) if ledger is not None else None
        rec = ctx.__enter__() if ctx else None
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            with torch.no_grad():
                m[0].bias.mul_(0.9)  # an in-place edit, not an optimizer update
            if rec:
                rec.step()
        if ctx:
            ctx.__exit__(None, None, None)
        return m

    ledger = StageLedger(tmp_path / "ledger")
    with pytest.warns(UserWarning, match="without requires_grad changed"):
        train(model, ledger)
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert "0.bias" in stage.trainable_parameters and stage.changed_without_grad == ["0.bias"]
    model.requires_grad_(True)  # as a copy of an unloaded PeftModel would be
    assert estimators.replay_gap(ledger, model, stage_fns={"s1": train}) < 1e-6
