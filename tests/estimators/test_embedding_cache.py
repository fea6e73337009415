"""The stage-embedding cache is keyed on what changes the result: the curvature loss itself, not its stage name."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution._internal.fingerprint import callable_fingerprint
from hf_stage_attribution.estimators.embeddings.cache import stage_embeddings
from tests.estimators.test_curvature import LATER, _ce_data, _mlp, record_pipeline


def _tempered(temperature: float):
    """A (forward, loss) pair whose loss is the cross-entropy of logits × ``temperature`` (a closure constant)."""
    return (lambda m, b: m(b[0]), lambda out, b: torch.nn.functional.cross_entropy(out * temperature, b[1]))


class _CallableLoss:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, out, b):
        return torch.nn.functional.cross_entropy(out * self.temperature, b[1])


def _embedding(emb) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in emb.items(0)}


@pytest.fixture
def ledger_and_model(tmp_path):
    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["sgd-nesterov"], steps=(4, 4), segments=1)
    return ledger, model


def test_two_different_loss_functions_give_different_embeddings(ledger_and_model):
    ledger, model = ledger_and_model
    options = {"model": model, "krylov_size": 4, "sample_size": 16}
    first = _embedding(stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": _tempered(1.0)}, **options))
    second = _embedding(stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": _tempered(3.0)}, **options))
    fresh = _embedding(
        stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": _tempered(3.0)}, recompute=True, **options)
    )
    diff = max((first[n] - second[n]).abs().max().item() for n in first)
    print(f"max |v(T=1) - v(T=3)| = {diff:.3g}")
    assert diff > 1e-6, "the second loss was served the first loss's cached embeddings"
    for name in fresh:  # and what the cache serves for T=3 is what T=3 computes
        assert torch.equal(second[name], fresh[name])
    path = ledger.embeddings_dir / "aa-ggn.safetensors"
    stamp = path.stat().st_mtime_ns
    again = _embedding(stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": _tempered(3.0)}, **options))
    assert path.stat().st_mtime_ns == stamp, "an equal loss (a new closure, same code and constant) reuses the cache"
    assert all(torch.equal(again[n], fresh[n]) for n in fresh)


def test_a_loss_that_cannot_be_keyed_is_recomputed_and_says_so(ledger_and_model):
    ledger, model = ledger_and_model
    options = {"model": model, "krylov_size": 4, "sample_size": 16}
    pair = (lambda m, b: m(b[0]), _CallableLoss(1.0))
    assert callable_fingerprint(pair) is None
    first = _embedding(stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": pair}, **options))
    pair[1].temperature = 3.0  # the same object, another result: only recomputing can see it
    with pytest.warns(UserWarning, match=r"stage\(s\) \['s2'\] cannot be fingerprinted.*recomputing"):
        second = _embedding(stage_embeddings(ledger, "aa-ggn", [0], loss_fns={"s2": pair}, **options))
    assert max((first[n] - second[n]).abs().max().item() for n in first) > 1e-6


def test_fingerprints_see_code_constants_closures_and_partials():
    import functools

    def scaled(out, b, scale=1.0):
        return (out * scale).sum()

    assert callable_fingerprint(_tempered(1.0)) == callable_fingerprint(_tempered(1.0))
    assert callable_fingerprint(_tempered(1.0)) != callable_fingerprint(_tempered(2.0))
    assert callable_fingerprint(lambda x: x + 1) != callable_fingerprint(lambda x: x + 2)
    assert callable_fingerprint(functools.partial(scaled, scale=2.0)) != callable_fingerprint(
        functools.partial(scaled, scale=3.0)
    )
    weights = torch.ones(3)
    closure = lambda out, b: (out * weights).sum()  # noqa: E731
    before = callable_fingerprint(closure)
    weights[0] = 2.0
    assert callable_fingerprint(closure) != before


def logits(model, batch):  # reads `.logits`, the name of this global function: a (forward, loss) pair's usual shape
    return model(batch).logits


SCALE = 1.0


def depth(n):  # recursive, through a global
    return SCALE if n == 0 else depth(n - 1)


def test_a_function_named_again_inside_itself_is_fingerprinted_and_its_globals_still_count():
    global SCALE
    assert callable_fingerprint(logits) is not None  # was None: hashed `logits` inside `logits` until too deep
    before = callable_fingerprint(depth)
    assert before is not None
    SCALE = 2.0
    try:
        assert callable_fingerprint(depth) != before
    finally:
        SCALE = 1.0


def test_an_embedding_equal_to_the_recorded_delta_is_read_from_the_ledger_not_copied(tmp_path):
    """Later stages that ran Adam or SGD without weight decay carry an update unchanged, bit for bit, and the last
    stage has nothing to carry it through: the cache lists those tensors as ``unchanged`` and reads them from the
    ledger (on SmolLM2-135M the cache of the default estimator fell from 538 MB to a header). A stage with weight
    decay after it is still stored, and every value is the one propagation computes."""
    import json

    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.estimators.propagation.stage import StagePropagator, iter_propagated, next_trained

    torch.manual_seed(0)
    model, ledger = torch.nn.Linear(3, 2), StageLedger(tmp_path / "ledger")
    x = torch.randn(8, 3)
    for name, make in (
        ("a", lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0)),
        ("b", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.2)),  # a decay: a's embedding is not its delta
        ("c", lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0)),
        ("d", lambda p: torch.optim.Adam(p, lr=0.05)),
    ):
        opt = make(model.parameters())
        with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            for _ in range(3):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
                rec.step()
    emb = stage_embeddings(ledger, "aa-linear")
    stored = json.loads(emb._handle.metadata()["unchanged"])
    assert stored == {"1": ["bias", "weight"], "2": ["bias", "weight"], "3": ["bias", "weight"]}
    assert sorted(emb._keys) == [0] and sorted(emb._keys[0]) == ["bias", "weight"]
    stages = ledger.stages
    props = {j: StagePropagator(stages[j], next_trained(stages, j)) for j in range(1, len(stages))}
    for k in range(len(stages)):
        assert emb.names(k) == ["weight", "bias"]
        for name in emb.names(k):
            ((_, expected),) = iter_propagated(ledger, name, [k], props, {}, set())
            assert torch.equal(emb.get(k, name), expected.to(torch.float32)), (k, name)
            if k > 0:
                assert torch.equal(emb.get(k, name), stages[k].delta_tensor(name))
    assert not torch.equal(emb.get(0, "weight"), stages[0].delta_tensor("weight"))


CLASS_WEIGHTS = torch.ones(3)
WEIGHTS_BY_NAME = {"scale": 1.0}
CRITERION = torch.nn.CrossEntropyLoss()


def weighted_loss(out, b):  # reads a global tensor and a global dict
    return torch.nn.functional.cross_entropy(out * WEIGHTS_BY_NAME["scale"], b[1], weight=CLASS_WEIGHTS)


def criterion_loss(out, b):  # reads a global loss module, whose state the fingerprint cannot read
    return CRITERION(out, b[1])


def test_globals_a_loss_reads_are_fingerprinted_by_content_or_make_it_unkeyable():
    """A global tensor, list or dict a loss reads changes its fingerprint when its content changes (a loss's class
    weights changed from (1, 1, 1) to (20, 1, 0.05) kept the fingerprint, and the cached aa-ggn result was served
    again: +16 % on one stage); a global object whose state cannot be read (an ``nn.Module`` criterion) makes the
    loss unkeyable, so its cache is never reused."""
    before = callable_fingerprint(weighted_loss)
    assert before is not None
    CLASS_WEIGHTS[0] = 20.0
    try:
        after_tensor = callable_fingerprint(weighted_loss)
    finally:
        CLASS_WEIGHTS[0] = 1.0
    WEIGHTS_BY_NAME["scale"] = 2.0
    try:
        after_dict = callable_fingerprint(weighted_loss)
    finally:
        WEIGHTS_BY_NAME["scale"] = 1.0
    assert len({before, after_tensor, after_dict}) == 3
    assert callable_fingerprint(weighted_loss) == before
    assert callable_fingerprint(criterion_loss) is None


def test_a_stage_the_cache_file_does_not_hold_is_an_error_not_zeros(ledger_and_model):
    """A process that opened a cache file another process wrote for other stages (the race the attributor's
    main-process-first ``prepare`` avoids) would have read ``v_k = 0``: it is refused, naming what the file holds."""
    from hf_stage_attribution.errors import EstimatorError

    ledger, _ = ledger_and_model
    emb = stage_embeddings(ledger, "aa-linear", [1])
    assert emb.stage_indices == [1] and emb.norm(1) > 0
    name = ledger.parameter_names[0]
    for read in (lambda: emb.get(0, name), lambda: emb.names(0)):
        with pytest.raises(EstimatorError, match=r"to hold stage 0, found stages \[1\]"):
            read()
