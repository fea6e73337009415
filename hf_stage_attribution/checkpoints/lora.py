"""A PEFT LoRA adapter repo as a ledger stage: its factors, scalings and replaced modules in base names.

The ledger stores adapter factors, not their product (ESTIMATORS.md §1): ``<base weight>::A`` / ``::B`` in
``lora.safetensors`` with ``stage.json["lora"]["modules"][name] = {"scaling", "fan_in_fan_out", "layer_type"}``,
expanded by :class:`~hf_stage_attribution.ledger.stage.Stage` as ``scaling · B @ A`` (transposed for embeddings
and fan-in/fan-out layers, as PEFT's ``get_delta_weight``). ``modules_to_save`` (and trained biases) are whole
tensors: they become dense deltas, and so does an embedding's base layer that PEFT saves beside its factors
(``save_embedding_layers``): that boundary's value is the saved base layer plus the LoRA delta. DoRA, non-LoRA PEFT
methods, LoRA biases (``lora_bias``), trainable tokens (``trainable_token_indices``) and a separately trained copy
of a tied output embedding are refused (import the merged model instead).

An adapter that follows another adapter of the same base (:func:`stage_factors` with ``previous``) is stored as the
difference of the two: its own factors ``A``/``B`` minus the previous adapter's as ``A0``/``B0`` (the ledger's
format for a stage that starts from a trained adapter), so ``Δ = scaling · (B@A − B0@A0)`` exactly.

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


_MERGED = (
    "Merge the adapter into its base model (PeftModel.merge_and_unload() + save_pretrained()) and import the merged "
    "model instead."
)


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
    if config.get("lora_bias"):
        raise _lora_bias(label, "adapter_config.json has lora_bias=true")
    if config.get("trainable_token_indices"):
        raise _trainable_tokens(label, f"trainable_token_indices={config['trainable_token_indices']!r}")


def _lora_bias(label: str, found: str) -> CheckpointImportError:
    return CheckpointImportError(
        f"{label}: expected LoRA factors without a bias, found a LoRA bias ({found}): lora_B's bias adds a term the "
        f"ledger's LoRA format (scaling·B@A) cannot hold. {_MERGED}"
    )


def _trainable_tokens(label: str, found: str) -> CheckpointImportError:
    return CheckpointImportError(
        f"{label}: expected LoRA factors and whole modules_to_save, found PEFT trainable tokens ({found}), which "
        f"store only the trained rows of an embedding. {_MERGED}"
    )


def _unknown_tensor(key: str, base: str | None, tied: dict[str, str] | None, label: str) -> CheckpointImportError:
    """The error for an adapter tensor whose base parameter is not in the ledger: a tied copy, or another model."""
    shared = repr(tied[base]) if tied and base in tied else None
    if shared is None and tied is None and base is not None and base.split(".")[-2:-1] == ["lm_head"]:
        shared = "the input embedding"  # no buildable config to tell: the usual reason for a missing lm_head
    if shared is not None:
        return CheckpointImportError(
            f"{label}: adapter tensor {key!r} trains {base!r} separately, but the base model ties it to {shared} "
            "(one tensor in the ledger's parameter space); a separately trained tied lm_head (modules_to_save or a "
            f"LoRA on it) changes one without the other, which the ledger cannot represent. {_MERGED} (Or train the "
            "adapter without lm_head in target_modules/modules_to_save.)"
        )
    return CheckpointMismatchError(
        f"{label}: adapter tensor {key!r} names no parameter of the base model (expected a LoRA factor or a "
        "module_to_save of the previous boundary's architecture). Import an adapter trained on this base model."
    )


def _check_not_tied(key: str, base: str, tied: dict[str, str] | None, label: str) -> None:
    """Refuse an adapter tensor (LoRA factor or module_to_save) on a parameter other modules share: the adapter
    changes it in its own module only (an input-embedding LoRA leaves the tied output head as it was), but the ledger
    holds one tensor for the whole tied group."""
    aliases = sorted(alias for alias, shared in (tied or {}).items() if shared == base)
    if aliases:
        raise CheckpointImportError(
            f"{label}: adapter tensor {key!r} trains {base!r}, which the base model ties to {', '.join(aliases)} (one "
            "tensor in the ledger's parameter space); the adapter changes it in one module only, which the ledger "
            f"cannot represent. {_MERGED} (Or train the adapter without that module, or untie the weights.)"
        )


def _collect(reader: TensorReader, out: AdapterDelta, shapes: dict, tied: dict[str, str] | None, label: str) -> dict:
    """Sort the adapter's tensors into LoRA factor pieces (returned) and replaced base tensors (``out.replaced``)."""
    pieces: dict[str, dict[str, tuple[str, str]]] = {}
    for key in reader.names():
        stripped = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        if "lora_magnitude_vector" in stripped:
            raise CheckpointImportError(f"{label}: DoRA magnitude vectors found ({key!r}); import the merged model.")
        if stripped.endswith((".lora_A.bias", ".lora_B.bias")):
            raise _lora_bias(label, f"tensor {key!r}")
        if ".token_adapter." in stripped or "trainable_tokens_" in stripped:
            raise _trainable_tokens(label, f"tensor {key!r}")
        suffix = next((s for s in _FACTOR_SUFFIXES if stripped.endswith(s)), None)
        if suffix is not None:
            module = stripped[: -len(suffix)]
            layer_type, which = _FACTOR_SUFFIXES[suffix]
            pieces.setdefault(module, {})[which] = (key, layer_type)
            continue
        base = normalize_name(stripped)
        if base is None or base not in shapes:
            raise _unknown_tensor(key, base, tied, label)
        _check_not_tied(key, base, tied, label)
        out.replaced[base] = key
    return pieces


def read_adapter(
    reader: TensorReader,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    label: str,
    tied: dict[str, str] | None = None,
) -> AdapterDelta:
    """Parse an adapter's tensors against the ledger's parameter ``shapes`` (base names).

    ``tied`` maps the base model's tied parameter names (``lm_head.weight``) to the parameter they share
    (:func:`~.checkpoints.model.tied_parameters`); None when unknown.
    """
    _check_config(config, label)
    out = AdapterDelta(reader, config={k: config[k] for k in _CONFIG_KEYS if k in config})
    pieces = _collect(reader, out, shapes, tied, label)
    for module, parts in sorted(pieces.items()):
        if set(parts) != {"A", "B"}:
            raise CheckpointImportError(f"{label}: LoRA module {module!r} has only its {sorted(parts)} factor.")
        base = f"{module}.weight"
        if base not in shapes:
            raise _unknown_tensor(parts["A"][0], base, tied, label)
        _check_not_tied(parts["A"][0], base, tied, label)
        a = reader.get(parts["A"][0])
        b = reader.get(parts["B"][0])
        layer_type = parts["A"][1]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
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
        if base in out.replaced:
            out.notes.append(
                f"{base}: the adapter also stores the base layer (PEFT's save_embedding_layers); this boundary's "
                "value is that base layer plus the LoRA delta, and the base layer's change is a dense delta."
            )
    if not out.modules and not out.replaced:
        raise CheckpointImportError(f"{label}: the adapter holds no LoRA factors.")
    return out


@dataclass
class StageFactors:
    """What the ledger stores for one adapter stage: factor ``modules`` (``stage.json["lora"]["modules"]``), their
    ``factors`` (``A``/``B``, and ``A0``/``B0`` where the stage continues an adapter of the same base) and the
    ``dense`` names (replaced tensors, and modules whose factors cannot be stacked), whose dense delta excludes the
    factor part (``lora=False`` in :meth:`~.checkpoints.tensors.AdapterState.get`)."""

    modules: dict[str, dict]
    factors: dict[str, torch.Tensor]
    dense: list[str]
    continued: bool = False


def _stackable(spec: dict, before: dict) -> bool:
    same_layout = spec["layer_type"] == before["layer_type"] and spec["fan_in_fan_out"] == before["fan_in_fan_out"]
    return same_layout and float(spec["scaling"]) != 0.0


def stage_factors(adapter: AdapterDelta, previous: AdapterDelta | None = None) -> StageFactors:
    """The stage from ``previous`` (an adapter on the same base, or None: the base itself) to ``adapter``.

    With ``previous``, a module both adapters train keeps ``adapter``'s factors and scaling and gets ``previous``'s
    as ``A0``/``B0`` (``B0`` rescaled by the ratio of the scalings), so ``scaling·(B@A − B0@A0)`` is exactly
    ``Δ_adapter − Δ_previous``. A module only ``previous`` trains (or one whose layout changed) is dense.
    """
    if previous is None:
        return StageFactors(dict(adapter.modules), dict(adapter.factors), sorted(adapter.replaced))
    modules, factors = {}, {}
    dense = set(adapter.replaced) | set(previous.replaced)
    for name, spec in adapter.modules.items():
        modules[name] = dict(spec)
        factors[f"{name}::A"], factors[f"{name}::B"] = adapter.factors[f"{name}::A"], adapter.factors[f"{name}::B"]
        before = previous.modules.get(name)
        if before is None:
            continue
        if _stackable(spec, before):
            ratio = float(before["scaling"]) / float(spec["scaling"])
            factors[f"{name}::A0"] = previous.factors[f"{name}::A"]
            factors[f"{name}::B0"] = previous.factors[f"{name}::B"] * ratio
        else:
            dense.add(name)
    dense |= set(previous.modules) - set(adapter.modules)
    return StageFactors(modules, factors, sorted(dense), continued=True)
