"""Curvature-aware propagation (aa-ggn / aa-hvp, ESTIMATORS.md §4a): the recurrence, the Krylov algebra, the
curvature products, exactness with curvature off, agreement with dense linear algebra, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_stage_attribution import estimators
from hf_stage_attribution.errors import MissingCurvatureError, UnsupportedOptimizerError
from hf_stage_attribution.estimators.curvature.krylov import block_lanczos
from hf_stage_attribution.estimators.curvature.products import BUILTIN_LOSSES, CurvatureOperator, resolve_loss
from hf_stage_attribution.estimators.curvature.propagation import propagate
from hf_stage_attribution.estimators.curvature.recurrence import group_coefficients, run_projected, unstable_modes
from hf_stage_attribution.estimators.propagation.rules import run_recurrence
from hf_stage_attribution.estimators.propagation.stage import StagePropagator
from hf_stage_attribution.ledger import StageLedger

CE_PAIR = (lambda m, b: m(b[0]), lambda out, b: torch.nn.functional.cross_entropy(out, b[1]))
MSE_PAIR = (lambda m, b: m(b[0]), lambda out, b: 0.5 * ((out - b[1]) ** 2).sum(-1).mean())

# --- the recurrence in a Ritz basis -------------------------------------------------------------------------------

FAMILY_GROUPS = [
    ("sgd", {"momentum": 0.0, "dampening": 0.3, "weight_decay": 0.2}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.2}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.2}),
    ("sgd", {"momentum": 0.9, "maximize": True, "weight_decay": 0.2}),
    ("adam", {"betas": (0.9, 0.99), "weight_decay": 0.3}),
    ("adamw", {"betas": (0.8, 0.99), "weight_decay": 0.3}),
    ("rmsprop", {"momentum": 0.5, "weight_decay": 0.1}),
    ("rmsprop", {"weight_decay": 0.1}),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize(("family", "group"), FAMILY_GROUPS)
def test_projected_recurrence_is_run_recurrence_per_ritz_mode(family, group, fresh):
    """One group: every Ritz mode follows exactly the scalar recurrence of estimators core, with curvature."""
    lrs = list(np.random.default_rng(0).uniform(0.01, 0.2, size=17))
    theta, x0, b0 = np.array([0.0, 0.5, 3.0]), np.array([1.0, 0.3, -2.0]), np.array([0.0, 0.5, 1.0])
    co = group_coefficients(family, group, lrs, step0=3, buffer_fresh=fresh)
    x, b = run_projected([co], x0, b0 if not (fresh and family == "sgd") else np.zeros(3), theta=theta, decay=co.lam_c)
    f64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    buf0 = None if (fresh and family == "sgd") else f64(b0)
    ref_x, ref_b = run_recurrence(lrs, group, family, curvature=f64(theta), x0=f64(x0), buf0=buf0, step0=3)
    assert np.allclose(x, ref_x.numpy(), rtol=1e-12, atol=1e-12)
    if isinstance(ref_b, torch.Tensor):
        assert np.allclose(b, ref_b.numpy(), rtol=1e-12, atol=1e-12)


def test_unstable_modes_are_the_growing_ones():
    """Heavy ball (μ = 0.9, η = 0.1) is stable for η·c < 2(1 + μ) = 3.8, i.e. c < 38."""
    co = group_coefficients("sgd", {"momentum": 0.9}, [0.1] * 20)
    assert unstable_modes(co, np.array([0.0, 1.0, 30.0, 37.0, 39.0, 50.0]), 0.0).tolist() == [
        False, False, False, False, True, True,
    ]  # fmt: skip


@pytest.mark.parametrize(("family", "group"), FAMILY_GROUPS)
def test_batched_independent_modes_equal_the_separate_runs(family, group):
    """One batched pass (maps with and without curvature, forced response) gives what the separate runs give,
    with the same modes judged unstable and damped."""
    from hf_stage_attribution.estimators.curvature.recurrence import independent_modes

    rng = np.random.default_rng(1)
    lrs = list(rng.uniform(0.01, 0.2, size=13))
    theta = np.array([0.0, 0.4, 2.0, 45.0, 400.0])
    x0, b0, f = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    co = group_coefficients(family, group, lrs, step0=2, buffer_fresh=False)
    xc, bc, x0_, b0_, bad = independent_modes(co, theta, co.lam_c, x0, b0, f)
    ref_bad = unstable_modes(co, theta, co.lam_c)
    assert bad.tolist() == ref_bad.tolist()
    keep = ~ref_bad
    rx, rb = run_projected([co], x0[keep], b0[keep], theta=theta[keep], decay=co.lam_c, forcing=f[keep])
    assert np.allclose(xc[keep], rx, rtol=1e-10, atol=1e-12) and np.allclose(bc[keep], rb, rtol=1e-10, atol=1e-12)
    assert (xc[bad] == 0).all() and (bc[bad] == 0).all()
    zx, zb = run_projected([co], x0, b0, decay=co.lam_c)
    assert np.allclose(x0_, zx, rtol=1e-10, atol=1e-12) and np.allclose(b0_, zb, rtol=1e-10, atol=1e-12)


# --- Krylov algebra and curvature products ------------------------------------------------------------------------


def test_block_lanczos_exact_on_small_operator_and_stops_at_invariant_subspace():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = a @ a.T
    q, h, products = block_lanczos(lambda v: a @ v, [torch.randn(6, generator=gen, dtype=torch.float64)], 10)
    assert q.shape == (6, 6) and products == 6
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(h), torch.linalg.eigvalsh(a), atol=1e-9)
    q0, h0, p0 = block_lanczos(lambda v: 0 * v, [torch.ones(6, dtype=torch.float64), torch.arange(6.0)], 10)
    assert q0.shape[1] == 2 and p0 == 2 and float(h0.abs().max()) == 0.0  # zero operator: nothing beyond the start


def _mlp(seed: int = 0, double: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model.double() if double else model


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _unflat(f, model):
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = f[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


@pytest.mark.parametrize("mode", ["ggn", "hvp"])
def test_products_match_dense_matrices(mode):
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))]
    batches.append((torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)))
    state = {n: p.detach() for n, p in model.named_parameters()}
    names = list(state)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    flat = _flat(state, names)
    outputs = lambda f: torch.func.functional_call(model, _unflat(f, model), (x,))  # noqa: E731
    if mode == "hvp":
        dense = torch.autograd.functional.hessian(lambda f: torch.nn.functional.cross_entropy(outputs(f), y), flat)
    else:
        jac = torch.autograd.functional.jacobian(outputs, flat).reshape(-1, flat.numel())
        out = outputs(flat).detach()
        ce = lambda o: torch.nn.functional.cross_entropy(o.reshape(out.shape), y)  # noqa: E731
        dense = jac.T @ torch.autograd.functional.hessian(ce, out.reshape(-1)) @ jac
    op = CurvatureOperator(model, state, batches, CE_PAIR, mode=mode)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in state.items()}
    got = _flat(op.apply(v, names), names)
    assert torch.allclose(got, dense @ _flat(v, names), atol=1e-12, rtol=1e-10)
    assert op.products == 1
    shapes = {n: tuple(state[n].shape) for n in names}
    assert torch.allclose(op.apply_flat(_flat(v, names), names, shapes), got, atol=1e-14, rtol=1e-12)
    assert op.products == 2

    # the streamed path of large models (no cached graphs; pieces of v read on demand, sums written back in pieces;
    # Hessian: v read again in the second backward pass) is the same product
    streamed = CurvatureOperator(model, state, batches, CE_PAIR, mode=mode, cache_graphs=False, chunk_rows=6)
    assert len(streamed.batches) == 2  # kept apart: the running sums go through write/read
    sums: dict = {}
    asked: list = []

    def source(i, lo, hi):
        asked.append(i)
        return v[names[i]].reshape(-1)[lo:hi]

    def write(i, lo, t):
        sums.setdefault(i, torch.zeros(state[names[i]].numel(), dtype=torch.float64))[lo : lo + len(t)] = t

    streamed.apply_parts(names, shapes, source, write, read=lambda i, lo, hi: sums[i][lo:hi].clone())
    parts = torch.cat([sums[i] for i in range(len(names))])
    assert torch.allclose(parts, dense @ _flat(v, names), atol=1e-12, rtol=1e-10)
    assert streamed.products == 1 and set(asked) == set(range(len(names)))
    if mode == "hvp":  # v written once to a scratch file, then read back by both backward passes of each batch
        assert sorted(asked) == list(range(len(names)))


@pytest.mark.parametrize("loss_type", ["causal-lm", "sequence-classification", "regression"])
def test_builtin_losses_give_symmetric_psd_gauss_newton_products(loss_type):
    """Stages recorded through the Trainer name their loss (``stage.curvature_loss``); the built-ins work on
    ``model(**batch).logits`` of real transformers models (the fused attention kernels are avoided)."""
    from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_gpt2, tiny_tokenizer

    tok = tiny_tokenizer()
    batch = dict(tok(["the weather today is nice", "our team played well"], return_tensors="pt", padding=True))
    if loss_type == "causal-lm":
        model, prefix = tiny_gpt2(tok), "h.0."
    else:
        model = tiny_bert_classifier(tok, num_labels=1 if loss_type == "regression" else 3)
        batch["labels"] = torch.tensor([0.5, -1.0]) if loss_type == "regression" else torch.tensor([2, 0])
        prefix = "classifier"
    stage = type("S", (), {"name": "sft", "loss_fn": None, "curvature_loss": {"type": loss_type}})()
    spec = resolve_loss(stage, None, "ggn")
    assert spec is BUILTIN_LOSSES[loss_type]
    state = {n: p.detach() for n, p in model.named_parameters()}
    op = CurvatureOperator(model, state, [batch], spec, mode="ggn")
    names = [n for n in state if n.startswith(prefix) or f".{prefix}" in n][:4]
    gen = torch.Generator().manual_seed(0)
    u, w = ({n: torch.randn(state[n].shape, generator=gen) for n in names} for _ in range(2))
    gu, gw = op.apply(u, names), op.apply(w, names)
    dot = lambda a, b: sum(float((a[n].double() * b[n].double()).sum()) for n in names)  # noqa: E731
    assert dot(u, gu) > 0 and dot(w, gw) > 0
    assert abs(dot(w, gu) - dot(u, gw)) <= 1e-4 * (abs(dot(w, gu)) + 1e-8)


# --- recorded ledgers ---------------------------------------------------------------------------------------------

LATER = {
    "sgd-momentum0-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.0, dampening=0.7, weight_decay=0.3),
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.2),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.2),
    "adam-coupled": lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.5),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.01),
    "two-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[:2], "weight_decay": 0.5}, {"params": ps[2:], "weight_decay": 0.0, "lr": 0.005}], lr=0.02
    ),
}


def record_pipeline(path, model, data, later, *, steps=(8, 9), pair=CE_PAIR, segments=3, examples=64, batch=8):
    """Stage s1 (SGD) then stage s2 with the optimizer ``later(list of params)``, both recorded with curvature."""
    ledger = StageLedger(path)
    makers = [lambda ps: torch.optim.SGD(ps, lr=0.1), later]
    for i, (name, make) in enumerate(zip(("s1", "s2"), makers)):
        opt = make(list(model.parameters()))
        with ledger.record_stage(name, model=model, optimizer=opt, loss_fn=pair, num_steps=steps[i],
                                 curvature_segments=segments, curvature_examples=examples) as rec:  # fmt: skip
            for t in range(steps[i]):
                b = tuple(d[(t * batch) % len(data[0]) :][:batch] for d in data)
                opt.zero_grad()
                pair[1](pair[0](model, b), b).backward()
                opt.step()
                rec.step(b)
    return ledger


def _ce_data(n=32, seed=0, double=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64 if double else torch.float32)
    return x, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("family", sorted(LATER))
def test_curvature_off_reduces_exactly_to_d_j(tmp_path, family):
    """curvature_scale=0: aa-ggn propagation equals the curvature-free D_j of estimators core (aa-linear) to 1e-10."""
    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER[family])
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    out, info = propagate(v, ledger, 1, mode="ggn", model=model, curvature_scale=0.0)
    prop = StagePropagator(ledger.stages[1])
    for name, t in v.items():
        assert torch.allclose(out[name], prop.apply(name, t)[0], atol=1e-10, rtol=0), name
    assert info["curvature_products"] == 0


def test_linear_loss_has_no_curvature_so_aa_ggn_is_aa_linear(tmp_path):
    """A later stage whose loss is linear in the outputs of a linear model: products vanish, propagation is D_j."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    coef = torch.randn(3, dtype=torch.float64)
    pair = (lambda m, b: m(b[0]), lambda out, b: -(out * coef).sum(-1).mean())
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["sgd-nesterov"], pair=pair)
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    prop = StagePropagator(ledger.stages[1])
    for mode in ("ggn", "hvp"):
        out, info = propagate(v, ledger, 1, mode=mode, model=model)
        assert info["curvature_products"] > 0
        for name, t in v.items():
            assert torch.allclose(out[name], prop.apply(name, t)[0], atol=1e-10, rtol=0), (mode, name)


def _dense_reference(ledger, model, v, stage_index, mode, pair):
    """The frozen-curvature recurrence with explicit matrices: per segment C̄ from autograd, torch's update rules."""
    from hf_stage_attribution.estimators.curvature.propagation import _MidState, _segment_ranges

    stage = ledger.stages[stage_index]
    names = [n for n, _ in model.named_parameters()]
    n_all = sum(p.numel() for p in model.parameters())
    groups = stage.optimizer["param_groups"]
    x, m = _flat(v, names), torch.zeros(n_all, dtype=torch.float64)
    start = ledger.state_at(stage_index - 1)
    for seg, a, e in _segment_ranges(stage):
        op = CurvatureOperator(model, _MidState(start, seg.params_delta()), seg.examples(), pair, mode)
        eye = torch.eye(n_all, dtype=torch.float64)
        c = torch.stack([_flat(op.apply(_unflat(eye[i], model), names), names) for i in range(n_all)], 1)
        if mode == "hvp":  # negative curvature is treated as flat, in the symmetrised coordinates of the method
            from hf_stage_attribution.estimators.curvature.layout import SegmentLayout

            scale = SegmentLayout(stage, seg, "adamw", a, e, False, buffer_fresh=a == 0).scale
            evals, evecs = torch.linalg.eigh(scale[:, None] * c * scale[None, :])
            c = (evecs * evals.clamp_min(0)) @ evecs.T / scale[:, None] / scale[None, :]
        moments = seg.second_moments()
        for t in range(a, e):
            new_x = x.clone()
            for gi, g in enumerate(groups):
                idx = torch.cat([torch.arange(*_span(model, n)) for n in g["params"]])
                lr, (b1, b2) = stage.learning_rates[t][gi], g["betas"]
                p = torch.cat(
                    [
                        1.0
                        / (
                            (
                                moments["exp_avg_sq"][n].double().reshape(-1) / (1 - b2 ** float(moments["step"][n]))
                            ).sqrt()
                            + g["eps"]
                        )
                        for n in g["params"]
                    ]
                )
                grad = (c @ x)[idx]
                m[idx] = b1 * m[idx] + (1 - b1) * grad
                new_x[idx] = x[idx] * (1 - lr * g["weight_decay"]) - lr / (1 - b1 ** (t + 1)) * p * m[idx]
            x = new_x
    return x


def _span(model, name):
    i = 0
    for n, p in model.named_parameters():
        if n == name:
            return i, i + p.numel()
        i += p.numel()
    raise KeyError(name)


@pytest.mark.parametrize("mode", ["ggn", "hvp"])
def test_full_krylov_basis_equals_dense_frozen_curvature_recurrence(tmp_path, mode):
    """With a basis as large as the model (and two param groups with different decay and learning rate), the
    Galerkin projection is exact: propagate equals the dense frozen-curvature AdamW recurrence."""
    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["two-groups"])
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    n_all = sum(p.numel() for p in model.parameters())
    out, info = propagate(v, ledger, 1, mode=mode, model=model, krylov_size=n_all + 2)
    ref = _dense_reference(ledger, model, v, 1, mode, CE_PAIR)
    names = [n for n, _ in model.named_parameters()]
    assert info["unstable_modes"] == 0 and (info["negative_modes"] > 0) == (mode == "hvp")
    assert torch.allclose(_flat(out, names), ref, atol=1e-9, rtol=1e-7)
    small, _ = propagate(v, ledger, 1, mode=mode, model=model, krylov_size=4)
    assert info["curvature_products"] > 3 * 4  # the basis grew past the small one
    assert (_flat(small, names) - ref).norm() < (_flat(v, names) - ref).norm()  # even 4 vectors help


def test_quadratic_full_batch_stage_is_propagated_exactly(tmp_path):
    """MSE on a linear model with full-batch SGD (momentum, nesterov, coupled decay): the stage map is affine with a
    constant Hessian, so aa-ggn's propagated delta equals replay's θ_K − θ̃_K to rounding."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    gen = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(16, 4, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
    )
    later = LATER["sgd-nesterov"]
    ledger = record_pipeline(tmp_path / "l", model, (x, y), later, pair=MSE_PAIR, batch=16, examples=16, steps=(6, 30))
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    out, info = propagate(v, ledger, 1, mode="ggn", model=model, krylov_size=12)
    replayed = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        for n, p in replayed.named_parameters():
            p.copy_(ledger.state_at(-1)[n])
    opt = later(list(replayed.parameters()))
    for _ in range(30):
        opt.zero_grad()
        MSE_PAIR[1](replayed(x), (x, y)).backward()
        opt.step()
    for n, p in model.named_parameters():
        true = p.detach() - dict(replayed.named_parameters())[n].detach()
        assert torch.allclose(out[n], true, atol=1e-9, rtol=1e-6), n
    linear, _ = propagate(v, ledger, 1, model=model, curvature_scale=0.0)
    assert max(float((linear[n] - out[n]).abs().max()) for n in v) > 1e-3  # curvature mattered


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_segments_unknown_optimizer_and_bad_loss_are_clear_errors(tmp_path):
    model = _mlp()
    data = _ce_data()
    ledger = record_pipeline(tmp_path / "a", model, data, LATER["adamw"], segments=0)
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    with pytest.raises(MissingCurvatureError, match=r"'s2'.*curvature_segments=3"):
        propagate(v, ledger, 1, model=model)
    with pytest.raises(MissingCurvatureError, match="s2"):
        estimators.get("aa-ggn").estimate(ledger, model, lambda m: m(data[0]).sum(-1))
    ledger = record_pipeline(tmp_path / "b", _mlp(), data, lambda ps: torch.optim.Adamax(ps, lr=0.01))
    with pytest.raises(UnsupportedOptimizerError, match=r"'s2'.*Adamax"):
        propagate(v, ledger, 1, model=model)
    same, info = propagate(v, ledger, 1, model=model, allow_identity_propagation=True)
    assert all(torch.equal(same[n], v[n]) for n in v) and "Adamax" in info["approximations"][0]
    ledger = record_pipeline(tmp_path / "c", _mlp(), data, LATER["adamw"])
    with pytest.raises(MissingCurvatureError, match="model="):
        propagate(v, ledger, 1)
    scalar = {"s2": lambda m, b: CE_PAIR[1](m(b[0]), b)}
    with pytest.raises(MissingCurvatureError, match=r"\(forward"):
        propagate(v, ledger, 1, model=model, loss_fns=scalar)
    out, _ = propagate(v, ledger, 1, mode="hvp", model=model, loss_fns=scalar)  # the Hessian takes f(model, batch)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_unstable_modes_are_damped_and_counted(tmp_path):
    """A later stage whose step is far beyond the edge of stability in the top curvature directions."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64) * torch.tensor(
        [6.0, 1.0, 1.0, 1.0], dtype=torch.float64
    )
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    ledger = record_pipeline(tmp_path / "l", model, (x, y), lambda ps: torch.optim.SGD(ps, lr=0.08), pair=MSE_PAIR,
                             steps=(4, 6), batch=16, examples=16)  # fmt: skip
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    out, info = propagate(v, ledger, 1, model=model)
    assert info["unstable_modes"] > 0 and any("unstable" in a for a in info["approximations"])
    assert all(torch.isfinite(t).all() and float(t.abs().max()) < 1e3 for t in out.values())


# --- curvature shows: replay and aa-linear differ, less so as the later learning rates shrink ---------------------


def _two_stage_effects(tmp_path, kind: str, lr_scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """Stage s1's effect on a behavior linear in θ (six random directions), per estimator, with s2's rate scaled."""
    gen = torch.Generator().manual_seed(seed)
    xa, xb = (torch.randn(64, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    if kind == "mse":
        torch.manual_seed(0)
        model, pair = torch.nn.Linear(4, 2).double(), MSE_PAIR
        ya, xb = torch.randn(64, 2, generator=gen, dtype=torch.float64), 1.5 * xb
        yb = xb @ torch.randn(4, 2, generator=gen, dtype=torch.float64)
        makers = [lambda ps: torch.optim.SGD(ps, lr=0.05),
                  lambda ps: torch.optim.SGD(ps, lr=0.005 * lr_scale, momentum=0.9, weight_decay=0.01)]  # fmt: skip
    else:
        model, pair = _mlp(), CE_PAIR
        ya, yb = (xa @ torch.randn(4, 3, generator=gen, dtype=torch.float64)).argmax(1), (xb[:, :2] > 0).sum(1)
        makers = [lambda ps: torch.optim.SGD(ps, lr=0.02),
                  lambda ps: torch.optim.SGD(ps, lr=0.005 * lr_scale, momentum=0.9)]  # fmt: skip
    datas, steps = [(xa, ya), (xb, yb)], (40, 60)

    def train(m, i, ledger=None):
        opt = makers[i](list(m.parameters()))
        rec = None
        if ledger is not None:
            rec = ledger.record_stage(f"s{i + 1}", model=m, optimizer=opt, loss_fn=pair, num_steps=steps[i],
                                      curvature_examples=64)  # fmt: skip
            rec.begin()
        for t in range(steps[i]):
            b = tuple(d[(t * 8) % 64 :][:8] for d in datas[i])
            opt.zero_grad()
            pair[1](pair[0](m, b), b).backward()
            opt.step()
            if rec is not None:
                rec.step(b)
        if rec is not None:
            rec.end()

    ledger = StageLedger(tmp_path / f"{kind}-{lr_scale}-{seed}")
    train(model, 0, ledger)
    train(model, 1, ledger)
    fns = {"s1": lambda m: train(m, 0), "s2": lambda m: train(m, 1)}
    dirs = {n: torch.randn((6, *p.shape), generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    behavior = lambda m: sum((dirs[n] * p).flatten(1).sum(1) for n, p in m.named_parameters())  # noqa: E731
    names = ("replay", "delta-linear", "aa-linear", "aa-ggn")
    return {n: estimators.get(n).estimate(ledger, model, behavior, stage_fns=fns).per_example["s1"] for n in names}


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_curvature_shows_and_fades_with_the_later_learning_rate(tmp_path, kind):
    """MSE on a linear model and cross-entropy on an MLP: the later stage re-learns, so replay and aa-linear differ;
    the difference (in units of the stage's direct effect) shrinks as the later rate shrinks, and aa-ggn is closer."""
    gaps = {}
    for scale in (1.0, 0.1, 0.01):
        eff = _two_stage_effects(tmp_path, kind, scale)
        unit = eff["delta-linear"].norm()
        gaps[scale] = {n: float((eff[n] - eff["replay"]).norm() / unit) for n in ("aa-linear", "aa-ggn")}
    lin = [gaps[s]["aa-linear"] for s in (1.0, 0.1, 0.01)]
    assert lin[0] > 0.3, gaps  # curvature of the later stage's loss makes replay and aa-linear differ
    assert lin[0] > lin[1] > lin[2], gaps
    assert all(gaps[s]["aa-ggn"] < gaps[s]["aa-linear"] for s in gaps), gaps


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_continued_optimizer_state_carries_the_first_moment_with_curvature(tmp_path, family):
    """A stage that continued the previous stage's optimizer: the incoming first-moment difference (the momentum
    tail) enters the Krylov block and the recurrence (no clone-first-step, Adam's step count keeps counting); with a
    full basis the result equals the dense frozen-curvature recurrence, and the outgoing buffer is returned."""
    from hf_stage_attribution.estimators.curvature.propagation import _MidState, _segment_ranges

    model, data = _mlp(), _ce_data()
    if family == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.8, 0.99), weight_decay=0.1)
    ledger = StageLedger(tmp_path / "l")
    for name, steps in (("s1", 5), ("s2", 9)):
        with ledger.record_stage(name, model=model, optimizer=opt, loss_fn=CE_PAIR, num_steps=steps) as rec:
            for t in range(steps):
                b = tuple(d[(t * 8) % 32 :][:8] for d in data)
                opt.zero_grad()
                CE_PAIR[1](CE_PAIR[0](model, b), b).backward()
                opt.step()
                rec.step(b)
    stage = ledger.stages[1]
    assert stage.optimizer_state_policy == "continued"
    names = [n for n, _ in model.named_parameters()]
    n_all = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(5)
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    buf0 = {n: 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    out, info = propagate(v, ledger, 1, model=model, krylov_size=n_all + 3, initial_buffer=buf0)
    group = stage.optimizer["param_groups"][0]
    x, m = _flat(v, names), _flat(buf0, names)
    step0 = int(float(stage.optimizer_state_at_start()["step"][names[0]])) if family == "adam" else 0
    for seg, a, e in _segment_ranges(stage):
        op = CurvatureOperator(
            model, _MidState(ledger.state_at(0), seg.params_delta()), seg.examples(), CE_PAIR, "ggn"
        )
        eye = torch.eye(n_all, dtype=torch.float64)
        c = torch.stack([_flat(op.apply(_unflat(eye[i], model), names), names) for i in range(n_all)], 1)
        if family == "adam":
            mom, (b1, b2) = seg.second_moments(), group["betas"]
            vhat = {n: mom["exp_avg_sq"][n].double().reshape(-1) / (1 - b2 ** float(mom["step"][n])) for n in names}
            p = torch.cat([1.0 / (vhat[n].sqrt() + group["eps"]) for n in names])
        for t in range(a, e):
            lr, g = stage.learning_rates[t][0], c @ x + group["weight_decay"] * x
            if family == "sgd":
                m = 0.9 * m + 0.8 * g
                x = x - lr * m
            else:
                m = b1 * m + (1 - b1) * g
                x = x - lr / (1 - b1 ** (step0 + t + 1)) * p * m
    assert step0 == (5 if family == "adam" else 0)
    assert torch.allclose(_flat(out, names), x, atol=1e-9, rtol=1e-7)
    assert torch.allclose(_flat(info["buffer"], names), m, atol=1e-9, rtol=1e-7)


def test_curvature_presets_expand_and_unknown_ones_are_refused():
    from hf_stage_attribution.errors import UnknownNameError
    from hf_stage_attribution.estimators.curvature.propagation import CURVATURE_PRESETS, curvature_settings

    assert curvature_settings(None) == {"preset": "default", **CURVATURE_PRESETS["default"]}
    cheap = curvature_settings({"preset": "cheap", "sample_size": 32, "model": "m"})
    assert cheap == {"preset": "cheap", "krylov_size": 8, "max_segments": 1, "sample_size": 32, "model": "m"}
    assert CURVATURE_PRESETS["cheap"] == {"krylov_size": 8, "max_segments": 1, "sample_size": None}
    with pytest.raises(UnknownNameError, match="curvature preset 'fast'. Known curvature presets: cheap, default"):
        curvature_settings({"preset": "fast"})


def test_cheap_preset_is_the_explicit_cheap_setting(tmp_path):
    """The preset gives the same embeddings as its options spelled out, with one segment and ≤ 8 products per
    (stage, later stage) pair, and the cache tells the two settings apart from the default."""
    from hf_stage_attribution.estimators.embeddings.cache import stage_embeddings
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    pipe = build_digits_pipeline("hf", tmp_path / "ledger", seed=0, steps_scale=0.2, base_steps_scale=0.2)
    loss_fns = {s.name: pipe.loss_fn for s in pipe.ledger.stages}
    preset = stage_embeddings(pipe.ledger, "aa-ggn", loss_fns=loss_fns, model=pipe.model, preset="cheap")
    pairs = preset.diagnostics["curvature"]["per_stage_pair"]
    assert len(pairs) == 3 and all(0 < p["curvature_products"] <= 8 for p in pairs.values())
    first = {k: dict(preset.items(k)) for k in (0, 1)}
    spelled = stage_embeddings(pipe.ledger, "aa-ggn", loss_fns=loss_fns, model=pipe.model, recompute=True,
                               krylov_size=8, max_segments=1)  # fmt: skip
    for k in (0, 1):
        for name, t in spelled.items(k):
            assert torch.equal(t, first[k][name])
    default = stage_embeddings(pipe.ledger, "aa-ggn", loss_fns=loss_fns, model=pipe.model)
    assert default.diagnostics["curvature"]["settings"]["preset"] == "default"
    products = [e.diagnostics["curvature"]["curvature_products"] for e in (default, preset)]
    assert products[0] > products[1]


def _full_collections():
    """A list that counts the full (generation 2) garbage collections while its callback is registered."""
    import gc

    seen: list[int] = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(count)
    return seen, lambda: gc.callbacks.remove(count)


def test_aa_ggn_runs_no_full_garbage_collection_per_curvature_segment(tmp_path):
    """A full collection walks every live object (0.2 s once transformers is imported): run once per segment, it
    made aa-ggn 5-26x slower on the benchmark pipelines. The products' buffers need none."""
    from hf_stage_attribution.estimators.embeddings.cache import stage_embeddings
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    pipe = build_digits_pipeline("hf", tmp_path / "ledger", seed=0, steps_scale=0.1, base_steps_scale=0.1)
    loss_fns = {s.name: pipe.loss_fn for s in pipe.ledger.stages}
    seen, stop = _full_collections()
    try:
        emb = stage_embeddings(pipe.ledger, "aa-ggn", loss_fns=loss_fns, model=pipe.model)
    finally:
        stop()
    assert emb.diagnostics["curvature"]["curvature_products"] > 0 and not seen


def test_the_dropped_dpo_reference_is_freed_with_a_full_collection_only_when_it_sits_in_a_cycle():
    import weakref

    from hf_stage_attribution.estimators.curvature.trl import _Reference

    full, stop = _full_collections()
    try:
        for cyclic in (False, True):
            full.clear()

            def build(cyclic=cyclic):  # a fresh model each time, as the reference's builder makes
                module = torch.nn.Linear(2, 2)
                if cyclic:
                    module.me = [module]  # what a patched forward bound to its module amounts to
                return module

            ref = _Reference(build)
            alive = weakref.ref(ref.get())
            ref.drop()
            assert alive() is None and len(full) == int(cyclic), cyclic
    finally:
        stop()
