"""TRL (and plain transformers) specifics: which stage kind a run is, the loss it trains, and the TRL settings that
an attribution needs to interpret it (DPO β and reference policy, GRPO generations and reward functions, ...).

Everything is read from the config class and the trainer's attributes; ``trl`` itself is never imported here,
so this works (and is light) without TRL installed.

Example:
    >>> from transformers import TrainingArguments
    >>> from hf_stage_attribution.integrations.trl import infer_stage_kind
    >>> infer_stage_kind(TrainingArguments(output_dir="/tmp/x", report_to=[]), model=None)
    'fine-tuning'
"""

from __future__ import annotations

from typing import Any

import torch

from .._internal.hashing import combine_digests
from .._internal.params import is_peft_model, state_digests, unwrap_model
from .run_info import json_safe

# Config class name (anywhere in the MRO) → stage kind, and the trainer class that config belongs to.
CONFIG_KINDS: dict[str, tuple[str, str]] = {
    "SFTConfig": ("sft", "SFTTrainer"),
    "DPOConfig": ("dpo", "DPOTrainer"),
    "RewardConfig": ("reward", "RewardTrainer"),
    "GRPOConfig": ("grpo", "GRPOTrainer"),
    "KTOConfig": ("kto", "KTOTrainer"),
    "RLOOConfig": ("rloo", "RLOOTrainer"),
    "PPOConfig": ("ppo", "PPOTrainer"),
    "DistillationConfig": ("distillation", "DistillationTrainer"),
}

# Per kind: the config fields that describe its objective.
_SETTINGS: dict[str, tuple[str, ...]] = {
    "sft": ("max_length", "packing", "padding_free", "completion_only_loss", "assistant_only_loss", "loss_type",
            "dataset_text_field", "shuffle_dataset"),
    "dpo": ("beta", "loss_type", "loss_weights", "label_smoothing", "precompute_ref_log_probs", "sync_ref_model",
            "ref_model_sync_steps", "ref_model_mixup_alpha", "max_length", "truncation_mode", "use_weighting",
            "f_divergence_type", "ld_alpha"),
    "reward": ("max_length", "center_rewards_coefficient"),
    "kto": ("beta", "loss_type", "desirable_weight", "undesirable_weight", "precompute_ref_log_probs",
            "sync_ref_model", "max_length", "train_sampling_strategy"),
    "grpo": ("num_generations", "max_completion_length", "beta", "loss_type", "num_iterations", "epsilon",
             "epsilon_high", "temperature", "top_p", "top_k", "scale_rewards", "reward_weights",
             "steps_per_generation", "generation_batch_size", "importance_sampling_level", "use_vllm",
             "mask_truncated_completions"),
    "rloo": ("num_generations", "max_completion_length", "beta", "num_iterations", "epsilon", "epsilon_high",
             "temperature", "top_p", "top_k", "reward_weights", "normalize_advantages", "reward_clip_range",
             "steps_per_generation", "generation_batch_size", "use_vllm", "mask_truncated_completions"),
}  # fmt: skip


def config_kind(args: Any) -> tuple[str, str] | None:
    """(kind, trainer class name) for a TRL config (or a subclass of one), None for plain ``TrainingArguments``."""
    for cls in type(args).__mro__:
        if cls.__name__ in CONFIG_KINDS:
            return CONFIG_KINDS[cls.__name__]
    return None


def infer_stage_kind(args: Any, model: Any, told: str | None = None) -> str:
    """``told`` if given; else the TRL config's kind (``lora`` for SFT of a PEFT model: the objective is SFT, the
    stage trains adapters); else ``lora`` for a PEFT model, else ``fine-tuning``."""
    if told:
        return told
    found = config_kind(args)
    if found is not None:
        if found[0] == "sft" and model is not None and is_peft_model(model):
            return "lora"
        return found[0]

    return "lora" if model is not None and is_peft_model(model) else "fine-tuning"


def training_mode_warnings(args: Any, model: Any = None) -> list[str]:
    """What a run's settings mean for replay and the estimators: half-precision training (``bf16``/``fp16``, or
    half-precision weights) and gradient checkpointing. TRL's configs turn both on by default.

    Example:
        >>> from types import SimpleNamespace
        >>> [m.split(":")[0] for m in training_mode_warnings(SimpleNamespace(bf16=True, gradient_checkpointing=False))]
        ['The stage trains in bf16 mixed precision']
    """
    out = []
    half = [k for k in ("bf16", "fp16") if getattr(args, k, False)]
    dtypes = {p.dtype for p in model.parameters()} if model is not None and hasattr(model, "parameters") else set()
    half_weights = sorted(str(d).replace("torch.", "") for d in dtypes if d in (torch.bfloat16, torch.float16))
    if half or half_weights:
        what = f"{half[0]} mixed precision" if half else f"{', '.join(half_weights)} weights"
        out.append(
            f"The stage trains in {what}: the ledger stores its Δ in float32, but replay re-runs the stage in the "
            "same precision, whose rounding differs from run to run, and the estimators linearise a float32 model, "
            "so replay and estimates agree only to that precision. For exact replay train in float32 (TRL: "
            "bf16=False, fp16=False; on CPU also use_cpu=True)."
        )
    checkpointing = getattr(args, "activation_checkpointing", None)  # transformers 5's name; 4's below
    if checkpointing is None:
        checkpointing = getattr(args, "gradient_checkpointing", False)
    if checkpointing:
        out.append(
            "The stage trains with gradient checkpointing: the recorded trajectory is the same, but replaying it "
            "and the curvature estimators' forward passes run without checkpointing (more memory, on CPU about 2x "
            "faster); set gradient_checkpointing=False unless memory requires it."
        )
    return out


def _base_model_class(model: Any) -> str:

    if model is not None and is_peft_model(model):
        model = model.get_base_model()
    return type(model).__name__ if model is not None else ""


def infer_curvature_loss(kind: str, args: Any, model: Any) -> dict:
    """The loss description for curvature products (``stage.curvature_loss``) from the kind and model class.

    Built-in types the estimators compute: ``causal-lm``, ``masked-lm``, ``token-classification``,
    ``sequence-classification``. Preference and RL objectives are described (type, β, loss type) but need a
    ``loss_fns=`` entry from the caller: their captured batches hold the policy's forward inputs only.
    """
    model_class = _base_model_class(model)
    if kind == "sft" or (kind == "lora" and (config_kind(args) or ("",))[0] == "sft"):
        loss_type = getattr(args, "loss_type", "nll")
        return {"type": "causal-lm"} if loss_type in (None, "nll") else {"type": f"sft-{loss_type}"}
    if kind in ("dpo", "kto", "grpo", "rloo", "reward", "ppo", "distillation"):
        out: dict[str, Any] = {"type": kind if kind != "reward" else "pairwise-reward", "model_class": model_class}
        for key in ("beta", "loss_type"):
            if hasattr(args, key):
                out[key] = json_safe(getattr(args, key))
        if kind in ("dpo", "reward"):
            out["batch"] = "chosen and rejected sequences concatenated along the batch (chosen first)"
        return out
    for suffix, loss in (
        ("ForCausalLM", "causal-lm"),
        ("LMHeadModel", "causal-lm"),
        ("ForMaskedLM", "masked-lm"),
        ("ForTokenClassification", "token-classification"),
        ("ForSequenceClassification", "sequence-classification"),
    ):
        if model_class.endswith(suffix):
            return {"type": loss}
    return {"type": "custom", "model_class": model_class}


def _callable_name(fn: Any) -> str:
    config = getattr(fn, "config", None)
    if config is not None:
        return str(getattr(config, "_name_or_path", "") or type(fn).__name__)
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def reference_policy(trainer: Any, kind: str, args: Any, start_digests: dict[str, str] | None) -> dict | None:
    """How the stage's reference model was defined (DPO, KTO, GRPO, RLOO); None for kinds without one.

    ``policy`` is one of ``copy of the stage start``, ``adapter disabled``, ``precomputed``, ``none (beta=0)``,
    ``loaded from <path>`` or ``separate model``; ``sync_ref_model`` adds ``synced every N steps``.
    """
    if kind not in ("dpo", "kto", "grpo", "rloo"):
        return None

    ref = getattr(trainer, "ref_model", None) if trainer is not None else None
    model = getattr(trainer, "model", None) if trainer is not None else None
    out: dict[str, Any] = {}
    if trainer is None:
        out["policy"] = "unknown (the trainer was not found from the callback)"
    elif ref is None:
        if kind in ("grpo", "rloo") and float(getattr(args, "beta", 0.0) or 0.0) == 0.0:
            out["policy"] = "none (beta=0)"
        elif model is not None and is_peft_model(model):
            out["policy"] = "adapter disabled"
        elif getattr(args, "precompute_ref_log_probs", False):
            out["policy"] = "precomputed"
        else:
            out["policy"] = "unknown"
    else:
        ref = unwrap_model(ref)
        out["name_or_path"] = str(getattr(getattr(ref, "config", None), "_name_or_path", "") or "")
        digests = state_digests(ref)
        same = start_digests is not None and digests == {n: start_digests.get(n) for n in digests}
        if same and set(digests) == set(start_digests or {}):
            out["policy"] = "copy of the stage start"
        else:
            out["policy"] = "separate model"
            out["state_hash"] = combine_digests(digests)
    if getattr(args, "sync_ref_model", False):
        out["policy"] += f"; synced every {getattr(args, 'ref_model_sync_steps', '?')} steps"
    return out


def trl_settings(trainer: Any, kind: str, args: Any, start_digests: dict[str, str] | None = None) -> dict | None:
    """The TRL-specific settings of a run (``stage.json["trl"]``), or None for plain transformers runs."""
    if config_kind(args) is None:
        return None
    out: dict[str, Any] = {"config_class": type(args).__name__}
    for key in _SETTINGS.get(kind, ()):
        if hasattr(args, key):
            out[key] = json_safe(getattr(args, key))
    ref = reference_policy(trainer, kind, args, start_digests)
    if ref is not None:
        out["reference_model"] = ref
    if trainer is not None and kind in ("grpo", "rloo"):
        names = getattr(trainer, "reward_func_names", None)
        funcs = getattr(trainer, "reward_funcs", None) or []
        out["reward_functions"] = [str(n) for n in names] if names else [_callable_name(f) for f in funcs]
    return out
