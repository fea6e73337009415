"""Which stage an intervention acts on, and the vector it subtracts (``v_k`` of an embedding kind, or ``Δ_k``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InterventionError
from ..estimators.linear import embeddings_for
from ..ledger.core import LedgerCore
from ..ledger.stage import Stage

KINDS = ("aa-linear", "delta", "aa-ggn", "aa-hvp")


def resolve_stage(ledger: LedgerCore, stage: int | str) -> Any:
    """The ledger stage named or indexed by ``stage``; :class:`InterventionError` listing the stages otherwise."""
    stages = list(ledger.stages)
    listing = ", ".join(f"{s.index}:{s.name}" for s in stages) or "none"
    if isinstance(stage, bool) or not isinstance(stage, (int, str)):
        raise InterventionError(f"Expected a stage name or index, got {stage!r}. Stages: {listing}.")
    if isinstance(stage, str) and stage.lstrip("-").isdigit() and not any(s.name == stage for s in stages):
        stage = int(stage)
    if isinstance(stage, int):
        if not 0 <= stage < len(stages):
            raise InterventionError(
                f"Stage index {stage} is out of range: the ledger at {ledger.dir} has {len(stages)} stage(s), "
                f"indices 0..{len(stages) - 1} ({listing})."
            )
        return stages[stage]
    for s in stages:
        if s.name == stage:
            return s
    raise InterventionError(f"No stage named {stage!r} in the ledger at {ledger.dir}. Stages: {listing}.")


def stage_vectors(
    ledger: LedgerCore, model: torch.nn.Module, stage: Stage, kind: str, options: Mapping[str, Any] | None = None
) -> Any:
    """The stage embeddings of ``kind`` holding ``v_k`` (``kind="delta"``: ``Δ_k``), computed or read from cache."""
    if kind not in KINDS:
        raise InterventionError(f"Unknown intervention kind {kind!r}; known kinds: {', '.join(KINDS)}.")

    return embeddings_for(ledger, kind, [stage], dict(options or {}), model)
