"""A ``(forward, loss)`` pair for the curvature products of a recorded TRL DPO stage (``loss_fns={"dpo": ...}``).

The ledger's DPO stages carry ``curvature_loss={"type": "dpo", ...}``, which has no built-in loss in the curvature
engine: the caller passes one. The captured batches hold the policy's inputs with chosen and rejected sequences
concatenated along the batch (chosen first) and ``labels`` = -100 on prompt and padding. ``forward`` returns the
summed completion log-probability of every row; ``loss`` is TRL's sigmoid DPO loss
``−log σ(β((lp_c − ref_c) − (lp_r − ref_r)))`` with the reference log-probabilities of the stage's start (the
reference model of a DPO stage trained with ``ref_model=copy of the start``), evaluated once per batch and cached.

The split at the log-probabilities makes the Gauss–Newton matrix ``Jᵀ H J`` with ``J`` the Jacobian of the
per-sequence log-probabilities (the log-softmax is part of the "network"), a valid PSD Gauss–Newton of the DPO loss.
Batches must not be concatenated across captured steps (each holds its own chosen/rejected halves): pass
``curvature_options={"chunk_rows": 1}`` with these losses.

Example:
    >>> # pair = dpo_loss_pair(ledger, model, stage_name="dpo")
    >>> # opts = {"loss_fns": {"dpo": pair}, "curvature_options": {"chunk_rows": 1}}
    >>> # estimators.get("aa-ggn").estimate(ledger, model, f, **opts)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of the labelled (non -100) tokens of every row (float32, differentiable)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss_pair(ledger: Any, model: torch.nn.Module, stage_name: str = "dpo") -> tuple[Callable, Callable]:
    """``(forward, loss)`` for the DPO stage ``stage_name`` of ``ledger``; ``model`` lends its architecture."""
    from hf_stage_attribution.estimators.replay import load_state
    from hf_stage_attribution.params import unwrap_model

    stage = ledger.stage(stage_name)
    beta = float((stage.curvature_loss or {}).get("beta", 0.1))
    reference = copy.deepcopy(unwrap_model(model))
    for module in reference.modules():  # drop instance-level forward patches (TRL) that point at the original
        module.__dict__.pop("forward", None)
    load_state(reference, ledger.state_at(stage.index - 1))
    reference.eval().requires_grad_(False)
    cache: dict[tuple, torch.Tensor] = {}

    def ref_logprobs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = (tuple(batch["input_ids"].shape), int(batch["input_ids"].sum()), int(batch["labels"].sum()))
        if key not in cache:
            with torch.no_grad():
                cache[key] = sequence_logprobs(reference, batch)
        return cache[key]

    def loss(logps: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        half = logps.shape[0] // 2
        ref = ref_logprobs(batch).to(logps.dtype)
        margin = (logps[:half] - ref[:half]) - (logps[half:] - ref[half:])
        return -torch.nn.functional.logsigmoid(beta * margin).mean()

    return sequence_logprobs, loss
