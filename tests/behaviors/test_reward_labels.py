"""A reward read off a classifier with several labels needs `label_index`: logit 0 is a class (often the negative
one), not a reward, so leaving it out is refused with the labels named; a one-label reward model needs none."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_gpt2, tiny_tokenizer

ROWS = [{"prompt": "you are", "response": " kind"}, {"prompt": "the weather today is", "response": " a shit"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def two_labels(tok):
    model = tiny_bert_classifier(tok, num_labels=2).eval()
    model.config.id2label, model.config.label2id = {0: "clean", 1: "toxic"}, {"clean": 0, "toxic": 1}
    return model


def test_reward_model_score_on_a_two_label_classifier_asks_for_label_index(tok, two_labels):
    b = behaviors.RewardModelScore(ROWS, tokenizer=tok, name="rm")
    with pytest.raises(BehaviorError) as err:
        b(two_labels)
    message = str(err.value)
    assert "\n" not in message and message.startswith("Behavior 'rm' (reward-model): ")
    assert "2 labels (0: 'clean', 1: 'toxic'; config.id2label)" in message and "set label_index" in message


def test_an_explicit_label_index_reads_that_logit(tok, two_labels):
    values = behaviors.RewardModelScore(ROWS, tokenizer=tok, label_index=1)(two_labels).detach()
    with torch.no_grad():
        enc = tok([r["prompt"] + r["response"] for r in ROWS], padding=True, return_tensors="pt")
        expected = two_labels(**enc).logits[:, 1]
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


def test_a_one_label_reward_model_needs_no_label_index(tok):
    rm = tiny_bert_classifier(tok, num_labels=1).eval()
    assert behaviors.RewardModelScore(ROWS, tokenizer=tok)(rm).shape == (2,)


def test_policy_reward_with_a_two_label_reward_model_is_refused_when_built(tok, two_labels):
    with pytest.raises(BehaviorError, match=r"Behavior 'pr' \(reward\): .*2 labels \(0: 'clean', 1: 'toxic'"):
        behaviors.PolicyReward(ROWS, tokenizer=tok, reward_model=two_labels, completion_key="response", name="pr")
    b = behaviors.PolicyReward(ROWS, tokenizer=tok, reward_model=two_labels, completion_key="response", label_index=1)
    b.prepare(tiny_gpt2(tok))
    assert len(b._state["scores"]) == 2


def test_a_reward_model_folder_that_does_not_load_is_one_line(tmp_path):
    """Weights of another shape in the folder: transformers' multi-line error becomes one BehaviorError naming it."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_stage_attribution.behaviors.loading import load_sequence_classifier
    from hf_stage_attribution.errors import BehaviorError

    def model(width):
        config = GPT2Config(vocab_size=50, n_embd=width, n_layer=1, n_head=2, n_positions=16, num_labels=1)
        return GPT2ForSequenceClassification(config)

    model(8).save_pretrained(tmp_path / "rm")
    model(16).save_pretrained(tmp_path / "other")
    (tmp_path / "rm" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(BehaviorError, match="Cannot load a sequence-classification") as caught:
        load_sequence_classifier(str(tmp_path / "rm"))
    assert "\n" not in str(caught.value)
