"""A ledger of a ``torch.nn.Linear(2, 1)`` trained one SGD step per stage: the smallest real recording, for tests
of input checks and ledger bookkeeping."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_stage_attribution import StageLedger


def linear_ledger(path: str | Path, names: tuple[str, ...] = ("a", "b"), seed: int | None = None):
    """``(ledger, model)``: one recorded stage per name, each one SGD step on ``model(ones(1, 2)).sum()``."""
    if seed is not None:
        torch.manual_seed(seed)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = StageLedger(path)
    for name in names:
        with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            rec.step()
    return ledger, model
