"""Several stages inside one Trainer run, and resuming an interrupted run from a Trainer checkpoint."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger  # noqa: E402
from hf_stage_attribution.errors import LedgerError  # noqa: E402


class _Crash(Exception):
    pass


def _run(out: Path, ledger: Path, *, crash_at=None, resume=None, boundaries=None, save_steps=4):
    from transformers import Trainer, TrainerCallback

    from hf_stage_attribution import StageRecorder

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == crash_at:
                raise _Crash(f"simulated crash after step {crash_at}")

    model = F.gpt2()
    args = F.training_args(
        str(out),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )
    recorder = StageRecorder(ledger, "main", curvature_segments=2, curvature_examples=8, stage_boundaries=boundaries)
    callbacks = [recorder] + ([CrashAt()] if crash_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=callbacks)
    with contextlib.suppress(_Crash):
        trainer.train(resume_from_checkpoint=resume)
    return model


def _assert_same_ledger(a: StageLedger, b: StageLedger) -> None:
    assert [(s.name, s.kind, s.num_steps, s.optimizer_state_policy) for s in a.stages] == [
        (s.name, s.kind, s.num_steps, s.optimizer_state_policy) for s in b.stages
    ]
    for sa, sb in zip(a.stages, b.stages):
        assert sa.learning_rates == sb.learning_rates  # exactly
        da, db = sa.delta(), sb.delta()
        assert set(da) == set(db)
        for name in da:
            torch.testing.assert_close(da[name], db[name], atol=1e-6, rtol=0)
        assert [(g.step_start, g.mid_step, g.step_end) for g in sa.segments] == [
            (g.step_start, g.mid_step, g.step_end) for g in sb.segments
        ]
        for ga, gb in zip(sa.segments, sb.segments):
            for name, value in ga.params_delta().items():
                torch.testing.assert_close(value, gb.params_delta()[name], atol=1e-6, rtol=0)
        state_a, state_b = sa.optimizer_state_at_start(), sb.optimizer_state_at_start()
        assert (state_a is None) == (state_b is None)
        for key in state_a or {}:
            for name in state_a[key]:
                torch.testing.assert_close(state_a[key][name], state_b[key][name], atol=1e-7, rtol=0)


def test_stage_boundaries_split_one_run_and_keep_the_optimizer_state(tmp_path):
    whole = _run(tmp_path / "a", tmp_path / "one", save_steps=0)
    split = _run(tmp_path / "b", tmp_path / "two", boundaries={"anneal": 5}, save_steps=0)
    for p, q in zip(whole.parameters(), split.parameters()):
        assert torch.equal(p, q)  # recording (and splitting) never changes training
    one, two = StageLedger.load(tmp_path / "one"), StageLedger.load(tmp_path / "two")
    assert [(s.name, s.num_steps, s.optimizer_state_policy) for s in two.stages] == [
        ("main", 5, "fresh"),
        ("anneal", 3, "continued"),
    ]
    assert two.stages[0].learning_rates + two.stages[1].learning_rates == one.stages[0].learning_rates
    state = two.stages[1].optimizer_state_at_start()
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(state) and float(state["step"]["transformer.wte.weight"]) == 5.0
    for name, delta in one.stages[0].delta().items():
        torch.testing.assert_close(two.stages[0].delta_tensor(name) + two.stages[1].delta_tensor(name), delta)
    assert two.stages[1].info["source"]["run_steps"] == [5, 8]


@pytest.mark.parametrize("boundaries", [None, {"anneal": 5}], ids=["one-stage", "two-stages"])
def test_resumed_run_records_the_same_ledger_as_an_uninterrupted_one(tmp_path, boundaries):
    reference = _run(tmp_path / "a", tmp_path / "ledger_a", boundaries=boundaries)
    _run(tmp_path / "b", tmp_path / "ledger_b", crash_at=6, boundaries=boundaries)
    interrupted = StageLedger(tmp_path / "ledger_b")
    assert len(interrupted.stages) == (1 if boundaries else 0) and interrupted.incomplete_stages()
    # A checkpoint exists at the stage boundary (StageRecorder asks the Trainer to save there).
    checkpoint = "checkpoint-5" if boundaries else "checkpoint-4"
    assert (tmp_path / "b" / checkpoint).is_dir()
    resumed = _run(
        tmp_path / "b", tmp_path / "ledger_b", resume=str(tmp_path / "b" / checkpoint), boundaries=boundaries
    )
    for p, q in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    ledger_b = StageLedger.load(tmp_path / "ledger_b")
    _assert_same_ledger(StageLedger.load(tmp_path / "ledger_a"), ledger_b)
    assert not ledger_b.incomplete_stages()
    assert any("Resumed from a Trainer checkpoint" in n for n in ledger_b.stages[-1].info["notes"])


def test_resuming_before_a_finished_boundary_is_refused(tmp_path):
    _run(tmp_path / "b", tmp_path / "ledger", crash_at=6, boundaries={"anneal": 5})
    with pytest.raises(LedgerError, match="checkpoint-5"):
        _run(
            tmp_path / "b", tmp_path / "ledger", resume=str(tmp_path / "b" / "checkpoint-4"), boundaries={"anneal": 5}
        )
    assert [s.name for s in StageLedger.load(tmp_path / "ledger").stages] == ["main"]


def test_resume_without_recorded_progress_records_the_gap_as_untracked(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    model = F.gpt2()
    args = F.training_args(
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2
    )
    Trainer(model=model, args=args, train_dataset=F.lm_dataset()).train()  # checkpoints, but nothing recorded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder = StageRecorder(tmp_path / "ledger", "late")
        trainer = Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(), callbacks=[recorder])
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("late", 2)]
    assert any("holds 0 of its 2 completed steps: they are not recorded" in str(w.message) for w in caught)
    assert "holds 0 of its 2" in ledger.stages[0].info["notes"][-1]


def test_training_stopped_at_a_stage_boundary_records_no_empty_stage_and_a_resume_records_it(tmp_path):
    """A stop exactly at a ``stage_boundaries`` step committed an empty next stage (0 steps, zero delta) with a
    warning to call ``rec.step()``, and its name then refused a resume from the boundary's checkpoint."""
    from transformers import Trainer, TrainerCallback

    from hf_stage_attribution import StageRecorder

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = control.should_training_stop or state.global_step >= 5
            return control

    def trainer(model, callbacks):
        args = F.training_args(str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8,
                               learning_rate=1e-2, save_strategy="steps", save_steps=5)  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=callbacks)

    model = F.gpt2()
    recorder = StageRecorder(tmp_path / "ledger", "main", curvature_segments=0, stage_boundaries={"anneal": 5})
    with pytest.warns(UserWarning, match=r"stopped at the boundary of stage 'anneal' \(global step 5\)"):
        trainer(model, [recorder, StopAt5()]).train()
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("main", 5)]
    assert (
        not list((tmp_path / "ledger" / "stages").glob(".partial-*"))
        and not (tmp_path / "ledger" / "ledger.lock").exists()
    )
    resumed = F.gpt2()
    recorder = StageRecorder(tmp_path / "ledger", "main", curvature_segments=0, stage_boundaries={"anneal": 5})
    trainer(resumed, [recorder]).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("main", 5), ("anneal", 3)]
    final = ledger.final_state()
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(final[name], param.detach(), atol=1e-6, rtol=0)


def test_a_recorder_whose_train_raised_is_released_in_a_process_that_goes_on(tmp_path):
    """In a notebook the crashed Trainer and its recorder stay referenced, so the ledger stayed locked; the messages
    told a Trainer user to leave a `with` block they do not have, and another process to delete a live lock."""
    import json
    import os
    import socket

    from transformers import Trainer, TrainerCallback

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.errors import LedgerLockedError
    from hf_stage_attribution.ledger.storage import DirectoryLock, lock_holder

    class CrashAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash("simulated crash")

    model = F.gpt2()
    args = F.training_args(str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8, save_strategy="steps",
                           save_steps=2)  # fmt: skip
    recorder = StageRecorder(tmp_path / "ledger", "main", curvature_segments=0)
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder, CrashAt3()])
    with contextlib.suppress(_Crash):
        trainer.train()
    with pytest.raises(LedgerLockedError, match=r"a StageRecorder whose train\(\) raised: call its release\(\)"):
        StageLedger(tmp_path / "ledger").record_stage("other", model=model).begin()
    from hf_stage_attribution.cli.inspect_cmd import _leftovers_text

    assert "its StageRecorder's release() frees the lock" in _leftovers_text(StageLedger(tmp_path / "ledger"))
    recorder.release()
    assert lock_holder(tmp_path / "ledger") is None  # freed, and the partial stage is kept for a resume
    assert list((tmp_path / "ledger" / "stages").glob(".partial-*-main"))
    recorder = StageRecorder(tmp_path / "ledger", "main", curvature_segments=0)
    resumed = F.gpt2()
    Trainer(model=resumed, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
    )
    assert [(s.name, s.num_steps) for s in StageLedger.load(tmp_path / "ledger").stages] == [("main", 8)]
    # a lock of a live process on this host (the test runner's parent): not "delete it", but where to release it
    other = tmp_path / "locked"
    other.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "since": 0.0, "purpose": "recording stage 'x'"}
    (other / "ledger.lock").write_text(json.dumps({**holder, "token": "t"}))
    with pytest.raises(LedgerLockedError, match=r"is running: if it is a notebook or script whose train\(\) raised"):
        DirectoryLock(other, "test").acquire()


def test_a_best_checkpoint_at_a_stage_boundary_drops_the_later_stage(tmp_path):
    """``load_best_model_at_end`` picking the boundary's checkpoint discards the later stage's whole update: it was
    recorded with its learning rates, curvature segments and a zero delta, describing a trajectory that is gone."""
    from transformers import Trainer, TrainerCallback

    from hf_stage_attribution import StageRecorder

    class EarliestIsBest(TrainerCallback):  # a metric that makes the first evaluation (step 4) the best
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_earliness"] = -float(state.global_step)
            return control

    args = F.training_args(str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
                           eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                           load_best_model_at_end=True, metric_for_best_model="earliness",
                           greater_is_better=True)  # fmt: skip
    model = F.gpt2()
    recorder = StageRecorder(tmp_path / "ledger", "main", curvature_segments=0, stage_boundaries={"anneal": 4})
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), eval_dataset=F.lm_dataset(8, seed=2),
                      callbacks=[EarliestIsBest(), recorder])  # fmt: skip
    with pytest.warns(UserWarning, match=r"best checkpoint \(global step 4.*the start of stage 'anneal'"):
        trainer.train()
    assert trainer.state.best_global_step == 4
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("main", 4)]
    final = ledger.final_state()
    for name, param in model.named_parameters():
        torch.testing.assert_close(final[name], param.detach(), atol=1e-6, rtol=0)
