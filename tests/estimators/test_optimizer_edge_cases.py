"""Estimators on optimizer set-ups the benchmark pipelines do not use (custom loops, tiny models).

- a fresh torch ``Adagrad`` later stage (state built at construction) is carried as fresh, never through its zero sum;
- ``auto`` falls back to ``delta-fd``, with the stage and optimizer named, when a later stage cannot be propagated;
- a tensor the later stage never stepped (grad None) is carried unchanged, so linear later stages stay exact;
- ``aa-ggn`` notes a later stage's gradient clipping, which its curvature carry does not model;
- a stage with a metric-driven schedule (``reduce_lr_on_plateau``) is refused by replay from its replay data.
"""

from __future__ import annotations

import pytest
import torch

import hf_stage_attribution.ledger.recorder as recorder_module
from hf_stage_attribution import StageLedger, estimators
from hf_stage_attribution.errors import ReplayError, UnsupportedOptimizerError
from hf_stage_attribution.estimators.curvature.propagation import clipping_note
from hf_stage_attribution.estimators.propagation.rules import preconditioner
from hf_stage_attribution.estimators.propagation.stage import StagePropagator, carry_problem
from hf_stage_attribution.estimators.replay import can_replay
from hf_stage_attribution.estimators.selection import choose_estimator
from tests.helpers.tiny import TwoLinear

STEPS = 6


def _run(model, loss, make, rec=None, steps=STEPS):
    opt = make(model)
    ctx = rec(model, opt) if rec else None
    r = ctx.__enter__() if ctx else None
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
        if r:
            r.step()
    if ctx:
        ctx.__exit__(None, None, None)


def _pipeline(tmp_path, later, *, later_loss=None, metadata=None):
    """Stage ``s1``: SGD on cross-entropy; stage ``s2``: ``later`` on a loss linear in θ (no curvature)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    gen = torch.Generator().manual_seed(1)
    coef = {n: 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    linear = later_loss or (lambda m: -sum((coef[n] * p).sum() for n, p in m.named_parameters()))
    first = lambda m: torch.optim.SGD(m.parameters(), lr=0.2)  # noqa: E731
    recipes = [("s1", lambda m: torch.nn.functional.cross_entropy(m(x), y), first), ("s2", linear, later)]
    ledger = StageLedger(tmp_path / "ledger")
    for name, loss, make in recipes:
        meta = metadata if name == "s2" else None
        _run(model, loss, make, lambda m, o, n=name, meta=meta: ledger.record_stage(n, model=m, optimizer=o,
                                                                                    metadata=meta))  # fmt: skip
    fns = {n: (lambda m, loss=loss, make=make: _run(m, loss, make)) for n, loss, make in recipes}
    w = torch.randn(16, 3, dtype=torch.float64)
    return ledger, model, fns, (lambda m: (m(x) * w).sum(-1))


# --- 1. a fresh Adagrad -------------------------------------------------------------------------------------------


def test_fresh_adagrad_without_decay_is_exact(tmp_path):
    ledger, model, fns, behavior = _pipeline(tmp_path, lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05))
    assert ledger.stages[1].optimizer_state_policy == "fresh"
    replay = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    linear = estimators.get("aa-linear").estimate(ledger, model, behavior)
    for stage in ("s1", "s2"):
        assert linear.mean[stage] == pytest.approx(replay.mean[stage], abs=1e-6)  # float32 deltas


def test_fresh_adagrad_with_decay_and_no_moments_is_refused_not_blown_up(tmp_path):
    ledger, model, _, behavior = _pipeline(
        tmp_path, lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05, weight_decay=0.6)
    )
    with pytest.raises(UnsupportedOptimizerError, match="second-moment state"):
        estimators.get("aa-linear").estimate(ledger, model, behavior)
    name, reason = choose_estimator(ledger)
    assert name == "delta-fd" and "'s2'" in reason and "Adagrad" in reason
    assert estimators.get("auto").estimate(ledger, model, behavior).estimator == "delta-fd"


def test_state_taken_before_any_step_is_not_used_as_moments(tmp_path, monkeypatch):
    """Ledgers recorded before the fix marked a new Adagrad 'continued' with its zero sum as the start state."""
    monkeypatch.setattr(recorder_module, "has_state", lambda opt: any(len(s) for s in opt.state.values()))
    ledger, *_ = _pipeline(tmp_path, lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05, weight_decay=0.6))
    stage = ledger.stages[1]
    assert stage.optimizer_state_policy == "continued"  # the old record
    prop = StagePropagator(stage)
    assert prop.start_state() == {}
    with pytest.raises(UnsupportedOptimizerError, match="second-moment state"):  # before: max |x| ≈ 1e101
        prop.apply("weight", ledger.stages[0].delta_tensor("weight").double())


def test_adagrad_preconditioner_is_zero_where_no_gradient_reached():
    p = preconditioner("adagrad", {"eps": 1e-10}, torch.tensor([0.0, 4.0]), step=3)
    assert p.tolist() == [0.0, pytest.approx(0.5)]


# --- 2. auto when a later stage cannot be propagated --------------------------------------------------------------


@pytest.mark.parametrize(
    "label, make",
    [
        ("Adamax", lambda m: torch.optim.Adamax(m.parameters(), lr=0.05)),
        ("NAdam", lambda m: torch.optim.NAdam(m.parameters(), lr=0.05)),
        ("Adam", lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01)),
        ("RMSprop", lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, weight_decay=0.01)),
    ],
)
def test_auto_picks_delta_fd_when_a_later_stage_cannot_be_propagated(tmp_path, label, make):
    ledger, model, _, behavior = _pipeline(tmp_path, make)
    assert carry_problem(ledger.stages[1]) is not None
    name, reason = choose_estimator(ledger)
    assert name == "delta-fd"
    assert reason.startswith("stage 's2' was trained with") and label in reason
    result = estimators.get("auto").estimate(ledger, model, behavior)
    assert result.estimator == "delta-fd" and result.reason == reason


def test_unknown_optimizer_goes_to_delta_fd_before_partial_replay(tmp_path):
    ledger, *_ = _pipeline(tmp_path, lambda m: torch.optim.Adamax(m.parameters(), lr=0.05))
    fns = {"s2": lambda model, max_steps=None: None}
    assert choose_estimator(ledger, stage_fns=fns)[0] == "delta-fd"


def test_propagatable_stages_keep_their_choice(tmp_path):
    ledger, *_ = _pipeline(tmp_path, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.6))
    assert carry_problem(ledger.stages[1]) is None
    assert choose_estimator(ledger)[0] == "aa-fd"


# --- 5. a tensor the later stage never stepped --------------------------------------------------------------------


def test_tensor_without_gradient_is_carried_unchanged(tmp_path):
    """AdamW(weight_decay=0.6) over all parameters; the later loss ignores ``b.weight`` (grad None: torch skips it)."""
    torch.manual_seed(0)
    model = TwoLinear().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    ca = torch.randn(2, 3, dtype=torch.float64)
    recipes = [
        ("s1", lambda m: (m(x) ** 2).mean(), lambda m: torch.optim.SGD(m.parameters(), lr=0.3)),
        ("s2", lambda m: -(ca * m.a.weight).sum(), lambda m: torch.optim.AdamW(m.parameters(), lr=0.05,
                                                                                weight_decay=0.6)),
    ]  # fmt: skip
    ledger = StageLedger(tmp_path / "ledger")
    for name, loss, make in recipes:
        _run(model, loss, make, lambda m, o, n=name: ledger.record_stage(n, model=m, optimizer=o))
    assert ledger.stages[1].unstepped_parameters == ["b.weight"]
    fns = {n: (lambda m, loss=loss, make=make: _run(m, loss, make)) for n, loss, make in recipes}
    u = torch.randn(8, 2, dtype=torch.float64)
    behavior = lambda m: (m(x) * u).sum(-1)  # noqa: E731
    replay = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    linear = estimators.get("aa-linear").estimate(ledger, model, behavior)
    assert linear.mean["s1"] == pytest.approx(replay.mean["s1"], abs=1e-6)  # before: off by the decay of b.weight


# --- 4. gradient clipping and the curvature carry -----------------------------------------------------------------


def _quadratic_pipeline(tmp_path, clip):
    n = 4
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(32, n, generator=gen, dtype=torch.float64)
    targets = [features @ torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2)]
    torch.manual_seed(0)
    model = torch.nn.Linear(n, 1, bias=False).double()
    ledger = StageLedger(tmp_path / "ledger")

    def forward(m, b):
        return m(b[0]).squeeze(-1)

    def loss(out, b):
        return 0.5 * ((out - b[1]) ** 2).mean()

    for index, y in enumerate(targets):
        clipping = {"gradient_clipping": {"max_grad_norm": clip, "enabled": True}} if index and clip else None
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        options = {"num_steps": 8, "curvature_segments": 1, "curvature_material": "full", "metadata": clipping}
        with ledger.record_stage(
            f"s{index + 1}", model=model, optimizer=opt, loss_fn=(forward, loss), **options
        ) as rec:
            for _ in range(8):
                opt.zero_grad()
                loss(forward(model, (features, y)), (features, y)).backward()
                if index and clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                rec.step((features, y))
    return ledger, model, (lambda m: m(features[:8]).squeeze(-1))


def test_aa_ggn_notes_gradient_clipping_of_a_later_stage(tmp_path):
    ledger, model, behavior = _quadratic_pipeline(tmp_path, clip=0.05)
    note = clipping_note("s2", 0.05)
    assert note in estimators.get("aa-ggn").estimate(ledger, model, behavior).approximations
    assert note not in estimators.get("aa-linear").estimate(ledger, model, behavior).approximations  # no curvature


def test_aa_ggn_without_clipping_has_no_note(tmp_path):
    ledger, model, behavior = _quadratic_pipeline(tmp_path, clip=None)
    result = estimators.get("aa-ggn").estimate(ledger, model, behavior)
    assert not any("clipping" in a for a in result.approximations)


# --- 3. a metric-driven learning-rate schedule --------------------------------------------------------------------


def test_metric_driven_schedule_is_not_replayed_from_replay_data(tmp_path):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    ledger = StageLedger(tmp_path / "ledger")
    for name in ("s1", "s2"):
        meta = {"training_arguments": {"lr_scheduler_type": "reduce_lr_on_plateau"}} if name == "s2" else None
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        with ledger.record_stage(name, model=model, optimizer=opt, metadata=meta) as rec:
            (rec.replay_dir / "replay.json").write_text("{}")  # stands for the Trainer's replay data
            for _ in range(3):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
                rec.step()
    stage = ledger.stages[1]
    assert stage.replay_dir is not None
    assert not can_replay(stage, {}, step_limited=True)
    assert can_replay(stage, {"s2": lambda m, max_steps=None: None}, step_limited=True)  # a function can
    name, reason = choose_estimator(ledger)
    assert name == "aa-fd" and "metric-driven" in reason and "'s2'" in reason
    with pytest.raises(ReplayError, match="metric-driven") as info:
        estimators.get("replay").estimate(ledger, model, lambda m: m(x).squeeze(-1))
    assert "\n" not in str(info.value)
