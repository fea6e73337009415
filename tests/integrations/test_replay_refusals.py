"""Stages whose replay data a replay cannot use as they are — the user's own ``Trainer`` subclass (a custom
``compute_loss``: a replay imports only transformers' and TRL's classes) and a training dataset that was not saved
(a torch or iterable dataset) — are refused up front with ``stage_fns`` as the way (the attributor's replays failed
half way through, with advice — ``trainer_cls=``, ``train_dataset=`` — that the attributor cannot take)."""

from __future__ import annotations

import copy

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.integrations.replay import replay_trainer_stage


def _weighted_trainer():
    from transformers import Trainer

    class WeightedTrainer(Trainer):  # what users write for a class-weighted or auxiliary loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = 2.0 * outputs.loss
            return (loss, outputs) if return_outputs else loss

    return WeightedTrainer


def test_a_user_trainer_class_is_refused_up_front_and_replays_with_trainer_cls(tmp_path):
    from transformers import Trainer

    ledger_dir, model, starts = tmp_path / "ledger", F.gpt2(), {}
    for name, cls in (("pre", Trainer), ("sft", _weighted_trainer())):
        starts[name] = copy.deepcopy(model)
        args = F.training_args(str(tmp_path / name), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=3)
        recorder = StageRecorder(ledger_dir, name, save_replay_data=True)
        cls(model=model, args=args, train_dataset=F.lm_dataset(24), callbacks=[recorder]).train()
    ledger = StageLedger.load(ledger_dir)
    assert any("replay: the stage trained with the trainer class" in n for n in ledger.stages[1].info["notes"])
    assert not any("trainer class" in n for n in ledger.stages[0].info["notes"])
    behavior = lambda m: m(input_ids=torch.arange(8)[None]).logits[0, -1, :3]  # noqa: E731
    attributor = StageAttributor(ledger, model, show_progress=False)
    with pytest.raises(
        ReplayError,
        match=r"stage 'sft' cannot be replayed from its replay data: it trained with the trainer class "
        r".*WeightedTrainer, which a replay does not import.*stage_fns=",
    ):
        attributor.attribute({"logits": behavior}, validate=True)
    assert "replay" not in attributor.attribute({"logits": behavior}).estimator  # `auto` does not pick a replay
    # called directly (from the exact θ_1), the replay takes the class and lands on the recorded parameters
    replayed = replay_trainer_stage(ledger.stages[1], starts["sft"], trainer_cls=_weighted_trainer())
    for name, param in model.named_parameters():
        torch.testing.assert_close(dict(replayed.named_parameters())[name], param, atol=1e-7, rtol=0)


def test_a_stage_whose_dataset_was_not_saved_is_refused_up_front(tmp_path):
    from transformers import Trainer

    ledger_dir, model = tmp_path / "ledger", F.gpt2()
    rows = F.lm_dataset(24)
    for name, data in (("pre", rows), ("sft", rows.to_iterable_dataset())):
        args = F.training_args(str(tmp_path / name), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=3)
        recorder = StageRecorder(ledger_dir, name, save_replay_data=True)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder]).train()
    sft = StageLedger.load(ledger_dir).stages[1]
    assert sft.info["replay"]["dataset_saved"] is False
    attributor = StageAttributor(ledger_dir, model, show_progress=False)
    behavior = lambda m: m(input_ids=torch.arange(8)[None]).logits[0, -1, :3]  # noqa: E731
    with pytest.raises(ReplayError, match=r"training dataset was not saved with its replay data.*stage_fns="):
        attributor.attribute({"logits": behavior}, validate=True)


def test_a_stage_that_continued_the_optimizer_state_is_refused_for_that_reason_not_for_missing_replay_data(tmp_path):
    """One Trainer run split by ``stage_boundaries``, recorded with ``save_replay_data=True``: its second part
    continued the optimizer state, so it has no replay data of its own. ``auto``'s reason, the replay refusal and the
    partial-replay refusal told the user to record it with ``save_replay_data=True`` — which it was."""
    from transformers import Trainer

    from hf_stage_attribution.errors import PartialReplayError

    ledger_dir, model = tmp_path / "ledger", F.gpt2()
    args = F.training_args(str(tmp_path / "a"), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=3)
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(24),
            callbacks=[StageRecorder(ledger_dir, "a", save_replay_data=True)]).train()  # fmt: skip
    args = F.training_args(str(tmp_path / "b"), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=4)
    recorder = StageRecorder(ledger_dir, "b1", save_replay_data=True, stage_boundaries={"b2": 2})
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(24, seed=1), callbacks=[recorder]).train()
    ledger = StageLedger.load(ledger_dir)
    assert [s.optimizer_state_policy for s in ledger.stages] == ["fresh", "fresh", "continued"]
    behavior = lambda m: m(input_ids=torch.arange(8)[None]).logits[0, -1, :3]  # noqa: E731
    attributor = StageAttributor(ledger, model, show_progress=False, diagnostics=False)
    report = attributor.attribute({"logits": behavior})
    assert "stage 'b2' cannot be replayed without a stage function: it continued the previous stage's optimizer" in (
        report.estimator_reason
    )
    assert "neither replay data" not in report.estimator_reason
    with pytest.raises(ReplayError, match="continued the previous stage's optimizer state") as refused:
        attributor.attribute({"logits": behavior}, validate=True)
    assert "save_replay_data=True" not in str(refused.value)
    partial = StageAttributor(ledger, model, "partial-replay", show_progress=False, diagnostics=False,
                              estimator_options={"budget": 1.0})  # fmt: skip
    with pytest.raises(PartialReplayError, match="continued the previous stage's optimizer state") as refused:
        partial.attribute({"logits": behavior})
    assert "save_replay_data=True" not in str(refused.value)
