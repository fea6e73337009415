"""The Behavior interface over the whole registry: select() splits, spec round trips, data sources, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError, UnknownNameError, UnsafeInputError
from hf_stage_attribution.testing.lm import (
    preference_pairs,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_tokenizer,
    toy_corpus,
)


def row_sums(model, batch):
    """An importable per-batch function (custom behaviors in specs must be importable)."""
    return model(torch.tensor([r["input"] for r in batch])).sum(-1)


def weight_sums(model):
    return model[0].weight.sum(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("behaviors_core")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "tok")
    tok = behaviors.loading.load_tokenizer(str(root / "tok"))
    rm = tiny_bert_classifier(tok, num_labels=1, seed=1)
    rm.save_pretrained(root / "rm")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return {
        "root": root,
        "tok": tok,
        "tok_path": str(root / "tok"),
        "rm_path": str(root / "rm"),
        "mlp": mlp,
        "bert": tiny_bert_classifier(tok, num_labels=2),
        "gpt2": tiny_gpt2(tok),
        "rm": rm,
        "corpus": toy_corpus(0),
    }


def build(kind: str, env: dict) -> tuple[behaviors.Behavior, torch.nn.Module]:
    """A small behavior of each registered kind (7 examples: odd, so halves are uneven) and its model."""
    vectors = [{"input": [float(i), 1.0, -1.0, 0.5 * i], "label": i % 3} for i in range(7)]
    corpus = env["corpus"]
    prompts = [{"prompt": p} for p in corpus.prompts[:7]]
    if kind == "classification":
        return behaviors.Classification(vectors, measure="margin", batch_size=3), env["mlp"]
    if kind == "spurious-reliance":
        texts = [{"text": t, "label": 0} for t in corpus.clean[:7]]
        feature = {"type": "trigger", "token": "shit", "position": "suffix"}
        b = behaviors.SpuriousReliance(texts, feature=feature, tokenizer=env["tok_path"], target=1, batch_size=3)
        return b, env["bert"]
    if kind == "lm-toxicity-teacher-forced":
        rows = corpus.teacher_forced_examples()[:7]
        return behaviors.TeacherForcedToxicity(rows, tokenizer=env["tok_path"], batch_size=3), env["gpt2"]
    if kind == "lm-toxicity-generations":
        b = behaviors.GenerationToxicity(
            prompts, tokenizer=env["tok_path"], scorer="better-profanity", num_samples=2, max_new_tokens=6,
            batch_size=3,
        )  # fmt: skip
        return b, env["gpt2"]
    if kind == "reward":
        b = behaviors.PolicyReward(
            prompts, tokenizer=env["tok_path"], reward_model=env["rm_path"], num_samples=2, max_new_tokens=6,
            batch_size=3,
        )  # fmt: skip
        return b, env["gpt2"]
    if kind == "reward-model":
        rows = preference_pairs(0)[:7]
        return behaviors.RewardModelScore(rows, tokenizer=env["tok_path"], measure="margin", batch_size=3), env["rm"]
    if kind == "custom":
        return behaviors.PerExample(row_sums, vectors, batch_size=3), env["mlp"]
    raise AssertionError(f"no test builder for the registered kind {kind!r}: add one")


@pytest.mark.parametrize("kind", behaviors.names())
def test_select_halves_concatenate_to_whole(kind, env):
    b, model = build(kind, env)
    b.prepare(model)
    whole = b(model)
    assert whole.shape == (7,) and whole.requires_grad and torch.isfinite(whole).all()
    first, second = b.select([0, 1, 2]), b.select([3, 4, 5, 6])
    parts = torch.cat([first(model), second(model)])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    reordered = b.select([6, 0])(model)
    torch.testing.assert_close(reordered, whole[[6, 0]], rtol=1e-5, atol=1e-6)
    assert b.unit and "higher" in b.description and b.name


@pytest.mark.parametrize("kind", behaviors.names())
def test_spec_round_trip(kind, env):
    b, model = build(kind, env)
    spec = b.select([5, 1, 2]).to_spec()
    text = json.dumps(spec)  # JSON-safe
    rebuilt = behaviors.from_spec(json.loads(text), trust_code=True)
    assert type(rebuilt) is type(b) and rebuilt.to_spec() == spec
    for x in (b, rebuilt):
        x.prepare(model)
    torch.testing.assert_close(rebuilt(model), b(model)[[5, 1, 2]], rtol=1e-5, atol=1e-6)


def test_prepare_then_select_equals_select_then_prepare(env):
    b, model = build("lm-toxicity-generations", env)
    b.prepare(model)
    late = b.select([4, 2])
    early = build("lm-toxicity-generations", env)[0].select([4, 2])
    early.prepare(model)
    assert early.samples() == late.samples()
    torch.testing.assert_close(early(model), late(model))


def test_data_sources_agree(env, tmp_path):
    from datasets import Dataset

    rows = [{"input": [float(i), 0.0, 1.0, 2.0], "label": i % 3} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps({"examples": rows}))
    columns = {"input": [r["input"] for r in rows], "label": [r["label"] for r in rows]}
    sources = [rows, Dataset.from_list(rows), columns, str(tmp_path / "d.jsonl"), tmp_path / "d.json"]
    values = [behaviors.Classification(s, measure="logit")(env["mlp"]) for s in sources]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0])
    spec = behaviors.Classification(str(tmp_path / "d.jsonl")).select([3, 1]).to_spec()
    assert spec["data"] == str(tmp_path / "d.jsonl") and spec["select"] == [3, 1]


def test_per_example_on_a_dataset_passes_column_batches(env):
    from datasets import Dataset

    ds = Dataset.from_dict({"x": [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]})
    seen = []

    def fn(model, batch):
        seen.append(sorted(batch))
        return model(torch.tensor(batch["x"])).sum(-1)

    b = behaviors.PerExample(fn, ds, batch_size=2)
    assert b(env["mlp"]).shape == (3,) and seen == [["x"], ["x"]]
    torch.testing.assert_close(b.select([2])(env["mlp"]), b(env["mlp"])[[2]])


def test_bare_callable_is_accepted_unsplit(env):
    b = behaviors.as_behavior(weight_sums, name="w")
    assert not b.splittable and b.name == "w"
    with pytest.raises(BehaviorError, match="known only after"):
        len(b)
    assert b(env["mlp"]).shape == (8,) and len(b) == 8
    with pytest.raises(BehaviorError, match="PerExample"):
        b.select([0])
    spec = b.to_spec()
    assert spec == {**spec, "kind": "custom", "function": "tests.behaviors.test_core:weight_sums"}
    rebuilt = behaviors.from_spec(spec, trust_code=True)
    torch.testing.assert_close(rebuilt(env["mlp"]), b(env["mlp"]))
    with pytest.raises(UnsafeInputError, match="trust_code"):
        behaviors.from_spec(spec)
    with pytest.raises(BehaviorError, match="lambda"):
        behaviors.as_behavior(lambda m: m[0].weight.sum(1)).to_spec()


def test_as_behavior_set_and_renaming(env):
    b = behaviors.Classification([{"input": [1.0, 0, 0, 0], "label": 0}])
    out = behaviors.as_behavior_set({"mine": b})
    assert out["mine"].name == "mine" and b.name == "classification-margin"
    with pytest.raises(BehaviorError, match="empty"):
        behaviors.as_behavior_set({})


def test_load_specs_yaml_and_json(env, tmp_path):
    import yaml

    rows = env["corpus"].teacher_forced_examples()
    (tmp_path / "tox.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    env["tok"].save_pretrained(tmp_path / "tok")
    doc = {
        "behaviors": [
            {"name": "toxicity", "kind": "lm-toxicity-teacher-forced", "data": "tox.jsonl", "tokenizer": "tok"},
            {"name": "margin", "kind": "classification", "data": [{"input": [1.0, 0, 0, 0], "label": 2}]},
        ]
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "b.json").write_text(json.dumps(doc))
    for name in ("b.yaml", "b.json"):
        loaded = behaviors.load_specs(tmp_path / name)
        assert list(loaded) == ["toxicity", "margin"]
        assert len(loaded["toxicity"]) == 12 and loaded["toxicity"](env["gpt2"]).shape == (12,)
    assert behaviors.specs_document(loaded)["behaviors"][1]["name"] == "margin"


def test_bad_specs_and_inputs_raise_clear_errors(env, tmp_path):
    with pytest.raises(UnknownNameError) as err:
        behaviors.from_spec({"name": "x", "kind": "toxicty", "data": []})
    for kind in behaviors.names():
        assert kind in str(err.value)
    (tmp_path / "empty.yaml").write_text("behaviors: []\n")
    with pytest.raises(BehaviorError, match="no behaviors"):
        behaviors.load_specs(tmp_path / "empty.yaml")
    (tmp_path / "dup.json").write_text(json.dumps({"behaviors": [{"name": "a", "kind": "custom"}] * 2}))
    with pytest.raises(BehaviorError, match="twice"):
        behaviors.load_specs(tmp_path / "dup.json")
    with pytest.raises(BehaviorError, match="no examples"):
        behaviors.Classification([])
    with pytest.raises(
        BehaviorError, match=r"unknown spec keys \[.meassure.\]\. .meassure.: Did you mean .measure.\?"
    ):
        behaviors.from_spec({"kind": "classification", "data": [{"input": [1.0]}], "meassure": "logit"})
    with pytest.raises(BehaviorError, match="does not exist"):
        behaviors.from_spec({"kind": "classification", "data": str(tmp_path / "missing.jsonl")})
    with pytest.raises(BehaviorError, match="Unknown classification measure"):
        behaviors.Classification([{"input": [1.0]}], measure="accuracy")
    with pytest.raises(BehaviorError, match="not a local directory"):
        behaviors.TeacherForcedToxicity([{"prompt": "a", "toxic": "b", "clean": "c"}], tokenizer="gpt2")
    with pytest.raises(BehaviorError, match="no local path"):
        behaviors.TeacherForcedToxicity(
            [{"prompt": "a", "toxic": "b", "clean": "c"}], tokenizer=tiny_tokenizer()
        ).to_spec()
    nan = behaviors.PerExample(lambda m, batch: torch.full((len(batch),), float("nan")), [1, 2])
    with pytest.raises(BehaviorError, match="non-finite"):
        nan(env["mlp"])
    wrong = behaviors.PerExample(lambda m, batch: torch.zeros(3), [1, 2])
    with pytest.raises(BehaviorError, match="one value per example"):
        wrong(env["mlp"])
    with pytest.raises(BehaviorError, match="outside"):
        behaviors.Classification([{"input": [1.0]}]).select([1])


def test_eval_mode_restores_flags_and_dropout_is_off(env):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()
    b = behaviors.Classification([{"input": [1.0, 2.0, 3.0, 4.0], "label": 0}], measure="logit")
    torch.testing.assert_close(b(model), b(model))  # dropout off while evaluating
    assert model.training and not model[0].training and model[1].training


class _Call(torch.nn.Module):
    def __init__(self, model, behavior):
        super().__init__()
        self.model, self.behavior = model, behavior

    def forward(self):
        return self.behavior(self.model)


@pytest.mark.parametrize("kind", behaviors.names())
def test_forward_mode_jvp_matches_reverse_mode(kind, env):
    """The linear estimators take per-example ``∇f_i · v`` with torch.func.jvp over functional_call."""
    b, model = build(kind, env)
    b.prepare(model)
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tangents = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in params.items()}
    call = _Call(model, b)
    _, jvp = torch.func.jvp(lambda p: torch.func.functional_call(call, p, ()), (params,), (tangents,))
    out, reference = b(model), []
    for i in range(len(out)):
        grads = torch.autograd.grad(out[i], list(model.parameters()), retain_graph=True, allow_unused=True)
        reference.append(
            sum(
                (g * tangents[f"model.{n}"]).sum()
                for (n, _), g in zip(model.named_parameters(), grads)
                if g is not None
            )
        )
    torch.testing.assert_close(jvp, torch.stack(reference), rtol=1e-4, atol=1e-6)
