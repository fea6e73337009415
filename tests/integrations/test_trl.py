"""TRL trainers beyond SFT/DPO record a stage with the right kind and their TRL settings: reward modelling, GRPO,
KTO and RLOO (tiny models, a couple of steps each, generation lengths of a few tokens), and DPO on a PEFT model."""

from __future__ import annotations

import copy

import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger  # noqa: E402
from hf_stage_attribution._internal.params import iter_merged_state  # noqa: E402


def reward_length(completions, **kwargs):
    """A reward function in Python: longer completions score higher."""
    return [len(c) / 10.0 for c in completions]


def _record(tmp_path, make_trainer, save_replay_data=False):
    from hf_stage_attribution import StageRecorder

    recorder = StageRecorder(
        tmp_path / "ledger", "stage", curvature_segments=2, curvature_examples=8, save_replay_data=save_replay_data
    )
    trainer = make_trainer(str(tmp_path / "out"), recorder)
    trainer.train()
    ledger = StageLedger.load(tmp_path / "ledger")
    ledger.check_model(trainer.model)
    (stage,) = ledger.stages
    return stage


def test_reward_trainer_records_a_reward_stage(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = F.tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    args = dict(max_steps=3, per_device_train_batch_size=4, max_length=32, center_rewards_coefficient=0.01)
    stage = _record(
        tmp_path,
        lambda out, rec: RewardTrainer(model=model, args=F.trl_args(RewardConfig, out, **args),
                                       train_dataset=F.preference_dataset(), processing_class=tok, callbacks=[rec]),
    )  # fmt: skip
    assert (stage.kind, stage.num_steps, stage.info["trainer"]["class"]) == ("reward", 3, "RewardTrainer")
    assert stage.info["trl"]["center_rewards_coefficient"] == 0.01 and stage.info["trl"]["max_length"] == 32
    assert stage.curvature_loss["type"] == "pairwise-reward"
    assert "score.weight" in stage.trainable_parameters


def test_grpo_trainer_records_generations_and_reward_functions(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.0)
    stage = _record(
        tmp_path,
        lambda out, rec: GRPOTrainer(model=F.gpt2(), reward_funcs=[reward_length], args=F.trl_args(GRPOConfig, out,
                                     **args), train_dataset=F.prompt_dataset(), processing_class=F.tokenizer(),
                                     callbacks=[rec]),
    )  # fmt: skip
    assert (stage.kind, stage.num_steps, stage.info["trainer"]["class"]) == ("grpo", 2, "GRPOTrainer")
    trl = stage.info["trl"]
    assert trl["num_generations"] == 2 and trl["max_completion_length"] == 4
    assert trl["reward_functions"] == ["reward_length"]
    assert trl["reference_model"]["policy"] == "none (beta=0)"
    assert len(stage.learning_rates) == 2 and stage.segments and stage.segments[0].num_examples > 0


def test_kto_trainer_records_its_weights_and_reference(tmp_path):
    from trl import KTOConfig, KTOTrainer

    model = F.gpt2()
    args = dict(max_steps=2, per_device_train_batch_size=4, max_length=32, beta=0.2, desirable_weight=1.5)
    stage = _record(
        tmp_path,
        lambda out, rec: KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=F.trl_args(KTOConfig, out,
                                    **args), train_dataset=F.unpaired_dataset(), processing_class=F.tokenizer(),
                                    callbacks=[rec]),
    )  # fmt: skip
    assert (stage.kind, stage.num_steps, stage.info["trainer"]["class"]) == ("kto", 2, "KTOTrainer")
    trl = stage.info["trl"]
    assert trl["beta"] == 0.2 and trl["desirable_weight"] == 1.5 and trl["undesirable_weight"] == 1.0
    assert trl["reference_model"]["policy"] == "copy of the stage start"


def test_rloo_trainer_records_its_reference_and_replays_to_the_recorded_end(tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    F.gpt2().save_pretrained(tmp_path / "init")  # RLOO (beta > 0) loads its reference from the model's path
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    args = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.05)
    stage = _record(
        tmp_path,
        lambda out, rec: RLOOTrainer(model=model, reward_funcs=[reward_length], args=F.trl_args(RLOOConfig, out,
                                     **args), train_dataset=F.prompt_dataset(), processing_class=F.tokenizer(),
                                     callbacks=[rec]),
        save_replay_data=True,
    )  # fmt: skip
    assert (stage.kind, stage.num_steps, stage.info["trainer"]["class"]) == ("rloo", 2, "RLOOTrainer")
    trl = stage.info["trl"]
    assert trl["beta"] == 0.05 and trl["num_generations"] == 2 and trl["reward_functions"] == ["reward_length"]
    assert trl["reference_model"] == {
        "name_or_path": str(tmp_path / "init"), "policy": "copy of the stage start", "attn_implementation": "sdpa",
        "dtype": "float32",
    }  # fmt: skip
    # Replay from the same start (sampling, rewards and the reference rebuilt from the replay's start).
    replayed = replay_trainer_stage(
        stage, AutoModelForCausalLM.from_pretrained(tmp_path / "init"), reward_funcs=[reward_length]
    )
    final = dict(iter_merged_state(model))
    assert max((final[n] - p.detach()).abs().max().item() for n, p in replayed.named_parameters()) <= 1e-6


def test_dpo_on_a_peft_model_records_lora_and_the_disabled_adapter_reference(tmp_path):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    base = F.gpt2()
    before = dict(iter_merged_state(base))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    args = dict(max_steps=2, per_device_train_batch_size=4, max_length=32, learning_rate=1e-2)
    stage = _record(
        tmp_path,
        lambda out, rec: DPOTrainer(model=base, args=F.trl_args(DPOConfig, out, **args), peft_config=lora,
                                    train_dataset=F.preference_dataset(), processing_class=F.tokenizer(),
                                    callbacks=[rec]),
    )  # fmt: skip
    assert stage.kind == "dpo" and stage.info["trl"]["reference_model"]["policy"] == "adapter disabled"
    assert any(note.startswith("lora:") for note in stage.info["notes"])
    assert set(stage.lora["modules"]) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    delta = stage.delta()
    assert set(delta) == set(stage.lora["modules"]) and all(float(d.abs().max()) > 0 for d in delta.values())
    assert stage.trainable_parameters == sorted(stage.lora["modules"])  # the base weights stayed frozen
    start = StageLedger.load(tmp_path / "ledger").initial_state()
    assert all(torch.equal(start[name], value) for name, value in before.items())
