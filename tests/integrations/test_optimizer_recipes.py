"""Trainer stages recorded with ``save_replay_data=True`` under HF ``optim``/scheduler choices the benchmark
pipelines do not use: ``optim="adagrad"`` (its state is built at construction: the stage is still fresh and
replayable) and ``lr_scheduler_type="reduce_lr_on_plateau"`` (metric-driven: replay data cannot reproduce it)."""

from __future__ import annotations

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger, estimators
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.estimators.replay import can_replay
from hf_stage_attribution.estimators.selection import choose_estimator


def _two_stages(tmp_path, **second):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    ledger_dir = tmp_path / "ledger"
    model = F.gpt2(0, n_embd=16, n_layer=1)
    first = F.training_args(str(tmp_path / "o1"), max_steps=2, per_device_train_batch_size=4)
    Trainer(model=model, args=first, train_dataset=F.lm_dataset(8),
            callbacks=[StageRecorder(ledger_dir, "s1")]).train()  # fmt: skip
    args = F.training_args(str(tmp_path / "o2"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                           weight_decay=0.1, **second)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(16, seed=1), eval_dataset=F.lm_dataset(4, seed=2),
            callbacks=[StageRecorder(ledger_dir, "s2", save_replay_data=True)]).train()  # fmt: skip
    batch = torch.tensor(F.lm_dataset(4, seed=3)["input_ids"])
    return StageLedger.load(ledger_dir), model, (lambda m: m(batch).logits[:, -1, :].logsumexp(-1))


def test_hf_adagrad_stage_is_fresh_and_replays(tmp_path):
    ledger, model, behavior = _two_stages(tmp_path, optim="adagrad")
    stage = ledger.stages[1]
    assert stage.optimizer["type"] == "Adagrad"
    assert stage.optimizer_state_policy == "fresh"  # before: "continued" (Adagrad's constructor state)
    assert can_replay(stage, {}, step_limited=True)
    assert "would replay no optimizer step" in choose_estimator(ledger)[1]  # replayable; 25 % of 4 steps is none
    replay = estimators.get("replay").estimate(ledger, model, behavior, stages=["s1"])
    assert torch.isfinite(torch.tensor(replay.mean["s1"]))


def test_hf_plateau_schedule_is_refused_by_replay_with_the_reason(tmp_path):
    ledger, model, behavior = _two_stages(
        tmp_path, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2,
        lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "threshold": 10.0},
    )  # fmt: skip
    stage = ledger.stages[1]
    assert stage.replay_dir is not None and not can_replay(stage, {}, step_limited=True)
    name, reason = choose_estimator(ledger)
    assert name != "partial-replay" and "metric-driven" in reason  # before: partial-replay, which then failed
    with pytest.raises(ReplayError, match="metric-driven") as info:
        estimators.get("replay").estimate(ledger, model, behavior, stages=["s1"])
    assert "\n" not in str(info.value)
    result = estimators.get("auto").estimate(ledger, model, behavior)
    assert "metric-driven" in result.reason
