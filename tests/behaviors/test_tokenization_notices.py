"""Notices about text the model will not see as written: a byte-level BPE tokenizer (GPT-2 style) scores a
continuation without a leading space as glued to its prompt, and texts longer than the tokenizer's limit (or
`max_length`) are truncated. Each is said once, naming what and how many; the values are unchanged."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_gpt2, tiny_tokenizer, toy_corpus

LONG = " ".join(["the weather today is very nice and sunny"] * 12)  # 96 tokens; the tiny tokenizer keeps 64


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A GPT-2-style tokenizer trained on the spot: ByteLevel pre-tokenizer without a prefix space, BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(toy_corpus(0).texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[hf-stage-attribution]")]


def test_glued_continuations_with_a_byte_level_tokenizer_are_named_once(byte_level_tokenizer, capsys):
    from hf_stage_attribution.behaviors.toxicity import splits_leading_space

    tok = byte_level_tokenizer
    assert splits_leading_space(tok) and not splits_leading_space(tiny_tokenizer())
    rows = toy_corpus(0).teacher_forced_examples()  # "the weather today is" + "a prick and a shit"
    b = behaviors.TeacherForcedToxicity(rows, tokenizer=tok, name="glued-bl")
    [said] = notices(capsys)
    assert "Behavior 'glued-bl' (lm-toxicity-teacher-forced): its tokenizer is byte-level BPE" in said
    assert "in 12 of 12 examples a continuation starts without a space" in said
    assert f"example 0: prompt 'the weather today is' + toxic {rows[0]['toxic']!r}" in said
    assert f"Start continuations with a space ({' ' + rows[0]['toxic']!r})" in said
    model = tiny_gpt2(tok)
    values = b(model)
    assert values.shape == (12,) and notices(capsys) == []  # evaluation says nothing more
    rebuilt = behaviors.TeacherForcedToxicity(rows, tokenizer=tok, name="glued-bl")
    assert notices(capsys) == []  # once per process
    torch.testing.assert_close(rebuilt(model), values)  # the values are computed as given


def test_spaced_continuations_or_a_metaspace_tokenizer_say_nothing(byte_level_tokenizer, capsys):
    rows = toy_corpus(0).teacher_forced_examples()
    spaced = [{**r, "toxic": " " + r["toxic"], "clean": [" " + r["clean"]]} for r in rows]
    behaviors.TeacherForcedToxicity(spaced, tokenizer=byte_level_tokenizer, name="spaced-bl")
    behaviors.TeacherForcedToxicity(rows, tokenizer=tiny_tokenizer(), name="metaspace")
    assert notices(capsys) == []


def test_truncated_texts_are_counted_once_with_the_length(capsys):
    tok = tiny_tokenizer()  # model_max_length 64
    model = tiny_bert_classifier(tok)
    rows = [{"text": LONG, "label": 0}, {"text": "you are kind", "label": 1}, {"text": LONG, "label": 1}]
    b = behaviors.Classification(rows, tokenizer=tok, name="long-texts", batch_size=2)
    b(model)
    [said] = notices(capsys)
    assert said.endswith(
        "Behavior 'long-texts' (classification): 2 of 3 texts it encoded were longer than 64 tokens (the tokenizer's "
        "model_max_length) and were truncated to 64; its values score the truncated texts. Set `max_length` (up to "
        "the model's limit) or shorten the texts to score them whole."
    )
    b(model)
    b.select([0, 1, 2])(model)
    assert notices(capsys) == []  # said once for the behavior and its selections


def test_max_length_names_itself_and_a_text_exactly_at_the_limit_is_not_truncated(capsys):
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok)
    exact = len(tok("you are kind")["input_ids"])
    behaviors.Classification([{"text": "you are kind", "label": 0}], tokenizer=tok, max_length=exact)(model)
    behaviors.Classification([{"text": "you are kind and calm", "label": 0}], tokenizer=tok)(model)
    assert notices(capsys) == []
    behaviors.Classification([{"text": "you are kind and calm", "label": 0}], tokenizer=tok, max_length=exact)(model)
    [said] = notices(capsys)
    assert f"1 of 1 texts it encoded were longer than {exact} tokens (`max_length`)" in said


def test_reward_model_texts_are_counted_too(capsys):
    tok = tiny_tokenizer()
    rm = tiny_bert_classifier(tok, num_labels=1)
    behaviors.RewardModelScore([{"prompt": LONG, "chosen": " kind", "rejected": " rude"}], tokenizer=tok,
                               measure="margin", name="rm-long")(rm)  # fmt: skip
    [said] = notices(capsys)
    assert "Behavior 'rm-long' (reward-model): 2 of 2 texts it encoded were longer than 64 tokens" in said


def test_prompts_cut_to_fit_the_models_context_are_counted(capsys):
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok, n_positions=32)  # room for 32 tokens: the long prompt loses its start
    rows = [{"prompt": LONG, "toxic": " a jerk", "clean": " a friend"}, {"prompt": "you are", "toxic": " a jerk",
            "clean": " a friend"}]  # fmt: skip
    b = behaviors.TeacherForcedToxicity(rows, tokenizer=tok, name="long-prompts")
    values = b(model)
    [said] = notices(capsys)
    assert "Behavior 'long-prompts'" in said and "2 of 4 texts it encoded were longer than" in said
    assert "prompts: the model's context less the continuation; cut from the left" in said
    assert torch.isfinite(values).all()
    b(model)
    assert notices(capsys) == []
