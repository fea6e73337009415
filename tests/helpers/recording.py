"""Tiny offline data and arguments for the recording tests, shared with the scripts launched under torchrun.

Everything is built on the spot from :mod:`hf_stage_attribution.testing.lm` (no downloads).
"""

from __future__ import annotations

import functools
from typing import Any

SEQ_LEN = 16


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    from hf_stage_attribution.testing.lm import tiny_tokenizer

    return tiny_tokenizer()


def gpt2(seed: int = 0, **sizes: int) -> Any:
    from hf_stage_attribution.testing.lm import tiny_gpt2

    return tiny_gpt2(tokenizer(), seed=seed, **sizes)


def lm_dataset(n: int = 64, seed: int = 0) -> Any:
    """Causal-LM rows of exactly ``SEQ_LEN`` tokens (padding masked in the labels)."""
    from datasets import Dataset

    from hf_stage_attribution.testing.lm import toy_corpus

    tok = tokenizer()
    texts = toy_corpus(seed).texts()[:n]
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ_LEN)
    labels = [
        [t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]
    return Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    )


def sft_dataset(n: int = 32) -> Any:
    from datasets import Dataset

    from hf_stage_attribution.testing.lm import toy_corpus

    corpus = toy_corpus(0)
    rows = [{"prompt": p, "completion": " " + c} for p in corpus.prompts for c in corpus.clean_completions[:3]]
    return Dataset.from_list(rows[:n])


def preference_dataset(n: int = 16) -> Any:
    from datasets import Dataset

    from hf_stage_attribution.testing.lm import preference_pairs

    return Dataset.from_list(preference_pairs(0)[:n])


def unpaired_dataset(n: int = 16) -> Any:
    """KTO rows: prompt, completion, label (True = desirable)."""
    from datasets import Dataset

    rows = []
    for pair in preference_dataset(n // 2):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return Dataset.from_list(rows)


def prompt_dataset(n: int = 8) -> Any:
    from datasets import Dataset

    from hf_stage_attribution.testing.lm import toy_corpus

    return Dataset.from_list([{"prompt": p} for p in toy_corpus(0).prompts[:n]])


COMMON = {
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "logging_strategy": "no",
    "disable_tqdm": True,
    "seed": 0,
    "dataloader_num_workers": 0,
}


def training_args(output_dir: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(output_dir, **{**COMMON, **overrides})


def trl_args(config_cls: Any, output_dir: str, **overrides: Any) -> Any:
    """A TRL config with the CPU-friendly settings (no bf16, no gradient checkpointing)."""
    return config_cls(output_dir, **{**COMMON, "bf16": False, "activation_checkpointing": False, **overrides})
