"""The transformers scorer turns logits into scores as transformers' text-classification pipeline does (sigmoid
for multi-label and single-logit models, softmax otherwise) and guesses the toxic label from exact names."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_stage_attribution.behaviors.scorers import get_scorer, score_function, toxic_label_guess
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_tokenizer

TEXTS = ["you are a shit", "have a nice day", "fuck"]
TOXIC_BERT = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]  # unitary/toxic-bert


def saved_classifier(tmp_path, tok, labels, **config):
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    return str(tmp_path), logits


def test_multi_label_classifier_scores_the_sigmoid_of_its_toxic_logit(tmp_path):
    tok = tiny_tokenizer()
    path, logits = saved_classifier(tmp_path, tok, TOXIC_BERT, problem_type="multi_label_classification")
    scorer = get_scorer({"type": "transformers", "model": path})  # the exact name "toxic" is the guess
    assert scorer.toxic_label is None and scorer._index == 0
    assert scorer(TEXTS) == pytest.approx(logits.sigmoid()[:, 0].tolist(), abs=1e-6)


def test_single_logit_classifier_scores_the_sigmoid_not_a_constant_one(tmp_path):
    tok = tiny_tokenizer()
    path, logits = saved_classifier(tmp_path, tok, ["toxic"])
    scores = get_scorer({"type": "transformers", "model": path})(TEXTS)
    assert scores == pytest.approx(logits.sigmoid()[:, 0].tolist(), abs=1e-6)
    assert len(set(scores)) == len(TEXTS)


def test_two_label_classifier_still_scores_the_softmax_and_function_to_apply_overrides(tmp_path):
    tok = tiny_tokenizer()
    path, logits = saved_classifier(tmp_path, tok, ["clean", "toxic"])
    assert get_scorer({"type": "transformers", "model": path})(TEXTS) == pytest.approx(
        logits.softmax(-1)[:, 1].tolist(), abs=1e-6
    )
    spec = {"type": "transformers", "model": path, "function_to_apply": "none"}
    scorer = get_scorer(spec)
    assert scorer(TEXTS) == pytest.approx(logits[:, 1].tolist(), abs=1e-5)
    assert get_scorer(scorer.to_spec()).to_spec()["function_to_apply"] == "none"
    with pytest.raises(BehaviorError, match="function_to_apply"):
        get_scorer({**spec, "function_to_apply": "tanh"})


def test_pipeline_rule_for_the_score_function():
    assert score_function(BertConfig(num_labels=6, problem_type="multi_label_classification")) == "sigmoid"
    assert score_function(BertConfig(num_labels=1)) == "sigmoid"
    assert score_function(BertConfig(num_labels=2)) == "softmax"
    assert score_function(BertConfig(num_labels=1, problem_type="regression")) == "none"


@pytest.mark.parametrize(
    ("id2label", "expected"),
    [
        ({0: "non-toxic", 1: "toxic"}, [1]),
        ({0: "nothate", 1: "hate"}, [1]),
        ({0: "NOT_OFFENSIVE", 1: "OFFENSIVE"}, [1]),
        ({0: "neutral", 1: "hate_speech"}, [1]),
        (dict(enumerate(TOXIC_BERT)), [0]),
        ({0: "non-toxic", 1: "not_hate"}, []),
    ],
)
def test_toxic_label_guess_prefers_exact_names_and_skips_negated_ones(id2label, expected):
    assert toxic_label_guess(id2label) == expected


def test_non_toxic_and_toxic_labels_are_no_longer_ambiguous(tmp_path):
    tok = tiny_tokenizer()
    path, logits = saved_classifier(tmp_path, tok, ["non-toxic", "toxic"])
    assert get_scorer({"type": "transformers", "model": path})(TEXTS) == pytest.approx(
        logits.softmax(-1)[:, 1].tolist(), abs=1e-6
    )


def test_scorer_with_a_left_padding_tokenizer_without_pad_token_scores_each_text_as_alone(tmp_path):
    tok = tiny_tokenizer()
    path, _ = saved_classifier(tmp_path, tok, ["clean", "toxic"])
    scorer = get_scorer({"type": "transformers", "model": path})
    scorer._tokenizer.padding_side, scorer._tokenizer.pad_token = "left", None
    assert scorer(TEXTS) == pytest.approx([scorer([t])[0] for t in TEXTS], abs=1e-6)
