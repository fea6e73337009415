"""A stage that evaluated during training (``eval_strategy="steps"``) replays exactly although its replay runs no
evaluation: each evaluation drew from the global random generators (its dataloader alone draws one torch number),
so a replay without the recorded generator states drew other dropout masks after the first evaluation and missed
θ_K by about 1e-2 (tiny GPT-2, dropout 0.1, an evaluation every 2 of 6 steps; exact replay: ~2e-9)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger, StageRecorder
from hf_stage_attribution.integrations.eval_rng import EVAL_RNG_FILE
from hf_stage_attribution.integrations.replay import replay_trainer_stage
from hf_stage_attribution.ledger.storage import file_sha256


def _gpt2_with_dropout(p: float = 0.1):
    from transformers import GPT2LMHeadModel

    config = F.gpt2().config
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.config._attn_implementation = "eager"
    return model


def _record(tmp_path, eval_dataset=None, snapshot_at: int | None = None, **kwargs):
    """Train 6 steps of a tiny GPT-2 with dropout under a recorder; returns the trained model, its start, the
    parameters after step ``snapshot_at`` and the recorded stage."""
    from transformers import Trainer, TrainerCallback

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == snapshot_at:
                snapshots["mid"] = copy.deepcopy(model)

    model = _gpt2_with_dropout()
    start = copy.deepcopy(model)
    args = F.training_args(str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3,
                           **kwargs)  # fmt: skip
    recorder = StageRecorder(tmp_path / "ledger", "sft", save_replay_data=True, curvature_segments=0)
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(32), eval_dataset=eval_dataset,
                      callbacks=[recorder, Snapshot()])  # fmt: skip
    trainer.train()
    return model, start, snapshots.get("mid"), StageLedger.load(tmp_path / "ledger").stages[-1]


def _gap(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "evaluation",
    [
        {"eval_strategy": "steps", "eval_steps": 2},
        {"eval_strategy": "steps", "eval_steps": 3, "eval_on_start": True, "two_sets": True},
    ],
    ids=["every-2-steps", "on-start-and-two-eval-sets"],
)
def test_a_stage_that_evaluated_during_training_replays_exactly(tmp_path, evaluation):
    evaluation = dict(evaluation)
    eval_data = F.lm_dataset(8, seed=2)
    eval_dataset = {"a": eval_data, "b": eval_data} if evaluation.pop("two_sets", False) else eval_data
    trained, start, mid, stage = _record(tmp_path, eval_dataset=eval_dataset, snapshot_at=3, **evaluation)
    info = json.loads((stage.replay_dir / "replay.json").read_text())
    expected = [0, 3, 6] if evaluation.get("eval_on_start") else [2, 4, 6]
    assert info["eval_rng"] == {"file": EVAL_RNG_FILE, "steps": expected}
    assert (stage.replay_dir / EVAL_RNG_FILE).exists()
    assert not stage.info["notes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        replayed = replay_trainer_stage(stage, copy.deepcopy(start))
        partial = replay_trainer_stage(stage, copy.deepcopy(start), max_steps=3)  # partial replay: same stream
    assert _gap(trained, replayed) <= 1e-7, _gap(trained, replayed)  # without the states: about 1e-2
    assert _gap(mid, partial) <= 1e-7, _gap(mid, partial)


def test_a_stage_without_evaluation_saves_no_generator_states(tmp_path):
    trained, start, _, stage = _record(tmp_path)
    info = json.loads((stage.replay_dir / "replay.json").read_text())
    assert "eval_rng" not in info and sorted(p.name for p in stage.replay_dir.iterdir()) == ["dataset", "replay.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed = replay_trainer_stage(stage, start)
    assert _gap(trained, replayed) <= 1e-7


def test_a_ledger_whose_evaluations_left_no_generator_states_warns_once(tmp_path):
    _, start, _, stage = _record(tmp_path, eval_dataset=F.lm_dataset(8, seed=2), eval_strategy="steps", eval_steps=2)
    # a ledger recorded before the states were saved: neither the file nor its entry in replay.json
    (stage.replay_dir / EVAL_RNG_FILE).unlink()
    replay_json = stage.replay_dir / "replay.json"
    info = json.loads(replay_json.read_text())
    del info["eval_rng"]
    replay_json.write_text(json.dumps(info))
    ledger_json = tmp_path / "ledger" / "ledger.json"  # whose hashes then listed the replay files it had
    manifest = json.loads(ledger_json.read_text())
    files = manifest["stages"][stage.index]["files"]
    del files[f"replay/{EVAL_RNG_FILE}"]
    files["replay/replay.json"] = file_sha256(replay_json)
    ledger_json.write_text(json.dumps(manifest))
    stage = StageLedger.load(tmp_path / "ledger").stages[-1]
    with pytest.warns(UserWarning, match=r"Stage 'sft' evaluated during training \(eval_strategy='steps' every 2"):
        replay_trainer_stage(stage, copy.deepcopy(start), max_steps=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        replay_trainer_stage(stage, copy.deepcopy(start), max_steps=1)
    assert not [w for w in seen if "evaluated during training" in str(w.message)]  # once per stage


def test_an_evaluation_at_each_epoch_end_replays_exactly(tmp_path):
    """``eval_strategy="epoch"``: the evaluation runs after the epoch's last step (``on_step_end``, then
    ``on_epoch_end``, then the evaluation) and the next epoch's dataloader draws after it; the states put back at that
    step's ``on_step_end`` must give the recorded stream (nothing draws in between)."""
    from transformers import Trainer

    model = _gpt2_with_dropout()
    start = copy.deepcopy(model)
    args = F.training_args(str(tmp_path / "out"), num_train_epochs=3, per_device_train_batch_size=8,
                           learning_rate=5e-3, eval_strategy="epoch")  # fmt: skip
    recorder = StageRecorder(tmp_path / "ledger", "sft", save_replay_data=True, curvature_segments=0)
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(16), eval_dataset=F.lm_dataset(8, seed=2),
            callbacks=[recorder]).train()  # fmt: skip
    stage = StageLedger.load(tmp_path / "ledger").stages[-1]
    assert json.loads((stage.replay_dir / "replay.json").read_text())["eval_rng"]["steps"] == [2, 4, 6]
    replayed = replay_trainer_stage(stage, start)
    assert _gap(model, replayed) <= 1e-7, _gap(model, replayed)
