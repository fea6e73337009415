"""What a Trainer run says about itself, made JSON-safe for ``stage.json``: arguments, seeds, data identity, the
trainer class, and whether the estimators will understand its optimizer.

Nothing here changes the run: it only reads attributes (no RNG, no data iteration).

Example:
    >>> from hf_stage_attribution.integrations.run_info import json_safe, optimizer_support_note
    >>> json_safe({"betas": (0.9, 0.999), "path": __import__("pathlib").Path("/tmp")})
    {'betas': [0.9, 0.999], 'path': '/tmp'}
    >>> optimizer_support_note("AdamW") is None, "Adafactor" in optimizer_support_note("Adafactor")
    (True, True)
"""

from __future__ import annotations

import enum
import math
import re
import sys
from pathlib import Path
from typing import Any

from ..ledger.optimizer_info import optimizer_family

# Redacted or machine-specific arguments that a replay must not reuse.
_REDACTED = ("hub_token", "push_to_hub_token", "hub_model_id")


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: tuples/sets → lists, enums → values, paths → str, non-finite floats → str, rest → repr."""
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return json_safe(value.item())
    if hasattr(value, "to_dict"):
        try:
            return json_safe(value.to_dict())
        except Exception:  # noqa: BLE001  (a to_dict that fails is recorded by its repr)
            return repr(value)
    return repr(value)


def training_arguments(args: Any) -> dict:
    """``args.to_dict()`` made JSON-safe. Hub credentials stay redacted as transformers redacts them; TRL's special
    token fields (``eos_token``, ``pad_token``: strings of the vocabulary, which ``to_dict`` also masks because their
    names end in ``_token``) are restored, since a replay needs them."""
    raw = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    for key in raw:
        if key.endswith("_token") and "hub" not in key:
            value = getattr(args, key, None)
            if value is None or isinstance(value, str):
                raw[key] = value
    return json_safe(raw)


def attn_implementation(model: Any) -> str | None:
    """The attention implementation the model runs (``config._attn_implementation``: ``eager``, ``sdpa``, ...;
    a PEFT model's is its base model's), or None where it has none.

    Example:
        >>> from types import SimpleNamespace
        >>> attn_implementation(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")))
        'sdpa'
    """
    value = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return value if isinstance(value, str) else None


def class_path(obj_or_cls: Any) -> dict[str, str]:
    """``{"class": name, "module": module}`` of an object or a class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return {"class": cls.__qualname__, "module": cls.__module__}


def find_trainer(max_depth: int = 16) -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling us (found on the call stack), or None.

    Callbacks are not given the trainer; its loop method is a few frames up (``self`` in its locals).
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


_REVISION = re.compile(r"@([0-9a-f]{40})\b")


def dataset_identity(dataset: Any, role: str = "train") -> dict | None:
    """Name, config, split, revision (where ``datasets`` knows it), fingerprint and size of a training dataset."""
    if dataset is None:
        return None
    out: dict[str, Any] = {"role": role, "class": type(dataset).__name__}
    try:
        out["size"] = len(dataset)
    except TypeError:
        out["size"] = None
    info = getattr(dataset, "info", None)
    if info is not None:
        for key, field in (("dataset_name", "name"), ("config_name", "config"), ("builder_name", "builder_name")):
            value = getattr(info, key, None)
            if value:
                out[field] = str(value)
        version = getattr(info, "version", None)
        if version is not None:
            out["version"] = str(version)
        checksums = getattr(info, "download_checksums", None) or {}
        revisions = sorted({m.group(1) for url in checksums for m in [_REVISION.search(str(url))] if m})
        if revisions:
            out["revision"] = revisions[0]
            if len(revisions) > 1:
                out["revisions"] = revisions
    split = getattr(dataset, "split", None)
    if split is not None:
        out["split"] = str(split)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is not None:
        out["fingerprint"] = str(fingerprint)
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list):
        out["columns"] = [str(c) for c in columns]
    return out


def train_dataset(trainer: Any, train_dataloader: Any) -> Any:
    """The dataset the trainer was built with (after TRL's preprocessing), else the dataloader's."""
    dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
    if dataset is None and train_dataloader is not None:
        dataset = getattr(train_dataloader, "dataset", None)
    return dataset


# Optimizer families the estimators propagate (ESTIMATORS.md §3).
SUPPORTED_OPTIMIZERS = "SGD, Adam, AdamW (and HF adamw_* variants), RMSprop, Adagrad, Lion"


def optimizer_support_note(optimizer_type: str, decoupled: bool = False) -> str | None:
    """None when the estimators know ``optimizer_type``; else a note naming it (also used as the warning)."""

    if optimizer_family(optimizer_type, decoupled) is not None:
        return None
    return (
        f"Optimizer {optimizer_type!r} is not one the estimators support ({SUPPORTED_OPTIMIZERS}): its update rule "
        "is unknown, so the aa-* estimators will refuse this stage (delta-* and replay still work). Train with a "
        "supported optimizer (e.g. `optim='adamw_torch'`) to get propagated estimates."
    )


def replay_safe_arguments(args_dict: dict) -> dict:
    """Recorded arguments without the entries a replay must never reuse (tokens, hub ids)."""
    return {k: v for k, v in args_dict.items() if k not in _REDACTED}
