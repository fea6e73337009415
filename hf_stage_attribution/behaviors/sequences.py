"""Causal-LM helpers for behaviors: summed continuation log-probabilities (differentiable, teacher-forced) and
seeded sampling with one ``torch.Generator`` per sequence (no global RNG side effects, independent of batching).

Example:
    >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2
    >>> from hf_stage_attribution.behaviors.sequences import continuation_logprobs, sample_continuations
    >>> tok = tiny_tokenizer(); lm = tiny_gpt2(tok)
    >>> prompt = tok("the weather today is", add_special_tokens=False)["input_ids"]
    >>> [c] = sample_continuations(lm, [prompt], [0], max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=0)
    >>> continuation_logprobs(lm, [prompt], [c], pad_id=0).shape
    torch.Size([1])
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch

from ..errors import BehaviorError
from .base import model_device, record_truncation

__all__ = [
    "continuation_logprobs", "sample_continuations", "encode", "fit_prompt", "max_positions", "sample_seed",
    "tempered",
]  # fmt: skip


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length from its config (``n_positions`` / ``max_position_embeddings``), if any."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (prompt and continuation are encoded separately)."""
    if not isinstance(text, str):
        raise BehaviorError(f"Expected a string to tokenize; got a {type(text).__name__} ({text!r:.60}).")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(prompt: list[int], room: int | None, start_id: int) -> list[int]:
    """``prompt`` cut from the left to ``room`` tokens (never empty: ``start_id`` when it is); a cut is counted for
    the evaluating behavior's truncation notice (:meth:`~.base.ExampleBehavior.truncation`)."""
    if room is not None and room < 1:
        raise BehaviorError(f"No room left for the prompt in the model's context (room {room}); shorten the text.")
    ids = list(prompt) if prompt else [start_id]
    if room is None:
        return ids
    record_truncation(int(len(ids) > room), 1, room, PROMPT_CUT)
    return ids[-room:]


#: how :func:`fit_prompt`'s cuts are described in the truncation notice
PROMPT_CUT = "prompts: the model's context less the continuation; cut from the left, their last tokens kept"


def sample_seed(seed: int, index: int, sample: int) -> int:
    """A 63-bit seed for sample ``sample`` of example ``index`` (original position in the behavior set)."""
    digest = hashlib.sha256(f"{seed}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tempered(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Logits of the sampling distribution: divided by ``temperature``, all but the top ``top_k`` set to -inf."""
    logits = logits.float() / float(temperature)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


LOGITS_CHUNK_BYTES = 64 * 2**20  # float32 logits materialised at once by continuation_logprobs (per row chunk)


def _forward_keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward (a PEFT wrapper's base model's) takes ``logits_to_keep``."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _vocab_size(model: torch.nn.Module) -> int:
    """The output vocabulary size (for sizing the row chunks); a generous guess when the config has none."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(value) if isinstance(value, int) and value > 0 else 65536


def continuation_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    continuations: list[list[int]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> torch.Tensor:
    """Summed ``log p(continuation | prompt)`` per row (float32, differentiable).

    Rows run in right-padded chunks sized so that one chunk's logits stay under ``chunk_bytes`` (all rows at once
    when they fit), and the LM head computes logits only from the first continuation position of the chunk on
    (``logits_to_keep``, where the model's forward has it): a ``[rows, sequence, vocabulary]`` float32 tensor is
    never materialised whole.
    """
    if any(len(c) == 0 for c in continuations):
        raise BehaviorError("A continuation is empty after tokenization; every continuation needs a token.")
    if any(len(p) == 0 for p in prompts):
        raise BehaviorError("A prompt is empty; every prompt needs a token (e.g. the tokenizer's bos/eos id).")
    if len(prompts) != len(continuations):
        raise BehaviorError(f"Got {len(prompts)} prompts but {len(continuations)} continuations; pass one each.")
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(s) for s in seqs)
    keeps = _forward_keeps_logits(model)
    per_row = width * _vocab_size(model) * 4
    rows = max(1, int(chunk_bytes) // max(per_row, 1))
    parts = [
        _chunk_logprobs(model, prompts[i : i + rows], seqs[i : i + rows], width, pad_id, temperature, top_k, keeps)
        for i in range(0, len(seqs), rows)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunk_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    seqs: list[list[int]],
    width: int,
    pad_id: int,
    temperature: float,
    top_k: int | None,
    keeps: bool,
) -> torch.Tensor:
    """:func:`continuation_logprobs` of one chunk of rows (padded to ``width``, the width of all rows)."""
    device = model_device(model)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)  # position t predicts token t+1
    for r, (p, s) in enumerate(zip(prompts, seqs)):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        scored[r, len(p) - 1 : len(s) - 1] = True
    first = min(len(p) for p in prompts) - 1  # the first position whose logits are read
    keep = width - first  # positions first..width-1 (the last one predicts nothing and is dropped below)
    ids, mask, scored = ids.to(device), mask.to(device), scored[:, first:].to(device)
    extra = {"logits_to_keep": keep} if keeps else {}
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -keep:-1]
    picked = tempered(logits[scored], temperature, top_k).log_softmax(-1)
    del logits
    token_lp = picked.gather(1, ids[:, first + 1 :][scored][:, None]).squeeze(1)
    rows = torch.arange(len(seqs), device=device)[:, None].expand_as(scored)[scored]
    return torch.zeros(len(seqs), device=device, dtype=token_lp.dtype).index_add(0, rows, token_lp)


@torch.no_grad()
def sample_continuations(
    model: torch.nn.Module,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 32,
) -> list[list[int]]:
    """Sample one continuation per prompt (up to ``max_new_tokens``, ending with eos when produced).

    Row ``r`` draws its uniforms from its own ``torch.Generator`` seeded with ``seeds[r]`` (inverse-CDF sampling),
    so a sample depends only on its prompt, its seed and the model, not on batching or the global RNG.
    """
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        out.extend(
            _sample_batch(
                model, prompts[start:stop], seeds[start:stop], max_new_tokens, eos_id, pad_id, temperature, top_k
            )
        )
    return out


def _cache_of(out: Any) -> dict[str, Any]:
    """The KV cache of a forward's output, under the argument name this transformers version uses."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for key in ("cache", "past_key_values"):  # transformers >= 5.2x renamed past_key_values to cache
        if key in keys and out[key] is not None:
            return {key: out[key]}
    raise BehaviorError("The model returned no KV cache with use_cache=True; sampling needs a causal LM with a cache.")


def _sample_batch(model, prompts, seeds, max_new_tokens, eos_id, pad_id, temperature, top_k) -> list[list[int]]:
    device = model_device(model)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: the next token is always at the end
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    seqs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        probs = tempered(out.logits[:, -1], temperature, top_k).softmax(-1).double().cpu()
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                seqs[r].append(t)
                done[r] = eos_id is not None and t == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens[:, None].to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **_cache_of(out),
        )
    return seqs
