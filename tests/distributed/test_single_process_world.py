"""``single_process_world`` / ``replay_world``: what a replay in a multi-process world sees, and what comes back
after it (in one process, the launcher's world simulated by its environment variables)."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from hf_stage_attribution._internal.distributed import replays_alone, single_process_world, world_size
from hf_stage_attribution.estimators.replay import run_stage
from hf_stage_attribution.integrations.replay import recorded_world_size, replay_world

LAUNCHER = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_the_block_sees_one_process_and_everything_comes_back(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    outer = PartialState(cpu=True)  # the process's state (the attributor's), made before the launcher's variables
    for name, value in LAUNCHER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    before = {cls: vars(cls)["_shared_state"] for cls in (PartialState, AcceleratorState, GradientState)}
    snapshot = dict(before[PartialState])
    assert world_size() == 2 and replays_alone(1) and not replays_alone(2)
    with single_process_world():
        assert not any(name in os.environ for name in LAUNCHER)
        assert world_size() == 1 and not replays_alone(1)
        inner = PartialState(cpu=True)
        assert inner.num_processes == 1 and inner.distributed_type == "NO"
        PartialState._reset_state()  # what TrainingArguments does: clears only the block's fresh state
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # set inside: gone on exit
        with single_process_world():  # nested: a no-op
            assert world_size() == 1
    assert {k: os.environ[k] for k in LAUNCHER} == LAUNCHER and "ACCELERATE_USE_FSDP" not in os.environ
    assert all(vars(cls)["_shared_state"] is state for cls, state in before.items())
    assert before[PartialState] == snapshot and PartialState().__dict__ is outer.__dict__
    with pytest.raises(RuntimeError), single_process_world():  # also on error
        raise RuntimeError("boom")
    assert world_size() == 2 and os.environ["RANK"] == "1"
    assert all(vars(cls)["_shared_state"] is state for cls, state in before.items())


def test_replay_world_isolates_only_a_recording_of_another_size(monkeypatch):
    stage = SimpleNamespace(info={"world_size": 1})
    with replay_world(stage):  # one process: as it is
        assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with replay_world(SimpleNamespace(info={"world_size": 2})):  # a 2-process recording replays in 2 processes
        assert os.environ["WORLD_SIZE"] == "2"
    with replay_world(stage):
        assert "WORLD_SIZE" not in os.environ
    assert os.environ["WORLD_SIZE"] == "2"
    assert recorded_world_size(SimpleNamespace(info={})) == 1  # not recorded (custom loop): one process


def test_a_recording_of_more_processes_replayed_in_another_world_says_it_is_not_the_recorded_run(monkeypatch):
    """Measured (a throwaway torchrun script): two Trainer stages recorded in 2 processes replay to θ_K within 4e-9
    in 2 processes, but 0.06 away in 1 process (each step sees other data); that replay is no ground truth."""
    two = SimpleNamespace(name="sft", info={"world_size": 2})
    recorded_in_two = r"'sft' was recorded in 2 processes .* replayed in 1 process: .*torchrun --nproc_per_node 2"
    with pytest.warns(UserWarning, match=recorded_in_two), replay_world(two):
        pass
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.warns(UserWarning, match=r"replayed in 4 processes, each as one process"), replay_world(two):
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with replay_world(two), replay_world(SimpleNamespace(name="a", info={"world_size": 1})):
            pass


def test_stage_functions_run_in_a_single_process_world(monkeypatch):
    """A stage function (which often builds a Trainer) sees one process when its stage was recorded in one."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = []

    def fn(model):
        from accelerate import PartialState

        seen.append((os.environ.get("WORLD_SIZE"), PartialState(cpu=True).num_processes))
        with torch.no_grad():
            model.weight.add_(1.0)

    stage = SimpleNamespace(name="s", index=0, num_steps=1, learning_rates=[0.1], info={"world_size": 1},
                            trainable_parameters=[], changed_without_grad=[], lora=None)  # fmt: skip
    model = torch.nn.Linear(2, 1)
    run_stage(stage, model, {"s": fn}, {"stage": stage, "removed": None, "scale": 0.0})
    assert seen == [(None, 1)] and os.environ["WORLD_SIZE"] == "2"
