"""PolicyReward encodes the reward model's inputs with the reward model's own tokenizer: `reward_tokenizer`, else
the one saved in the reward model's folder; the policy's tokenizer only when its vocabulary fits."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.behaviors.reward import reward_scores
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_gpt2, tiny_tokenizer

ROWS = [{"prompt": "you are", "response": " kind"}, {"prompt": "the weather today is", "response": " a shit"}]


@pytest.fixture(scope="module")
def two_vocabularies():
    rm_tok = tiny_tokenizer()  # 300 ids
    policy_tok = tiny_tokenizer(texts=["you are kind the weather today is a shit nice rude"] * 20, vocab_size=150)
    return rm_tok, policy_tok, tiny_bert_classifier(rm_tok, num_labels=1), tiny_gpt2(policy_tok)


def rewards(b, policy):
    b.prepare(policy)
    return [s[0] for s in b._state["scores"]]


def test_reward_model_folder_with_its_tokenizer_is_encoded_with_it(tmp_path, two_vocabularies):
    rm_tok, policy_tok, rm, policy = two_vocabularies
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    policy_tok.save_pretrained(tmp_path / "policy")
    b = behaviors.PolicyReward(ROWS, tokenizer=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"),
                               completion_key="response")  # fmt: skip
    with torch.no_grad():
        expected = reward_scores(rm.eval(), rm_tok, [r["prompt"] + r["response"] for r in ROWS]).tolist()
    assert rewards(b, policy) == pytest.approx(expected, abs=1e-6)
    assert "reward_tokenizer" not in b.to_spec()  # the folder's tokenizer is found again when the spec is loaded
    loaded = behaviors.from_spec(b.to_spec())
    assert len(loaded.reward_tokenizer) == len(rm_tok)


def test_reward_model_object_with_another_vocabulary_asks_for_reward_tokenizer(two_vocabularies):
    rm_tok, policy_tok, rm, policy = two_vocabularies
    with pytest.raises(BehaviorError, match=r"takes 300 token ids.*policy.s tokenizer has 136.*reward_tokenizer="):
        behaviors.PolicyReward(ROWS, tokenizer=policy_tok, reward_model=rm, completion_key="response")
    b = behaviors.PolicyReward(ROWS, tokenizer=policy_tok, reward_model=rm, reward_tokenizer=rm_tok,
                               completion_key="response")  # fmt: skip
    assert len(rewards(b, policy)) == 2


def test_reward_model_object_sharing_the_policy_vocabulary_uses_the_policy_tokenizer(two_vocabularies):
    rm_tok, _, rm, _ = two_vocabularies
    b = behaviors.PolicyReward(ROWS, tokenizer=rm_tok, reward_model=rm, completion_key="response")
    assert b.reward_tokenizer is rm_tok
