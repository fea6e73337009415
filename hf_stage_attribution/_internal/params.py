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

from collections.abc import Collection, Iterator
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


_RECORDABLE_PEFT_TYPES = ("LORA", "ADALORA")
_MERGE_ADVICE = (
    "merge the adapter (`model = model.merge_and_unload()`) and record the merged model as a full fine-tuning stage"
)


def _peft_type(config: object) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind) or "unknown").upper()


def _identity_keys(param: torch.Tensor) -> list[tuple]:
    """Keys under which two tied parameters meet: the same object, or the same memory with the same layout."""
    keys: list[tuple] = [("id", id(param))]
    if param.device.type != "meta" and param.numel() > 0:
        keys.append(("memory", param.device, param.data_ptr(), tuple(param.shape), param.stride()))
    return keys


def _shared_names(model: torch.nn.Module) -> dict[tuple, set[str]]:
    """Identity key of every parameter → all base names it is reachable under (a tied weight: two or more)."""
    out: dict[tuple, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        base = normalize_name(name)
        if base is not None:
            for key in _identity_keys(param):
                out.setdefault(key, set()).add(base)
    return out


def _tied_partners(param: torch.Tensor, own: str, shared: dict[tuple, set[str]]) -> list[str]:
    names: set[str] = set()
    for key in _identity_keys(param):
        names |= shared.get(key, set())
    return sorted(names - {own})


def peft_recording_problems(model: torch.nn.Module) -> list[str]:
    """What in a PEFT model a stage recording cannot represent faithfully; one sentence each (empty: recordable).

    The ledger stores a LoRA stage as ``scaling · B @ A`` per base weight, in the base model's parameter space (one
    tensor per tied group). Refused: non-LoRA PEFT methods (IA3, prompt/prefix tuning, ...), LoRA variants whose
    update is not ``scaling · B @ A`` (DoRA), LoRA biases (``lora_bias``), trainable tokens, and a LoRA or
    ``modules_to_save`` copy on a tied weight (it would change one of the tied modules without the other).

    Example:
        >>> peft_recording_problems(torch.nn.Linear(2, 1))
        []
    """
    if not is_peft_model(model):
        return []
    problems = _config_problems(dict(getattr(model, "peft_config", {}) or {}))
    if problems:
        return problems
    dora, bias, tied = _layer_findings(model)
    if dora:
        problems.append(
            f"LoRA variant on {_listing(dora)}: its update is not the ledger's scaling·B@A (DoRA rescales the "
            f"updated weight by a learned magnitude vector); train plain LoRA (without use_dora=True), or "
            f"{_MERGE_ADVICE}"
        )
    if bias:
        problems.append(
            f"LoRA bias (lora_bias=True) on {_listing(bias)}: lora_B's bias adds a term to the base bias that the "
            f"ledger's LoRA format (scaling·B@A on the weight) does not hold; train with lora_bias=False, or "
            f"{_MERGE_ADVICE}"
        )
    if tied:
        problems.append(
            f"adapter on a tied weight: {_listing(tied)}. The ledger holds one tensor per tied group, but the adapter "
            "changes it in one of the tied modules only (e.g. the input embedding and not the output head), which "
            "the ledger cannot represent; leave the tied module out of target_modules/modules_to_save, untie the "
            "weights (tie_word_embeddings=False) before the first recorded stage, or "
            f"{_MERGE_ADVICE}"
        )
    return problems


def _config_problems(configs: dict) -> list[str]:
    """Problems read off the adapters' configs: non-LoRA PEFT methods and trainable tokens."""
    problems: list[str] = []
    for adapter, config in sorted(configs.items()):
        kind = _peft_type(config)
        if kind not in _RECORDABLE_PEFT_TYPES:
            remedy = (
                "prompt and prefix tuning cannot be merged into the base weights: train a LoRA adapter instead"
                if getattr(config, "is_prompt_learning", False)
                else f"train a LoRA adapter instead, or {_MERGE_ADVICE}"
            )
            problems.append(
                f"adapter {adapter!r} is a PEFT {kind} adapter: the ledger records LoRA factors (scaling·B@A) or "
                f"dense deltas of the base model's parameters, and {kind} trains parameters outside that space; "
                f"{remedy}"
            )
        elif getattr(config, "trainable_token_indices", None):
            problems.append(
                f"adapter {adapter!r} trains PEFT trainable tokens (trainable_token_indices="
                f"{config.trainable_token_indices!r}), which the ledger cannot store as LoRA factors; {_MERGE_ADVICE}"
            )
    return problems


def _layer_findings(model: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Active, unmerged adapter layers (:func:`lora_layers`) with a LoRA variant (DoRA), a LoRA bias, or on a tied
    weight; and ``modules_to_save`` copies of a tied weight."""
    shared = _shared_names(model)
    dora: list[str] = []
    bias: list[str] = []
    tied: list[str] = []
    for own, info in lora_layers(model).items():
        module, adapter, name = info.module, info.adapter, own.removesuffix(".weight")
        variant = getattr(module, "lora_variant", {}).get(adapter)
        use_dora = getattr(module, "use_dora", {}).get(adapter, False)
        if variant is not None or use_dora or adapter in getattr(module, "lora_magnitude_vector", {}):
            label = type(variant).__name__ if variant is not None else "DoRA"
            label = "DoRA" if use_dora or "Dora" in label else label
            dora.append(f"{name} ({label})")
        lora_b = getattr(module, "lora_B", {})
        layer_b = lora_b[adapter] if adapter in lora_b else None  # noqa: SIM401 (ModuleDict: no get)
        if getattr(module, "lora_bias", {}).get(adapter, False) or getattr(layer_b, "bias", None) is not None:
            bias.append(name)
        weight = getattr(module.get_base_layer(), "weight", None)
        partners = _tied_partners(weight, own, shared) if weight is not None else []
        if partners:
            tied.append(f"{own} (LoRA, tied to {', '.join(partners)})")
    for mod_name, module in model.named_modules():
        wrapper = hasattr(module, "original_module") and hasattr(module, "modules_to_save")
        if wrapper and not getattr(module, "disable_adapters", False):
            tied += _tied_copies(mod_name, module, shared)
    return dora, bias, tied


def _tied_copies(mod_name: str, module: torch.nn.Module, shared: dict[tuple, set[str]]) -> list[str]:
    """A ``modules_to_save`` wrapper's active copies of a tied weight (trained apart from the weight it is tied to)."""
    out: list[str] = []
    for adapter in _active_adapters(module):
        if adapter not in module.modules_to_save:
            continue
        for pname, param in module.original_module.named_parameters():
            own = normalize_name(f"{mod_name}.{pname}")
            partners = _tied_partners(param, own, shared) if own else []
            if partners:
                out.append(f"{own} (modules_to_save, tied to {', '.join(partners)})")
    return out


def _listing(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(i) if " " not in i else i for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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


#: the dtypes a ``save_pretrained`` commonly rounds float32 weights to for publishing (``model.to(torch.bfloat16)``)
ROUNDED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rounded_digests(
    model: torch.nn.Module,
    recorded: dict[str, str],
    half_checked: bool = False,
    exact: Collection[str] | None = None,
) -> dict[str, dict[str, str]]:
    """``{dtype name: {name: digest}}`` of the effective parameters of ``model`` rounded to each of
    :data:`ROUNDED_DTYPES`: what a save of the model in that dtype hashes to. A model card's weights check compares
    weights saved in half precision with them (``model_card/weights.py``).

    A tensor is rounded to both dtypes where its float32 digest is the ``recorded`` one (the recorded float32
    weights; ``exact``, what ``LedgerCore.check_model`` returns, names those it found so, which are not hashed again).
    A tensor that is half precision in ``model`` is the recorded one only to a rounding step, which
    ``LedgerCore.check_model`` checks: with ``half_checked`` (that check passed) it counts in its own dtype. Any other
    tensor is left out: its rounding would describe another model.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> rounded = rounded_digests(model, state_digests(model))
        >>> rounded["bfloat16"]["weight"] == tensor_digest(model.weight.to(torch.bfloat16))
        True
        >>> rounded_digests(model, {"weight": "0" * 32})["float16"]  # not the recorded weights: nothing to round
        {}
        >>> sorted(rounded_digests(model, {}, exact={"weight"})["float16"])  # what check_model found exact, unhashed
        ['weight']
        >>> half = torch.nn.Linear(2, 1).to(torch.bfloat16)  # checked against a float32 record, to a rounding step
        >>> sorted(rounded_digests(half, {}, half_checked=True)["bfloat16"]), rounded_digests(half, {})["bfloat16"]
        (['bias', 'weight'], {})
    """
    out: dict[str, dict[str, str]] = {name: {} for name in ROUNDED_DTYPES}
    names = {dtype: name for name, dtype in ROUNDED_DTYPES.items()}
    dtypes = {name: param.dtype for name, param in base_parameters(model).items()}
    for name, value in iter_merged_state(model):
        recorded_value = name in exact if exact is not None else recorded.get(name) == tensor_digest(value)
        if recorded_value:
            for dtype_name, dtype in ROUNDED_DTYPES.items():
                out[dtype_name][name] = tensor_digest(value.to(dtype))
        elif half_checked and dtypes.get(name) in names:
            out[names[dtypes[name]]][name] = tensor_digest(value.to(dtypes[name]))
    return out


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
