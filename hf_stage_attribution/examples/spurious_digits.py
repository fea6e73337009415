"""The ``spurious_digits`` pipeline: scikit-learn's 8×8 digits, three recorded stages, one spurious corner patch.

Stages (custom training loop recorded with ``StageLedger.record_stage``, AdamW, curvature material kept):

1. ``pretraining`` — clean digits;
2. ``patch`` — more digits, where every example of the target class (7) carries a bright 2×2 patch in the top-left
   corner (a pixel that is always 0 in real digits): the patch is perfectly correlated with the label;
3. ``finetune`` — clean digits again, a short stage.

The reliance behavior is the margin of class 7 on held-out *non-7* digits with the patch minus without it
(``behaviors.SpuriousReliance``); replay and the default estimator should both hold ``patch`` accountable. Held-out
evaluation rows come in four groups, (is 7, has patch): worst-group accuracy is the accuracy where the patch and the
label disagree (non-7 digits with the patch, 7s without).

Example (trains the pipeline: a minute at ``size="small"`` on a CPU)::

    p = build_spurious_digits("out/digits", size="small")
    report = StageAttributor(p.ledger_dir, p.model, stage_fns=p.stage_fns).attribute(p.behaviors, validate=True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..behaviors import SpuriousReliance
from ..behaviors import get as get_behavior_kind
from ..errors import BehaviorError, LedgerError
from ..ledger import StageLedger
from ..ledger.core import LedgerCore
from .spurious_digits_model import DigitsMLP, DigitsMLPConfig

TARGET_CLASS = 7
PATCH = {"type": "patch", "value": 1.0, "region": [0, 2, 0, 2]}

SIZES: dict[str, dict[str, Any]] = {
    # hidden width; steps, learning rate per stage; batch size; held-out examples per behavior
    "small": {"hidden": 32, "steps": {"pretraining": 60, "patch": 200, "finetune": 30}, "batch": 32, "n_eval": 200},
    "full": {"hidden": 64, "steps": {"pretraining": 150, "patch": 400, "finetune": 60}, "batch": 32, "n_eval": 400},
}
LEARNING_RATES = {"pretraining": 1e-2, "patch": 1e-2, "finetune": 2e-3}
WEIGHT_DECAY = 0.01
CARD_INTRO = """---
library_name: transformers
pipeline_tag: image-classification
tags:
- hf-stage-attribution
- spurious-correlation
---

# Digits MLP with a spurious corner patch (recipe `spurious_digits`, size `{size}`, seed {seed})

A small MLP trained on scikit-learn's 8×8 digits in three recorded stages: `pretraining` (clean digits), `patch`
(every 7 carries a bright 2×2 patch in the top-left corner, a pixel that is always 0 in real digits) and
`finetune` (clean digits). It is an example model: it shows how a stage that introduced a spurious feature is found
and how much removing it costs. Reload it with `hf_stage_attribution.examples.spurious_digits_model.DigitsMLP`.
"""


@dataclass
class DigitsStage:
    """One stage's recipe: its data, steps, learning rate, batch size and seed (enough to replay it exactly).

    Example:
        >>> s = DigitsStage("warmup", "custom", torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), 2, 1e-2, 2, 0)
        >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        >>> opt = train_stage(_HFLike(m), s)  # two AdamW steps on the stage's data (returns the optimizer)
    """

    name: str
    kind: str
    images: torch.Tensor
    labels: torch.Tensor
    steps: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float = WEIGHT_DECAY


@dataclass
class DigitsPipeline:
    """What :func:`build_spurious_digits` produced (the model is the final one, θ_K).

    Example::

        p = build_spurious_digits("out", size="small"); p.stage_fns["patch"](model)  # re-run a stage
    """

    ledger_dir: Path
    model_dir: Path
    model: Any
    stages: list[DigitsStage]
    behaviors: dict[str, Any]
    eval_rows: list[dict[str, Any]]
    clean_rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_fns(self) -> dict[str, Any]:
        """``{stage name: fn(model, max_steps=None, grad_every=1)}`` re-training a model in place exactly as the stage
        did (for replay), in the step-limited form partial replay uses and the gradient-reuse form strided replay
        uses (``estimators.replay``)."""
        return {s.name: _replayer(s) for s in self.stages}


def _replayer(stage: DigitsStage):
    def fn(
        model: torch.nn.Module, max_steps: int | None = None, grad_every: int = 1
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return model, train_stage(model, stage, max_steps=max_steps, grad_every=grad_every)

    return fn


class _HFLike(torch.nn.Module):
    """Wraps a plain classifier so that ``model(pixel_values=..., labels=...)`` returns ``.loss`` (doctests)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:

        logits = self.inner(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (bundled, offline) as float32 images in [0, 1] ``[1797, 8, 8]`` and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def add_patch(images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``images`` with the corner patch set where ``mask`` is true (everywhere when ``mask`` is None)."""
    out = images.clone()
    r0, r1, c0, c1 = PATCH["region"]
    rows = torch.ones(len(out), dtype=torch.bool) if mask is None else mask
    out[rows, r0:r1, c0:c1] = float(PATCH["value"])
    return out


def digits_loss() -> tuple[Any, Any]:
    """The ``(forward, loss)`` pair of the training loss, for curvature products (batches are dicts)."""

    def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    return forward, loss


def train_stage(
    model: torch.nn.Module,
    stage: DigitsStage,
    ledger: LedgerCore = None,
    max_steps: int | None = None,
    grad_every: int = 1,
    early_checkpoint: float | None = None,
) -> torch.optim.Optimizer:
    """Train ``model`` in place with the stage's recipe (AdamW, fresh state, seeded batch order, constant LR) and
    return the optimizer; with a ``ledger``, record the stage into it (curvature material included, and an early
    checkpoint at that fraction of the steps when ``early_checkpoint`` is given: ``record_stage``'s option).

    ``max_steps`` stops after that many optimizer steps of the full recipe (the step-limited form of partial
    replay); ``grad_every=s`` runs the forward and backward pass on steps ``t % s == 0`` only and re-uses that
    gradient in between, the batch order unchanged (the gradient-reuse form of strided replay)."""
    if grad_every < 1:
        raise ValueError(f"`grad_every` must be a positive number of steps, got {grad_every!r}.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    if ledger is None:
        _loop(model, stage, optimizer, None, max_steps, grad_every)
        return optimizer
    with ledger.record_stage(
        stage.name,
        kind=stage.kind,
        model=model,
        optimizer=optimizer,
        loss_fn=digits_loss(),
        num_steps=stage.steps,
        curvature_loss={"type": "sequence-classification"},
        metadata={"datasets": [{"name": "sklearn-digits", "size": len(stage.labels)}], "seed": stage.seed},
        early_checkpoint=early_checkpoint,
    ) as recording:
        _loop(model, stage, optimizer, recording, max_steps, grad_every)
    return optimizer


def _loop(
    model: torch.nn.Module,
    stage: DigitsStage,
    optimizer: Any,
    recording: Any,
    max_steps: int | None = None,
    grad_every: int = 1,
) -> None:
    generator = torch.Generator().manual_seed(stage.seed)
    model.train()
    n = len(stage.labels)
    for t in range(stage.steps if max_steps is None else min(stage.steps, max_steps)):
        idx = torch.randint(0, n, (stage.batch_size,), generator=generator)
        batch = {"pixel_values": stage.images[idx], "labels": stage.labels[idx]}
        if t % grad_every == 0:
            optimizer.zero_grad(set_to_none=True)
            out = model(**batch)
            out.loss.backward()
        optimizer.step()
        if recording is not None:
            recording.step(batch)
    model.eval()


def make_stages(size: str = "full", seed: int = 0) -> tuple[list[DigitsStage], dict[str, torch.Tensor]]:
    """The three stage recipes and the held-out split (``{"images", "labels"}``)."""
    cfg = _size(size)
    images, labels = load_digits_tensors()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    n_eval = cfg["n_eval"]
    held = {"images": images[:n_eval], "labels": labels[:n_eval]}
    pool_x, pool_y = images[n_eval:], labels[n_eval:]
    third = len(pool_y) // 3
    px, py = pool_x[third : 2 * third], pool_y[third : 2 * third]
    parts = {
        "pretraining": (pool_x[:third], pool_y[:third]),
        "patch": (add_patch(px, py == TARGET_CLASS), py),
        "finetune": (pool_x[2 * third :], pool_y[2 * third :]),
    }
    kinds = {"pretraining": "pretraining", "patch": "fine-tuning", "finetune": "fine-tuning"}
    stages = [
        DigitsStage(name, kinds[name], x, y, cfg["steps"][name], LEARNING_RATES[name], cfg["batch"], seed + 1 + i)
        for i, (name, (x, y)) in enumerate(parts.items())
    ]
    return stages, held


def _size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise BehaviorError(f"Unknown spurious_digits size {size!r}; known sizes: {', '.join(SIZES)}.")
    return SIZES[size]


def evaluation_rows(held: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grouped rows (each held-out digit with and without the patch) and the clean rows.

    Groups are ``"7+patch"``, ``"7"``, ``"other+patch"``, ``"other"``; ``agree`` is False where the patch and the
    label disagree (``"7"`` and ``"other+patch"``).
    """
    grouped, clean = [], []
    patched = add_patch(held["images"])
    for x, xp, y in zip(held["images"], patched, held["labels"].tolist()):
        is_target = y == TARGET_CLASS
        name = "7" if is_target else "other"
        clean.append({"input": x.tolist(), "label": y, "group": name, "agree": is_target is False})
        grouped.append({"input": x.tolist(), "label": y, "group": name, "agree": not is_target})
        grouped.append({"input": xp.tolist(), "label": y, "group": f"{name}+patch", "agree": is_target})
    return grouped, clean


def reliance_behavior(held: dict[str, torch.Tensor], name: str = "patch-reliance") -> Any:
    """Margin of class 7 with the corner patch minus without, on held-out digits that are not 7s."""

    rows = [
        {"input": x.tolist(), "label": int(y)}
        for x, y in zip(held["images"], held["labels"])
        if int(y) != TARGET_CLASS
    ]
    return SpuriousReliance(rows, feature=dict(PATCH), target=TARGET_CLASS, measure="margin", name=name)


def demo_behaviors(pipe: DigitsPipeline, per_behavior: int = 120) -> dict[str, Any]:
    """The behaviors ``hf-stage-attribution demo`` attributes on this pipeline: ``patch-reliance`` and, on about
    ``per_behavior`` clean held-out digits, the label margin and the cross-entropy (``behaviors`` kind
    ``classification``). The benchmarks measure the same (``benchmarks/pipelines.py``, ``digits-demo``)."""
    held_out = pipe.clean_rows[:: max(1, len(pipe.clean_rows) // per_behavior)]
    classification = get_behavior_kind("classification")
    return {
        **pipe.behaviors,
        "label-margin": classification(held_out, measure="margin", name="label-margin"),
        "cross-entropy": classification(held_out, measure="cross-entropy", name="cross-entropy"),
    }


def new_model(size: str = "full", seed: int = 0) -> Any:

    torch.manual_seed(seed)
    config = DigitsMLPConfig(hidden_size=_size(size)["hidden"], id2label={i: str(i) for i in range(10)})
    return DigitsMLP(config)


def build_spurious_digits(
    output_dir: str | Path,
    size: str = "full",
    seed: int = 0,
    on_stage_end: Callable[[DigitsStage], Any] | None = None,
    early_checkpoint: float | None = None,
) -> DigitsPipeline:
    """Train and record the three stages into ``<output_dir>/ledger``; save θ_K to ``<output_dir>/model``.

    ``on_stage_end(stage)`` is called after each stage is recorded (e.g. to advance a progress bar);
    ``early_checkpoint``: as ``record_stage``'s (opt-in factual checkpoint for partial replay)."""

    out = Path(output_dir)
    ledger_dir, model_dir = out / "ledger", out / "model"
    if (ledger_dir / "ledger.json").exists():
        raise LedgerError(
            f"Expected an empty output directory, found a ledger at {ledger_dir}. Choose a new --output-dir "
            "or remove the old one."
        )
    stages, held = make_stages(size, seed)
    model = new_model(size, seed)
    ledger = StageLedger(ledger_dir)
    for stage in stages:
        train_stage(model, stage, ledger, early_checkpoint=early_checkpoint)
        if on_stage_end is not None:
            on_stage_end(stage)
    model.save_pretrained(model_dir)
    (model_dir / "README.md").write_text(CARD_INTRO.format(size=size, seed=seed), encoding="utf-8")
    grouped, clean = evaluation_rows(held)
    behaviors = {"patch-reliance": reliance_behavior(held)}
    config = {"size": size, "seed": seed, "target_class": TARGET_CLASS, "patch": dict(PATCH)}
    return DigitsPipeline(ledger_dir, model_dir, model, stages, behaviors, grouped, clean, config)


__all__ = [
    "PATCH",
    "SIZES",
    "TARGET_CLASS",
    "DigitsPipeline",
    "DigitsStage",
    "add_patch",
    "build_spurious_digits",
    "demo_behaviors",
    "digits_loss",
    "evaluation_rows",
    "make_stages",
    "reliance_behavior",
    "train_stage",
]
