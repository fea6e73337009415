"""What a replay needs besides the replay data — the reward functions of a GRPO/RLOO/OnlineDPO stage and a
reference model it cannot rebuild — reaches every estimator that replays (replay, partial and strided replay),
``auto``'s choice and the report's ``replay_needs``. Before, partial and strided replay dropped ``ref_models``
(the reference the user passed was never used) and nothing accepted reward functions, so ``auto`` picked partial
replay for a ledger with a GRPO stage and failed half way through."""

from __future__ import annotations

import copy

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder, estimators
from hf_stage_attribution._internal.params import iter_merged_state
from hf_stage_attribution.cli.attribute_cmd import reward_functions
from hf_stage_attribution.errors import PartialReplayError, ReplayError, StageAttributionError, UnsafeInputError
from hf_stage_attribution.estimators.replay import replay_model, replay_needs

STEPS = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2}


def reward_length(completions, **kwargs):
    """A reward function in Python: longer completions score higher."""
    return [len(c) / 10.0 for c in completions]


def _sft(model, out, callbacks):
    from trl import SFTConfig, SFTTrainer

    args = F.trl_args(SFTConfig, out, max_length=32, **STEPS)
    return SFTTrainer(model=model, args=args, train_dataset=F.sft_dataset(), processing_class=F.tokenizer(),
                      callbacks=callbacks)  # fmt: skip


def _grpo(model, out, callbacks):
    from trl import GRPOConfig, GRPOTrainer

    args = F.trl_args(GRPOConfig, out, num_generations=2, max_completion_length=4, **STEPS)
    return GRPOTrainer(model=model, reward_funcs=[reward_length], args=args, train_dataset=F.prompt_dataset(),
                       processing_class=F.tokenizer(), callbacks=callbacks)  # fmt: skip


def _online_dpo(ref):
    def make(model, out, callbacks):
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = F.trl_args(OnlineDPOConfig, out, max_new_tokens=4, beta=1.0, **STEPS)
        return OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=[reward_length], args=args,
                                train_dataset=F.prompt_dataset(), processing_class=F.tokenizer(),
                                callbacks=callbacks)  # fmt: skip

    return make


def _ledger(tmp_path, second):
    """Two stages with replay data: ``sft``, then ``rl`` (``second``); the ledger and the trained model."""
    model = F.gpt2()
    for name, make in (("sft", _sft), ("rl", second)):
        recorder = StageRecorder(tmp_path / "ledger", name, curvature_segments=0, save_replay_data=True)
        make(model, str(tmp_path / f"out-{name}"), [recorder]).train()
    return StageLedger.load(tmp_path / "ledger"), model


def _behavior(model):
    ids = torch.arange(24).reshape(3, 8) % 50
    return model(input_ids=ids).logits[:, -1, :4].reshape(-1)


def test_grpo_stage_replays_with_the_reward_functions_given_and_auto_says_why_not_without(tmp_path):
    ledger, model = _ledger(tmp_path, _grpo)
    chosen, reason = estimators.choose_estimator(ledger)
    assert chosen != "partial-replay" and "reward functions (recorded: ['reward_length'])" in reason
    assert "--reward-func rl=MODULE:FUNCTION" in reason
    (problem,) = replay_needs(ledger, [0]).problems
    assert "reward_funcs={'rl': [fn, ...]}" in problem
    assert replay_needs(ledger, [0], reward_funcs={"rl": [reward_length]}).problems == []
    with pytest.raises(PartialReplayError, match="scores its generations with reward functions"):
        whole = {"budget": 1.0}  # both branches of one step of 2 cost the whole budget: a smaller one replays nothing
        StageAttributor(
            ledger, model, estimator="partial-replay", estimator_options=whole, show_progress=False
        ).attribute({"logits": _behavior}, stages=["sft"])
    with pytest.raises(ReplayError, match="scores its generations with reward functions"):
        StageAttributor(ledger, model, estimator="replay", show_progress=False).attribute({"logits": _behavior})
    with pytest.raises(StageAttributionError, match="Expected reward_funcs keyed by the ledger's stage names"):
        StageAttributor(ledger, model, reward_funcs={"grpo": [reward_length]})

    rewards = {"rl": [reward_length]}
    chosen, reason = estimators.choose_estimator(ledger, reward_funcs=rewards)  # replayable; 25 % of 2 steps is none
    assert "would replay no optimizer step for any stage" in reason and "reward" not in reason
    kw = {"show_progress": False, "diagnostics": False, "reward_funcs": rewards}
    auto = StageAttributor(ledger, model, **kw).attribute({"logits": _behavior}, stages=["sft"])
    assert auto.estimator == chosen
    full = StageAttributor(ledger, model, estimator="partial-replay", estimator_options={"budget": 1.0}, **kw)
    replay = StageAttributor(ledger, model, estimator="replay", **kw)
    got = full.attribute({"logits": _behavior}, stages=["sft"]).rows[0]
    want = replay.attribute({"logits": _behavior}, stages=["sft"]).rows[0]
    assert got.effect == pytest.approx(want.effect, abs=1e-5) and want.effect != 0.0


def test_partial_and_strided_replay_use_the_reference_model_they_are_given(tmp_path):
    ref = F.gpt2(seed=5)  # built in memory: replay cannot rebuild it from a folder
    ledger, model = _ledger(tmp_path, _online_dpo(copy.deepcopy(ref)))
    rewards = {"rl": [reward_length]}
    (problem,) = replay_needs(ledger, [0], reward_funcs=rewards).problems
    assert "ref_models={'rl': model}" in problem
    kw = {"show_progress": False, "diagnostics": False, "reward_funcs": rewards, "ref_models": {"rl": ref}}
    assert "ref_models" in estimators.choose_estimator(ledger, reward_funcs=rewards)[1]
    replayable = estimators.choose_estimator(ledger, reward_funcs=rewards, ref_models={"rl": ref})[1]
    assert "would replay no optimizer step for any stage" in replayable  # every input given; 25 % of 2 steps is none
    replay = StageAttributor(ledger, model, estimator="replay", **kw).attribute({"logits": _behavior}, stages=["sft"])
    full = StageAttributor(ledger, model, estimator="partial-replay", estimator_options={"budget": 1.0}, **kw)
    got = full.attribute({"logits": _behavior}, stages=["sft"])  # dropped ref_models before: a ReplayError here
    assert got.rows[0].effect == pytest.approx(replay.rows[0].effect, abs=1e-5)
    strided = StageAttributor(ledger, model, estimator="strided-replay", estimator_options={"budget": 1.0}, **kw)
    assert strided.attribute({"logits": _behavior}, stages=["sft"]).rows[0].effect == pytest.approx(
        replay.rows[0].effect, abs=1e-5
    )


def test_cli_reward_functions_import_only_with_trust_code(tmp_path):
    path = f"{__name__}:reward_length"
    assert reward_functions([f"rl={path}", f"rl={tmp_path}"], trust_code=True) == {
        "rl": [reward_length, str(tmp_path)]
    }
    with pytest.raises(UnsafeInputError, match="--reward-func .* names the function"):
        reward_functions([f"rl={path}"])
    with pytest.raises(ReplayError, match="Expected --reward-func STAGE=MODULE:FUNCTION"):
        reward_functions(["rl"])
    with pytest.raises(ReplayError, match="neither a folder here nor an importable"):
        reward_functions(["rl=no_such_thing"], trust_code=True)


def test_a_reward_model_folder_given_by_path_replays_the_stage(tmp_path):
    """--reward-func STAGE=PATH: the TRL trainer loads the reward model from the folder, as it did when trained."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = F.tokenizer()
    folder = tmp_path / "reward-model"
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64, num_labels=1,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(3)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)

    def grpo_with_model(model, out, callbacks):
        from trl import GRPOConfig, GRPOTrainer

        args = F.trl_args(GRPOConfig, out, num_generations=2, max_completion_length=4, **STEPS)
        return GRPOTrainer(model=model, reward_funcs=[str(folder)], args=args, train_dataset=F.prompt_dataset(),
                           processing_class=tok, callbacks=callbacks)  # fmt: skip

    ledger, model = _ledger(tmp_path, grpo_with_model)
    rewards = reward_functions([f"rl={folder}"])  # a folder: no code is imported, no --trust-code needed
    assert rewards == {"rl": [str(folder)]}
    kw = {"show_progress": False, "diagnostics": False, "reward_funcs": rewards}
    replay = StageAttributor(ledger, model, estimator="replay", **kw).attribute({"logits": _behavior}, stages=["sft"])
    full = StageAttributor(ledger, model, estimator="partial-replay", estimator_options={"budget": 1.0}, **kw)
    got = full.attribute({"logits": _behavior}, stages=["sft"])
    assert got.rows[0].effect == pytest.approx(replay.rows[0].effect, abs=1e-5) and replay.rows[0].effect != 0.0
    again = replay_model(ledger, model, None, reward_funcs=rewards)  # nothing removed: the recorded θ_K again
    final = ledger.final_state()
    assert max(float((t - final[n]).abs().max()) for n, t in iter_merged_state(again)) <= 1e-5
