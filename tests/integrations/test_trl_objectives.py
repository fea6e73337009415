"""TRL trainers whose objective the stage kind does not name (``trl.experimental`` OnlineDPO, CPO, ORPO, GKD), the
distillation teacher, SFT packing and TRL configs the package does not know: each is recorded with its objective
and the models it trained against, never as plain fine-tuning with a causal-LM curvature loss, and replay either
rebuilds what the stage trained against or refuses up front, naming how to provide it."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger, StageRecorder
from hf_stage_attribution._internal.params import iter_merged_state
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.estimators.replay import can_replay, replay_data_problem, replay_needs
from hf_stage_attribution.integrations.replay import reference_problem, replay_trainer_stage
from hf_stage_attribution.integrations.trl import infer_curvature_loss, infer_stage_kind, trl_notes

STEPS = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2}


def reward_length(completions, **kwargs):
    """A reward function in Python: longer completions score higher."""
    return [len(c) / 10.0 for c in completions]


def _record(tmp_path, make_trainer, *, replay=True):
    """Record one stage ``x`` (``make_trainer(output_dir, callbacks) -> trainer``); its stage and trained model."""
    recorder = StageRecorder(tmp_path / "ledger", "x", curvature_segments=0, save_replay_data=replay)
    trainer = make_trainer(str(tmp_path / "out"), [recorder])
    trainer.train()
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    return stage, trainer.model


def _gap(model, reference) -> float:
    want = dict(iter_merged_state(reference))
    return max(float((t - want[n]).abs().max()) for n, t in iter_merged_state(model))


def _online_dpo(ref):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    def make(out, callbacks):
        args = F.trl_args(OnlineDPOConfig, out, max_new_tokens=4, beta=1.0, **STEPS)
        return OnlineDPOTrainer(model=F.gpt2(), ref_model=ref, reward_funcs=[reward_length], args=args,
                                train_dataset=F.prompt_dataset(), processing_class=F.tokenizer(),
                                callbacks=callbacks)  # fmt: skip

    return make


def test_online_dpo_records_its_separate_reference_and_replay_needs_it(tmp_path):
    ref = F.gpt2(seed=5)
    stage, trained = _record(tmp_path, _online_dpo(ref))
    trl = stage.info["trl"]
    assert (stage.kind, trl["objective"], trl["config_class"]) == ("dpo", "online_dpo", "OnlineDPOConfig")
    assert trl["reference_model"]["policy"] == "separate model" and trl["reference_model"]["state_hash"]
    assert trl["reward_functions"] == ["reward_length"] and trl["beta"] == 1.0
    assert stage.curvature_loss["type"] == "online_dpo"
    assert "ref_models={'x': model}" in reference_problem(stage)
    assert reference_problem(stage, ref) is None
    with pytest.raises(ReplayError, match="reference model was 'separate model'"):
        replay_trainer_stage(stage, F.gpt2(), reward_funcs=[reward_length])
    replayed = replay_trainer_stage(stage, F.gpt2(), reward_funcs=[reward_length], ref_model=ref)
    assert _gap(replayed, trained) <= 1e-6


def test_online_dpo_replays_a_copy_of_its_start_and_refuses_gradient_reuse(tmp_path):
    stage, trained = _record(tmp_path, _online_dpo(None))
    assert stage.info["trl"]["reference_model"]["policy"] == "copy of the stage start"
    assert reference_problem(stage) is None
    rewards = {"x": [reward_length]}  # without its reward functions it cannot replay at all
    assert can_replay(stage, {}, reward_funcs=rewards) and not can_replay(
        stage, {}, grad_reuse=True, reward_funcs=rewards
    )
    assert not can_replay(stage, {})
    with pytest.raises(ReplayError, match="needs `reward_funcs=`"):
        replay_trainer_stage(stage, F.gpt2())
    with pytest.raises(ReplayError, match=r"\(online_dpo\) generates its training data"):
        replay_trainer_stage(stage, F.gpt2(), reward_funcs=[reward_length], grad_every=2)
    assert _gap(replay_trainer_stage(stage, F.gpt2(), reward_funcs=[reward_length]), trained) <= 1e-6


@pytest.mark.parametrize("name", ["orpo", "cpo"])
def test_reference_free_preference_objectives_get_their_own_objective_and_no_causal_lm_loss(tmp_path, name):
    import trl.experimental.cpo as cpo
    import trl.experimental.orpo as orpo

    config_cls, trainer_cls = {"orpo": (orpo.ORPOConfig, orpo.ORPOTrainer), "cpo": (cpo.CPOConfig, cpo.CPOTrainer)}[
        name
    ]
    stage, trained = _record(
        tmp_path,
        lambda out, callbacks: trainer_cls(model=F.gpt2(), args=F.trl_args(config_cls, out, max_length=32, **STEPS),
                                           train_dataset=F.preference_dataset(8), processing_class=F.tokenizer(),
                                           callbacks=callbacks),
    )  # fmt: skip
    assert (stage.kind, stage.info["trl"]["objective"]) == ("custom", name)
    assert stage.curvature_loss["type"] == name and "reference_model" not in stage.info["trl"]
    assert any(f"TRL's {name} objective" in note for note in stage.info["notes"])
    assert replay_data_problem(stage) is None and reference_problem(stage) is None  # the policy is all it needs
    assert _gap(replay_trainer_stage(stage, F.gpt2()), trained) <= 1e-6


def test_gkd_is_recorded_as_distillation_with_its_teacher_not_as_sft(tmp_path):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher = F.gpt2(seed=7)
    tok = F.tokenizer()
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in F.sft_dataset(8)]  # fmt: skip

    def make(out, callbacks):
        from datasets import Dataset

        tok.chat_template = tok.chat_template or template
        args = F.trl_args(GKDConfig, out, max_length=32, max_new_tokens=4, lmbda=0.0, **STEPS)
        return GKDTrainer(model=F.gpt2(), teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=callbacks)  # fmt: skip

    stage, trained = _record(tmp_path, make)
    trl = stage.info["trl"]
    assert (stage.kind, trl["objective"], trl["lmbda"]) == ("distillation", "gkd", 0.0)
    assert "packing" not in trl and stage.curvature_loss["type"] == "gkd"
    assert trl["teacher_model"]["policy"] == "separate model" and trl["teacher_model"]["state_hash"]
    assert "pass the teacher as ref_models={'x': teacher}" in reference_problem(stage)
    assert not can_replay(stage, {}, grad_reuse=True)
    assert _gap(replay_trainer_stage(stage, F.gpt2(), ref_model=teacher), trained) <= 1e-6


def test_a_distillation_teacher_loaded_from_a_folder_is_rebuilt_by_replay(tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    F.gpt2(seed=7).save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")

    def make(out, callbacks):
        args = F.trl_args(DistillationConfig, out, max_completion_length=8, **STEPS)
        return DistillationTrainer(model=F.gpt2(), teacher_model=teacher, args=args, train_dataset=F.sft_dataset(8),
                                   processing_class=F.tokenizer(), callbacks=callbacks)  # fmt: skip

    stage, trained = _record(tmp_path, make)
    recorded = stage.info["trl"]["teacher_model"]
    assert recorded["policy"] == "separate model" and recorded["name_or_path"] == str(tmp_path / "teacher")
    assert reference_problem(stage) is None
    assert _gap(replay_trainer_stage(stage, F.gpt2()), trained) <= 1e-6  # the teacher rebuilt from its folder
    shutil.rmtree(tmp_path / "teacher")
    problem = reference_problem(stage)
    assert "teacher model loaded from" in problem and "--ref-model x=PATH" in problem
    with pytest.raises(ReplayError, match="teacher model loaded from"):
        replay_trainer_stage(stage, F.gpt2())


def test_packed_sft_is_refused_from_its_replay_data_up_front(tmp_path):
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    ledger_dir = tmp_path / "ledger"
    model = F.gpt2()
    pre_args = F.training_args(str(tmp_path / "pre"), max_steps=1, per_device_train_batch_size=8)
    pre = StageRecorder(ledger_dir, "pre", curvature_segments=0, save_replay_data=True)
    Trainer(model=model, args=pre_args, train_dataset=F.lm_dataset(8), callbacks=[pre]).train()
    args = F.trl_args(SFTConfig, str(tmp_path / "out"), max_length=32, packing=True, **STEPS)
    recorder = StageRecorder(ledger_dir, "x", curvature_segments=0, save_replay_data=True)
    SFTTrainer(model=model, args=args, train_dataset=F.sft_dataset(), processing_class=F.tokenizer(),
               callbacks=[recorder]).train()  # fmt: skip
    ledger = StageLedger.load(ledger_dir)
    stage = ledger.stage("x")
    assert "packing=True" in replay_data_problem(stage) and not can_replay(stage, {})
    (problem,) = replay_needs(ledger, [0]).problems
    assert problem.startswith("stage 'x' cannot be replayed from its replay data: it trained with SFT packing=True")
    assert replay_needs(ledger, [0], stage_fns={"x": lambda m: m}).problems == []
    with pytest.raises(ReplayError, match="trained with SFT packing=True"):  # before TRL's own error
        replay_trainer_stage(stage, F.gpt2())


def test_a_trl_config_the_package_does_not_know_is_not_treated_as_fine_tuning(tmp_path):
    from trl.experimental.gold import GOLDConfig

    args = F.trl_args(GOLDConfig, str(tmp_path))  # subclasses SFTConfig, but distils from a teacher
    model = F.gpt2()
    assert infer_stage_kind(args, model) == "custom"
    assert infer_curvature_loss("custom", args, model) == {
        "type": "custom", "config_class": "GOLDConfig", "model_class": "GPT2LMHeadModel"
    }  # fmt: skip
    (note,) = trl_notes("custom", args)
    assert "GOLDConfig is not one this package knows" in note and "stage_fns" in note
    stage = SimpleNamespace(name="gold", kind="custom", optimizer_state_policy="fresh",
                            info={"trl": {"config_class": "GOLDConfig", "objective": "unknown"}})  # fmt: skip
    assert "GOLDConfig, whose objective this package does not know" in replay_data_problem(stage)
