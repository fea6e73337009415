"""A PEFT LoRA adapter repo as a ledger stage: its factors, scalings and replaced modules in base names.

The ledger stores adapter factors, not their product (ESTIMATORS.md §1): ``<base weight>::A`` / ``::B`` in
``lora.safetensors`` with ``stage.json["lora"]["modules"][name] = {"scaling", "fan_in_fan_out", "layer_type"}``,
expanded by :class:`~hf_stage_attribution.ledger.stage.Stage` as ``scaling · B @ A`` (transposed for embeddings
and fan-in/fan-out layers, as PEFT's ``get_delta_weight``). ``modules_to_save`` (and trained biases) are whole
tensors: they become dense deltas. DoRA and non-LoRA PEFT methods are refused (import the merged model instead).

Example, with a PEFT adapter's ``adapter_model.safetensors`` at ``path`` and its ``adapter_config``::

    adapter = read_adapter(TensorReader([path]), adapter_config, ledger_shapes, "org/adapter")
    adapter.modules["transformer.h.0.attn.c_attn.weight"]["scaling"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._internal.params import normalize_name
from ..errors import CheckpointImportError, CheckpointMismatchError
from .tensors import TensorReader

_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
_CONFIG_KEYS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "fan_in_fan_out", "bias",
    "rank_pattern", "alpha_pattern", "base_model_name_or_path", "revision", "task_type",
)  # fmt: skip


@dataclass
class AdapterDelta:
    """One adapter in base parameter names: ``modules`` (factor layers), ``factors``, ``replaced`` tensors."""

    reader: TensorReader
    modules: dict[str, dict] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def delta(self, name: str) -> torch.Tensor:
        """Dense float32 ``ΔW`` of a factor layer (the ledger's and PEFT's convention)."""
        spec = self.modules[name]
        out = self.factors[f"{name}::B"] @ self.factors[f"{name}::A"]
        if spec["layer_type"] == "embedding" or spec["fan_in_fan_out"]:
            out = out.T
        return (out * float(spec["scaling"])).contiguous()


def _alpha(config: dict, module: str) -> float:
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            return float(pattern[key])
    return float(config.get("lora_alpha", 8))


def _check_config(config: dict, label: str) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointImportError(
            f"{label}: a PEFT {config.get('peft_type')!r} adapter; only LoRA adapters can be imported as factors. "
            "Merge it into the base model (merge_and_unload) and import the merged checkpoint instead."
        )
    if config.get("use_dora"):
        raise CheckpointImportError(
            f"{label}: a DoRA adapter; its update is not scaling·B@A. Import the merged model instead."
        )


def read_adapter(reader: TensorReader, config: dict, shapes: dict[str, tuple[int, ...]], label: str) -> AdapterDelta:
    """Parse an adapter's tensors against the ledger's parameter ``shapes`` (base names)."""
    _check_config(config, label)
    out = AdapterDelta(reader, config={k: config[k] for k in _CONFIG_KEYS if k in config})
    pieces: dict[str, dict[str, tuple[str, str]]] = {}
    for key in reader.names():
        stripped = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        if "lora_magnitude_vector" in stripped:
            raise CheckpointImportError(f"{label}: DoRA magnitude vectors found ({key!r}); import the merged model.")
        suffix = next((s for s in _FACTOR_SUFFIXES if stripped.endswith(s)), None)
        if suffix is not None:
            module = stripped[: -len(suffix)]
            layer_type, which = _FACTOR_SUFFIXES[suffix]
            pieces.setdefault(module, {})[which] = (key, layer_type)
            continue
        base = normalize_name(stripped)
        if base is None or base not in shapes:
            raise CheckpointMismatchError(
                f"{label}: adapter tensor {key!r} names no parameter of the base model (expected a LoRA factor or a "
                "module_to_save of the previous boundary's architecture)."
            )
        out.replaced[base] = key
    for module, parts in sorted(pieces.items()):
        if set(parts) != {"A", "B"}:
            raise CheckpointImportError(f"{label}: LoRA module {module!r} has only its {sorted(parts)} factor.")
        base = f"{module}.weight"
        a = reader.get(parts["A"][0])
        b = reader.get(parts["B"][0])
        layer_type = parts["A"][1]
        if base not in shapes or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointMismatchError(
                f"{label}: LoRA factors of {module!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit a 2-d "
                f"parameter {base!r} of the base model (conv adapters are not supported; import the merged model)."
            )
        rank = a.shape[0]
        alpha = _alpha(config, module)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False)) and layer_type == "linear"
        product = (b.shape[0], a.shape[1])
        expected = shapes[base]
        oriented = product[::-1] if (fan_in_fan_out or layer_type == "embedding") else product
        if oriented != expected:
            if layer_type == "linear" and expected in (product, product[::-1]):
                fan_in_fan_out = not fan_in_fan_out
                out.notes.append(
                    f"{base}: the adapter's fan_in_fan_out={config.get('fan_in_fan_out')} did not fit the weight's "
                    f"shape {expected}; used fan_in_fan_out={fan_in_fan_out}."
                )
            else:
                raise CheckpointMismatchError(
                    f"{label}: LoRA delta of {base!r} would have shape {oriented}, the base weight is {expected}."
                )
        out.modules[base] = {
            "scaling": float(scaling), "fan_in_fan_out": fan_in_fan_out, "layer_type": layer_type,
            "adapter": "default", "rank": int(rank), "alpha": alpha,
        }  # fmt: skip
        out.factors[f"{base}::A"], out.factors[f"{base}::B"] = a, b
    if not out.modules and not out.replaced:
        raise CheckpointImportError(f"{label}: the adapter holds no LoRA factors.")
    return out
