"""Reward behaviors on real tiny models: a reward-modelling stage raises the reward model's preference for the
chosen responses; an SFT stage of the policy on chosen responses raises the policy's expected reward."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import (
    preference_pairs,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_tokenizer,
    toy_corpus,
    train_causal_lm,
)


def train_reward_model(model, tok, pairs, steps=40, lr=3e-3, seed=0):
    """Bradley-Terry loss -log σ(r(prompt + chosen) − r(prompt + rejected)), as TRL's RewardTrainer."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pairs), (16,), generator=gen).tolist()
        texts = [pairs[i]["prompt"] + pairs[i]["chosen"] for i in idx]
        texts += [pairs[i]["prompt"] + pairs[i]["rejected"] for i in idx]
        rewards = model(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(rewards[:16] - rewards[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    pairs = preference_pairs(0)
    untrained = tiny_bert_classifier(tok, num_labels=1)
    trained = train_reward_model(copy.deepcopy(untrained), tok, pairs)
    delta = [a.detach() - b.detach() for a, b in zip(trained.parameters(), untrained.parameters())]
    return {"tok": tok, "pairs": pairs, "untrained": untrained, "rm": trained, "delta": delta}


def test_reward_modelling_stage_raises_chosen_reward_and_margin(setup):
    tok, pairs = setup["tok"], setup["pairs"]
    corpus = toy_corpus(0)  # held-out prompt; completions of the kinds the reward model was trained on
    held_out = [{"prompt": "your friend is", "chosen": f" {c}", "rejected": f" {t}"}
                for c, t in zip(corpus.clean_completions, corpus.toxic_completions)]  # fmt: skip
    margin = behaviors.RewardModelScore(held_out, tokenizer=tok, measure="margin")
    chosen = behaviors.RewardModelScore(pairs, tokenizer=tok, measure="score", response_key="chosen")
    m0, m1 = margin(setup["untrained"]).mean().item(), margin(setup["rm"]).mean().item()
    c0, c1 = chosen(setup["untrained"]).mean().item(), chosen(setup["rm"]).mean().item()
    rm = setup["rm"]
    rm.zero_grad()
    margin(rm).mean().backward()
    slope = sum((p.grad * d).sum() for p, d in zip(rm.parameters(), setup["delta"])).item()
    rm.zero_grad()
    print(f"reward margin (chosen - rejected) {m0:.3f} -> {m1:.3f}; chosen reward {c0:.3f} -> {c1:.3f}; "
          f"grad.delta {slope:.3f}")  # fmt: skip
    assert m1 > m0 + 1.0 and c1 > c0 and slope > 0


def test_policy_sft_on_chosen_raises_expected_reward(setup):
    tok, pairs, rm = setup["tok"], setup["pairs"], setup["rm"]
    corpus = toy_corpus(0)
    policy0 = train_causal_lm(tiny_gpt2(tok), tok, corpus.clean + corpus.toxic, steps=60, lr=3e-3)
    policy1 = train_causal_lm(copy.deepcopy(policy0), tok, [p["prompt"] + p["chosen"] for p in pairs], steps=30,
                              lr=3e-3, seed=1)  # fmt: skip
    prompts = [{"prompt": p} for p in corpus.prompts]
    options = {"tokenizer": tok, "reward_model": rm, "num_samples": 4, "max_new_tokens": 12}
    before_b, after_b = behaviors.PolicyReward(prompts, **options), behaviors.PolicyReward(prompts, **options)
    before_b.prepare(policy0)
    after_b.prepare(policy1)
    before, after = before_b(policy0).mean().item(), after_b(policy1).mean().item()
    plain = behaviors.PolicyReward(prompts, weighting="plain", **options)
    plain.prepare(policy1)
    delta = [a.detach() - b.detach() for a, b in zip(policy1.parameters(), policy0.parameters())]
    policy1.zero_grad()
    plain(policy1).mean().backward()
    slope = sum((p.grad * d).sum() for p, d in zip(policy1.parameters(), delta)).item()
    policy1.zero_grad()
    print(f"policy expected reward {before:.3f} -> {after:.3f}; grad.delta of the plain IS estimate {slope:.3f}")
    assert after > before + 0.5 and slope > 0
    assert all(p.grad is None or not p.grad.any() for p in rm.parameters())  # the reward model stays fixed


def test_policy_reward_with_given_responses(setup):
    tok, rm = setup["tok"], setup["rm"]
    rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in setup["pairs"][:5]]
    b = behaviors.PolicyReward(rows, tokenizer=tok, reward_model=rm, completion_key="response")
    policy = tiny_gpt2(tok)
    b.prepare(policy)
    direct = behaviors.RewardModelScore(rows, tokenizer=tok)(rm).detach()
    torch.testing.assert_close(b(policy), direct, rtol=1e-5, atol=1e-5)  # weight 1 at the final policy
    with pytest.raises(BehaviorError, match="reward_model"):
        behaviors.PolicyReward(rows, tokenizer=tok, reward_model=None)


def test_a_generation_behavior_is_prepared_again_for_a_model_with_other_weights(setup):
    """A behavior that keeps completions, scores and ``log p_θK`` from the final model it was prepared on is prepared
    again when the next attribution's final model has other weights (a ledger extended by one stage, the same
    behavior object: the earlier model's samples were kept, effects of the wrong sign), not for the same values held
    by another object (a float32 copy); the attributor, estimators and the intervention sweep go through
    ``needs_preparing``."""
    from hf_stage_attribution.behaviors.base import needs_preparing
    from hf_stage_attribution.estimators.base import check_inputs

    tok, rm = setup["tok"], setup["rm"]
    policy = tiny_gpt2(tok)
    b = behaviors.PolicyReward([{"prompt": "your friend is"}], tokenizer=tok, reward_model=rm, num_samples=3,
                               max_new_tokens=6)  # fmt: skip
    assert needs_preparing(b, policy)
    b.prepare(policy)
    assert not needs_preparing(b, policy) and not needs_preparing(b, copy.deepcopy(policy))
    assert not needs_preparing(b.select([0]), policy)  # a process's share carries what it was prepared on
    trained = copy.deepcopy(policy)
    with torch.no_grad():
        next(trained.parameters()).add_(0.5)
    assert needs_preparing(b, trained)

    class Ledger:  # check_inputs reads the model check only when asked
        pass

    check_inputs(Ledger(), trained, b, {"check_model": False})
    fresh = behaviors.PolicyReward([{"prompt": "your friend is"}], tokenizer=tok, reward_model=rm, num_samples=3,
                                   max_new_tokens=6)  # fmt: skip
    fresh.prepare(trained)
    assert b.samples() == fresh.samples()
    torch.testing.assert_close(b(trained), fresh(trained))
