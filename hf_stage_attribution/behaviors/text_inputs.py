"""Text batches for sequence-classification heads (classifiers, reward models, scorer models), independent of how
the user's tokenizer is set up for generation.

Texts are tokenized without padding and padded here, always on the right (a left-padding tokenizer, usual for
decoders prepared for generation, would shift position ids and make a value depend on its batch), with the
tokenizer's pad token, or its eos token when it has none (GPT-2 and Llama tokenizers ship none). The tokenizer
itself is never changed. Decoder classifiers with a score head (GPT-2, Llama, …) pool the rightmost token that
is not ``config.pad_token_id``: padded positions hold that id, and a model whose config has none gets the pad id
used here for the duration of the forward (then ``None`` again), so the pooled token is the last one the
attention mask keeps.

Example:
    >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_bert_classifier
    >>> from hf_stage_attribution.behaviors.text_inputs import forward_texts
    >>> tok = tiny_tokenizer(); tok.padding_side = "left"
    >>> forward_texts(tiny_bert_classifier(tok), tok, ["you", "you are kind"]).logits.shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import BehaviorError
from .base import model_device, record_truncation

__all__ = ["embedding_rows", "encode_texts", "forward_texts", "padding_id", "pooling_pad_id"]


def _text_config(model: torch.nn.Module) -> Any:
    """The config holding ``pad_token_id`` for a score head (a multimodal config's text config), or None."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def embedding_rows(model: torch.nn.Module) -> int | None:
    """How many token ids the model's input embeddings hold, when it says."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None


def padding_id(tokenizer: Any, model: torch.nn.Module | None = None) -> int:
    """The id padded positions get: the model's ``config.pad_token_id`` when it has a valid one (a score head then
    finds the last real token), else the tokenizer's pad id, else its eos id."""
    config_pad = getattr(_text_config(model), "pad_token_id", None) if model is not None else None
    rows = embedding_rows(model) if model is not None else None
    if isinstance(config_pad, int) and config_pad >= 0 and (rows is None or config_pad < rows):
        return config_pad
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise BehaviorError(
        f"The tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token, so a batch of texts cannot be "
        "padded; set one, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the model's "
        "embeddings), or set the model's config.pad_token_id."
    )


def _pad_value(key: str, tokenizer: Any, pad_id: int) -> int:
    if key == "input_ids":
        return pad_id
    if key == "token_type_ids":
        return int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
    return 1 if key == "special_tokens_mask" else 0


def encode_texts(
    tokenizer: Any,
    texts: list[Any],
    pairs: list[Any] | None = None,
    *,
    max_length: int | None = None,
    pad_id: int,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``tokenizer(texts, pairs)`` truncated to ``max_length`` (default: the tokenizer's), padded on the right with
    ``pad_id``, as tensors of the keys the tokenizer names in ``model_input_names``."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    names = getattr(tokenizer, "model_input_names", None) or list(enc.keys())
    ids = enc["input_ids"]
    _note_truncation(tokenizer, texts, pairs, ids, max_length)
    width = max(len(row) for row in ids)
    out = {}
    for key in [k for k in enc.keys() if k in names]:
        value = _pad_value(key, tokenizer, pad_id)
        out[key] = torch.tensor([list(row) + [value] * (width - len(row)) for row in enc[key]], dtype=torch.long)
    if "attention_mask" in names and "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _note_truncation(
    tokenizer: Any, texts: list[Any], pairs: list[Any] | None, ids: list[list[int]], max_length: int | None
) -> None:
    """Count the texts that ``truncation=True`` cut (:func:`~.base.record_truncation`): a row that reached the limit
    is encoded again with one more token allowed; it was cut when it fills that too."""
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit >= 10**9:  # no limit (transformers' VERY_LARGE_INTEGER)
        return
    full = [i for i, row in enumerate(ids) if len(row) >= limit]
    if full:
        again = tokenizer(
            [texts[i] for i in full], [pairs[i] for i in full] if pairs is not None else None, truncation=True,
            max_length=limit + 1,
        )["input_ids"]  # fmt: skip
        cut = sum(len(row) > limit for row in again)
    else:
        cut = 0
    source = "`max_length`" if max_length is not None else "the tokenizer's model_max_length"
    record_truncation(cut, len(ids), limit, source)


@contextmanager
def pooling_pad_id(model: torch.nn.Module, pad_id: int) -> Iterator[None]:
    """``model.config.pad_token_id`` set to ``pad_id`` while inside, when the config has none (a score head
    refuses batches without one); restored to ``None`` on exit."""
    config = _text_config(model)
    if config is None or not hasattr(config, "pad_token_id") or config.pad_token_id is not None:
        yield
        return
    config.pad_token_id = pad_id
    try:
        yield
    finally:
        config.pad_token_id = None


def forward_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[Any],
    pairs: list[Any] | None = None,
    *,
    max_length: int | None = None,
) -> Any:
    """The model's output on ``texts`` (and ``pairs``), right-padded as this module describes."""
    pad_id = padding_id(tokenizer, model)
    enc = encode_texts(tokenizer, texts, pairs, max_length=max_length, pad_id=pad_id, device=model_device(model))
    with pooling_pad_id(model, pad_id):
        return model(**enc)
