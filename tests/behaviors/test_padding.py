"""Text batches for classifier heads: a value does not depend on the batch (left-padding tokenizers), tokenizers
without a pad token pad with eos, and score-head models without config.pad_token_id pool the last real token."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_gpt2, tiny_tokenizer

TEXTS = [{"text": "you", "label": 1}, {"text": "the weather today is very nice and sunny", "label": 0}]
PAIRS = [{"prompt": "you", "response": " are"}, {"prompt": "the weather today is", "response": " very nice and sunny"}]


def gpt2_classifier(tok, num_labels=2, pad_token_id="tokenizer"):
    pad = tok.pad_token_id if pad_token_id == "tokenizer" else pad_token_id
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=num_labels,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(config).eval()


def llama_classifier(tok):
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, num_labels=1, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


def batch_and_alone(behavior, model):
    batch = behavior(model).detach()
    alone = torch.cat([behavior.select([i])(model).detach() for i in range(len(behavior))])
    return batch, alone


def test_left_padding_tokenizer_gives_batch_independent_values_and_is_left_as_it_was():
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    right = tiny_tokenizer()
    clf, rm = gpt2_classifier(tok), gpt2_classifier(tok, num_labels=1)
    batch, alone = batch_and_alone(behaviors.Classification(TEXTS, tokenizer=tok), clf)
    torch.testing.assert_close(batch, alone)
    torch.testing.assert_close(batch, behaviors.Classification(TEXTS, tokenizer=right)(clf).detach())
    batch, alone = batch_and_alone(behaviors.RewardModelScore(PAIRS, tokenizer=tok), rm)
    torch.testing.assert_close(batch, alone)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"


@pytest.mark.parametrize("kind", ["classification", "reward-model"])
def test_tokenizer_without_pad_token_pads_with_eos(kind):
    tok = tiny_tokenizer()
    tok.pad_token = None
    if kind == "classification":
        model, behavior = gpt2_classifier(tok, pad_token_id=None), behaviors.Classification(TEXTS, tokenizer=tok)
    else:
        model = tiny_bert_classifier(tiny_tokenizer(), num_labels=1)
        behavior = behaviors.RewardModelScore(PAIRS, tokenizer=tok)
    batch, alone = batch_and_alone(behavior, model)
    torch.testing.assert_close(batch, alone)
    assert tok.pad_token is None and model.config.pad_token_id in (None, 0)


def test_policy_reward_prepares_with_a_tokenizer_without_pad_token():
    tok = tiny_tokenizer()
    tok.pad_token = None
    policy, rm = tiny_gpt2(tiny_tokenizer()), tiny_bert_classifier(tiny_tokenizer(), num_labels=1)
    b = behaviors.PolicyReward([{"prompt": "you are"}, {"prompt": "the weather"}], tokenizer=tok, reward_model=rm,
                               num_samples=2, max_new_tokens=4)  # fmt: skip
    b.prepare(policy)
    assert b(policy).shape == (2,)


@pytest.mark.parametrize("build", [gpt2_classifier, llama_classifier], ids=["gpt2", "llama"])
def test_score_head_without_config_pad_token_pools_the_last_real_token(build):
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # the usual fix for GPT-2/Llama tokenizers; the model's config keeps None
    model = build(tok, num_labels=1) if build is gpt2_classifier else build(tok)
    model.config.pad_token_id = None
    batch, alone = batch_and_alone(behaviors.RewardModelScore(PAIRS, tokenizer=tok), model)
    torch.testing.assert_close(batch, alone)
    assert model.config.pad_token_id is None


def test_score_head_whose_config_pad_differs_from_the_tokenizers_pools_the_last_real_token():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # pads with eos (3); the model's config says <pad> (0)
    model = gpt2_classifier(tiny_tokenizer(), num_labels=1)
    batch, alone = batch_and_alone(behaviors.RewardModelScore(PAIRS, tokenizer=tok), model)
    torch.testing.assert_close(batch, alone)


def test_tokenizer_with_neither_pad_nor_eos_is_refused_with_the_fix():
    tok = tiny_tokenizer()
    tok.pad_token, tok.eos_token = None, None
    model = gpt2_classifier(tiny_tokenizer(), pad_token_id=None)
    with pytest.raises(BehaviorError, match="neither a pad nor an eos token.*pad_token"):
        behaviors.Classification(TEXTS, tokenizer=tok)(model)
    model.config.pad_token_id = 0  # the model's own pad id is enough to pad with
    assert behaviors.Classification(TEXTS, tokenizer=tok)(model).shape == (2,)
