"""The ``stage.json`` fields a Trainer run contributes: trainer, arguments, seeds, epochs, accumulation, clipping,
dataset identity, PEFT config, world size, TRL settings and notes (keys as in ``ledger/format.py``).

Example:
    >>> from hf_stage_attribution.integrations.stage_metadata import optimizer_warning
    >>> import torch
    >>> optimizer_warning(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())) is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ledger.core import framework_versions
from ..ledger.optimizer_info import decoupled_weight_decay, unwrap_optimizer
from .peft import peft_config_json, peft_notes
from .run_info import (
    attn_implementation,
    class_path,
    dataset_identity,
    json_safe,
    optimizer_support_note,
    train_dataset,
    training_arguments,
)
from .trl import config_kind, trl_notes, trl_settings


@dataclass
class RunContext:
    """What the Trainer handed the callback at ``on_train_begin`` (and the trainer found on the call stack)."""

    args: Any
    trainer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_dataloader: Any
    processing_class: Any
    is_main: bool


def resolve_trainer_class(given: str | type | None, ctx: RunContext) -> dict:
    """``{"class", "module", "inferred_from"}``: given > found on the call stack > implied by the config class."""
    if given is not None:
        if isinstance(given, type):
            return {**class_path(given), "inferred_from": "trainer_class argument"}
        module, _, name = str(given).rpartition(".")
        return {"class": name, "module": module or None, "inferred_from": "trainer_class argument"}
    if ctx.trainer is not None:
        return {**class_path(ctx.trainer), "inferred_from": "call stack"}
    found = config_kind(ctx.args)
    name = found[1] if found else "Trainer"
    return {"class": name, "module": "trl" if found else "transformers", "inferred_from": "config class"}


def optimizer_warning(optimizer: Any) -> str | None:
    """A note naming the optimizer when the estimators do not support it, else None."""
    if optimizer is None:
        return None
    opt = unwrap_optimizer(optimizer)
    return optimizer_support_note(type(opt).__name__, bool(decoupled_weight_decay(opt)))


def run_settings(ctx: RunContext) -> dict:
    """Seeds, epochs, accumulation, clipping and world size of the run."""
    args = ctx.args
    clip = getattr(args, "max_grad_norm", None)
    return {
        "seed": {
            "seed": json_safe(getattr(args, "seed", None)),
            "data_seed": json_safe(getattr(args, "data_seed", None)),
            "full_determinism": bool(getattr(args, "full_determinism", False)),
        },
        "epochs": json_safe(getattr(args, "num_train_epochs", None)),
        "gradient_accumulation_steps": int(getattr(args, "gradient_accumulation_steps", 1) or 1),
        "gradient_clipping": {
            "max_grad_norm": json_safe(clip),
            "enabled": clip is not None and float(clip) > 0,
        },
        "world_size": int(getattr(args, "world_size", 1) or 1),
    }


def build_metadata(ctx: RunContext, kind: str, part: Any, trainer_class: dict, recording: Any, boundaries) -> tuple:
    """``(metadata, notes)`` for ``recording.update_metadata``."""
    notes = list(peft_notes(ctx.model))
    if ctx.trainer is None:
        notes.append(
            "The trainer object was not found on the call stack: TRL settings, the reference model and the data "
            "collator could not be recorded."
        )
    dataset = train_dataset(ctx.trainer, ctx.train_dataloader)
    metadata: dict[str, Any] = {
        "trainer": {
            **trainer_class,
            "config_class": type(ctx.args).__name__,
            # the kernels round differently: replay trains with the same one (integrations/replay.py)
            "attn_implementation": attn_implementation(ctx.model),
        },
        "training_arguments": training_arguments(ctx.args),
        **run_settings(ctx),
        "datasets": [d for d in [dataset_identity(dataset, "train")] if d is not None],
        "peft_config": peft_config_json(ctx.model),
        "framework_versions": framework_versions(),
        "source": {
            "front_end": "hf_stage_attribution.StageRecorder",
            "run_steps": [part.start, part.end],
            "stage_boundaries": {name: step for name, step, _ in boundaries} or None,
        },
    }
    settings = trl_settings(ctx.trainer, kind, ctx.args, getattr(recording, "start_digests", None))
    if settings is not None:
        metadata["trl"] = settings
    notes += trl_notes(kind, ctx.args)
    return metadata, notes
