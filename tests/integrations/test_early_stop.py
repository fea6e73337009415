"""A stage that takes fewer optimizer steps than planned (an early-stopping callback, a ``break`` in a custom loop,
a run resumed after ``max_steps`` was raised), and stages that take none.

Its curvature segments were planned over the planned steps and written as planned: the stage failed the check
every reader makes (``step_end <= num_steps``) after ``ledger.json`` already listed it, so the whole ledger,
earlier stages included, could not be opened any more."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger, StageRecorder
from hf_stage_attribution.errors import LedgerError, LedgerFormatError
from tests.helpers.tiny import linear_ledger


def _train(out: Path, ledger: Path, name: str, max_steps: int, stop_at: int | None = None, model=None, **kwargs):
    from transformers import Trainer, TrainerCallback

    class Stop(TrainerCallback):  # what EarlyStoppingCallback does
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == stop_at:
                control.should_training_stop = True

    eval_dataset = kwargs.pop("eval_dataset", None)
    best = {"eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
            "learning_rate": 5e-2, "load_best_model_at_end": True, "metric_for_best_model": "loss",
            "greater_is_better": True}  # fmt: skip
    kwargs = {**(best if eval_dataset is not None else {"learning_rate": 1e-3}), **kwargs}
    args = F.training_args(str(out), per_device_train_batch_size=4, max_steps=max_steps, **kwargs)
    callbacks = [StageRecorder(ledger, name, save_replay_data=eval_dataset is not None), Stop()]
    trainer = Trainer(model=model or F.gpt2(), args=args, train_dataset=F.lm_dataset(64), eval_dataset=eval_dataset,
                      callbacks=callbacks)  # fmt: skip
    trainer.train()
    return trainer


def test_a_stage_stopped_early_by_a_callback_is_recorded_with_its_segments_cut(tmp_path):
    ledger_dir = tmp_path / "ledger"
    model = _train(tmp_path / "a", ledger_dir, "pre", max_steps=12).model
    # the second stage stops early: the first must survive it
    _train(tmp_path / "b", ledger_dir, "sft", max_steps=12, stop_at=7, model=model)
    ledger = StageLedger(ledger_dir)
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("pre", 12), ("sft", 7)]
    segments = json.loads((ledger.stages[1].dir / "stage.json").read_text())["segments"]
    assert segments and all(s["step_start"] <= s["mid_step"] < s["step_end"] <= 7 for s in segments)
    assert max(s["step_end"] for s in segments) == 7  # the segment the stop cut keeps its material


def test_a_custom_loop_that_breaks_early_gives_a_readable_stage(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = StageLedger(tmp_path / "ledger")
    with ledger.record_stage("anneal", model=model, optimizer=opt, num_steps=12, loss_fn=(lambda m, b: m(b[0]),
                             lambda out, b: torch.nn.functional.cross_entropy(out, b[1]))) as rec:  # fmt: skip
        for t in range(12):
            if t == 7:
                break
            batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()
            rec.step(batch)
    stage = StageLedger(ledger.dir).stages[0]
    assert stage.num_steps == 7 and all(s.step_end <= 7 for s in stage.segments)


def test_a_stage_that_fails_the_readers_checks_is_not_listed(tmp_path):
    """Defence in depth: the index lists a stage only after it passed the checks every reader makes."""
    ledger, _ = linear_ledger(tmp_path / "ledger", ("a",))
    bad = ledger.dir / "stages" / "001-b"
    bad.mkdir()
    info = json.loads((ledger.stages[0].dir / "stage.json").read_text())
    info.update(index=1, name="b", num_steps=1, segments=[{"index": 0, "step_start": 0, "step_end": 5, "mid_step": 2}])
    (bad / "stage.json").write_text(json.dumps(info))
    before = (ledger.dir / "ledger.json").read_bytes()
    with pytest.raises(LedgerFormatError, match="was not added to .*--remove-incomplete"):
        ledger._append_stage("001-b", "b", "fine-tuning", "x", "y", {})
    assert (ledger.dir / "ledger.json").read_bytes() == before
    assert [s.name for s in StageLedger(ledger.dir).stages] == ["a"]
    assert StageLedger(ledger.dir).incomplete_stages() == [bad]


def test_a_stage_without_optimizer_steps_says_so(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = StageLedger(tmp_path / "ledger")
    zero_steps = r"'nothing' ended after 0 optimizer steps .* no parameter changed"
    with pytest.warns(UserWarning, match=zero_steps), ledger.record_stage("nothing", model=model, optimizer=opt):
        pass
    no_step = r"takes no optimizer step \(max_steps = 0.*nothing is recorded for stage 'z'"
    with pytest.warns(UserWarning, match=no_step):
        from transformers import Trainer

        args = F.training_args(str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=0)
        Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(8),
                callbacks=[StageRecorder(tmp_path / "l2", "z")]).train()  # fmt: skip
    assert not (tmp_path / "l2" / "ledger.json").exists()


def test_resuming_a_finished_stage_after_raising_max_steps_names_the_way_out(tmp_path):
    ledger_dir, out = tmp_path / "ledger", tmp_path / "out"
    _train(out, ledger_dir, "pre", max_steps=4, save_strategy="steps", save_steps=4)
    from transformers import Trainer

    def resume(name: str) -> None:
        args = F.training_args(str(out), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=8,
                               save_strategy="no")  # fmt: skip
        trainer = Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(64),
                          callbacks=[StageRecorder(ledger_dir, name)])  # fmt: skip
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))

    with pytest.raises(LedgerError, match=r"'pre' .* finished after 4 step\(s\).*'pre-continued'"):
        resume("pre")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume("pre-continued")
    assert any("where the ledger's last stage 'pre' ends" in str(w.message) for w in caught)
    ledger = StageLedger(ledger_dir)
    assert [(s.name, s.num_steps) for s in ledger.stages] == [("pre", 4), ("pre-continued", 4)]


def test_a_stage_that_loads_its_best_checkpoint_at_the_end_ends_at_that_step(tmp_path):
    """``load_best_model_at_end``: the stage's parameters are its best checkpoint's (here step 2 of 6: the metric
    prefers the highest loss), so it is recorded as its first 2 steps and a replay stops there (it ran all 6 and
    missed θ_K by 90 % of the largest update)."""
    from hf_stage_attribution.estimators.replay import replay_model

    ledger_dir = tmp_path / "ledger"
    trainer = _train(tmp_path / "a", ledger_dir, "sft", max_steps=6, eval_dataset=F.lm_dataset(16, seed=2))
    assert trainer.state.best_global_step == 2
    stage = StageLedger.load(ledger_dir).stages[0]
    assert stage.num_steps == 2 and len(stage.learning_rates) == 2
    assert any("loaded its best checkpoint (global step 2 of 6)" in note for note in stage.info["notes"])
    assert json.loads((stage.replay_dir / "replay.json").read_text())["stage_steps"] == [0, 2]
    replayed = replay_model(StageLedger.load(ledger_dir), trainer.model, None)
    gap = max((p - q).abs().max().item() for p, q in zip(replayed.parameters(), trainer.model.parameters()))
    assert gap < 1e-6, gap
