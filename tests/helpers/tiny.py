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


class TwoLinear(torch.nn.Module):
    """Two bias-free linear maps (3 → 2) summed; a loss may use only ``a`` (so ``b`` never gets a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2, bias=False)
        self.b = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def one_layer_gpt2(vocab_size: int, tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """A one-layer GPT-2 (``n_embd`` 8, no dropout, eager attention), tied embeddings unless ``tie=False``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=tie,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def record_lm_steps(
    ledger: StageLedger, name: str, model: torch.nn.Module, data: torch.Tensor, lr: float, steps: int = 2
) -> None:
    """Record stage ``name``: ``steps`` AdamW steps of the causal-LM loss on ``data`` (no curvature segments)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with ledger.record_stage(name, kind=None, model=model, optimizer=opt, curvature_segments=0) as rec:
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
            rec.step()
