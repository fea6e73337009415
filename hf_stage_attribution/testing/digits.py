"""Three-stage MLP pipelines on scikit-learn's bundled digits (1,797 real 8×8 images; offline), recorded in a ledger.

The pipelines of the fidelity experiment (ESTIMATORS.md §5, issue 3): stage 1 learns classes 0–4; stage 2 learns all
classes while a bright corner patch is correlated with label 7; stage 3 trains on a disjoint pool of clean images of
all classes. Two configurations:

* ``"decay"`` (*material decay*): SGD with momentum and coupled decay, then AdamW with decay, then SGD nesterov with
  coupled decay strong enough that the last stage's ``D_j`` is about 0.5.
* ``"hf"`` (*Hugging Face defaults*): AdamW with ``weight_decay=0``, a fresh optimizer per stage and a linear
  warmup-decay schedule (``transformers.get_linear_schedule_with_warmup``, 10 % warmup).

Each stage is recorded with the custom-loop recorder (``ledger.record_stage(..., loss_fn=(forward, loss))`` and
``rec.step(batch)`` after ``optimizer.step()``, before ``scheduler.step()``), so the ledger holds curvature
material. ``stage_fns`` re-run each stage exactly (same data order and seeds), for replay. Behaviors (``f(model) ->
Tensor[n]``, on held-out images): class margins (0, 3, 7, 9), the loss on classes stage 1 never saw (5–9), the loss
on classes 0–4, and the patch-reliance gap (class-7 margin with the patch minus without, on images of other classes).

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), seed=0, steps_scale=0.2, base_steps_scale=0.2)
    >>> [s.name for s in pipe.ledger.stages], sorted(pipe.behaviors)[:2]
    (['digits-base', 'digits-patch', 'digits-clean'], ['loss_seen', 'loss_unseen'])
    >>> len(pipe.behaviors["margin_7"](pipe.model)) > 1
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import estimators
from ..estimators.fidelity import fidelity
from ..estimators.replay import replay_model
from ..ledger.core import LedgerCore
from ..ledger.ledger import StageLedger

CONFIGS = ("decay", "hf")
PATCH_CLASS = 7
_PATCH = (slice(0, 2), slice(6, 8))  # top-right 2×2 corner of the 8×8 image


@dataclass(frozen=True)
class StageSpec:
    """The recipe of one digits stage (everything replay needs to re-run it)."""

    name: str
    kind: str
    pool: int  # which third of the training split
    classes: tuple[int, ...]
    patch: bool
    steps: int
    optimizer: str  # "sgd-momentum", "sgd-nesterov" or "adamw"
    lr: float
    weight_decay: float
    warmup_decay: bool = False
    batch_size: int = 32


def stage_specs(
    config: str, *, lr_scale: float = 1.0, steps_scale: float = 1.0, base_steps_scale: float = 1.0
) -> list[StageSpec]:
    """The three stages of ``config``; ``lr_scale`` / ``steps_scale`` multiply the *later* stages' rates / lengths,
    ``base_steps_scale`` the first stage's length."""
    if config not in CONFIGS:
        raise ValueError(f"`config` must be one of {CONFIGS}, got {config!r}.")

    def n(steps: int, later: bool) -> int:
        return max(4, round(steps * (steps_scale if later else base_steps_scale)))

    first, every, nest = tuple(range(5)), tuple(range(10)), "sgd-nesterov"
    if config == "decay":
        return [
            StageSpec("digits-base", "pretraining", 0, first, False, n(200, False), "sgd-momentum", 0.05, 1e-3),
            StageSpec("digits-patch", "fine-tuning", 1, every, True, n(150, True), "adamw", 1e-2 * lr_scale, 0.75),
            StageSpec("digits-clean", "fine-tuning", 2, every, False, n(300, True), nest, 0.01 * lr_scale, 0.05),
        ]  # fmt: skip
    return [
        StageSpec("digits-base", "pretraining", 0, first, False, n(200, False), "adamw", 1e-2, 0.0, True),
        StageSpec("digits-patch", "fine-tuning", 1, every, True, n(150, True), "adamw", 5e-3 * lr_scale, 0.0, True),
        StageSpec("digits-clean", "fine-tuning", 2, every, False, n(150, True), "adamw", 3e-3 * lr_scale, 0.0, True),
    ]


# --- data ---------------------------------------------------------------------------------------------------------


def add_patch(images: torch.Tensor) -> torch.Tensor:
    """A copy of ``images`` (``n×64``, values in [0, 1]) with the bright corner patch."""
    out = images.clone().view(-1, 8, 8)
    out[:, _PATCH[0], _PATCH[1]] = 1.0
    return out.view(-1, 64)


@dataclass
class DigitsData:
    """Training pools (one per stage) and the held-out split, as float32 tensors with values in [0, 1]."""

    pools: list[tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(seed: int = 0) -> DigitsData:
    """Split scikit-learn's digits: 1/3 held out, the rest into three disjoint training pools (seeded)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))
    test, train = perm[: len(y) // 3], perm[len(y) // 3 :]
    thirds = torch.tensor_split(train, 3)
    return DigitsData([(x[t], y[t]) for t in thirds], x[test], y[test])


def _stage_data(spec: StageSpec, data: DigitsData, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.pools[spec.pool]
    keep = torch.isin(y, torch.tensor(spec.classes))
    x, y = x[keep], y[keep]
    if spec.patch:
        g = torch.Generator().manual_seed(2000 + 10 * seed + index)
        prob = torch.where(y == PATCH_CLASS, 0.9, 0.05)
        mask = torch.rand(len(y), generator=g) < prob
        x = torch.where(mask[:, None], add_patch(x), x)
    return x, y


# --- model, loss, training ----------------------------------------------------------------------------------------


def digits_mlp(seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    """A 64–hidden–10 tanh MLP, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


def forward(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def _optimizer(spec: StageSpec, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    params = model.parameters()
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        nesterov = spec.optimizer == "sgd-nesterov"
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay, nesterov=nesterov)
    scheduler = None
    if spec.warmup_decay:
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(opt, max(1, spec.steps // 10), spec.steps)
    return opt, scheduler


def run_stage(model: torch.nn.Module, spec: StageSpec, data: DigitsData, seed: int, index: int, rec: Any = None,
              ledger: LedgerCore | None = None, curvature: tuple = (3, 256),
              max_steps: int | None = None,
              early_checkpoint: float | None = None, grad_every: int = 1) -> torch.optim.Optimizer:  # fmt: skip
    """Train ``model`` in place as stage ``index`` of the pipeline; recorded into ``ledger`` when one is given.

    ``max_steps`` stops after that many optimizer steps of the full recipe (the schedule spans the whole stage): the
    step-limited form partial replay uses. ``grad_every``: the gradient-reuse form strided replay uses (see
    :func:`train_steps`). Returns the optimizer."""
    x, y = _stage_data(spec, data, seed, index)
    opt, scheduler = _optimizer(spec, model)
    g = torch.Generator().manual_seed(3000 + 10 * seed + index)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(spec.steps * spec.batch_size // len(y) + 1)])
    recording = None
    if ledger is not None:
        recording = ledger.record_stage(
            spec.name, kind=spec.kind, model=model, optimizer=opt, scheduler=scheduler, loss_fn=(forward, loss),
            num_steps=spec.steps, curvature_segments=curvature[0], curvature_examples=curvature[1],
            curvature_material=curvature[2] if len(curvature) > 2 else "compact",
            metadata={"recipe": dataclasses.asdict(spec), "seed": seed}, early_checkpoint=early_checkpoint,
        )  # fmt: skip
        recording.begin()
    steps = spec.steps if max_steps is None else min(spec.steps, max_steps)
    train_steps(model, opt, scheduler, (x, y), order, spec.batch_size, steps, recording, grad_every=grad_every)
    return opt


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, scheduler: Any,
                data: tuple[torch.Tensor, torch.Tensor], order: torch.Tensor, batch_size: int, steps: int,
                recording: Any = None, grad_every: int = 1) -> None:  # fmt: skip
    """The custom training loop of a digits stage: ``steps`` batches of ``batch_size`` taken from ``data`` in
    ``order``; a begun ``recording`` gets every step and is ended (aborted on an exception).

    ``grad_every=s``: the forward and backward pass run on steps ``t`` with ``t % s == 0`` only (batch ``t``); the
    steps in between re-use that gradient, the optimizer and the schedule step as usual (the gradient-reuse form of
    strided replay, ``estimators.strided_replay``)."""
    if grad_every < 1:
        raise ValueError(f"`grad_every` must be a positive number of steps, got {grad_every!r}.")
    x, y = data
    model.train()
    try:
        with torch.enable_grad():
            for t in range(steps):
                idx = order[t * batch_size : (t + 1) * batch_size]
                batch = (x[idx], y[idx])
                if t % grad_every == 0:
                    opt.zero_grad(set_to_none=True)
                    loss(forward(model, batch), batch).backward()
                opt.step()
                if recording is not None:
                    recording.step(batch)
                if scheduler is not None:
                    scheduler.step()
    except BaseException:
        if recording is not None:
            recording.abort()
        raise
    if recording is not None:
        recording.end()


# --- behaviors ----------------------------------------------------------------------------------------------------


def _margin(logits: torch.Tensor, cls: int) -> torch.Tensor:
    others = torch.cat([logits[:, :cls], logits[:, cls + 1 :]], dim=1)
    return logits[:, cls] - others.max(dim=1).values


def digits_behaviors(data: DigitsData, per_behavior: int = 60) -> dict[str, Callable[[torch.nn.Module], torch.Tensor]]:
    """Seven behaviors on held-out images, each ``f(model) -> Tensor[n]`` (differentiable)."""
    x, y = data.x_test, data.y_test

    def of_class(classes: tuple[int, ...]) -> torch.Tensor:
        return torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()[:per_behavior]

    def margin(cls: int) -> Callable[[torch.nn.Module], torch.Tensor]:
        idx = of_class((cls,))
        return lambda model: _margin(model(x[idx]), cls)

    def ce(classes: tuple[int, ...]) -> Callable[[torch.nn.Module], torch.Tensor]:
        idx = of_class(classes)
        return lambda model: torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")

    other = of_class(tuple(c for c in range(10) if c != PATCH_CLASS))
    clean, patched = x[other], add_patch(x[other])

    def patch_gap(model: torch.nn.Module) -> torch.Tensor:
        return _margin(model(patched), PATCH_CLASS) - _margin(model(clean), PATCH_CLASS)

    return {
        "margin_0": margin(0), "margin_3": margin(3), "margin_7": margin(7), "margin_9": margin(9),
        "loss_unseen": ce(tuple(range(5, 10))), "loss_seen": ce(tuple(range(5))), "patch_gap": patch_gap,
    }  # fmt: skip


# --- the pipeline -------------------------------------------------------------------------------------------------


@dataclass
class DigitsPipeline:
    """A recorded digits pipeline: its ledger, final model, behaviors, and the stage functions replay needs."""

    config: str
    seed: int
    ledger: LedgerCore
    model: torch.nn.Module
    specs: list[StageSpec]
    data: DigitsData
    behaviors: dict[str, Callable[[torch.nn.Module], torch.Tensor]]
    stage_fns: dict[str, Callable[..., Any]]
    loss_fn: tuple[Callable, Callable] = (forward, loss)
    seconds: dict[str, float] = field(default_factory=dict)


def build_digits_pipeline(
    config: str,
    ledger_dir: str | Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    lr_scale: float = 1.0,
    steps_scale: float = 1.0,
    base_steps_scale: float = 1.0,
    curvature_segments: int = 3,
    curvature_examples: int = 256,
    curvature_material: str = "compact",
    early_checkpoint: float | None = None,
) -> DigitsPipeline:
    """Train and record the three stages of ``config`` into a new ledger at ``ledger_dir`` (see module doc);
    ``early_checkpoint``: as ``record_stage``'s (opt-in factual checkpoint for partial replay)."""

    specs = stage_specs(config, lr_scale=lr_scale, steps_scale=steps_scale, base_steps_scale=base_steps_scale)
    data = digits_data(seed)
    ledger = StageLedger(ledger_dir)
    model = digits_mlp(seed, hidden)
    seconds = {}
    for index, spec in enumerate(specs):
        start = time.perf_counter()
        curvature = (curvature_segments, curvature_examples, curvature_material)
        run_stage(model, spec, data, seed, index, ledger=ledger, curvature=curvature,
                  early_checkpoint=early_checkpoint)  # fmt: skip
        seconds[spec.name] = time.perf_counter() - start

    fns = digits_stage_fns(specs, data, seed)
    return DigitsPipeline(config, seed, ledger, model, specs, data, digits_behaviors(data), fns, seconds=seconds)


def digits_stage_fns(specs: list[StageSpec], data: DigitsData, seed: int) -> dict[str, Callable[..., Any]]:
    """``{stage name: fn(model, max_steps=None, grad_every=1)}`` re-running the stages :func:`build_digits_pipeline`
    recorded from ``specs``, ``data`` and ``seed`` (the same data order and seeds): for replay, in the step-limited
    and gradient-reuse forms. A process that did not record the pipeline rebuilds them from the same arguments.

    Example:
        >>> specs = stage_specs("hf", steps_scale=0.05, base_steps_scale=0.05)
        >>> sorted(digits_stage_fns(specs, digits_data(0), 0)) == sorted(s.name for s in specs)
        True
    """

    def stage_fn(index: int) -> Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]]:
        def fn(
            m: torch.nn.Module, max_steps: int | None = None, grad_every: int = 1
        ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            return m, run_stage(m, specs[index], data, seed, index, max_steps=max_steps, grad_every=grad_every)

        return fn

    return {spec.name: stage_fn(i) for i, spec in enumerate(specs)}


# --- fidelity against replay ----------------------------------------------------------------------------------------

ESTIMATORS = ("delta-linear", "delta-fd", "aa-linear", "aa-fd", "aa-ggn", "aa-ggn-fd", "aa-hvp", "aa-hvp-fd")


def replay_truth(pipe: DigitsPipeline) -> tuple[dict[tuple[str, str], torch.Tensor], float]:
    """``τ_k`` per (stage, behavior) by replay (one counterfactual model per stage, every behavior), and seconds."""

    start = time.perf_counter()
    truth = {}
    with torch.no_grad():
        final = {b: f(pipe.model) for b, f in pipe.behaviors.items()}
        for stage in pipe.ledger.stages:
            cf = replay_model(pipe.ledger, pipe.model, stage.index, stage_fns=pipe.stage_fns)
            for b, f in pipe.behaviors.items():
                truth[(stage.name, b)] = (final[b] - f(cf)).double()
    return truth, time.perf_counter() - start


def fidelity_rows(
    pipe: DigitsPipeline, names: tuple[str, ...] = ESTIMATORS, truth: dict | None = None, **options: Any
) -> dict[str, dict[str, Any]]:
    """Per estimator: the fidelity figures of ``estimators.fidelity.fidelity`` against replay, plus ``seconds``."""

    truth = truth if truth is not None else replay_truth(pipe)[0]
    rows = {}
    for name in names:
        start = time.perf_counter()
        est = {}
        for b, f in pipe.behaviors.items():
            result = estimators.get(name).estimate(pipe.ledger, pipe.model, f, **options)
            est.update({(stage, b): v for stage, v in result.per_example.items()})
        rows[name] = dict(fidelity(est, truth, terminal_stage=pipe.ledger.stages[-1].name))
        rows[name]["seconds"] = time.perf_counter() - start
    return rows
