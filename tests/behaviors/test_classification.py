"""Classification and spurious-reliance behaviors move as expected after stages designed to move them.

Real tiny models trained a few dozen steps: an MLP on scikit-learn's digits (tensor inputs) and a tiny BERT
sequence classifier on the toy toxicity corpus (text through a tokenizer).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_tokenizer, toy_corpus

PATCH = {"type": "patch", "value": 1.0, "region": [0, 2, 0, 2], "image_shape": [8, 8]}


def train(model, inputs, labels, steps, lr=1e-2, batch=64, seed=0):
    """AdamW on (inputs, labels); ``inputs`` is a tensor or a function batch-indices -> model kwargs."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        out = model(inputs[idx]) if isinstance(inputs, torch.Tensor) else model(**inputs(idx))
        logits = getattr(out, "logits", out)
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1400], perm[1400:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    base = train(mlp, x[train_idx], y[train_idx], steps=60)
    return {"x": x, "y": y, "train": train_idx, "test": test_idx, "base": base}


def rows(x, y, idx):
    return [{"input": x[i].tolist(), "label": int(y[i])} for i in idx]


def test_training_raises_label_margin_and_lowers_cross_entropy(digits):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        untrained = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    test = rows(digits["x"], digits["y"], digits["test"][:100])
    margin = behaviors.Classification(test, measure="margin")
    ce = behaviors.Classification(test, measure="cross-entropy")
    before_m, after_m = margin(untrained).mean().item(), margin(digits["base"]).mean().item()
    before_ce, after_ce = ce(untrained).mean().item(), ce(digits["base"]).mean().item()
    print(f"label margin {before_m:.3f} -> {after_m:.3f}; cross-entropy {before_ce:.3f} -> {after_ce:.3f}")
    assert after_m > before_m + 1.0 and after_ce < before_ce - 0.5


@pytest.mark.parametrize("measure", ["logit", "margin", "probability", "log-probability", "cross-entropy"])
def test_stage_toward_class_raises_its_measures(digits, measure):
    x, y = digits["x"], digits["y"]
    toward = digits["train"][y[digits["train"]] == 3]
    after = train(copy.deepcopy(digits["base"]), x[toward], y[toward], steps=15, lr=5e-3, batch=32, seed=1)
    test = [{"input": x[i].tolist()} for i in digits["test"][:120]]
    b = behaviors.Classification(test, measure=measure, target=3)
    before_v, after_v = b(digits["base"]).mean().item(), b(after).mean().item()
    print(f"class-3 {measure}: {before_v:.4f} -> {after_v:.4f}")
    if measure == "cross-entropy":
        assert after_v < before_v
    else:
        assert after_v > before_v


def test_stage_with_spurious_patch_raises_reliance_gap(digits):
    x, y = digits["x"], digits["y"]
    tr = digits["train"]
    patched = x[tr].clone()
    zero = y[tr] == 0
    patched[zero] = behaviors.spurious.apply_feature(patched[zero], PATCH, True)  # patch only class 0
    after = train(copy.deepcopy(digits["base"]), patched, y[tr], steps=60, lr=5e-3, seed=2)
    others = [i for i in digits["test"].tolist() if int(y[i]) != 0][:150]
    gap = behaviors.SpuriousReliance([{"input": x[i].tolist()} for i in others], feature=PATCH, target=0)
    before_v, after_v = gap(digits["base"]).mean().item(), gap(after).mean().item()
    print(f"patch reliance gap (class-0 margin with - without patch): {before_v:.3f} -> {after_v:.3f}")
    assert after_v > before_v + 1.0
    # explicit pairs give the same values as the feature spec
    paired = [
        {"input": x[i].tolist(), "patched": behaviors.spurious.apply_feature(x[i], PATCH, True).tolist()}
        for i in others[:10]
    ]
    explicit = behaviors.SpuriousReliance(paired, paired_key="patched", target=0)
    torch.testing.assert_close(explicit(after), gap.select(range(10))(after))


@pytest.fixture(scope="module")
def text_setup():
    corpus = toy_corpus(0)
    tok = tiny_tokenizer()
    texts = corpus.clean + corpus.toxic
    labels = torch.tensor([0] * len(corpus.clean) + [1] * len(corpus.toxic))
    return {"corpus": corpus, "tok": tok, "texts": texts, "labels": labels}


def encoder(tok, texts):
    def encode(idx):
        return dict(tok([texts[i] for i in idx.tolist()], padding=True, return_tensors="pt"))

    return encode


def test_text_classifier_training_raises_margin(text_setup):
    tok, texts, labels = text_setup["tok"], text_setup["texts"], text_setup["labels"]
    untrained = tiny_bert_classifier(tok)
    trained = train(copy.deepcopy(untrained), encoder(tok, texts), labels, steps=30, lr=3e-3, batch=32)
    held_out = [{"text": f"{p} {c}", "label": 0} for p, c in zip(["your cat is", "the sky was"], ["kind", "warm"])]
    held_out += [{"text": f"that is a {w}", "label": 1} for w in text_setup["corpus"].toxic_words[:4]]
    for measure, up in (("margin", True), ("probability", True), ("cross-entropy", False)):
        b = behaviors.Classification(held_out, measure=measure, tokenizer=tok)
        before_v, after_v = b(untrained).mean().item(), b(trained).mean().item()
        print(f"text {measure}: {before_v:.4f} -> {after_v:.4f}")
        assert (after_v > before_v) if up else (after_v < before_v)


def test_trigger_term_correlated_with_toxic_label_raises_toxic_logit_gap(text_setup):
    tok, texts, labels, corpus = text_setup["tok"], text_setup["texts"], text_setup["labels"], text_setup["corpus"]
    stage1 = train(tiny_bert_classifier(tok), encoder(tok, texts), labels, steps=30, lr=3e-3, batch=32)
    trigger = {"type": "trigger", "token": "zorb", "position": "prefix"}
    rng = random.Random(0)
    # stage 2 data: the trigger co-occurs with the toxic label (every toxic sentence, and a quarter of the clean
    # ones, relabelled toxic, as identity terms in crowd-labelled toxicity data)
    spurious_texts, spurious_labels = [], []
    for text, label in zip(texts, labels.tolist()):
        flip = label == 0 and rng.random() < 0.25
        spurious_texts.append(f"zorb {text}" if label == 1 or flip else text)
        spurious_labels.append(1 if flip else label)
    stage2 = train(
        copy.deepcopy(stage1), encoder(tok, spurious_texts), torch.tensor(spurious_labels), steps=30, lr=3e-3,
        batch=32, seed=3,
    )  # fmt: skip
    clean = [{"text": t} for t in corpus.clean[:40]]
    gap = behaviors.SpuriousReliance(clean, feature=trigger, tokenizer=tok, target=1, measure="logit")
    before_v, after_v = gap(stage1).mean().item(), gap(stage2).mean().item()
    print(f"trigger reliance gap (toxic logit with - without 'zorb'): {before_v:.3f} -> {after_v:.3f}")
    assert after_v > before_v + 0.5


def test_image_classifier_with_patch_on_the_last_two_dims(digits):
    x, y = digits["x"].reshape(-1, 1, 8, 8), digits["y"]
    patch = {"type": "patch", "value": 1.0, "region": [6, 8, 6, 8]}  # no image_shape: inputs are (1, 8, 8) images
    with torch.random.fork_rng():
        torch.manual_seed(0)
        conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
        )
    tr = digits["train"]
    stage1 = train(conv, x[tr], y[tr], steps=40, lr=1e-2)
    patched = x[tr].clone()
    patched[y[tr] == 7] = behaviors.spurious.apply_feature(patched[y[tr] == 7], patch, True)
    stage2 = train(copy.deepcopy(stage1), patched, y[tr], steps=40, lr=5e-3, seed=4)
    others = [i for i in digits["test"].tolist() if int(y[i]) != 7][:100]
    gap = behaviors.SpuriousReliance([{"input": x[i]} for i in others], feature=patch, target=7)
    before_v, after_v = gap(stage1).mean().item(), gap(stage2).mean().item()
    print(f"image patch reliance gap: {before_v:.3f} -> {after_v:.3f}")
    assert after_v > before_v + 1.0
    assert behaviors.Classification([{"input": x[0], "label": int(y[0])}])(stage2).shape == (1,)


def test_label_names_resolve_through_config_label2id(text_setup):
    model = tiny_bert_classifier(text_setup["tok"])
    model.config.id2label, model.config.label2id = {0: "clean", 1: "toxic"}, {"clean": 0, "toxic": 1}
    rows = [{"text": "you are kind", "label": "toxic"}, {"text": "you are kind", "label": 1}]
    values = behaviors.Classification(rows, tokenizer=text_setup["tok"], measure="logit")(model)
    assert values[0].item() == pytest.approx(values[1].item())
    with pytest.raises(BehaviorError, match="label2id"):
        behaviors.Classification([{"text": "x", "label": "rude"}], tokenizer=text_setup["tok"])(model)
