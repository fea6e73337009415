"""PEFT helpers for recording and replaying adapter stages: the adapter config as JSON (and back), and the
adapter's weights at the stage start (LoRA's random ``A`` init must be the same in a replay).

``peft`` is imported only inside the functions that need it.

Example:
    >>> import torch
    >>> from hf_stage_attribution.integrations.peft import peft_config_json
    >>> peft_config_json(torch.nn.Linear(2, 2)) is None   # not a PEFT model
    True
"""

from __future__ import annotations

from typing import Any

from .._internal.params import is_peft_model
from ..errors import ReplayError
from .run_info import json_safe


def peft_config_json(model: Any) -> dict | None:
    """``{adapter name: config dict}`` (JSON-safe) of a PEFT model, with its active adapter; None otherwise."""
    if model is None or not is_peft_model(model):
        return None
    configs = {name: json_safe(cfg.to_dict()) for name, cfg in dict(model.peft_config).items()}
    active = getattr(model, "active_adapter", None)
    return {"adapters": configs, "active_adapter": json_safe(active)}


def peft_notes(model: Any) -> list[str]:
    """Human-readable notes for ``stage.json`` about adapters on the model."""
    cfg = peft_config_json(model)
    if cfg is None:
        return []
    types = sorted({str(c.get("peft_type")) for c in cfg["adapters"].values()})
    notes = [f"PEFT model with adapter(s) {sorted(cfg['adapters'])} of type {', '.join(types)}."]
    if "LORA" in types:
        notes.append("lora: the stage trains LoRA adapters; its delta is stored as factors (B @ A · scaling).")
    return notes


def adapter_state(model: Any) -> dict:
    """The active adapter's weights (PEFT's state-dict names, adapter name removed), detached float32 CPU clones."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=_active(model))
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def _active(model: Any) -> str:
    active = getattr(model, "active_adapter", "default")
    return active[0] if isinstance(active, (list, tuple)) else str(active)


def config_from_json(cfg: dict) -> Any:
    """Rebuild a PEFT config from :func:`peft_config_json`'s entry for one adapter (no code execution)."""
    from peft.config import PeftConfigMixin

    data = dict(cfg)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = list(data[key])
    try:
        return PeftConfigMixin.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ReplayError(
            f"Could not rebuild the stage's PEFT config from its recorded JSON ({exc}). The recorded config was made "
            "by another PEFT version? Pass `peft_config=` to replay_trainer_stage."
        ) from exc


def wrap_with_adapter(model: Any, peft_config: Any, start_state: dict | None, adapter_name: str = "default") -> Any:
    """``get_peft_model`` on ``model`` and load the recorded start weights of the adapter (if any)."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    if start_state:
        result = set_peft_model_state_dict(peft_model, start_state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ReplayError(
                f"The recorded adapter start weights do not fit the rebuilt adapter: unexpected key {unexpected[0]!r}."
                " Was the stage recorded on a different base model?"
            )
    return peft_model
