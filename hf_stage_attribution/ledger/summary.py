"""A JSON-safe summary of a ledger's stages, shared by ``inspect``, reports and model cards."""

from __future__ import annotations

import math

from .core import LedgerCore
from .stage import Stage


def _data_identity(stage: Stage) -> str:
    datasets = stage.info.get("datasets") or []
    parts = []
    for d in datasets:
        label = d.get("name") or "dataset"
        if d.get("size") is not None:
            label += f" (n={d['size']}"
            label += f", fp={d['fingerprint'][:8]})" if d.get("fingerprint") else ")"
        parts.append(label)
    return "; ".join(parts) or "-"


def stage_summary(stage: Stage, with_norm: bool = True) -> dict:
    """One row: index, name, kind, trainer, steps, optimizer, LR range, weight decay, trainables, data, ‖Δ‖."""
    lrs = [lr for row in stage.learning_rates for lr in row]
    opt = stage.optimizer or {}
    decays = sorted({float(g.get("weight_decay", 0.0) or 0.0) for g in opt.get("param_groups", [])})
    norm = None
    if with_norm:
        total = 0.0
        for _, delta in stage.iter_delta():
            total += float(delta.double().pow(2).sum())
        norm = math.sqrt(total)
    return {
        "index": stage.index,
        "name": stage.name,
        "kind": stage.kind,
        "trainer": (stage.info.get("trainer") or {}).get("class")
        if isinstance(stage.info.get("trainer"), dict)
        else stage.info.get("trainer"),
        "steps": stage.num_steps,
        "optimizer": opt.get("type"),
        "lr_min": min(lrs) if lrs else None,
        "lr_max": max(lrs) if lrs else None,
        "weight_decay": decays,
        "optimizer_state": stage.optimizer_state_policy,
        "trainable_parameters": len(stage.trainable_parameters),
        "data": _data_identity(stage),
        "delta_norm": norm,
        "curvature_segments": len(stage.segments),
        "early_checkpoint_steps": stage.early_checkpoint.steps if stage.early_checkpoint is not None else None,
        "bytes": _dir_bytes(stage.dir),
    }


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def ledger_summary(ledger: LedgerCore, with_norm: bool = True) -> dict:
    """The whole ledger as JSON-safe data (what ``inspect --json`` prints)."""
    embedding_bytes = _dir_bytes(ledger.dir / "embeddings")
    return {
        "ledger": str(ledger.dir),
        "format_version": ledger.manifest["format_version"],
        "created_with": ledger.manifest.get("created_with", {}),
        "model_class": ledger.manifest["model"].get("class"),
        "num_parameters": sum(math.prod(s) for s in ledger.parameter_shapes.values()),
        "model_bytes": 4 * sum(math.prod(s) for s in ledger.parameter_shapes.values()),
        "ledger_bytes": _dir_bytes(ledger.dir) - embedding_bytes,  # the record itself
        "embedding_cache_bytes": embedding_bytes,  # derived; safe to delete
        "fingerprint": ledger.fingerprint,
        "final_hash": ledger.final_hash,
        "stages": [stage_summary(s, with_norm) for s in ledger.stages],
        "incomplete_stages": [p.name for p in ledger.incomplete_stages()],
    }
