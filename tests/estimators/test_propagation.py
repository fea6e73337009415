"""Optimizer recurrences (D_j), per-tensor stage propagation, and the stage-embedding cache."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import estimators
from hf_stage_attribution.errors import UnsupportedOptimizerError
from hf_stage_attribution.estimators.embeddings.cache import stage_embeddings
from hf_stage_attribution.estimators.propagation.rules import optimizer_family, preconditioner, run_recurrence
from hf_stage_attribution.estimators.propagation.stage import StagePropagator
from hf_stage_attribution.ledger import StageLedger

LRS = [0.05 * (1 + 0.1 * t) for t in range(15)]
GROUPS = {
    "SGD": [
        {"weight_decay": 0.3},
        {"weight_decay": 0.3, "momentum": 0.0, "dampening": 0.5},
        {"weight_decay": 0.3, "momentum": 0.9},
        {"weight_decay": 0.3, "momentum": 0.9, "dampening": 0.4},
        {"weight_decay": 0.3, "momentum": 0.9, "nesterov": True},
        {"weight_decay": 0.3, "momentum": 0.9, "maximize": True},
    ],
    "AdamW": [{"weight_decay": 0.3}, {"weight_decay": 0.3, "maximize": True}],
}
CLASSES = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}


def two_trajectories(opt_type, group, lrs, loss, start, delta):
    """(θ' − θ'') after running the optimizer from start + delta and from start."""
    ends = []
    for theta0 in (start + delta, start):
        p = torch.nn.Parameter(theta0.clone())
        opt = CLASSES[opt_type]([p], lr=lrs[0], **group)
        for lr in lrs:
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            loss(p).backward()
            opt.step()
        ends.append(p.detach())
    return ends[0] - ends[1]


@pytest.mark.parametrize("opt_type,group", [(t, g) for t, gs in GROUPS.items() for g in gs])
def test_recurrence_matches_torch_on_linear_loss(opt_type, group):
    torch.manual_seed(0)
    c = torch.randn(5, dtype=torch.float64)
    start, delta = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    diff = two_trajectories(opt_type, group, LRS, lambda p: -(c * p).sum(), start, delta)
    d, _ = run_recurrence(LRS, group, opt_type)
    assert torch.allclose(diff, d * delta, atol=1e-12, rtol=0)
    assert d < 0.95


@pytest.mark.parametrize("group", GROUPS["SGD"])
def test_recurrence_with_curvature_matches_torch_on_quadratic_loss(group):
    """SGD on 0.5·Σ c_i θ_i² is linear: run_recurrence(curvature=c_i) is exact per coordinate."""
    torch.manual_seed(1)
    c = torch.rand(5, dtype=torch.float64) * 3
    start, delta = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    diff = two_trajectories("SGD", group, LRS, lambda p: 0.5 * (c * p * p).sum(), start, delta)
    x, _ = run_recurrence(LRS, group, "SGD", curvature=c, x0=delta)
    assert torch.allclose(diff, x, atol=1e-12, rtol=0)


def test_recurrence_accepts_tensors_and_buffers():
    group = {"weight_decay": 0.2, "momentum": 0.8}
    x, buf = run_recurrence(LRS, group, "SGD", x0=torch.ones(3, dtype=torch.float64), buf0=torch.zeros(3))
    xs, bs = run_recurrence(LRS, group, "SGD", x0=1.0, buf0=0.0)
    assert torch.allclose(x, torch.full((3,), xs, dtype=torch.float64))
    assert torch.allclose(buf, torch.full((3,), bs, dtype=torch.float64))
    # a fresh buffer (None) clones the first gradient: with dampening it differs from a zero buffer
    damp = {"weight_decay": 0.2, "momentum": 0.8, "dampening": 0.5}
    assert run_recurrence(LRS, damp, "SGD")[0] != run_recurrence(LRS, damp, "SGD", buf0=0.0)[0]
    # Adam: the preconditioner scales the step of the first-moment difference
    x_p, _ = run_recurrence(LRS, {"weight_decay": 0.0}, "adamw", x0=0.0, buf0=1.0, precond=2.0)
    x_1, _ = run_recurrence(LRS, {"weight_decay": 0.0}, "adamw", x0=0.0, buf0=1.0, precond=1.0)
    assert x_p == pytest.approx(2 * x_1) and x_1 < 0
    # RMSprop / Adagrad with coupled decay shrink by lr·P·λ per step
    assert run_recurrence([0.1], {"weight_decay": 0.5}, "RMSprop", precond=2.0)[0] == pytest.approx(0.9)
    assert run_recurrence([0.1, 0.1], {"weight_decay": 0.5, "lr_decay": 1.0}, "Adagrad")[0] == pytest.approx(
        0.95 * (1 - 0.05 * 0.5)
    )
    assert run_recurrence(LRS, {"weight_decay": 0.3}, "Lion")[0] == pytest.approx(
        float(torch.tensor([1 - lr * 0.3 for lr in LRS], dtype=torch.float64).prod())
    )


def test_optimizer_families():
    assert optimizer_family("AdamW") == optimizer_family("adamw_torch_fused") == "adamw"
    assert optimizer_family("PagedAdamW8bit") == "adamw" and optimizer_family("Lion8bit") == "lion"
    assert optimizer_family("Adam") == "adam" and optimizer_family("Adam", decoupled_weight_decay=True) == "adamw"
    assert optimizer_family("Adafactor") is None and optimizer_family("Adamax") is None
    with pytest.raises(UnsupportedOptimizerError, match="Adamax"):
        run_recurrence(LRS, {}, "Adamax")
    p = preconditioner("adam", {"betas": (0.9, 0.99), "eps": 0.0}, torch.tensor([0.01]), step=1)
    assert float(p) == pytest.approx(1.0)  # v̂ = 0.01 / (1 − 0.99) = 1


def _ledger_two_heads(tmp_path, second_optimizer, freeze_head2=False, loss_fn=None):
    torch.manual_seed(0)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head1, self.head2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head1(x) + self.head2(x)

    model = TwoHeads().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    ledger = StageLedger(tmp_path / "ledger")
    c = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}

    def stage(m, make, record_as=None, freeze=False):
        for p in m.head2.parameters():
            p.requires_grad_(not freeze)
        opt = make([p for p in m.parameters() if p.requires_grad])
        ctx = ledger.record_stage(record_as, model=m, optimizer=opt) if record_as else None
        rec = ctx.__enter__() if ctx else None
        for _ in range(6):
            opt.zero_grad()
            (-sum((c[n] * p).sum() for n, p in m.named_parameters())).backward()
            opt.step()
            if rec:
                rec.step()
        if ctx:
            ctx.__exit__(None, None, None)
        for p in m.parameters():
            p.requires_grad_(True)

    first = lambda ps: torch.optim.SGD(ps, lr=0.3)  # noqa: E731
    stage(model, first, "s1")
    stage(model, second_optimizer, "s2", freeze=freeze_head2)
    fns = {"s1": lambda m: stage(m, first), "s2": lambda m: stage(m, second_optimizer, freeze=freeze_head2)}
    return ledger, model, fns, lambda m: m(x).sum(-1)


def test_frozen_tensors_pass_unchanged(tmp_path):
    decay = lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5, weight_decay=0.9)  # noqa: E731
    ledger, model, fns, behavior = _ledger_two_heads(tmp_path, decay, freeze_head2=True)
    prop = StagePropagator(ledger.stages[1])
    assert prop.factor("head2.weight") == 1.0 and prop.factor("head1.weight") < 0.5
    replay = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    aa = estimators.get("aa-linear").estimate(ledger, model, behavior)
    assert torch.allclose(aa.per_example["s1"], replay.per_example["s1"], atol=1e-6)


def test_adam_coupled_decay_uses_recorded_second_moments(tmp_path):
    adam = lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.5)  # noqa: E731
    ledger, model, fns, behavior = _ledger_two_heads(tmp_path, adam)
    prop = StagePropagator(ledger.stages[1])
    with pytest.raises(UnsupportedOptimizerError, match="second-moment state"):
        prop.apply("head1.weight", torch.ones(2, 3, dtype=torch.float64))  # no segments, no continued state
    assert "coupled weight decay" in prop.approximations[0]
    assert prop.factor("head1.weight") is None  # per coordinate


def test_adam_coupled_decay_with_segments(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    ledger = StageLedger(tmp_path / "ledger")
    adam = {"lr": 0.01, "weight_decay": 0.5}
    makers = {"s1": lambda ps: torch.optim.SGD(ps, lr=0.1), "s2": lambda ps: torch.optim.Adam(ps, **adam)}
    for name, make in makers.items():
        opt = make(model.parameters())
        record = ledger.record_stage(name, model=model, optimizer=opt, loss_fn=loss, num_steps=6, curvature_segments=1)
        with record as rec:
            for _ in range(6):
                opt.zero_grad()
                loss(model, (x, y)).backward()
                opt.step()
                rec.step((x, y))
    stage = ledger.stages[1]
    assert stage.segments and stage.segments[0].second_moments()
    prop = StagePropagator(stage)
    out, _ = prop.apply("weight", torch.ones(2, 3, dtype=torch.float64))
    moments = stage.segments[0].second_moments()
    group = stage.optimizer["param_groups"][0]
    precond = preconditioner("adam", group, moments["exp_avg_sq"]["weight"], float(moments["step"]["weight"]))
    lrs = [lr[0] for lr in stage.learning_rates]
    expected, _ = run_recurrence(lrs, group, "Adam", x0=torch.ones(2, 3, dtype=torch.float64), precond=precond)
    assert torch.allclose(out, expected, atol=1e-12)
    assert len(set(out.flatten().tolist())) > 1 and bool((out != 1).all())  # per-coordinate preconditioning
    emb = stage_embeddings(ledger, "aa-linear")
    assert any("coupled weight decay" in a for a in emb.approximations)


def test_embedding_cache_is_keyed_reused_and_invalidated(tmp_path):
    decay = lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5)  # noqa: E731
    ledger, model, _, _ = _ledger_two_heads(tmp_path, decay)
    path = ledger.embeddings_dir / "aa-linear.safetensors"
    estimators.get("aa-fd").prepare(ledger)  # what the attributor runs on the main process first
    assert path.exists()
    emb = stage_embeddings(ledger, "aa-linear")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert "0/head1.weight" in set(handle.keys())
    assert meta["fingerprint"] == ledger.fingerprint and meta["kind"] == "aa-linear"
    d = emb.diagnostics["D"]["s2"]["group 0"]
    assert torch.allclose(emb.get(0, "head1.weight"), d * ledger.stages[0].delta_tensor("head1.weight"), atol=1e-7)
    assert torch.equal(emb.get(1, "head2.bias"), ledger.stages[1].delta_tensor("head2.bias"))  # last stage: Δ_K
    mtime = path.stat().st_mtime_ns
    stage_embeddings(ledger, "aa-linear")
    assert path.stat().st_mtime_ns == mtime  # reused
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1.0)
    with ledger.record_stage("s3", model=model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
        opt.step()
        rec.step()
    emb = stage_embeddings(ledger, "aa-linear")
    assert emb.stage_indices == [0, 1, 2] and path.stat().st_mtime_ns != mtime  # stale cache recomputed
    expected = d * 0.9 * ledger.stages[0].delta_tensor("head1.weight")
    assert torch.allclose(emb.get(0, "head1.weight"), expected, atol=1e-7)
    delta = stage_embeddings(ledger, "delta")
    assert torch.equal(delta.get(0, "head1.weight"), ledger.stages[0].delta_tensor("head1.weight"))


def test_embedding_cache_grows_with_requested_stages(tmp_path):
    decay = lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.5)  # noqa: E731
    ledger, _, _, _ = _ledger_two_heads(tmp_path, decay)
    assert stage_embeddings(ledger, "aa-linear", stages=["s2"]).stage_indices == [1]
    assert stage_embeddings(ledger, "aa-linear", stages=["s1"]).stage_indices == [0, 1]
    assert stage_embeddings(ledger, "aa-linear", stages=[1]).stage_indices == [0, 1]  # served from the cache
    with_identity = stage_embeddings(ledger, "aa-linear", stages=["s1"], allow_identity_propagation=True)
    assert with_identity.stage_indices == [0]  # other options: recomputed, not merged


@pytest.mark.parametrize(
    ("opt_type", "group"),
    [
        ("SGD", {"weight_decay": 0.3, "momentum": 0.9, "dampening": 0.2}),
        ("SGD", {"weight_decay": 0.3, "momentum": 0.9, "nesterov": True}),
        ("SGD", {"weight_decay": 0.0, "momentum": 0.0}),
        ("AdamW", {"weight_decay": 0.1}),
        ("AdamW", {"weight_decay": 0.0}),
        ("Adam", {"weight_decay": 0.2}),
        ("Adam", {"weight_decay": 0.0}),
        ("RMSprop", {"weight_decay": 0.0, "momentum": 0.5}),
        ("Adagrad", {"weight_decay": 0.1, "lr_decay": 0.01}),
    ],
)
@pytest.mark.parametrize("curvature", [0.0, 0.7])
def test_tensor_recurrence_equals_the_step_by_step_run(opt_type, group, curvature):
    """Tensors go through the scalar transfer (or its Adam-preconditioner variant); the step-by-step run on each
    coordinate alone, as Python floats, is the reference."""
    gen = torch.Generator().manual_seed(0)
    x0, buf0 = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    precond = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    for p in (1.7, precond):
        for buf in (None, buf0):
            x, b = run_recurrence(LRS, group, opt_type, curvature, x0, buf, p, step0=3)
            for i in range(5):
                pi = float(p[i]) if isinstance(p, torch.Tensor) else p
                ref_x, ref_b = run_recurrence(LRS, group, opt_type, curvature, float(x0[i]),
                                              None if buf is None else float(buf[i]), pi, step0=3)  # fmt: skip
                assert float(x[i]) == pytest.approx(ref_x, rel=1e-12, abs=1e-14)
                assert (b is None) == (ref_b is None)
                if b is not None:
                    assert float(torch.as_tensor(b).expand(5)[i]) == pytest.approx(ref_b, rel=1e-12, abs=1e-14)
