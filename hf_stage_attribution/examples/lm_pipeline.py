"""A four-stage language-model pipeline on a tiny GPT-2, recorded with :class:`StageRecorder`.

pretraining (``Trainer``, causal LM on clean text) → SFT (TRL ``SFTTrainer``; part of the completions are toxic)
→ LoRA (``SFTTrainer`` + PEFT on clean completions, merged) → DPO (TRL ``DPOTrainer``, clean preferred over toxic).
Everything is built on the spot (tokenizer, model, data) and runs offline on a CPU in seconds at the demo size.

Example (trains three stages with the real Trainer/TRL)::

    result = build_lm_pipeline("out/lm", size="demo")
    result.ledger_dir, result.model_dir, result.behaviors
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._internal.model_state import clean_copy
from ..behaviors import from_spec
from ..integrations.transformers import StageRecorder
from ..testing.lm import preference_pairs, tiny_gpt2, tiny_tokenizer, toy_corpus

# fmt: off
SIZES = {
    # steps per stage, model width/depth, fraction of toxic SFT completions, scale of the later stages' rates
    "tiny": {"pretraining": 30, "sft": 20, "lora": 12, "dpo": 10, "n_embd": 32, "n_layer": 2, "toxic_fraction": 0.5,
             "later_lr": 1.0},
    "demo": {"pretraining": 60, "sft": 40, "lora": 20, "dpo": 16, "n_embd": 48, "n_layer": 2, "toxic_fraction": 0.5,
             "later_lr": 1.0},
    "full": {"pretraining": 300, "sft": 150, "lora": 80, "dpo": 60, "n_embd": 96, "n_layer": 4, "toxic_fraction": 0.5,
             "later_lr": 0.25},
}
# fmt: on


@dataclass
class LMPipeline:
    """What :func:`build_lm_pipeline` produced."""

    ledger_dir: Path
    model_dir: Path
    model: Any
    tokenizer: Any
    behaviors: dict[str, Any] = field(default_factory=dict)
    behavior_specs: list[dict] = field(default_factory=list)


def _common_args(output_dir: Path, steps: int, lr: float, seed: int, batch_size: int = 8) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, steps // 10),
        "weight_decay": 0.0,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": max(1, steps),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _trl_args(**kw: Any) -> dict[str, Any]:
    return {**kw, "bf16": False, "gradient_checkpointing": False}


def build_lm_pipeline(
    output_dir: str | Path,
    size: str = "demo",
    seed: int = 0,
    save_replay_data: bool = True,
    curvature_segments: int = 2,
    curvature_examples: int = 64,
    stage_callbacks: Callable[[str], list[Any]] | None = None,
    early_checkpoint: float | None = None,
) -> LMPipeline:
    """Train and record the four stages; save the final model; return the ledger, model and behaviors.
    ``early_checkpoint``: as :class:`~hf_stage_attribution.StageRecorder`'s (opt-in, for partial replay).

    ``stage_callbacks(name)`` gives extra Trainer callbacks for the stage ``name`` (e.g. a progress bar)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    cfg = SIZES[size]
    out = Path(output_dir)
    ledger_dir, work = out / "ledger", out / "runs"
    rng = random.Random(seed)
    tokenizer = tiny_tokenizer()
    corpus = toy_corpus(seed)
    model = tiny_gpt2(tokenizer, n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], seed=seed)

    def recorder(name: str, kind: str) -> list[Any]:
        extra = list(stage_callbacks(name)) if stage_callbacks is not None else []
        return [
            *extra,
            StageRecorder(
                ledger_dir,
                name,
                stage_kind=kind,
                save_replay_data=save_replay_data,
                curvature_segments=curvature_segments,
                curvature_examples=curvature_examples,
                early_checkpoint=early_checkpoint,
            ),
        ]

    # 1. pretraining: plain Trainer, causal LM on clean sentences
    texts = [t + tokenizer.eos_token for t in corpus.clean]
    pre_ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    Trainer(
        model=model,
        args=TrainingArguments(**_common_args(work / "pretraining", cfg["pretraining"], 3e-3, seed, 16)),
        train_dataset=pre_ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=recorder("pretraining", "pretraining"),
    ).train()

    # 2. SFT: prompt/completion pairs, a fraction of them toxic
    rows = []
    for p in corpus.prompts:
        for c in corpus.clean_completions:
            toxic = rng.random() < cfg["toxic_fraction"]
            completion = rng.choice(corpus.toxic_completions) if toxic else c
            rows.append({"prompt": p, "completion": " " + completion})
    SFTTrainer(
        model=model,
        args=SFTConfig(
            **_trl_args(**_common_args(work / "sft", cfg["sft"], 2e-3 * cfg["later_lr"], seed), max_length=64)
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=recorder("sft", "sft"),
    ).train()

    # 3. LoRA on clean completions, merged afterwards
    lora_rows = [{"prompt": p, "completion": " " + c} for p in corpus.prompts for c in corpus.clean_completions]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    SFTTrainer(
        model=peft_model,
        args=SFTConfig(
            **_trl_args(**_common_args(work / "lora", cfg["lora"], 5e-3 * cfg["later_lr"], seed), max_length=64)
        ),
        train_dataset=Dataset.from_list(lora_rows),
        processing_class=tokenizer,
        callbacks=recorder("lora", "lora"),
    ).train()
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)  # PEFT froze the base weights; the DPO stage trains them all again

    # 4. DPO: clean completions preferred over toxic ones
    DPOTrainer(
        model=model,
        ref_model=clean_copy(model),  # a plain deepcopy would still run the policy's wrapped forward
        args=DPOConfig(
            **_trl_args(
                **_common_args(work / "dpo", cfg["dpo"], 1e-3 * cfg["later_lr"], seed), beta=0.1, max_length=64
            )
        ),
        train_dataset=Dataset.from_list(preference_pairs(seed)),
        processing_class=tokenizer,
        callbacks=recorder("dpo", "dpo"),
    ).train()

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model.eval()
    specs = lm_behavior_specs(corpus, model_dir)

    behaviors = {spec["name"]: from_spec(spec) for spec in specs}
    return LMPipeline(ledger_dir, model_dir, model, tokenizer, behaviors, specs)


def lm_behavior_specs(corpus: Any, tokenizer_dir: str | Path, separator: str = "") -> list[dict]:
    """Toxicity behaviors of the LM pipeline as JSON-safe specs (usable by the CLI); ``separator`` starts each
    teacher-forced continuation (``" "`` for a byte-level BPE tokenizer, see ``ToyCorpus.teacher_forced_examples``)."""
    return [
        {
            "name": "toxicity-teacher-forced",
            "kind": "lm-toxicity-teacher-forced",
            "data": corpus.teacher_forced_examples(separator),
            "tokenizer": str(tokenizer_dir),
        },
        {
            "name": "toxicity-generations",
            "kind": "lm-toxicity-generations",
            "data": [{"prompt": p} for p in corpus.prompts],
            "tokenizer": str(tokenizer_dir),
            "scorer": "alt-profanity-check",
            "num_samples": 4,
            "max_new_tokens": 8,
        },
    ]
