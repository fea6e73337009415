"""Digits pipelines that can catch untrustworthy answers (issue 13, item 4), recorded with curvature material.

Both train the 64-32-10 MLP of ``testing.digits`` on scikit-learn's digits, one optimizer and learning-rate schedule
per stage (every optimizer family the propagation supports), recorded with the custom-loop recorder
(``loss_fn=(forward, loss)``, ``num_steps``, curvature segments) and replayed by stage functions:

- ``digits-undo`` (4 stages): SGD + momentum, constant rate (base, clean) → Adam, cosine decay (a bright corner patch
  correlated with class 7: the *shortcut*) → RMSprop, step decay (the patch on images of other classes: the shortcut
  partly *unlearned*) → AdamW with weight decay, warmup + linear decay (clean polish). A later stage undoes part of
  an earlier one, so the shortcut stage's effect on the patch behavior depends on what the next stage reacts to.
- ``digits-first`` (3 stages): Adagrad, constant rate, long (learns the classes *and* the shortcut) → SGD + momentum,
  linear decay, short and slow (clean) → AdamW, warmup + linear decay, short and slow (clean). The *first* stage is
  the accountable one for most behaviors: later stages re-run from the initialisation cannot make up for it.

Behaviors: the seven of ``testing.digits.digits_behaviors`` (class margins, losses on seen/unseen classes, the
patch-reliance gap).

Example:
    >>> import tempfile
    >>> pipe = build_shortcut_pipeline("undo", tempfile.mkdtemp(), seed=0, steps_scale=0.05)
    >>> [s.name for s in pipe.ledger.stages]
    ['base', 'shortcut', 'unlearn', 'polish']
    >>> [s.optimizer["type"] for s in pipe.ledger.stages]
    ['SGD', 'Adam', 'RMSprop', 'AdamW']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.testing.digits import (
    PATCH_CLASS,
    DigitsData,
    add_patch,
    digits_behaviors,
    digits_data,
    digits_mlp,
    forward,
    loss,
    train_steps,
)

CONFIGS = ("undo", "first")


@dataclass(frozen=True)
class Spec:
    """One stage: data (pool, patch mode), length, optimizer and schedule."""

    name: str
    kind: str
    pool: int
    patch: str  # "none", "with-7" (shortcut: patch on 90 % of class 7, 5 % of others) or "against-7"
    steps: int
    optimizer: str  # "sgd-momentum", "adam", "adamw", "rmsprop", "adagrad"
    lr: float
    schedule: str  # "constant", "cosine", "step", "linear", "warmup-linear"
    weight_decay: float = 0.0
    batch_size: int = 32


def specs(config: str, steps_scale: float = 1.0) -> list[Spec]:
    """The stages of ``config`` (``"undo"`` or ``"first"``), lengths multiplied by ``steps_scale`` (at least 4)."""

    def n(steps: int) -> int:
        return max(4, round(steps * steps_scale))

    if config == "undo":
        return [
            Spec("base", "pretraining", 0, "none", n(150), "sgd-momentum", 0.05, "constant"),
            Spec("shortcut", "fine-tuning", 1, "with-7", n(100), "adam", 1e-2, "cosine"),
            Spec("unlearn", "fine-tuning", 2, "against-7", n(100), "rmsprop", 1e-3, "step"),
            Spec("polish", "fine-tuning", 0, "none", n(60), "adamw", 2e-3, "warmup-linear", weight_decay=0.01),
        ]
    if config == "first":
        return [
            Spec("base", "pretraining", 0, "with-7", n(200), "adagrad", 0.1, "constant"),
            Spec("sft", "sft", 1, "none", n(40), "sgd-momentum", 0.005, "linear"),
            Spec("align", "fine-tuning", 2, "none", n(40), "adamw", 5e-4, "warmup-linear"),
        ]
    raise ValueError(f"`config` must be one of {CONFIGS}, got {config!r}.")


def _stage_data(spec: Spec, data: DigitsData, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.pools[spec.pool]
    if spec.patch == "none":
        return x, y
    g = torch.Generator().manual_seed(5000 + 10 * seed + index)
    if spec.patch == "with-7":
        prob = torch.where(y == PATCH_CLASS, 0.9, 0.05)
    else:  # against-7: the patch now appears on other classes, never on 7
        prob = torch.where(y == PATCH_CLASS, 0.0, 0.3)
    mask = torch.rand(len(y), generator=g) < prob
    return torch.where(mask[:, None], add_patch(x), x), y


def _optimizer(spec: Spec, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    params, lr, wd = model.parameters(), spec.lr, spec.weight_decay
    make = {
        "sgd-momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, alpha=0.99, weight_decay=wd),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=wd),
    }
    opt = make[spec.optimizer]()
    steps, warm = spec.steps, max(1, spec.steps // 10)
    factor: Callable[[int], float] = {
        "constant": lambda t: 1.0,
        "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)),
        "step": lambda t: 0.5 ** (3 * t // steps),
        "linear": lambda t: max(0.0, 1.0 - t / steps),
        "warmup-linear": lambda t: (t + 1) / warm if t < warm else max(0.0, (steps - t) / (steps - warm)),
    }[spec.schedule]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def run_stage(
    model: torch.nn.Module,
    spec: Spec,
    data: DigitsData,
    seed: int,
    index: int,
    ledger: Any = None,
    max_steps: int | None = None,
    early_checkpoint: float | None = None,
    grad_every: int = 1,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Train ``model`` in place as stage ``index``; recorded into ``ledger`` when one is given (else: replay).

    ``max_steps`` stops after that many optimizer steps of the full recipe (the schedule spans the whole stage): the
    step-limited form partial replay needs; ``grad_every`` the gradient-reuse form of strided replay
    (``testing.digits.train_steps``). Returns the model and the optimizer (its state carries the momentum)."""
    x, y = _stage_data(spec, data, seed, index)
    opt, scheduler = _optimizer(spec, model)
    g = torch.Generator().manual_seed(6000 + 10 * seed + index)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(spec.steps * spec.batch_size // len(y) + 1)])
    rec = None
    if ledger is not None:
        rec = ledger.record_stage(
            spec.name, kind=spec.kind, model=model, optimizer=opt, scheduler=scheduler, loss_fn=(forward, loss),
            num_steps=spec.steps, curvature_segments=3, curvature_examples=256,
            metadata={"recipe": dataclasses.asdict(spec), "seed": seed}, early_checkpoint=early_checkpoint,
        )  # fmt: skip
        rec.begin()
    steps = spec.steps if max_steps is None else min(spec.steps, max_steps)
    train_steps(model, opt, scheduler, (x, y), order, spec.batch_size, steps, rec, grad_every=grad_every)
    return model, opt


@dataclass
class ShortcutPipeline:
    """A recorded pipeline: ledger, final model, behaviors, stage functions for replay, the stage recipes."""

    config: str
    seed: int
    ledger: Any
    model: torch.nn.Module
    specs: list[Spec]
    behaviors: dict[str, Callable[[torch.nn.Module], torch.Tensor]]
    stage_fns: dict[str, Callable[..., Any]]


def build_shortcut_pipeline(
    config: str,
    ledger_dir: str | Path,
    *,
    seed: int = 0,
    steps_scale: float = 1.0,
    early_checkpoint: float | None = None,
):
    """Train and record ``config`` (``"undo"`` or ``"first"``) into a new ledger at ``ledger_dir``
    (``early_checkpoint``: as ``record_stage``'s)."""
    stages = specs(config, steps_scale)
    data = digits_data(seed)
    ledger = StageLedger(ledger_dir)
    model = digits_mlp(seed)
    for index, spec in enumerate(stages):
        run_stage(model, spec, data, seed, index, ledger=ledger, early_checkpoint=early_checkpoint)

    def stage_fn(index: int) -> Callable[..., Any]:
        def fn(
            m: torch.nn.Module, max_steps: int | None = None, grad_every: int = 1
        ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            return run_stage(m, stages[index], data, seed, index, max_steps=max_steps, grad_every=grad_every)

        return fn

    fns = {spec.name: stage_fn(i) for i, spec in enumerate(stages)}
    return ShortcutPipeline(config, seed, ledger, model, stages, digits_behaviors(data), fns)


def describe(stages: list[Spec]) -> str:
    """One line per pipeline for BENCHMARKS.md."""
    return "MLP 64-32-10 on sklearn digits; " + "; ".join(
        f"{s.name} {s.steps} steps {s.optimizer} ({s.schedule}, lr {s.lr:g}"
        + (f", wd {s.weight_decay:g}" if s.weight_decay else "")
        + f", patch {s.patch})"
        for s in stages
    )
