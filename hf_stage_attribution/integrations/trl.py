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

from .._internal.hashing import combine_digests
from .._internal.params import is_peft_model, state_digests, unwrap_model
from .._internal.precision import half_weight_dtypes, precision_description
from .run_info import attn_implementation, json_safe

# Config class name (the most specific TRL class in the MRO) → stage kind, and the trainer class that config belongs
# to. The kind is one of the ledger's stage kinds (``ledger.format.STAGE_KINDS``): for the trainers below the last
# comment it names the family only, and their objective is in :data:`OBJECTIVES`.
CONFIG_KINDS: dict[str, tuple[str, str]] = {
    "SFTConfig": ("sft", "SFTTrainer"),
    "DPOConfig": ("dpo", "DPOTrainer"),
    "RewardConfig": ("reward", "RewardTrainer"),
    "GRPOConfig": ("grpo", "GRPOTrainer"),
    "KTOConfig": ("kto", "KTOTrainer"),
    "RLOOConfig": ("rloo", "RLOOTrainer"),
    "PPOConfig": ("ppo", "PPOTrainer"),
    "DistillationConfig": ("distillation", "DistillationTrainer"),
    # trl.experimental
    "OnlineDPOConfig": ("dpo", "OnlineDPOTrainer"),
    "CPOConfig": ("custom", "CPOTrainer"),
    "ORPOConfig": ("custom", "ORPOTrainer"),
    "GKDConfig": ("distillation", "GKDTrainer"),
}

#: The objective (``stage.json["trl"]["objective"]``) of the configs whose stage kind names only their family.
OBJECTIVES: dict[str, str] = {"OnlineDPOConfig": "online_dpo", "CPOConfig": "cpo", "ORPOConfig": "orpo",
                              "GKDConfig": "gkd"}  # fmt: skip
#: The objective recorded for a TRL config class this module does not know (its loss and models are not known).
UNKNOWN_OBJECTIVE = "unknown"
#: Objectives trained against a reference policy (``trl.reference_model``), and against a teacher
#: (``trl.teacher_model``).
REFERENCE_OBJECTIVES = ("dpo", "kto", "grpo", "rloo", "online_dpo")
TEACHER_OBJECTIVES = ("distillation", "gkd")
#: Objectives whose rewards come from reward functions (Python code that replay data cannot hold).
REWARD_OBJECTIVES = ("grpo", "rloo", "online_dpo")

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
    "online_dpo": ("beta", "loss_type", "max_new_tokens", "max_length", "temperature", "top_p", "top_k",
                   "missing_eos_penalty", "reward_model_path", "reward_weights", "use_vllm"),
    "cpo": ("beta", "loss_type", "cpo_alpha", "simpo_gamma", "label_smoothing", "max_length", "truncation_mode"),
    "orpo": ("beta", "max_length", "max_completion_length", "truncation_mode"),
    "gkd": ("lmbda", "beta", "temperature", "max_new_tokens", "seq_kd", "max_length", "teacher_model_name_or_path"),
}  # fmt: skip


def _config_entry(args: Any) -> tuple[str, str, str] | None:
    """(kind, trainer class name, objective) of the most specific TRL config class in ``type(args).__mro__``.

    A user's subclass of a TRL config is skipped over (it keeps its TRL parent's objective); a TRL class this module
    does not know (``trl.experimental``: GOLD, GMPO, SDFT, ...) gives kind ``custom`` and objective ``unknown``, never
    the objective of a TRL class it subclasses (GKD and GOLD subclass ``SFTConfig`` but are distillation)."""
    for cls in type(args).__mro__:
        name = cls.__name__
        if name in CONFIG_KINDS:
            kind, trainer = CONFIG_KINDS[name]
            return kind, trainer, OBJECTIVES.get(name, kind)
        if str(cls.__module__).split(".")[0] == "trl" and not name.startswith("_"):
            return "custom", name.removesuffix("Config") + "Trainer", UNKNOWN_OBJECTIVE
    return None


def config_kind(args: Any) -> tuple[str, str] | None:
    """(kind, trainer class name) for a TRL config (or a subclass of one), None for plain ``TrainingArguments``.

    Example:
        >>> from types import SimpleNamespace
        >>> config_kind(SimpleNamespace()) is None
        True
    """
    found = _config_entry(args)
    return None if found is None else found[:2]


def config_objective(args: Any) -> str | None:
    """The objective a TRL config trains (``dpo``, ``online_dpo``, ``gkd``, ..., ``unknown`` for a TRL config class
    this module does not know); None for plain ``TrainingArguments``."""
    found = _config_entry(args)
    return None if found is None else found[2]


def stage_objective(stage: Any) -> str:
    """The objective of a recorded stage: ``stage.info["trl"]["objective"]`` where the kind names only its family
    (OnlineDPO is kind ``dpo``, objective ``online_dpo``), else the stage kind.

    Example:
        >>> from types import SimpleNamespace
        >>> stage_objective(SimpleNamespace(kind="dpo", info={"trl": {"objective": "online_dpo"}}))
        'online_dpo'
        >>> stage_objective(SimpleNamespace(kind="grpo"))
        'grpo'
    """
    info = getattr(stage, "info", None)
    trl = info.get("trl") if isinstance(info, dict) else None
    found = trl.get("objective") if isinstance(trl, dict) else None
    return str(found or getattr(stage, "kind", "") or "")


def _objective(kind: str, args: Any) -> str:
    """The objective behind a stage of ``kind`` trained with ``args``: the config's where it names one that the kind
    does not (OnlineDPO, CPO, ORPO, GKD, unknown TRL configs), else the kind."""
    found = _config_entry(args)
    if found is not None and found[2] != found[0]:
        return found[2]
    return kind


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


def mixed_precision_ran(trainer: Any) -> bool | None:
    """Whether the trainer's accelerator really trains in mixed precision: False where ``bf16``/``fp16`` is set but
    accelerate did not take it up (``fp16=True`` on a CPU: ``native_amp`` False, no autocast, no GradScaler, the
    stage trains in float32), None where it cannot tell (no trainer, or DeepSpeed/Megatron-LM, which run their own
    mixed precision without accelerate's autocast).

    Example:
        >>> from types import SimpleNamespace
        >>> mixed_precision_ran(SimpleNamespace(accelerator=SimpleNamespace(native_amp=False, distributed_type="NO")))
        False
    """
    accelerator = getattr(trainer, "accelerator", None)
    native = getattr(accelerator, "native_amp", None)
    if not isinstance(native, bool):
        return None
    if native or getattr(accelerator, "fp8_enabled", False):
        return True
    backend = getattr(accelerator, "distributed_type", None)
    backend = str(getattr(backend, "value", backend)).upper()
    return None if "DEEPSPEED" in backend or "MEGATRON" in backend else False


def training_precision(args: Any, model: Any = None, trainer: Any = None) -> dict[str, Any] | None:
    """The stage's reduced precision for ``stage.json["training_precision"]``: ``{"mixed": "bf16"}`` where the run's
    ``bf16``/``fp16`` flag took effect (:func:`mixed_precision_ran` not False), ``{"weights": ["bfloat16"]}`` where
    the model's weights are half precision (both keys where both hold); None for a float32 run.

    Example:
        >>> from types import SimpleNamespace
        >>> training_precision(SimpleNamespace(bf16=True)), training_precision(SimpleNamespace(fp16=False))
        ({'mixed': 'bf16'}, None)
    """
    out: dict[str, Any] = {}
    half = [k for k in ("bf16", "fp16") if getattr(args, k, False)]
    if half and mixed_precision_ran(trainer) is not False:
        out["mixed"] = half[0]
    weights = half_weight_dtypes(model)
    if weights:
        out["weights"] = weights
    return out or None


def training_mode_warnings(args: Any, model: Any = None, trainer: Any = None) -> list[str]:
    """What a run's settings mean for replay and the estimators: half-precision training (``bf16``/``fp16``, or
    half-precision weights) and gradient checkpointing. TRL's configs turn both on by default.

    With ``trainer`` given, a ``bf16``/``fp16`` flag its accelerator did not act on (:func:`mixed_precision_ran`:
    ``fp16=True`` on a CPU) gets a one-line note that it had no effect instead of the mixed-precision warning.

    Example:
        >>> from types import SimpleNamespace
        >>> [m.split(":")[0] for m in training_mode_warnings(SimpleNamespace(bf16=True, gradient_checkpointing=False))]
        ['The stage trains in bf16 mixed precision']
    """
    out = []
    half = [k for k in ("bf16", "fp16") if getattr(args, k, False)]
    if half and mixed_precision_ran(trainer) is False:
        device = getattr(getattr(getattr(trainer, "accelerator", None), "device", None), "type", None) or "this device"
        out.append(
            f"{half[0]}=True had no effect on {device}: accelerate did not enable mixed precision (no autocast), "
            "so the stage trains in its weights' own precision."
        )
    what = precision_description(training_precision(args, model, trainer))
    if what:
        out.append(
            f"The stage trains in {what}: the ledger stores its Δ exactly, but replay re-runs the stage in the "
            "same precision, whose rounding differs from run to run, so replay and the estimates agree only to that "
            "precision (the attributor evaluates a float32 copy of half-precision weights). For exact replay train "
            "in float32 (TRL: bf16=False, fp16=False; on CPU also use_cpu=True)."
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
    ``loss_fns=`` entry from the caller: their captured batches hold the policy's forward inputs only. So are the
    objectives of TRL's experimental trainers (``online_dpo``, ``cpo``, ``orpo``, ``gkd``: never a causal-LM loss),
    and a TRL config this module does not know is ``custom`` (its loss is not guessed).

    Example:
        >>> from types import SimpleNamespace
        >>> infer_curvature_loss("sft", SimpleNamespace(loss_type="nll"), None)
        {'type': 'causal-lm'}
    """
    model_class = _base_model_class(model)
    objective = _objective(kind, args)
    if objective == UNKNOWN_OBJECTIVE:  # not guessed: TRL's experimental trainers train many other losses
        return {"type": "custom", "config_class": type(args).__name__, "model_class": model_class}
    if objective in OBJECTIVES.values():  # described; the curvature products need a loss_fns= entry
        out: dict[str, Any] = {"type": objective, "model_class": model_class}
        keys = ("beta", "loss_type", "lmbda", "temperature") if objective == "gkd" else ("beta", "loss_type")
        out.update({key: json_safe(getattr(args, key)) for key in keys if hasattr(args, key)})
        return out
    if kind == "sft" or (kind == "lora" and (config_kind(args) or ("",))[0] == "sft"):
        loss_type = getattr(args, "loss_type", "nll")
        return {"type": "causal-lm"} if loss_type in (None, "nll") else {"type": f"sft-{loss_type}"}
    if kind in ("dpo", "kto", "grpo", "rloo", "reward", "ppo", "distillation"):
        out = {"type": kind if kind != "reward" else "pairwise-reward", "model_class": model_class}
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
    """How the stage's reference model was defined (DPO, KTO, GRPO, RLOO, OnlineDPO); None for objectives without
    one.

    ``policy`` is one of ``copy of the stage start``, ``adapter disabled``, ``precomputed``, ``none (beta=0)``,
    ``loaded from <path>`` or ``separate model``; ``sync_ref_model`` adds ``synced every N steps``.
    """
    if _objective(kind, args) not in REFERENCE_OBJECTIVES:
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
        # how TRL loaded it: replay loads it the same way (eager and sdpa round differently: 2e-5 on a tiny GPT-2
        # in float32, the whole update under bf16 autocast)
        out["attn_implementation"] = attn_implementation(ref)
        first = next(iter(ref.parameters()), None)
        if first is not None:
            out["dtype"] = str(first.dtype).replace("torch.", "")
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


def teacher_policy(trainer: Any, start_digests: dict[str, str] | None) -> dict:
    """The teacher a distillation stage trained against (``stage.json["trl"]["teacher_model"]``): ``policy`` is
    ``separate model`` (with ``name_or_path`` and ``state_hash``, as a separate DPO reference), ``copy of the stage
    start``, ``none`` (the trainer held no teacher model: a teacher server, or none) or ``unknown`` (no trainer)."""
    if trainer is None:
        return {"policy": "unknown (the trainer was not found from the callback)"}
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None or not hasattr(teacher, "parameters"):
        return {"policy": "none"}
    teacher = unwrap_model(teacher)
    out: dict[str, Any] = {"name_or_path": str(getattr(getattr(teacher, "config", None), "_name_or_path", "") or "")}
    digests = state_digests(teacher)
    if start_digests is not None and digests == start_digests:
        out["policy"] = "copy of the stage start"
    else:
        out["policy"] = "separate model"
        out["state_hash"] = combine_digests(digests)
    return out


def trl_notes(kind: str, args: Any) -> list[str]:
    """Notes for ``stage.json`` on what the package does not know about a TRL run's objective.

    Example:
        >>> from types import SimpleNamespace
        >>> trl_notes("sft", SimpleNamespace())
        []
    """
    objective, name = _objective(kind, args), type(args).__name__
    if objective == UNKNOWN_OBJECTIVE:
        return [
            f"The TRL config {name} is not one this package knows: the stage's objective is unknown, so it is "
            "recorded as kind 'custom' with no curvature loss guessed (aa-ggn needs loss_fns={stage name: "
            "(forward, loss)}), and replay from its replay data is refused (the trainer may need models or reward "
            "functions besides the policy that replay cannot rebuild); pass stage_fns={stage name: fn} to replay it."
        ]
    if objective in OBJECTIVES.values():
        return [
            f"The stage trains TRL's {objective} objective ({name}): no built-in curvature loss computes it, so "
            f"aa-ggn needs loss_fns={{stage name: (forward, loss)}} for it; the propagation estimators without "
            "curvature (aa-fd) and replay do not."
        ]
    return []


def trl_settings(trainer: Any, kind: str, args: Any, start_digests: dict[str, str] | None = None) -> dict | None:
    """The TRL-specific settings of a run (``stage.json["trl"]``), or None for plain transformers runs.

    ``objective`` is added where the kind names only its family (``online_dpo``, ``cpo``, ``orpo``, ``gkd``) or the
    config class is unknown (``unknown``); ``teacher_model`` for distillation (:func:`teacher_policy`)."""
    if config_kind(args) is None:
        return None
    objective = _objective(kind, args)
    out: dict[str, Any] = {"config_class": type(args).__name__}
    for key in _SETTINGS.get(objective, ()):
        if hasattr(args, key):
            out[key] = json_safe(getattr(args, key))
    if objective != kind:
        out["objective"] = objective
    ref = reference_policy(trainer, kind, args, start_digests)
    if ref is not None:
        out["reference_model"] = ref
    if objective in TEACHER_OBJECTIVES:
        out["teacher_model"] = teacher_policy(trainer, start_digests)
    if trainer is not None and objective in REWARD_OBJECTIVES:
        names = getattr(trainer, "reward_func_names", None)
        funcs = getattr(trainer, "reward_funcs", None) or []
        out["reward_functions"] = [str(n) for n in names] if names else [_callable_name(f) for f in funcs]
    return out
