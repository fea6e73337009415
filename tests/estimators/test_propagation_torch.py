"""Ground truth for every recurrence family from torch itself (ESTIMATORS.md §3).

Two real ``torch.optim`` runs, driven by a real learning-rate scheduler, start from perturbed points; their difference
at the end is what :func:`run_recurrence` and :class:`StagePropagator` must reproduce from ``x0 = θ'₀ − θ''₀``.

Why this is exact, not approximate: the loss is linear in the parameters (or a centred quadratic for the curvature
argument), so the loss-gradient difference is ``0`` (or ``κ·x``) and coupled weight decay adds ``λ·x`` — linear in
``x``. The only nonlinearity left is the second-moment preconditioner ``1/(√v̂+ε)`` of Adam, RMSprop and Adagrad. The
two starts are placed symmetrically about the point where the total gradient vanishes, so the gradients of the two
runs are exact negatives of each other at every step, their second moments are identical (asserted below), and the
difference of the trajectories is exactly the linear recurrence with the preconditioner read from torch's own state
at that step. Where the gradient is the same in both runs (no coupled decay), ``v`` is identical trivially.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hf_stage_attribution.estimators.propagation.rules import (
    COUPLED_FAMILIES,
    FAMILIES,
    first_moment_key,
    preconditioner,
    run_recurrence,
)
from hf_stage_attribution.estimators.propagation.stage import StagePropagator
from hf_stage_attribution.ledger import StageLedger

F64 = torch.float64
STEPS = 12
CLASSES = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
TORCH_SECOND_MOMENT = {  # torch's own state keys (amsgrad divides by the running maximum)
    "adam": ("max_exp_avg_sq", "exp_avg_sq"),
    "adamw": ("max_exp_avg_sq", "exp_avg_sq"),
    "rmsprop": ("square_avg",),
    "adagrad": ("sum",),
}
CASES = [
    ("sgd", {"weight_decay": 0.3}),
    ("sgd", {"weight_decay": 0.3, "momentum": 0.0, "dampening": 0.5}),
    ("sgd", {"weight_decay": 0.3, "momentum": 0.9}),
    ("sgd", {"weight_decay": 0.3, "momentum": 0.9, "dampening": 0.4}),
    ("sgd", {"weight_decay": 0.3, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"weight_decay": 0.3, "momentum": 0.9, "maximize": True}),
    ("adam", {"weight_decay": 0.3}),
    ("adam", {"weight_decay": 0.3, "maximize": True}),
    ("adam", {"weight_decay": 0.3, "amsgrad": True}),
    ("adam", {"weight_decay": 0.0}),
    ("adamw", {"weight_decay": 0.3}),
    ("adamw", {"weight_decay": 0.3, "maximize": True}),
    ("rmsprop", {"weight_decay": 0.3}),
    ("rmsprop", {"weight_decay": 0.3, "momentum": 0.5}),
    ("adagrad", {"weight_decay": 0.3}),
    ("adagrad", {"weight_decay": 0.3, "lr_decay": 0.05}),
]
IDS = [f"{f}-" + "-".join(f"{k}={v}" for k, v in g.items()) for f, g in CASES]


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay: every step applies a different learning rate."""
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.005)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[4])


@dataclass
class Pair:
    group: dict  # the param group as torch holds it (all defaults filled in)
    x0: torch.Tensor
    buf0: torch.Tensor | None
    step0: int
    lrs: list[float]
    preconds: list[torch.Tensor]  # 1/(√v̂+ε) of each step, from torch's state (empty: no second moment)
    x: torch.Tensor
    buf: torch.Tensor | None


def loss_and_center(family: str, group: dict, curvature: float, n: int, gen: torch.Generator):
    """The loss and the point about which the total gradient (loss part and coupled decay) is odd."""
    if curvature:
        return (lambda p: 0.5 * curvature * (p * p).sum()), torch.zeros(n, dtype=F64)
    c = torch.randn(n, generator=gen, dtype=F64)
    sign = -1.0 if group.get("maximize") else 1.0
    lam = float(group.get("weight_decay", 0.0)) if family in COUPLED_FAMILIES else 0.0
    center = sign * c / lam if lam else torch.zeros(n, dtype=F64)
    return (lambda p: -(c * p).sum()), center


def torch_pair(
    family: str, group: dict, curvature: float = 0.0, warmup: int = 0, warmup_curvature: float = 0.0, n: int = 5
) -> Pair:
    """Run ``family`` from ``center ± s`` in lockstep; record x, the first-moment difference and the preconditioner.
    ``warmup_curvature``: the warm-up steps use ½κθ² instead (a first-moment difference for the stage to carry)."""
    gen = torch.Generator().manual_seed(0)
    loss, center = loss_and_center(family, group, curvature, n, gen)
    if warmup_curvature:
        assert not center.any()
        warmup_loss = lambda p: 0.5 * warmup_curvature * (p * p).sum()  # noqa: E731
    s = torch.randn(n, generator=gen, dtype=F64)
    params = [torch.nn.Parameter(center + s), torch.nn.Parameter(center - s)]
    opts = [CLASSES[family]([p], lr=0.05, **group) for p in params]
    scheds = [schedule(o) for o in opts]

    def step(objective=loss) -> float:
        applied = opts[0].param_groups[0]["lr"]
        for p, opt, sched in zip(params, opts, scheds):
            opt.zero_grad()
            objective(p).backward()
            opt.step()
            sched.step()
        return float(applied)

    def first_moment_difference() -> torch.Tensor | None:
        key = first_moment_key(family)
        states = [opt.state[p] for opt, p in zip(opts, params)]
        if key is None or key not in states[0]:
            return None
        return (states[0][key] - states[1][key]).to(F64)

    for _ in range(warmup):
        step(warmup_loss if warmup_curvature else loss)
    x0, buf0 = (params[0] - params[1]).detach().clone(), first_moment_difference()
    lrs, preconds = [], []
    for t in range(STEPS):
        lrs.append(step())
        states = [opt.state[p] for opt, p in zip(opts, params)]
        key = next((k for k in TORCH_SECOND_MOMENT.get(family, ()) if k in states[0]), None)
        if key is not None:
            assert torch.allclose(states[0][key], states[1][key], rtol=1e-14, atol=0)  # the premise of exactness
            steps_taken = float(states[0]["step"])
            assert steps_taken == warmup + t + 1
            preconds.append(preconditioner(family, opts[0].param_groups[0], states[0][key], steps_taken))
    x, buf = (params[0] - params[1]).detach(), first_moment_difference()
    group = {k: v for k, v in opts[0].param_groups[0].items() if k != "params"}
    return Pair(group, x0, buf0, warmup, lrs, preconds, x, buf)


def step_by_step(pair: Pair, family: str, curvature: float = 0.0):
    """``run_recurrence`` one step at a time, with torch's preconditioner of that step."""
    x, buf = pair.x0, pair.buf0
    for t, lr in enumerate(pair.lrs):
        precond = pair.preconds[t] if pair.preconds else 1.0
        x, buf = run_recurrence([lr], pair.group, family, curvature, x, buf, precond, step0=pair.step0 + t)
    return x, buf


def assert_close(actual, expected, tol=1e-12):
    actual = torch.as_tensor(actual, dtype=F64).expand_as(expected)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual - expected).abs().max()


def test_every_family_has_a_torch_ground_truth():
    """Lion has no torch implementation here (closed form below); ``frozen`` is checked below too."""
    assert set(FAMILIES) == set(CLASSES) | {"lion", "frozen"}
    assert {f for f, _ in CASES} == set(CLASSES)


@pytest.mark.parametrize(("family", "group"), CASES, ids=IDS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_recurrence_matches_two_torch_runs_on_a_linear_loss(family, group, warmup):
    pair = torch_pair(family, group, warmup=warmup)
    assert len(set(pair.lrs)) == STEPS  # a real schedule: a different rate at every step
    moved = (pair.x - pair.x0).abs().max()
    assert moved > 1e-3 or (family == "adam" and not group["weight_decay"])  # same gradient, same moments: D = 1
    x, buf = step_by_step(pair, family)
    assert_close(x, pair.x)
    if pair.buf is not None:
        assert_close(buf, pair.buf)
    # In one call over the whole stage where the preconditioner is constant (or does not enter)
    coupled = family in ("adam", "rmsprop", "adagrad") and group["weight_decay"]
    adam_tail = family in ("adam", "adamw") and pair.buf0 is not None
    if not coupled and not adam_tail:
        precond = pair.preconds[-1] if pair.preconds else 1.0
        x, _ = run_recurrence(pair.lrs, pair.group, family, 0.0, pair.x0, pair.buf0, precond, step0=pair.step0)
        assert_close(x, pair.x)


@pytest.mark.parametrize(("family", "group"), CASES, ids=IDS)
def test_recurrence_with_curvature_matches_two_torch_runs_on_a_quadratic_loss(family, group):
    """Loss ½κθ² from ±s: the gradient difference is κ·x, and ``curvature=κ`` must carry it exactly."""
    pair = torch_pair(family, group, curvature=0.7, warmup=2)
    x, buf = step_by_step(pair, family, curvature=0.7)
    assert_close(x, pair.x)
    if pair.buf is not None:
        assert_close(buf, pair.buf)
    # a wrong curvature is visible: the test can fail
    wrong, _ = step_by_step(pair, family, curvature=0.6)
    assert not torch.allclose(torch.as_tensor(wrong, dtype=F64).expand_as(pair.x), pair.x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("family", "group"), [("adam", {"weight_decay": 0.0}), ("adamw", {"weight_decay": 0.3})])
def test_adam_momentum_tail_without_gradient_difference(family, group):
    """Different first moments entering a stage whose gradients agree: only ``P·Δm`` moves ``x`` (the
    ``buf_scale`` path of the tensor transfer)."""
    pair = torch_pair(family, group, warmup=3, warmup_curvature=0.7)
    assert pair.buf0 is not None and pair.buf0.abs().min() > 1e-4
    x, buf = step_by_step(pair, family)
    assert_close(x, pair.x)
    assert_close(buf, pair.buf)
    assert (pair.x - pair.x0 * (pair.x / pair.x0)[0]).abs().max() > 1e-6  # per coordinate: P enters


def test_lion_and_frozen_closed_forms():
    """Lion's sign update has no first-order response (no torch Lion to run): only ``Π(1 − lr·λ)`` remains."""
    lrs = [0.01 * (t + 1) for t in range(6)]
    expected = 1.0
    for lr in lrs:
        expected *= 1 - lr * 0.3
    assert run_recurrence(lrs, {"weight_decay": 0.3, "betas": (0.9, 0.99)}, "Lion")[0] == pytest.approx(
        expected, 1e-15
    )
    x = torch.randn(4, dtype=F64)
    assert torch.equal(run_recurrence(lrs, {"weight_decay": 0.3}, "frozen", 0.7, x)[0], x)


# --- the stage propagator, on a recorded ledger stage ---------------------------------------------------------


class Vector(torch.nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(init.clone())


def record_run(tmp_path, family: str, group: dict, start: torch.Tensor, loss) -> StageLedger:
    """Run A of the pair again, recorded: per-step curvature segments keep the second moment of every step."""
    model = Vector(start)
    opt = CLASSES[family](model.parameters(), lr=0.05, **group)
    sched = schedule(opt)
    ledger = StageLedger(tmp_path / "ledger")
    batch = torch.zeros(2, 1, dtype=F64)
    loss_fn = lambda m, b: loss(m.w) + 0.0 * b.sum()  # noqa: E731
    with ledger.record_stage(
        "stage", model=model, optimizer=opt, scheduler=sched, loss_fn=loss_fn, num_steps=STEPS,
        curvature_segments=STEPS,
    ) as rec:  # fmt: skip
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            rec.step(batch)
            sched.step()
    return ledger


@pytest.mark.parametrize(("family", "group"), CASES, ids=IDS)
def test_stage_propagator_matches_two_torch_runs(tmp_path, family, group):
    gen = torch.Generator().manual_seed(0)
    loss, center = loss_and_center(family, group, 0.0, 5, gen)
    s = torch.randn(5, generator=gen, dtype=F64)
    pair = torch_pair(family, group)
    ledger = record_run(tmp_path, family, group, center + s, loss)
    stage = ledger.stages[0]
    assert [lr[0] for lr in stage.learning_rates] == pytest.approx(pair.lrs, rel=1e-15)
    prop = StagePropagator(stage)
    x, buf = prop.apply("w", pair.x0)
    assert buf is None or pair.buf is not None
    coupled = family in ("adam", "rmsprop", "adagrad") and group["weight_decay"]
    # the ledger keeps second moments in float32: the frozen-per-step preconditioner is exact to that precision
    assert_close(x, pair.x, tol=1e-6 if coupled else 1e-12)
    if not coupled:
        assert prop.factor("w") == pytest.approx(float((pair.x / pair.x0)[0]), rel=1e-12)


def test_centered_rmsprop_is_reported_as_an_approximation(tmp_path):
    """``preconditioner`` uses 1/(√v+ε) where centered RMSprop divides by √(v − ḡ²)+ε: the report must say so."""
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.estimators.propagation.stage import StagePropagator

    model = torch.nn.Linear(2, 1)
    ledger = StageLedger(tmp_path / "ledger")
    for name, centered in (("plain", False), ("centered", True)):
        opt = torch.optim.RMSprop(model.parameters(), lr=0.01, centered=centered)
        with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            rec.step()
    plain, centered = (StagePropagator(stage) for stage in ledger.stages)
    assert not any("centered" in a for a in plain.approximations)
    assert any("centered RMSprop" in a for a in centered.approximations)
