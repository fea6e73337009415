"""The parameter space every stage lives in: the *base* model's parameters, named as in plain transformers.

PEFT wraps models (``base_model.model.`` prefixes, ``.base_layer.``, ``modules_to_save``); these helpers see
through the wrappers so that a LoRA stage and a full fine-tuning stage speak of the same tensors.

Example:
    >>> import torch
    >>> from hf_stage_attribution._internal.params import base_parameters, state_digests
    >>> model = torch.nn.Linear(2, 1)
    >>> sorted(base_parameters(model))
    ['bias', 'weight']
    >>> len(state_digests(model))
    2
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .hashing import tensor_digest

_PEFT_PREFIX = "base_model.model."
_LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E")


@dataclass
class LoraInfo:
    """One LoRA-wrapped weight: where the factors live and how they combine into ``ΔW``."""

    base_name: str
    module: torch.nn.Module
    adapter: str
    scaling: float
    fan_in_fan_out: bool
    layer_type: str  # "linear", "embedding" or "other" (dense delta through PEFT's get_delta_weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) as stored by PEFT, or None for layer types whose delta is not ``B @ A``."""
        m = self.module
        if self.layer_type == "linear":
            return m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight
        if self.layer_type == "embedding":
            return m.lora_embedding_A[self.adapter], m.lora_embedding_B[self.adapter]
        return None

    def delta(self) -> torch.Tensor:
        """The dense float32 ``ΔW`` this adapter adds to the base weight (PEFT's convention)."""
        with torch.no_grad():
            return self.module.get_delta_weight(self.adapter).detach().to("cpu", torch.float32)


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def normalize_name(name: str) -> str | None:
    """The base name of a (possibly PEFT-wrapped) parameter name, or None for adapter-only parameters."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    parts = name.split(".")
    if any(p in _LORA_MARKERS for p in parts) or "original_module" in parts:
        return None
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
            continue
        if parts[i] == "modules_to_save" and i + 1 < len(parts):
            i += 2  # skip "modules_to_save.<adapter>"
            continue
        out.append(parts[i])
        i += 1
    return ".".join(out)


def base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map base names to the model's parameters (LoRA factors excluded); tied weights appear once."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        base = normalize_name(name)
        if base is not None and base not in out:
            out[base] = param
    return out


def _active_adapters(module: torch.nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    if isinstance(active, str):
        active = [active]
    return list(active)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraInfo]:
    """Base weight name → :class:`LoraInfo` for every active, unmerged LoRA adapter of a PEFT model."""
    if not is_peft_model(model):
        return {}
    out: dict[str, LoraInfo] = {}
    for mod_name, module in model.named_modules():
        if (
            not hasattr(module, "get_delta_weight")
            or not hasattr(module, "scaling")
            or not hasattr(module, "base_layer")
        ):
            continue
        if getattr(module, "disable_adapters", False):
            continue
        merged = set(getattr(module, "merged_adapters", []))
        base = normalize_name(f"{mod_name}.weight")
        for adapter in _active_adapters(module):
            if adapter in merged or adapter not in module.scaling:
                continue
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                layer_type = "linear" if isinstance(module.lora_A[adapter], torch.nn.Linear) else "other"
            elif hasattr(module, "lora_embedding_A") and adapter in module.lora_embedding_A:
                layer_type = "embedding"
            else:
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                layer_type = "other"
            out[base] = LoraInfo(
                base_name=base,
                module=module,
                adapter=adapter,
                scaling=float(module.scaling[adapter]),
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                layer_type=layer_type,
            )
    return out


def merged_tensor(name: str, param: torch.Tensor, lora: dict[str, LoraInfo]) -> torch.Tensor:
    """The effective float32 CPU value of a base parameter: base weight plus the active LoRA delta, if any."""
    value = param.detach().to("cpu", torch.float32)
    info = lora.get(name)
    if info is not None:
        value = value + info.delta()
    return value


def iter_merged_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(base name, float32 CPU tensor)`` of the effective parameters, one tensor at a time."""
    lora = lora_layers(model)
    for name, param in base_parameters(model).items():
        yield name, merged_tensor(name, param, lora)


def state_digests(model: torch.nn.Module) -> dict[str, str]:
    """Per-tensor digests of the effective (merged) parameters."""
    return {name: tensor_digest(t) for name, t in iter_merged_state(model)}


def floating_buffer_digests(model: torch.nn.Module) -> dict[str, str]:
    """Per-buffer digests of the floating-point buffers (BatchNorm running statistics, rotary caches), by name.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> before = floating_buffer_digests(bn)
        >>> sorted(before)
        ['running_mean', 'running_var']
        >>> _ = bn(torch.randn(4, 2))
        >>> before == floating_buffer_digests(bn)
        False
    """
    return {name: tensor_digest(b) for name, b in model.named_buffers() if b.is_floating_point()}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/accelerate/compile wrappers (not PEFT: PEFT is seen through by name normalisation)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            model = model.module
        else:
            break
    return model
