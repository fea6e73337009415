"""The opt-in early checkpoint: the factual parameters and optimizer state a few steps into a stage."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError, LedgerFormatError, UnsafeInputError
from hf_stage_attribution.ledger.recorder import EARLY_DIR


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _record(ledger_dir, steps=8, early=0.3, watch=None, num_steps_given=None, **kw):
    """A custom AdamW loop recorded with ``early_checkpoint=early``; ``watch`` gets (params, optimizer state) copies
    after that many optimizer steps."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 2
    seen = {}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with StageLedger(ledger_dir).record_stage(
        "sft", model=model, optimizer=opt, num_steps=num_steps_given or steps, early_checkpoint=early, **kw
    ) as rec:
        for t in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
            if watch is not None and t + 1 == watch:
                seen["delta"] = {n: p.detach().clone() - start[n] for n, p in model.named_parameters()}
                names = {id(p): n for n, p in model.named_parameters()}
                seen["state"] = {names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                                 for p, s in opt.state.items()}  # fmt: skip
    return seen


def test_the_early_checkpoint_is_the_state_after_its_steps(tmp_path):
    seen = _record(tmp_path / "ledger", steps=8, early=0.3, watch=2)  # ⌊0.3 · 8⌋ = 2 steps
    ledger = StageLedger.load(tmp_path / "ledger")
    stage = ledger.stages[0]
    early = stage.early_checkpoint
    assert early.steps == 2 and early.fraction == 0.3
    delta = early.params_delta()
    assert sorted(delta) == sorted(seen["delta"])
    for name, value in seen["delta"].items():
        torch.testing.assert_close(delta[name], value, rtol=0, atol=0)
    state = early.optimizer_state()
    for name, entry in seen["state"].items():
        assert state[name]["step"] == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][key], entry[key], rtol=0, atol=0)
    files = stage.entry["files"]  # hashed with the stage's other files
    assert {"early_checkpoint/params_delta.safetensors", "early_checkpoint/optimizer_state.safetensors"} <= set(files)
    from hf_stage_attribution.cli.inspect_cmd import format_summary
    from hf_stage_attribution.ledger.summary import ledger_summary

    summary = ledger_summary(ledger)
    assert summary["stages"][0]["early_checkpoint_steps"] == 2
    assert "Early checkpoints (partial replay reads the factual branch from them): sft after 2 steps" in (
        format_summary(summary)
    )


def test_without_the_option_nothing_is_saved(tmp_path):
    _record(tmp_path / "ledger", early=None)
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.early_checkpoint is None and "early_checkpoint" not in stage.info
    assert not (stage.dir / "early_checkpoint").exists()


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.25, math.nan, "0.25", True])
def test_an_early_checkpoint_outside_zero_one_is_refused_before_anything_is_written(tmp_path, value):
    with pytest.raises(LedgerError, match=r"early_checkpoint.*\(0, 1\).*early_checkpoint=0.25"):
        _record(tmp_path / "ledger", early=value)
    assert not (tmp_path / "ledger").exists()


def test_an_early_checkpoint_needs_num_steps_and_an_optimizer(tmp_path):
    model = _mlp()
    with pytest.raises(LedgerError, match="num_steps"):
        StageLedger(tmp_path / "a").record_stage("s", model=model, optimizer=None, early_checkpoint=0.25).begin()
    with pytest.raises(LedgerError, match="optimizer"):
        StageLedger(tmp_path / "b").record_stage("s", model=model, num_steps=8, early_checkpoint=0.25).begin()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("steps", 8, LedgerFormatError),  # not before the stage's end
        ("steps", 0, LedgerFormatError),
        ("params_delta_file", "../../elsewhere.safetensors", UnsafeInputError),
    ],
)
def test_a_tampered_early_checkpoint_entry_is_refused_on_load(tmp_path, field, value, error):
    _record(tmp_path / "ledger", steps=8, early=0.3)
    stage_json = next((tmp_path / "ledger" / "stages").glob("*/stage.json"))
    data = json.loads(stage_json.read_text())
    data["early_checkpoint"][field] = value
    stage_json.write_text(json.dumps(data))
    with pytest.raises(error, match="early_checkpoint"):
        StageLedger.load(tmp_path / "ledger")


def test_the_trainer_recorder_saves_the_early_checkpoint(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    args = F.training_args(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2)
    recorder = StageRecorder(tmp_path / "ledger", "ft", curvature_segments=0, early_checkpoint=0.5)
    model = F.gpt2()
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder]).train()
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.early_checkpoint.steps == 2
    state = stage.early_checkpoint.optimizer_state()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) <= trained and state and all(e["step"] == 2.0 and "exp_avg" in e for e in state.values())
    delta = stage.early_checkpoint.params_delta()
    assert set(delta) == set(stage.delta_names())
    with pytest.raises(LedgerError, match=r"\(0, 1\)"):
        StageRecorder(tmp_path / "ledger", "again", early_checkpoint=2)


@pytest.mark.parametrize("stop", [2, 3])
def test_a_stage_that_ends_at_its_early_step_is_recorded_without_the_checkpoint(tmp_path, stop):
    """A callback stopping training at the early step (or a best checkpoint cutting the stage there) made the end
    of ``train()`` raise LedgerFormatError — "early_checkpoint.steps in [1, 2), found 2" — and the stage was lost."""
    from transformers import Trainer, TrainerCallback

    from hf_stage_attribution import StageRecorder

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= stop

    args = F.training_args(str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2)
    recorder = StageRecorder(tmp_path / "ledger", "ft", curvature_segments=0, early_checkpoint=0.25)  # step 2
    Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(), callbacks=[recorder, StopAt()]).train()
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.num_steps == stop
    if stop == 2:  # the checkpoint would be the stage's end: none is kept, and no file of it is left behind
        assert stage.early_checkpoint is None and not (stage.dir / EARLY_DIR).exists()
    else:
        assert stage.early_checkpoint.steps == 2


@pytest.mark.parametrize("back_to", [1, 2, 3])
def test_a_resume_at_or_after_the_early_step_keeps_the_checkpoint_and_one_before_writes_it_again(tmp_path, back_to):
    """Training that resumes from a checkpoint at step ``back_to`` (the recorder's progress saved later): the early
    checkpoint (after step 2) is still the state after its steps at 2 and 3, and written again from 1. At exactly
    the early step it was deleted and never written again (``truncate`` dropped it for ``completed_steps <= 2``)."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 2
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved, at_two = {}, {}

    def step(rec, t):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
        if t + 1 == back_to:  # what a Trainer checkpoint keeps
            saved.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(opt.state_dict()))
        if t + 1 == 2:
            at_two.update({n: p.detach().clone() - start[n] for n, p in model.named_parameters()})

    with StageLedger(tmp_path / "ledger").record_stage(
        "sft", model=model, optimizer=opt, num_steps=8, early_checkpoint=0.25, curvature_segments=0
    ) as rec:
        for t in range(5):
            step(rec, t)
        model.load_state_dict(saved["model"])  # the run resumes from its checkpoint at step `back_to`
        opt.load_state_dict(saved["opt"])
        rec.truncate(back_to)
        for t in range(back_to, 8):
            step(rec, t)
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.num_steps == 8 and stage.early_checkpoint is not None and stage.early_checkpoint.steps == 2
    for name, value in stage.early_checkpoint.params_delta().items():
        torch.testing.assert_close(value, at_two[name], rtol=0, atol=0)


def test_more_steps_than_num_steps_is_said_where_segments_and_the_early_checkpoint_were_placed(tmp_path):
    """Planned 2, ran 5: the early checkpoint (after step ⌊0.25 · 2⌋ = 0 → 1) and the segments covered the first 2
    steps of 5 while stage.json said nothing (a custom loop whose num_steps was wrong)."""
    with pytest.warns(UserWarning, match=r"planned with num_steps=2 but took 5 optimizer steps"):
        _record(tmp_path / "ledger", steps=5, early=0.5, num_steps_given=2)
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert stage.num_steps == 5 and any("planned with num_steps=2 but took 5" in n for n in stage.info["notes"])
