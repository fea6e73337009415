"""``continuation_logprobs`` in bounded memory: row chunks and logits only from the first continuation position on
give the same values and gradients as one full forward, and bad inputs get one-line errors."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution.behaviors.sequences import continuation_logprobs
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tok, tiny_gpt2(tok).eval()


def _reference(model, prompts, conts, pad_id):
    """The sum of token log-probabilities from one full forward per row (no padding, every logit computed)."""
    out = []
    for p, c in zip(prompts, conts):
        ids = torch.tensor([p + c])
        lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        out.append(sum(lp[len(p) - 1 + i, t] for i, t in enumerate(c)))
    return torch.stack(out)


def _rows(tok):
    texts = [("the weather today is", " warm and dry"), ("hi", " there friend of mine"), ("a long prompt that says a"
             " lot before the end", " end"), ("ok", " yes")]  # fmt: skip
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [enc(p) for p, _ in texts], [enc(c) for _, c in texts]


@pytest.mark.parametrize("chunk_bytes", [1, 2**30])  # one row per chunk; all rows at once
def test_chunks_and_kept_logits_match_full_forwards(lm, chunk_bytes):
    tok, model = lm
    prompts, conts = _rows(tok)
    got = continuation_logprobs(model, prompts, conts, pad_id=0, chunk_bytes=chunk_bytes)
    want = _reference(model, prompts, conts, 0)
    assert got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_chunks(lm):
    tok, model = lm
    prompts, conts = _rows(tok)
    w = model.transformer.wte.weight
    (g_chunked,) = torch.autograd.grad(continuation_logprobs(model, prompts, conts, pad_id=0, chunk_bytes=1).sum(), w)
    (g_ref,) = torch.autograd.grad(_reference(model, prompts, conts, 0).sum(), w)
    torch.testing.assert_close(g_chunked, g_ref, rtol=1e-4, atol=1e-6)


def test_logits_are_kept_only_from_the_first_continuation_position(lm):
    tok, model = lm
    prompts, conts = _rows(tok)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        continuation_logprobs(model, prompts, conts, pad_id=0)
    finally:
        hook.remove()
    width = max(len(p) + len(c) for p, c in zip(prompts, conts))
    first = min(len(p) for p in prompts) - 1
    assert first > 0 and seen == [(4, width - first, model.config.vocab_size)]


def test_empty_prompt_or_mismatched_lists_are_one_line_errors(lm):
    tok, model = lm
    with pytest.raises(BehaviorError, match="prompt is empty"):
        continuation_logprobs(model, [[]], [[5]], pad_id=0)
    with pytest.raises(BehaviorError, match="2 prompts but 1 continuations"):
        continuation_logprobs(model, [[4], [5]], [[5]], pad_id=0)
