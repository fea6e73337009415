"""A Trainer stage that ended before its planned end — a callback stopping training, ``load_best_model_at_end`` —
is replayed up to the steps it took: its replay data were saved at its start with the planned end, and a replay ran
every planned step (a tiny GPT-2 stopped at step 3 of 8 missed θ_K by 0.0247, 1.6× the stage's whole update, and
every replay-based estimate and "verified" of an earlier stage rested on that wrong replay)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger, StageRecorder
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.integrations.recipe_check import recipe_check_callback
from hf_stage_attribution.integrations.replay import replay_trainer_stage


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = control.should_training_stop or state.global_step >= step
            return control

    return StopAt()


@pytest.mark.parametrize("stop", [3, 8])
def test_a_stage_a_callback_stopped_replays_to_its_recorded_end(tmp_path, stop):
    from transformers import Trainer

    model = F.gpt2()
    start = copy.deepcopy(model)
    args = F.training_args(str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-3)
    recorder = StageRecorder(tmp_path / "ledger", "s", save_replay_data=True, curvature_segments=0)
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder, _stop_at(stop)]).train()
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.num_steps == stop
    assert json.loads((stage.replay_dir / "replay.json").read_text())["stage_steps"] == [0, stop]
    replayed = replay_trainer_stage(stage, start)
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), replayed.parameters()))
    assert diff <= 1e-6, diff  # stopped at 3: 0.0247 before


def test_a_replay_that_runs_past_the_recorded_steps_is_stopped_with_a_clear_error():
    """The safety net for ledgers recorded before the fix: the recipe check refused nothing past the recorded rates."""
    stage = SimpleNamespace(name="s", learning_rates=[[1e-3], [2e-3], [3e-3]], optimizer=None)
    check = recipe_check_callback(stage, start=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    check.on_optimizer_step(None, SimpleNamespace(global_step=2), None, optimizer=optimizer)  # the last recorded step
    with pytest.raises(ReplayError, match=r"runs optimizer step 3, but the stage took 3 step\(s\).*max_steps=3"):
        check.on_optimizer_step(None, SimpleNamespace(global_step=3), None, optimizer=optimizer)
