"""What a Trainer stage saves so that :func:`~hf_stage_attribution.integrations.replay.replay_trainer_stage` can
rebuild the same trainer from a counterfactual start: the training dataset (``Dataset.save_to_disk``, Arrow),
the processing class (``save_pretrained``), JSON-safe arguments with the config class name, the trainer class,
the data collator (class and simple fields), seeds, the PEFT config and adapter start weights, and the DPO/KTO
reference policy. No pickle anywhere; classes are named, and replay only imports them from transformers/TRL.

Example:
    >>> from hf_stage_attribution.integrations.replay_data import describe_collator
    >>> from transformers import default_data_collator
    >>> describe_collator(default_data_collator, None)["function"]
    'default_data_collator'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .._internal.memory import human_bytes
from .._internal.notices import notice
from ..ledger.storage import atomic_write_json, read_json, write_safetensors
from .peft import adapter_state, peft_config_json
from .run_info import class_path, json_safe, replay_safe_arguments, train_dataset, training_arguments

REPLAY_FILE = "replay.json"
REPLAY_FORMAT = 1
# Columns that TRL fills from the reference model at init (model-dependent: a replay recomputes them).
MODEL_DEPENDENT_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_KL_logps")


def describe_collator(collator: Any, processing_class: Any) -> dict | None:
    """Class (or function) of the data collator and, for dataclass collators, their fields as JSON.

    A field holding the processing class is written as ``{"$processing_class": true}``, another tokenizer as
    ``{"$pretrained": "collator_<field>"}`` (saved with ``save_pretrained`` in that folder of the replay directory);
    the collator is marked ``rebuildable: false`` when a field holds anything else that JSON cannot carry.
    """
    if collator is None:
        return None
    if not dataclasses.is_dataclass(collator) and callable(collator) and hasattr(collator, "__qualname__"):
        return {"function": collator.__qualname__, "module": collator.__module__, "rebuildable": True}
    out: dict[str, Any] = {**class_path(collator), "fields": {}, "rebuildable": dataclasses.is_dataclass(collator)}
    if not dataclasses.is_dataclass(collator):
        return out
    for field in dataclasses.fields(collator):
        if not field.init:
            continue
        value = getattr(collator, field.name)
        if processing_class is not None and value is processing_class:
            out["fields"][field.name] = {"$processing_class": True}
        elif value is None or isinstance(value, (bool, int, float, str)):
            out["fields"][field.name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out["fields"][field.name] = list(value)
        elif hasattr(value, "save_pretrained"):  # a tokenizer other than the trainer's: saved beside it
            out["fields"][field.name] = {"$pretrained": f"collator_{field.name}"}
        else:
            out["rebuildable"] = False
            out.setdefault("unsupported_fields", []).append(field.name)
    return out


def _save_dataset(dataset: Any, target: Path, notes: list[str]) -> dict | None:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover  (datasets is a library requirement)
        Dataset = None  # noqa: N806
    if Dataset is None or not isinstance(dataset, Dataset):
        notes.append(
            f"replay: the training dataset ({type(dataset).__name__}) is not a `datasets.Dataset`, so it was not "
            "saved; a replay needs `train_dataset=` (replay_trainer_stage) or a stage function (stage_fns)."
        )
        return None
    dropped = [c for c in MODEL_DEPENDENT_COLUMNS if c in dataset.column_names]
    if dropped:
        dataset = dataset.remove_columns(dropped)
    dataset.save_to_disk(str(target))
    return {"dir": target.name, "dropped_columns": dropped, "num_rows": len(dataset)}


def projected_dataset_bytes(dataset: Any) -> int:
    """About the bytes ``save_to_disk`` will write for ``dataset`` as replay data: its Arrow table's size, scaled to
    the rows an indices mapping (``select``/``shuffle``) keeps; 0 for anything but a ``datasets.Dataset`` (not saved).

    Example:
        >>> from datasets import Dataset
        >>> rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 100})
        >>> whole, half = projected_dataset_bytes(rows), projected_dataset_bytes(rows.select(range(50)))
        >>> whole > 0, half == whole // 2
        (True, True)
        >>> projected_dataset_bytes([1, 2, 3])
        0
    """
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover  (datasets is a library requirement)
        return 0
    if not isinstance(dataset, Dataset):
        return 0
    table = dataset.data
    total = int(getattr(table, "nbytes", 0) or 0)
    rows = int(getattr(table, "num_rows", 0) or 0)
    return total if rows <= 0 else int(total * min(1.0, len(dataset) / rows))


def _save_processing_class(processing_class: Any, target: Path, notes: list[str]) -> dict | None:
    if processing_class is None:
        return None
    if not hasattr(processing_class, "save_pretrained"):
        notes.append(f"replay: the processing class {type(processing_class).__name__} has no save_pretrained.")
        return None
    processing_class.save_pretrained(str(target))
    return {"dir": target.name, **class_path(processing_class)}


def save_replay_data(
    replay_dir: Path,
    *,
    trainer: Any,
    args: Any,
    model: Any,
    dataset: Any,
    processing_class: Any,
    kind: str,
    trainer_class: dict,
    reference: dict | None,
    stage_steps: tuple[int, int],
) -> tuple[dict, list[str]]:
    """Write the replay material into ``replay_dir``; returns the ``stage.json["replay"]`` summary and notes."""
    notes: list[str] = []
    replay_dir = Path(replay_dir)
    collator_obj = getattr(trainer, "data_collator", None) if trainer else None
    collator = describe_collator(collator_obj, processing_class)
    for name, value in (collator or {}).get("fields", {}).items():
        if isinstance(value, dict) and "$pretrained" in value:
            getattr(collator_obj, name).save_pretrained(str(replay_dir / value["$pretrained"]))
    peft_cfg = peft_config_json(model)
    adapter_file = None
    if peft_cfg is not None:
        adapter_file = "adapter_start.safetensors"
        write_safetensors(replay_dir / adapter_file, adapter_state(model))
    info = {
        "format": REPLAY_FORMAT,
        "kind": kind,
        "trainer": trainer_class,
        "config": class_path(args),
        "args": replay_safe_arguments(training_arguments(args)),
        "seed": json_safe(getattr(args, "seed", None)),
        "data_seed": json_safe(getattr(args, "data_seed", None)),
        "collator": collator,
        "dataset": _save_dataset(dataset, replay_dir / "dataset", notes),
        "processing_class": _save_processing_class(processing_class, replay_dir / "processing_class", notes),
        "peft": None if peft_cfg is None else {**peft_cfg, "adapter_start_file": adapter_file},
        "reference_model": reference,
        "stage_steps": list(stage_steps),
    }
    if collator is not None and not collator.get("rebuildable", False):
        notes.append(
            f"replay: the data collator {collator.get('class')} has fields JSON cannot carry "
            f"({collator.get('unsupported_fields')}); replay needs `data_collator=`."
        )
    atomic_write_json(replay_dir / REPLAY_FILE, info)
    summary = {
        "dir": "replay",
        "file": f"replay/{REPLAY_FILE}",
        "dataset_saved": info["dataset"] is not None,
        "processing_class_saved": info["processing_class"] is not None,
        "collator_rebuildable": bool(collator and collator.get("rebuildable")),
    }
    return summary, notes


def save_stage_replay_data(recording: Any, ctx: Any, kind: str, part: Any, trainer_class: dict, metadata: dict):
    """StageRecorder's entry point: save into ``recording.replay_dir`` (once; a resumed stage keeps what the
    interrupted run saved) and set ``metadata["replay"]``; returns notes for ``stage.json``."""

    if part.start > 0:
        metadata["replay"] = {
            "supported": False,
            "reason": "the stage continues the optimizer state of the previous stage inside one run; replay the "
            "whole run instead",
        }
        return []
    replay_dir = recording.replay_dir
    if (replay_dir / REPLAY_FILE).exists():
        info = read_json(replay_dir / REPLAY_FILE, "replay file")
        metadata["replay"] = {
            "dir": "replay",
            "file": f"replay/{REPLAY_FILE}",
            "dataset_saved": bool(info.get("dataset")),
            "processing_class_saved": bool(info.get("processing_class")),
            "collator_rebuildable": bool((info.get("collator") or {}).get("rebuildable")),
        }
        return []
    summary, notes = save_replay_data(
        replay_dir,
        trainer=ctx.trainer,
        args=ctx.args,
        model=ctx.model,
        dataset=train_dataset(ctx.trainer, ctx.train_dataloader),
        processing_class=ctx.processing_class,
        kind=kind,
        trainer_class=trainer_class,
        reference=(metadata.get("trl") or {}).get("reference_model"),
        stage_steps=(part.start, part.end),
    )
    # a copy of the training dataset (and the tokenizer): projected from the dataset before, measured here
    summary["bytes"] = sum(f.stat().st_size for f in replay_dir.rglob("*") if f.is_file())
    size = human_bytes(summary["bytes"])
    notice(f"stage {part.name!r}: replay data {size} (training dataset, tokenizer, collator), {recording.ledger.dir}")
    metadata["replay"] = summary
    return notes
