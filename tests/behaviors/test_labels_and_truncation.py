"""Label names resolve through id2label when label2id is unset, and a spurious-reliance example whose feature
truncation cuts off is refused instead of measuring a gap of 0."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_tokenizer

SUFFIX = {"type": "trigger", "term": "shit", "position": "suffix"}
LONG = " ".join(["the weather today is very nice and sunny"] * 12)  # 96 tokens; the tokenizer keeps 64


def test_label_names_resolve_through_id2label_of_a_reloaded_config(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok)
    model.config.id2label = {0: "neg", 1: "pos"}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not reloaded.config.label2id or "pos" not in reloaded.config.label2id
    rows = [{"text": "you are nice", "label": "pos"}, {"text": "shit", "label": "neg"}]
    by_name = behaviors.Classification(rows, tokenizer=tok)(reloaded)
    by_index = behaviors.Classification([{**r, "label": i} for r, i in zip(rows, (1, 0))], tokenizer=tok)(reloaded)
    torch.testing.assert_close(by_name, by_index)
    with pytest.raises(BehaviorError, match=r"'positive'.*\['neg', 'pos'\]"):
        behaviors.Classification([{"text": "a", "label": "positive"}], tokenizer=tok)(reloaded)


def test_suffix_feature_truncated_away_is_refused_naming_the_examples():
    tok = tiny_tokenizer()
    rows = [{"text": "the weather today is nice", "label": 1}, {"text": LONG, "label": 1}, {"text": LONG, "label": 0}]
    b = behaviors.SpuriousReliance(rows, feature=SUFFIX, tokenizer=tok)
    with pytest.raises(BehaviorError, match=r"2 of the 3 examples in this batch \(examples \[1, 2\].*64 tokens"):
        b(tiny_bert_classifier(tok))
    with pytest.raises(BehaviorError, match=r"examples \[1\].*16 tokens.*max_length"):
        behaviors.SpuriousReliance(rows[:2], feature=SUFFIX, tokenizer=tok, max_length=16)(tiny_bert_classifier(tok))


def test_prefix_feature_on_a_long_text_and_a_suffix_on_a_short_one_still_measure():
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok)
    prefix = behaviors.SpuriousReliance([{"text": LONG, "label": 1}], feature={**SUFFIX, "position": "prefix"},
                                        tokenizer=tok)  # fmt: skip
    assert prefix(model).abs().item() > 0
    suffix = behaviors.SpuriousReliance([{"text": LONG, "label": 1}], feature=SUFFIX, tokenizer=tok, max_length=128)
    assert suffix(tiny_bert_classifier(tok, max_position_embeddings=128)).abs().item() > 0
