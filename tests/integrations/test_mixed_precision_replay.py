"""Mixed precision (``Trainer(bf16=True)`` on float32 weights, CPU) and the attention implementation in replay.

A model a Trainer prepared keeps accelerate's autocast ``forward`` wrapper and its "prepared" flag: a replay's Trainer
given a copy of it must autocast as the recorded run did (not train in float32), and the attributor must evaluate
it without the wrapper's autocast while leaving the user's object as it was. A stage replays with the attention
implementation it was recorded with. ``fp16=True`` on a CPU does nothing, and the recorder must not say otherwise.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder, behaviors
from hf_stage_attribution._internal.model_state import clean_copy
from hf_stage_attribution.estimators.replay import load_state, replay_gap, working_copy
from hf_stage_attribution.integrations.replay import replay_trainer_stage

# a float32 replay of the bf16-autocast stage misses θ_K by ~3e-3 and an sdpa one by ~5e-3; as recorded: ~2e-10
EXACT = 1e-7


def _train(root, precision: str, steps: int = 4):
    """One tiny GPT-2 (eager attention) stage with the recorder, ``Trainer(use_cpu=True, <precision>=True)``."""
    from transformers import Trainer, TrainingArguments

    model = F.gpt2(n_embd=32)
    args = TrainingArguments(
        str(root / "out"), use_cpu=True, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True, **{precision: True},
    )  # fmt: skip
    recorder = StageRecorder(str(root / "ledger"), "s", save_replay_data=True)
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(32), callbacks=[recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return model, StageLedger(str(root / "ledger")), [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("bf16"), "bf16")


def _fresh_copy(model):
    """The same weights in a model object no Trainer has touched."""
    fresh = F.gpt2(n_embd=32)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _accelerate_state(model) -> dict:
    return {k: model.__dict__[k] for k in ("forward", "_original_forward", "_is_accelerate_prepared")}


def test_replay_from_the_trained_object_autocasts_as_recorded(bf16_run):
    model, ledger, _ = bf16_run
    assert "forward" in model.__dict__ and model.__dict__.get("_is_accelerate_prepared")  # what the Trainer left
    before = _accelerate_state(model)
    assert replay_gap(ledger, model) < EXACT  # was 2.8e-3 on b7: the replay trained in float32
    assert all(model.__dict__[k] is v for k, v in before.items())  # the user's object keeps its wrapper


def test_clean_and_working_copies_drop_the_accelerate_wrapper(bf16_run):
    model, _, _ = bf16_run
    for copied in (clean_copy(model), working_copy(model)):
        assert not {"forward", "_original_forward", "_is_accelerate_prepared"} & set(copied.__dict__)


def test_attributor_evaluates_the_trained_object_without_autocast_and_leaves_it_alone(bf16_run):
    model, ledger, _ = bf16_run
    from hf_stage_attribution.testing.lm import toy_corpus

    behavior = behaviors.get("lm-toxicity-teacher-forced")(
        toy_corpus(0).teacher_forced_examples(), tokenizer=F.tokenizer()
    )
    before = _accelerate_state(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        wrapped_values = behavior(model)  # under the wrapper's bf16 autocast
    effects = {}
    for name, m in (("trained", model), ("fresh", _fresh_copy(model))):
        report = StageAttributor(ledger, m, "delta-fd", show_progress=False, diagnostics=False).attribute(
            {"t": behavior}
        )
        effects[name] = report.rows_for("t")[0].effect
        assert "Stages trained in reduced precision: s (bf16 mixed precision)." in " ".join(report.approximations)
    assert ledger.stages[0].info["training_precision"] == {"mixed": "bf16"}  # what that note reads
    assert effects["trained"] == pytest.approx(effects["fresh"], rel=1e-6, abs=1e-9)  # was 1e-3 apart (b13)
    assert set(model.__dict__) >= set(before) and all(model.__dict__[k] is v for k, v in before.items())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(behavior(model), wrapped_values)  # still the user's (wrapped) model


def test_stage_json_records_the_attention_implementation(bf16_run):
    _, ledger, _ = bf16_run
    trainer = json.loads((ledger.stages[0].dir / "stage.json").read_text())["trainer"]
    assert trainer["attn_implementation"] == "eager"


def test_replay_trains_with_the_recorded_attention_implementation(bf16_run):
    model, ledger, _ = bf16_run
    sdpa = _fresh_copy(model)
    sdpa.set_attn_implementation("sdpa")  # what from_pretrained picks for a stage recorded with eager
    assert replay_gap(ledger, sdpa) < EXACT  # was 5.4e-3 on b8
    assert sdpa.config._attn_implementation == "sdpa"
    start = working_copy(sdpa)
    load_state(start, ledger.initial_state())
    replay_trainer_stage(ledger.stages[0], start)
    assert start.config._attn_implementation == "sdpa"  # its own implementation back after the replay
    assert not {"forward", "_original_forward", "_is_accelerate_prepared"} & set(start.__dict__)


def _with_trainer_info(stage, **changes):
    """A copy of ``stage`` whose stage.json ``trainer`` entry is changed (None removes a key)."""
    out = copy.copy(stage)
    out.info = copy.deepcopy(stage.info)
    for key, value in changes.items():
        out.info["trainer"].pop(key, None) if value is None else out.info["trainer"].__setitem__(key, value)
    return out


def test_a_ledger_without_the_field_replays_as_before(bf16_run):
    model, ledger, _ = bf16_run
    start = working_copy(_fresh_copy(model))
    start.set_attn_implementation("sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replay_trainer_stage(_with_trainer_info(ledger.stages[0], attn_implementation=None), start, max_steps=1)
    assert start.config._attn_implementation == "sdpa"
    assert not [w for w in caught if "attention implementation" in str(w.message)]


def test_replay_warns_when_the_recorded_attention_cannot_be_set(bf16_run):
    model, ledger, _ = bf16_run
    stage = _with_trainer_info(ledger.stages[0], attn_implementation="no_such_attention")
    with pytest.warns(UserWarning, match=r"'no_such_attention'.*'eager'"):
        replay_trainer_stage(stage, working_copy(_fresh_copy(model)), max_steps=1)


def test_fp16_that_does_nothing_on_cpu_is_not_reported_as_mixed_precision(tmp_path):
    model, ledger, caught = _train(tmp_path, "fp16", steps=2)
    assert ledger.stages[0].info["trainer"]["inherited_autocast_wrapper"] is False
    notes = ledger.stages[0].info.get("notes") or []
    assert not [m for m in caught + notes if "mixed precision:" in m or "trains in fp16" in m]
    assert [m for m in caught if "fp16=True had no effect" in m]
    assert replay_gap(ledger, model) < EXACT


def test_bf16_on_cpu_is_still_reported_as_mixed_precision(bf16_run):
    _, ledger, caught = bf16_run
    assert [m for m in caught if "trains in bf16 mixed precision" in m]
    assert [m for m in ledger.stages[0].info.get("notes") or [] if "bf16 mixed precision" in m]


def test_an_estimator_called_directly_on_the_trained_object_says_it_runs_under_the_wrapper(bf16_run):
    from hf_stage_attribution import estimators

    model, ledger, _ = bf16_run
    x = torch.tensor(F.lm_dataset(4, seed=3)["input_ids"])
    with pytest.warns(UserWarning, match="still carries accelerate's mixed-precision forward wrapper"):
        estimators.get("delta-fd").estimate(ledger, model, lambda m: m(x).logits[:, -1, 0])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixed-precision forward wrapper")
        estimators.get("delta-fd").estimate(ledger, _fresh_copy(model), lambda m: m(x).logits[:, -1, 0])


def test_an_estimator_called_directly_on_a_float32_trainers_object_does_not_warn_of_a_wrapper(tmp_path):
    """A float32 Trainer leaves accelerate's "prepared" flag on the model but no autocast wrapper: the warning that
    the estimator evaluates under that autocast was false there."""
    from transformers import Trainer

    from hf_stage_attribution import estimators
    from hf_stage_attribution._internal.model_state import has_accelerate_wrapper, has_autocast_wrapper

    model = F.gpt2(n_embd=32)
    args = F.training_args(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2)
    recorder = StageRecorder(str(tmp_path / "ledger"), "s", curvature_segments=0)
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(16), callbacks=[recorder]).train()
    assert has_accelerate_wrapper(model) and not has_autocast_wrapper(model)  # the flag alone
    x = torch.tensor(F.lm_dataset(4, seed=3)["input_ids"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixed-precision forward wrapper")
        ledger = StageLedger(str(tmp_path / "ledger"))
        estimators.get("delta-fd").estimate(ledger, model, lambda m: m(x).logits[:, -1, 0])


def test_a_dpo_stage_trained_under_the_previous_trainers_autocast_wrapper_replays_to_its_end(tmp_path):
    """SFT then DPO with bf16=True on one model object: the DPO stage trains under the SFT Trainer's leftover wrapper
    (accelerate leaves a prepared model as it is), which lands 0.02 away from the same DPO on a fresh model — more
    than its whole update. The recorder notes it (stage.json trainer.inherited_autocast_wrapper) and replay puts the
    wrapper back on its clean copy."""
    from transformers import AutoModelForCausalLM, Trainer
    from trl import DPOConfig, DPOTrainer

    F.gpt2().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    ledger_dir = tmp_path / "ledger"
    first = F.training_args(str(tmp_path / "o1"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                            bf16=True)  # fmt: skip
    recorder = StageRecorder(ledger_dir, "ft", curvature_segments=0, save_replay_data=True)
    Trainer(model=model, args=first, train_dataset=F.lm_dataset(16), callbacks=[recorder]).train()
    args = F.trl_args(DPOConfig, str(tmp_path / "o2"), max_steps=3, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-2, bf16=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorder = StageRecorder(ledger_dir, "dpo", curvature_segments=0, save_replay_data=True)
        DPOTrainer(model=model, ref_model=None, args=args, train_dataset=F.preference_dataset(8),
                   processing_class=F.tokenizer(), callbacks=[recorder]).train()  # fmt: skip
    ledger = StageLedger.load(ledger_dir)
    assert [s.info["trainer"].get("inherited_autocast_wrapper") for s in ledger.stages] == [False, True]
    assert replay_gap(ledger, model) < EXACT  # was 0.0217: the DPO replay trained without that wrapper
