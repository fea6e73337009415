"""A tiny recorded 3-stage MLP pipeline and behaviors whose sizes do not divide by 2 (shared by attributor tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.behaviors import PerExample


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def forward(model, batch):
    return model(batch[0])


def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


OPTIMIZERS = [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.05),
]


def stage_fns(steps: int = 8) -> dict:
    """``{stage name: fn(model, max_steps=None)}`` re-training a model in place as :func:`record_pipeline`'s stages
    did (replay), or their first ``max_steps`` steps (the step-limited form partial replay needs); each returns
    ``(None, optimizer)`` so that a stopped stage hands on its moments."""

    def make(k: int):
        def train(model: torch.nn.Module, max_steps: int | None = None) -> tuple[None, torch.optim.Optimizer]:
            opt, batch = OPTIMIZERS[k](model.parameters()), _data(k)
            for _ in range(steps if max_steps is None else min(steps, max_steps)):
                opt.zero_grad()
                loss(forward(model, batch), batch).backward()
                opt.step()
            return None, opt

        return train

    return {f"stage{k}": make(k) for k in range(len(OPTIMIZERS))}


def record_pipeline(ledger_dir: Path, steps: int = 8) -> tuple[StageLedger, torch.nn.Module]:
    """Three stages: SGD momentum with coupled decay, AdamW with decay, plain SGD."""
    model = make_mlp()
    ledger = StageLedger(ledger_dir)
    for k, make_opt in enumerate(OPTIMIZERS):
        opt = make_opt(model.parameters())
        batch = _data(k)
        with ledger.record_stage(
            f"stage{k}", kind="custom", model=model, optimizer=opt, loss_fn=(forward, loss), num_steps=steps
        ) as rec:
            for _ in range(steps):
                opt.zero_grad()
                loss(forward(model, batch), batch).backward()
                opt.step()
                rec.step(batch)
    return ledger, model


def behaviors_for() -> dict:
    """Two behaviors over 7 and 5 examples (not divisible by 2 processes)."""
    x, y = _data(99, n=7)
    margin = PerExample(
        lambda m, batch: m(torch.stack([r[0] for r in batch])).gather(1, torch.stack([r[1] for r in batch])[:, None])[
            :, 0
        ],
        [(x[i], y[i]) for i in range(7)],
        batch_size=3,
    )
    x2, _ = _data(98, n=5)
    logit0 = PerExample(lambda m, batch: m(torch.stack(batch))[:, 0], [x2[i] for i in range(5)], batch_size=2)
    return {"target-logit": margin, "logit-0": logit0}
