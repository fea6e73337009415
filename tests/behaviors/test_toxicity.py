"""LM toxicity behaviors on a real tiny GPT-2: pretraining on clean text, then an SFT stage on toxic completions.

The SFT stage must raise the teacher-forced toxicity and the toxicity of the model's own generations (with
each offline scorer), and the linear estimate ``∇f(θ_K)·Δ`` must agree in sign. The importance-weighted
generation behavior is checked against its definition (value and gradient at θ_K, IS estimate elsewhere).
"""

from __future__ import annotations

import copy
import random
import textwrap

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError, ScorerUnavailableError
from hf_stage_attribution.testing.lm import (
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_tokenizer,
    toy_corpus,
    train_causal_lm,
)


@pytest.fixture(scope="module")
def lm():
    corpus = toy_corpus(0)
    tok = tiny_tokenizer()
    base = train_causal_lm(tiny_gpt2(tok), tok, corpus.clean, steps=60, lr=3e-3)
    toxic = train_causal_lm(copy.deepcopy(base), tok, corpus.toxic, steps=30, lr=3e-3, seed=1)
    delta = [a.detach() - b.detach() for a, b in zip(toxic.parameters(), base.parameters())]
    return {"corpus": corpus, "tok": tok, "base": base, "toxic": toxic, "delta": delta}


def directional_derivative(behavior, model, delta) -> float:
    """∇ mean_i f_i(θ) · Δ at the model's parameters (what the linear estimators compute)."""
    model.zero_grad()
    behavior(model).mean().backward()
    value = sum((p.grad * d).sum() for p, d in zip(model.parameters(), delta)).item()
    model.zero_grad()
    return value


def generations(lm, **kwargs):
    prompts = [{"prompt": p} for p in lm["corpus"].prompts]
    options = {"num_samples": 4, "max_new_tokens": 12, **kwargs}
    return behaviors.GenerationToxicity(prompts, tokenizer=lm["tok"], **options)


def test_toxic_sft_raises_teacher_forced_toxicity(lm):
    b = behaviors.TeacherForcedToxicity(lm["corpus"].teacher_forced_examples(), tokenizer=lm["tok"], batch_size=5)
    before, after = b(lm["base"]).mean().item(), b(lm["toxic"]).mean().item()
    slope = directional_derivative(b, lm["toxic"], lm["delta"])
    print(f"teacher-forced toxicity (nats): {before:.2f} -> {after:.2f}; grad.delta at final {slope:.2f}")
    assert after > before + 5.0 and slope > 0


def test_teacher_forced_value_is_the_log_prob_difference(lm):
    tok, model = lm["tok"], lm["toxic"]
    row = {"prompt": "you are", "toxic": "a shit", "clean": ["kind", "warm and kind"]}
    value = behaviors.TeacherForcedToxicity([row], tokenizer=tok)(model).item()

    def logp(prompt, cont):
        p, c = tok(prompt, add_special_tokens=False)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([p + c])).logits.log_softmax(-1)[0]
        return sum(logits[len(p) - 1 + j, t] for j, t in enumerate(c)).item()

    expected = logp("you are", "a shit") - (logp("you are", "kind") + logp("you are", "warm and kind")) / 2
    assert value == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("scorer", ["better-profanity", "alt-profanity-check"])
def test_toxic_sft_raises_generation_toxicity(lm, scorer):
    before_b, after_b = generations(lm, scorer=scorer), generations(lm, scorer=scorer)
    before_b.prepare(lm["base"])
    after_b.prepare(lm["toxic"])
    before, after = before_b(lm["base"]).mean().item(), after_b(lm["toxic"]).mean().item()
    plain = generations(lm, scorer=scorer, weighting="plain")
    plain.prepare(lm["toxic"])
    is_before = plain(lm["base"]).mean().item()  # IS estimate at the pre-SFT model from the final model's samples
    slope = directional_derivative(plain, lm["toxic"], lm["delta"])
    print(f"{scorer}: sampled toxicity {before:.3f} -> {after:.3f}; plain IS at pre-SFT from final samples "
          f"{is_before:.4f}; grad.delta {slope:.3f}")  # fmt: skip
    assert after > before + 0.3
    assert is_before < after and slope > 0


def test_importance_weights_at_the_final_model(lm):
    model = lm["toxic"]
    for weighting in ("self-normalised", "plain"):
        b = generations(lm, scorer="alt-profanity-check", weighting=weighting)
        b.prepare(model)
        scores = torch.tensor([s["scores"] for s in b.samples()], dtype=torch.float64)
        torch.testing.assert_close(b(model).double(), scores.mean(-1), rtol=1e-5, atol=1e-6)  # ratio 1 at θ_K
    # gradient of the plain estimate at θ_K = score-function surrogate mean_j s_j ∇ log p(c_j)
    b = generations(lm, scorer="alt-profanity-check", weighting="plain")
    b.prepare(model)
    slope = directional_derivative(b, model, lm["delta"])
    model.zero_grad()
    positions = range(len(b))
    logps = torch.stack(b._logprobs(model, positions))  # [prompts, samples]
    scores = torch.tensor([s["scores"] for s in b.samples()], dtype=logps.dtype)
    (scores * logps).mean().backward()
    surrogate = sum((p.grad * d).sum() for p, d in zip(model.parameters(), lm["delta"])).item()
    model.zero_grad()
    assert slope == pytest.approx(surrogate, rel=1e-4)
    # self-normalised gradient = surrogate with the per-prompt mean score as baseline
    sn = generations(lm, scorer="alt-profanity-check")
    sn.prepare(model)
    slope_sn = directional_derivative(sn, model, lm["delta"])
    logps = torch.stack(sn._logprobs(model, positions))
    ((scores - scores.mean(-1, keepdim=True)) * logps).mean().backward()
    baseline = sum((p.grad * d).sum() for p, d in zip(model.parameters(), lm["delta"])).item()
    model.zero_grad()
    assert slope_sn == pytest.approx(baseline, rel=1e-4)


def test_sampling_is_seeded_without_global_rng_side_effects(lm):
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a, b, c = generations(lm, scorer="better-profanity"), generations(lm, scorer="better-profanity"), None
    a.prepare(lm["toxic"])
    b.prepare(lm["toxic"])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert a.samples() == b.samples()
    c = generations(lm, scorer="better-profanity", seed=1)
    c.prepare(lm["toxic"])
    assert [s["completions"] for s in c.samples()] != [s["completions"] for s in a.samples()]
    with pytest.raises(BehaviorError, match="prepare"):
        generations(lm, scorer="better-profanity")(lm["toxic"])


def test_given_completions_are_teacher_forced(lm):
    rows = [{"prompt": p, "completion": t} for p, t in zip(lm["corpus"].prompts, lm["corpus"].toxic_completions)]
    b = behaviors.GenerationToxicity(rows, tokenizer=lm["tok"], scorer="better-profanity", completion_key="completion")
    assert b.weighting == "plain"
    b.prepare(lm["toxic"])
    assert all(s["scores"] == [1.0] for s in b.samples())
    assert b(lm["base"]).mean().item() < b(lm["toxic"]).mean().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def toxicity_classifier_dir(lm, tmp_path_factory):
    """A real tiny BERT toxicity classifier trained on the corpus, saved as a local model directory."""
    tok, corpus = lm["tok"], lm["corpus"]
    model = tiny_bert_classifier(tok)
    model.config.id2label, model.config.label2id = {0: "clean", 1: "toxic"}, {"clean": 0, "toxic": 1}
    texts = corpus.clean + corpus.toxic + corpus.toxic_completions + corpus.clean_completions
    labels = torch.tensor([0] * len(corpus.clean) + [1] * (len(corpus.toxic) + 12) + [0] * 12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(texts), (32,), generator=gen).tolist()
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        loss = model(**enc, labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("scorer") / "toxicity-bert"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_transformers_classifier_scorer(lm, toxicity_classifier_dir):
    scorer = behaviors.get_scorer({"type": "transformers", "model": toxicity_classifier_dir})
    clean, toxic = scorer(lm["corpus"].clean_completions), scorer(lm["corpus"].toxic_completions)
    assert sum(toxic) / len(toxic) > 0.8 > 0.2 > sum(clean) / len(clean)
    spec = {"type": "transformers", "model": toxicity_classifier_dir, "toxic_label": "toxic"}
    before_b, after_b = generations(lm, scorer=spec), generations(lm, scorer=spec)
    before_b.prepare(lm["base"])
    after_b.prepare(lm["toxic"])
    before, after = before_b(lm["base"]).mean().item(), after_b(lm["toxic"]).mean().item()
    print(f"transformers scorer: sampled toxicity {before:.3f} -> {after:.3f}")
    assert after > before + 0.3
    on_disk = behaviors.GenerationToxicity([{"prompt": "you are"}], tokenizer=toxicity_classifier_dir, scorer=spec)
    rebuilt = behaviors.from_spec(on_disk.to_spec())
    assert rebuilt.scorer.to_spec() == {**spec, "batch_size": 32, "max_length": None} == on_disk.to_spec()["scorer"]


def test_evaluate_module_from_a_local_folder(lm, tmp_path):
    folder = tmp_path / "word_toxicity"
    folder.mkdir()
    (folder / "word_toxicity.py").write_text(textwrap.dedent('''
        import datasets
        import evaluate


        class WordToxicity(evaluate.Measurement):
            def _info(self):
                return evaluate.MeasurementInfo(
                    description="fraction of words on better-profanity's list", citation="",
                    inputs_description="predictions: list of str",
                    features=datasets.Features({"predictions": datasets.Value("string")}),
                )

            def _compute(self, predictions):
                from better_profanity import Profanity

                p = Profanity()
                return {"word_toxicity": [sum(map(p.contains_profanity, t.split())) / max(len(t.split()), 1)
                                          for t in predictions]}
    '''))  # fmt: skip
    scorer = behaviors.get_scorer({"type": "evaluate", "module": str(folder)}, trust_code=True)
    assert scorer(["you shit head", "nice day"]) == pytest.approx([1 / 3, 0.0])
    b = generations(lm, scorer=scorer)
    b.prepare(lm["toxic"])
    assert b(lm["toxic"]).mean().item() > 0.1
    assert b.scorer.to_spec()["module"] == str(folder)


def test_scorers_that_cannot_load_offline_say_which_work(tmp_path):
    with pytest.raises(ScorerUnavailableError, match="alt-profanity-check, better-profanity") as err:
        behaviors.get_scorer({"type": "evaluate", "module": "toxicity"}, trust_code=True)  # Hub: needs a download
    assert "offline" in str(err.value)
    with pytest.raises(ScorerUnavailableError, match="better-profanity"):
        behaviors.get_scorer({"type": "transformers", "model": "facebook/roberta-hate-speech-dynabench-r4-target"})
    with pytest.raises(ScorerUnavailableError, match="known types"):
        behaviors.get_scorer("detoxify")
    with pytest.raises(ScorerUnavailableError):
        behaviors.from_spec({
            "kind": "lm-toxicity-generations", "data": [{"prompt": "a"}], "tokenizer": str(tmp_path),
            "scorer": {"type": "transformers", "model": str(tmp_path / "nope")},
        })  # fmt: skip


def test_callable_scorer_and_bad_scores(lm):
    b = generations(lm, scorer=lambda texts: [float(len(t) > 10) for t in texts])
    b.prepare(lm["base"])
    assert b(lm["base"]).shape == (12,)
    with pytest.raises(BehaviorError, match="returned"):
        generations(lm, scorer=lambda texts: [float("nan")] * len(texts)).prepare(lm["base"])
