"""ESTIMATORS.md §6 exactness checks (all but the curvature ones) on tiny ledgers recorded with custom loops."""

from __future__ import annotations

import math

import pytest
import torch

from hf_stage_attribution import estimators
from hf_stage_attribution.ledger import StageLedger

STEPS = 12
SCHEDULES = {
    "constant": lambda t: 1.0,
    "warmup-linear": lambda t: min(1.0, (t + 1) / 3) * max(0.0, (STEPS - t) / STEPS),
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t / STEPS)),
}


def run_stage(model, loss, make_opt, schedule, steps, rec=None, opt=None):
    """Train ``model`` in place; record it when ``rec`` is a ledger stage factory. Returns the optimizer."""
    opt = opt or make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ctx = rec(model, opt) if rec else None
    recording = ctx.__enter__() if ctx else None
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
        if recording:
            recording.step()
        sched.step()
    if ctx:
        ctx.__exit__(None, None, None)
    return opt


def linear_loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    coef = {n: 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    return lambda m: -sum((coef[n] * p).sum() for n, p in m.named_parameters())


def pipeline(tmp_path, later, schedule="constant"):
    """Stage 1: cross-entropy with plain SGD; later stages: linear losses with the given optimizers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    recipes = [("s1", lambda m: torch.nn.functional.cross_entropy(m(x), y), lambda ps: torch.optim.SGD(ps, lr=0.2))]
    recipes += [(f"s{i + 2}", linear_loss(model, i), make) for i, make in enumerate(later)]
    ledger = StageLedger(tmp_path / "ledger")
    sched = SCHEDULES[schedule]
    for name, loss, make in recipes:
        run_stage(model, loss, make, sched, STEPS, lambda m, o, n=name: ledger.record_stage(n, model=m, optimizer=o))
    fns = {n: (lambda m, loss=loss, make=make: run_stage(m, loss, make, sched, STEPS)) for n, loss, make in recipes}
    w = torch.randn(16, 3, dtype=torch.float64)
    behavior = lambda m: (m(x) * w).sum(-1)  # noqa: E731  (linear in θ for a linear model)
    return ledger, model, fns, behavior


SGD_FAMILIES = {
    "sgd-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.5),
    "sgd-momentum0-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.0, dampening=0.7, weight_decay=0.5),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.4),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.4),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.6),
}


def assert_same(a, b, tol=1e-6):
    assert a.per_example.keys() == b.per_example.keys()
    for stage in a.per_example:
        assert torch.allclose(a.per_example[stage], b.per_example[stage], atol=tol, rtol=0), stage


@pytest.mark.parametrize("family", sorted(SGD_FAMILIES))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_aa_linear_equals_replay_on_linear_later_stages(tmp_path, family, schedule):
    ledger, model, fns, behavior = pipeline(tmp_path, [SGD_FAMILIES[family], SGD_FAMILIES[family]], schedule)
    replay = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    aa = estimators.get("aa-linear").estimate(ledger, model, behavior)
    assert_same(aa, replay)
    assert_same(estimators.get("aa-fd").estimate(ledger, model, behavior), replay)
    factors = aa.diagnostics["D"]
    assert all(d["group 0"] < 0.95 for d in factors.values())  # the decay is material: the test can fail
    delta = estimators.get("delta-linear").estimate(ledger, model, behavior)
    assert abs(delta.mean["s1"] - replay.mean["s1"]) > 1e-4


def test_aa_linear_mixed_optimizers_and_groups(tmp_path):
    def groups(ps):
        ps = list(ps)
        groups = [{"params": ps[:1], "weight_decay": 0.8}, {"params": ps[1:], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=0.05)

    ledger, model, fns, behavior = pipeline(tmp_path, [SGD_FAMILIES["sgd-nesterov"], groups], "warmup-linear")
    replay = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    assert_same(estimators.get("aa-linear").estimate(ledger, model, behavior), replay)
    assert estimators.get("aa-linear").estimate(ledger, model, behavior).diagnostics["D"]["s3"]["group 1"] == 1.0


def test_momentum_tail_continued_sgd_state(tmp_path):
    """Stage 2 continues stage 1's SGD momentum: removing stage 1 also changes the buffer entering stage 2."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    ce = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    lin2, lin3 = linear_loss(model, 1), linear_loss(model, 2)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.3)  # noqa: E731
    adamw = lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5)  # noqa: E731
    ledger = StageLedger(tmp_path / "ledger")
    rec = lambda n: lambda m, o: ledger.record_stage(n, model=m, optimizer=o)  # noqa: E731
    opt = run_stage(model, ce, sgd, SCHEDULES["constant"], STEPS, rec("s1"))
    run_stage(model, lin2, sgd, SCHEDULES["cosine"], STEPS, rec("s2"), opt=opt)
    run_stage(model, lin3, adamw, SCHEDULES["constant"], STEPS, rec("s3"))
    assert ledger.stages[1].optimizer_state_policy == "continued"
    shared = {}

    def s1(m):
        shared["opt"] = run_stage(m, ce, sgd, SCHEDULES["constant"], STEPS)

    def s2(m, info):  # the counterfactual of removing s1: s1 started fresh, so s2 starts a fresh optimizer
        run_stage(m, lin2, sgd, SCHEDULES["cosine"], STEPS, opt=None if info["removed"] == 0 else shared["opt"])

    fns = {"s1": s1, "s2": s2, "s3": lambda m: run_stage(m, lin3, adamw, SCHEDULES["constant"], STEPS)}
    w = torch.randn(16, 3, dtype=torch.float64)
    behavior = lambda m: (m(x) * w).sum(-1)  # noqa: E731
    assert estimators.replay_gap(ledger, model, stage_fns=fns) < 1e-6
    replay = estimators.get("replay").estimate(ledger, model, behavior, stages=["s1"], stage_fns=fns)
    aa = estimators.get("aa-linear").estimate(ledger, model, behavior, stages=["s1"])
    assert_same(aa, replay)
    no_tail = estimators.get("delta-linear").estimate(ledger, model, behavior, stages=["s1"])
    assert abs(no_tail.mean["s1"] - replay.mean["s1"]) > 1e-3


def test_linear_and_finite_difference_agree_to_second_order(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    ledger = StageLedger(tmp_path / "ledger")
    for name, lr in (("s1", 0.3), ("s2", 0.2)):
        make = lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr, momentum=0.5, weight_decay=0.1)  # noqa: E731
        run_stage(model, lambda m: torch.nn.functional.cross_entropy(m(x), y), make, SCHEDULES["constant"], 6,
                  lambda m, o, n=name: ledger.record_stage(n, model=m, optimizer=o))  # fmt: skip
    behavior = lambda m: torch.logsumexp(m(x), -1)  # noqa: E731  (smooth, not linear)
    lin = estimators.get("aa-linear").estimate(ledger, model, behavior)
    gaps = []
    for scale in (1e-1, 1e-2, 1e-3):
        fd = estimators.get("aa-fd").estimate(ledger, model, behavior, step_scale=scale)
        gaps.append(max(float((fd.per_example[s] - lin.per_example[s]).abs().max()) for s in ("s1", "s2")))
    assert gaps[0] > 1e-6  # curvature of f is visible at full scale
    assert gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5  # the gap of (f(θ)-f(θ-sv))/s shrinks like s


def test_lora_exact_equals_replay_for_terminal_lora_stage(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    model = Net()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ce = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    ledger = StageLedger(tmp_path / "ledger")
    run_stage(model, ce, lambda ps: torch.optim.SGD(ps, lr=0.2), SCHEDULES["constant"], 5,
              lambda m, o: ledger.record_stage("base", model=m, optimizer=o))  # fmt: skip
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"])
    peft_model = peft.get_peft_model(model, config)
    adamw = lambda ps: torch.optim.AdamW([p for p in ps if p.requires_grad], lr=0.05)  # noqa: E731
    record = lambda m, o: ledger.record_stage("lora", kind="lora", model=m, optimizer=o)  # noqa: E731
    run_stage(peft_model, ce, adamw, SCHEDULES["constant"], 5, record)
    behavior = lambda m: torch.log_softmax(m(x), -1)[:, 0]  # noqa: E731
    exact = estimators.get("lora-exact").estimate(ledger, peft_model, behavior)
    replay = estimators.get("replay").estimate(ledger, peft_model, behavior, stages=["lora"])
    assert_same(exact, replay, tol=1e-5)
    assert exact.mean["lora"] != 0.0
    assert_same(estimators.get("aa-fd").estimate(ledger, peft_model, behavior, stages=["lora"]), replay, tol=1e-5)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    estimators.get("delta-fd").estimate(ledger, peft_model, behavior)
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())  # restored exactly


class Counting:
    """A behavior that counts its forward calls and the backward passes through its output."""

    name = "counting"

    def __init__(self, fn):
        self.fn, self.calls, self.backward = fn, 0, 0

    def __call__(self, model):
        self.calls += 1
        out = self.fn(model)
        if out.requires_grad:
            out.register_hook(self._hook)
        return out

    def _hook(self, grad):
        self.backward += 1


def test_costs_follow_section_4(tmp_path):
    ledger, model, fns, behavior = pipeline(tmp_path, [SGD_FAMILIES["sgd-momentum"], SGD_FAMILIES["adamw"]])
    k = len(ledger.stages)
    expected = {
        ("aa-linear", False): (1, 1),  # mean: one backward pass over the behavior set + K dot products
        ("aa-linear", True): (k, 0),  # per-example: one forward-mode JVP per stage
        ("delta-linear", False): (1, 1),
        ("aa-fd", True): (k + 1, 0),  # K + 1 forward passes
        ("delta-fd", True): (k + 1, 0),
    }
    for (name, per_example), (calls, backward) in expected.items():
        counting = Counting(behavior)
        result = estimators.get(name).estimate(ledger, model, counting, per_example=per_example)
        assert (counting.calls, counting.backward) == (calls, backward), name
        assert len(result.mean) == k
    counting = Counting(behavior)
    estimators.get("replay").estimate(ledger, model, counting, stage_fns=fns)
    assert counting.calls == k + 1


def test_curvature_embeddings_through_the_cache(tmp_path):
    """auto picks aa-ggn-fd where curvature material exists; with curvature off aa-ggn reproduces aa-linear, also
    through a continued SGD state (the momentum tail enters as the curvature propagation's initial buffer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    pair = (lambda m, b: m(b[0]), lambda out, b: torch.nn.functional.cross_entropy(out, b[1]))
    ledger = StageLedger(tmp_path / "ledger")
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.1)
    for name in ("s1", "s2", "s3"):
        if name == "s3":
            opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.2)
        with ledger.record_stage(name, model=model, optimizer=opt, loss_fn=pair, num_steps=6) as rec:
            for _ in range(6):
                opt.zero_grad()
                pair[1](pair[0](model, (x, y)), (x, y)).backward()
                opt.step()
                rec.step((x, y))
    assert ledger.stages[1].optimizer_state_policy == "continued" and ledger.stages[1].segments
    behavior = lambda m: torch.log_softmax(m(x), -1)[:, 0]  # noqa: E731
    assert estimators.get("auto").resolve(ledger).name == "aa-ggn-fd"
    auto = estimators.get("auto").estimate(ledger, model, behavior)
    assert auto.estimator == "aa-ggn-fd" and "curvature material" in auto.reason
    assert auto.diagnostics["curvature"]["curvature_products"] > 0
    off = estimators.get("aa-ggn").estimate(ledger, model, behavior, curvature_options={"curvature_scale": 0.0})
    linear = estimators.get("aa-linear").estimate(ledger, model, behavior)
    for stage in ("s1", "s2", "s3"):
        assert torch.allclose(off.per_example[stage], linear.per_example[stage], atol=1e-10, rtol=0), stage
    curvature_free = estimators.get("aa-fd").estimate(ledger, model, behavior)  # the same read-out, no curvature
    assert not torch.allclose(auto.per_example["s1"], curvature_free.per_example["s1"], atol=1e-6)


def test_untracked_edit_between_continued_stages_is_transparent(tmp_path):
    """Weights edited between runs become an 'untracked' stage (no optimizer step): it passes deltas and the
    momentum tail through unchanged, and replay re-applies it as recorded."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    ce = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    lin = linear_loss(model, 3)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.3)  # noqa: E731
    ledger = StageLedger(tmp_path / "ledger")
    record = lambda name: lambda m, o: ledger.record_stage(name, model=m, optimizer=o)  # noqa: E731
    opt = run_stage(model, ce, sgd, SCHEDULES["constant"], STEPS, record("s1"))
    with torch.no_grad():
        model.weight[0].add_(0.05)
    with pytest.warns(UserWarning, match="untracked"):
        run_stage(model, lin, sgd, SCHEDULES["constant"], STEPS, record("s2"), opt)
    assert [s.kind for s in ledger.stages] == ["custom", "untracked", "custom"]
    shared = {}

    def s1(m):
        shared["opt"] = run_stage(m, ce, sgd, SCHEDULES["constant"], STEPS)

    def s2(m, info):
        run_stage(m, lin, sgd, SCHEDULES["constant"], STEPS, opt=None if info["removed"] == 0 else shared["opt"])

    fns = {"s1": s1, "s2": s2}
    w = torch.randn(16, 3, dtype=torch.float64)
    behavior = lambda m: (m(x) * w).sum(-1)  # noqa: E731
    assert estimators.replay_gap(ledger, model, stage_fns=fns) < 1e-6
    replay = estimators.get("replay").estimate(ledger, model, behavior, stages=["s1"], stage_fns=fns)
    assert_same(estimators.get("aa-linear").estimate(ledger, model, behavior, stages=["s1"]), replay)
    assert any("re-applies its recorded delta" in a for a in replay.approximations)


class _SquareNoForwardAD(torch.autograd.Function):
    """x² with a backward but no forward-mode rule (forces the double-backward fallback)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_per_example_linear_readout_paths(tmp_path):
    """Forward-mode JVP where it exists (also through SDPA attention of a transformers model), double backward
    where an op has no forward-mode rule; both agree with the mean read by one backward pass."""
    from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)
    model.config._attn_implementation = "sdpa"
    enc = tok(["a b c d", "b c a", "d d c a b"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    ledger = StageLedger(tmp_path / "ledger")
    for name in ("a", "b"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(**enc, labels=labels).loss.backward()
                opt.step()
                rec.step()

    def logprob(m):
        logits = m(**enc).logits[:, :-1]
        return torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1).sum(-1)

    def squared(m):
        return _SquareNoForwardAD.apply(logprob(m))

    jvp = estimators.get("aa-linear").estimate(ledger, model, logprob)
    assert jvp.diagnostics["calls"] == {"jvp": 2}
    mean = estimators.get("aa-linear").estimate(ledger, model, logprob, per_example=False)
    for stage in ("a", "b"):
        assert jvp.mean[stage] == pytest.approx(mean.mean[stage], rel=1e-4, abs=1e-6)
    fallback = estimators.get("aa-linear").estimate(ledger, model, squared)
    assert fallback.diagnostics["calls"]["mode"] == "double-backward"
    with torch.no_grad():
        chain = 2 * logprob(model).double()
    for stage in ("a", "b"):  # d(f²) = 2 f df
        assert torch.allclose(fallback.per_example[stage], chain * jvp.per_example[stage], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_subtract_embedding_holds_theta_minus_scaled_v_and_restores_it_exactly(dtype, scale):
    """Inside the block the model holds θ − s·v as the float64 product cast to the parameter's dtype (at s = 1 the
    cast is made from v directly: the same numbers without float64 temporaries); a bf16 parameter rounded once (the
    difference taken in float64, not v cast to bf16 and subtracted in bf16); afterwards exactly θ."""
    from hf_stage_attribution.estimators.finite_difference import subtract_embedding

    class Emb:  # the read interface subtract_embedding uses
        def __init__(self, vectors):
            self.vectors = vectors

        def items(self, k):
            return iter(self.vectors.items())

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = {n: torch.randn(p.shape) * 1e-2 for n, p in model.named_parameters()}
    with subtract_embedding(model, Emb(v), 0, scale) as shifted:
        assert shifted == 2
        for n, p in model.named_parameters():
            if dtype == torch.bfloat16:
                expected = (before[n].double() - scale * v[n].to(torch.float64)).to(dtype)
            else:
                expected = before[n] - (scale * v[n].to(torch.float64)).to(dtype)
            assert torch.equal(p.detach(), expected), n
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
