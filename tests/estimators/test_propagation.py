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


def test_recurrence_closed_forms():
    """Hand-derived: one step shrinks by ``1 − lr·P·λ`` (RMSprop), Adagrad's rate is ``lr/(1 + t·lr_decay)``, Lion
    keeps only its decoupled decay. Every family is checked against two real torch runs in test_propagation_torch."""
    x, _ = run_recurrence([0.1] * 10, {"weight_decay": 0.5, "momentum": 0.0}, "SGD")
    assert x == pytest.approx(0.95**10, rel=1e-14)
    assert run_recurrence([0.1], {"weight_decay": 0.5}, "RMSprop", precond=2.0)[0] == pytest.approx(0.9)
    assert run_recurrence([0.1, 0.1], {"weight_decay": 0.5, "lr_decay": 1.0}, "Adagrad")[0] == pytest.approx(
        0.95 * (1 - 0.05 * 0.5)
    )
    x, buf = run_recurrence(
        [0.1, 0.2], {"weight_decay": 0.0, "betas": (0.5, 0.9)}, "adamw", x0=0.0, buf0=1.0, precond=2.0
    )
    # m: 0.5 then 0.25; x −= lr/(1−β1^t)·P·m: 0.1/0.5·2·0.5 + 0.2/0.75·2·0.25
    assert (x, buf) == (pytest.approx(-(0.2 + 0.2 / 1.5)), pytest.approx(0.25))
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
    # exactness against two torch runs: test_propagation_torch.test_stage_propagator_matches_two_torch_runs
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


def test_embedding_cache_written_by_another_package_version_is_recomputed(tmp_path, monkeypatch):
    from hf_stage_attribution.estimators.embeddings import cache

    ledger, _, _, _ = _ledger_two_heads(tmp_path, lambda ps: torch.optim.AdamW(ps, lr=0.1))
    path = ledger.embeddings_dir / "aa-linear.safetensors"
    stage_embeddings(ledger, "aa-linear")
    mtime = path.stat().st_mtime_ns
    stage_embeddings(ledger, "aa-linear")
    assert path.stat().st_mtime_ns == mtime  # same version: reused
    monkeypatch.setattr(cache, "__version__", "0.0.0-other")  # an upgrade (or downgrade) of the package
    stage_embeddings(ledger, "aa-linear")
    assert path.stat().st_mtime_ns != mtime  # never served: how embeddings are computed may have changed
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["package_version"] == "0.0.0-other"


def test_embedding_cache_whose_bytes_changed_is_recomputed_not_used(tmp_path):
    from hf_stage_attribution.estimators.embeddings import cache

    ledger, _, _, _ = _ledger_two_heads(tmp_path, lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5))
    path = ledger.embeddings_dir / "aa-linear.safetensors"
    fresh = stage_embeddings(ledger, "aa-linear").get(0, "head1.weight").clone()
    data = bytearray(path.read_bytes())
    data[-4:] = torch.tensor([123.0]).numpy().tobytes()  # one float of a well-formed file, changed
    path.write_bytes(bytes(data))
    cache._VERIFIED.clear()  # another process: nothing verified yet

    with pytest.warns(UserWarning, match="do not hash to the digest written with them"):
        again = stage_embeddings(ledger, "aa-linear")
    assert torch.equal(again.get(0, "head1.weight"), fresh)
    assert 123.0 not in torch.cat([t.flatten() for _, t in again.items(0)] + [t.flatten() for _, t in again.items(1)])

    (path.parent / f"{path.name}.sha256").unlink()  # a cache written before digests existed: recomputed, silently
    cache._VERIFIED.clear()
    mtime = path.stat().st_mtime_ns
    stage_embeddings(ledger, "aa-linear")
    assert path.stat().st_mtime_ns != mtime and (path.parent / f"{path.name}.sha256").exists()


def test_embedding_cache_grows_with_requested_stages(tmp_path):
    decay = lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.5)  # noqa: E731
    ledger, _, _, _ = _ledger_two_heads(tmp_path, decay)
    assert stage_embeddings(ledger, "aa-linear", stages=["s2"]).stage_indices == [1]
    assert stage_embeddings(ledger, "aa-linear", stages=["s1"]).stage_indices == [0, 1]
    assert stage_embeddings(ledger, "aa-linear", stages=[1]).stage_indices == [0, 1]  # served from the cache
    with_identity = stage_embeddings(ledger, "aa-linear", stages=["s1"], allow_identity_propagation=True)
    assert with_identity.stage_indices == [0]  # other options: recomputed, not merged
