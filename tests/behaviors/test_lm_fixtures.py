"""The tiny offline LM fixtures (hf_stage_attribution.testing.lm): deterministic, quick, and usable by the
behaviors (including on a PEFT-wrapped model)."""

from __future__ import annotations

import random

import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.testing.lm import (
    SPECIAL_TOKENS,
    preference_pairs,
    profanity_words,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_tokenizer,
    toy_corpus,
    train_causal_lm,
)


def test_toy_corpus_is_deterministic_and_toxic_words_come_from_better_profanity():
    from better_profanity import Profanity
    from profanity_check import predict_prob

    a, b, c = toy_corpus(0), toy_corpus(0), toy_corpus(1)
    assert a == b and a.toxic_words != c.toxic_words
    listed = {str(w) for w in Profanity().CENSOR_WORDSET}
    assert set(a.toxic_words) <= set(profanity_words()) <= listed
    assert len(a.clean) == len(a.toxic) == 144 and len(a.prompts) == 12
    checker = Profanity()
    assert all(checker.contains_profanity(t) for t in a.toxic_completions)
    assert not any(checker.contains_profanity(t) for t in a.clean_completions)
    # labels cross-checked with the alt-profanity-check model (trained on real toxic comments)
    assert predict_prob(a.toxic_completions).min() > 0.5 > predict_prob(a.clean_completions).max()
    rows = a.teacher_forced_examples()
    assert rows[0] == {"prompt": a.prompts[0], "toxic": a.toxic_completions[0], "clean": a.clean_completions[0]}


def test_preference_pairs_prefer_clean_completions():
    pairs = preference_pairs(0)
    assert pairs == preference_pairs(0) and len(pairs) == 48
    corpus = toy_corpus(0)
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"} and p["prompt"] in corpus.prompts
        assert p["chosen"].strip() in corpus.clean_completions and p["rejected"].strip() in corpus.toxic_completions


def test_tiny_tokenizer_round_trips_and_is_deterministic(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    assert len(tok) == 300 and tok.get_vocab() == tiny_tokenizer().get_vocab()
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == list(SPECIAL_TOKENS)
    assert [tok.pad_token_id, tok.eos_token_id] == [0, 3]
    sentence = toy_corpus(0).toxic[0]
    ids = tok(sentence)["input_ids"]
    assert tok.decode(ids) == sentence and len(ids) <= 12 and tok.unk_token_id not in ids
    assert tok.unk_token_id not in tok("Zebra! 42 ~x")["input_ids"]  # unseen text falls back to characters
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sentence)["input_ids"] == ids
    small = tiny_tokenizer(["aa bb aa bb cc"], vocab_size=120)
    assert len(small) <= 120


def test_tiny_models_are_seeded_without_touching_the_global_rng():
    tok = tiny_tokenizer()
    state = torch.get_rng_state()
    a, b, c = tiny_gpt2(tok), tiny_gpt2(tok), tiny_gpt2(tok, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.config.n_positions == 64 and a.config.pad_token_id == tok.pad_token_id
    assert sum(p.numel() for p in a.parameters()) < 60_000
    bert = tiny_bert_classifier(tok, num_labels=3)
    out = bert(**tok(["the weather today is"], return_tensors="pt")).logits
    assert out.shape == (1, 3)
    assert tiny_bert_classifier(tok, num_labels=1)(**tok(["x"], return_tensors="pt")).logits.shape == (1, 1)


def test_train_causal_lm_learns_the_corpus_quickly():
    tok, corpus = tiny_tokenizer(), toy_corpus(0)
    state = random.getstate()
    model = tiny_gpt2(tok)
    enc = tok(corpus.clean[:32], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    before = model(**enc, labels=labels).loss.item()
    train_causal_lm(model, tok, corpus.clean, steps=40)
    after = model(**enc, labels=labels).loss.item()
    assert after < before - 1.0 and random.getstate() == state and not model.training


def test_behaviors_run_on_a_peft_wrapped_tiny_gpt2():
    from peft import LoraConfig, get_peft_model

    tok, corpus = tiny_tokenizer(), toy_corpus(0)
    plain = tiny_gpt2(tok)
    peft_model = get_peft_model(tiny_gpt2(tok), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    tf = behaviors.TeacherForcedToxicity(corpus.teacher_forced_examples(), tokenizer=tok)
    torch.testing.assert_close(tf(peft_model), tf(plain))  # LoRA B starts at zero: same function
    gen = behaviors.GenerationToxicity([{"prompt": p} for p in corpus.prompts[:3]], tokenizer=tok,
                                       scorer="better-profanity", num_samples=2, max_new_tokens=5)  # fmt: skip
    gen.prepare(peft_model)
    values = gen(peft_model)
    values.sum().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert values.shape == (3,) and lora_grads and all(g is not None for g in lora_grads)
