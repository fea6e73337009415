"""A stage trained with an optimizer or scheduler given to the Trainer, or whose learning rates a callback changed.

A Trainer replay rebuilds the optimizer and schedule from the recorded ``TrainingArguments``: such a stage replayed
silently with AdamW and the default schedule (an SGD stage missed θ_K by 0.026, 44 % of its largest update), and every
estimate checked against that replay was checked against a wrong answer. Now the recorder notes it, replay refuses it
up front, and every replay checks the optimizer and the applied learning rates against the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.estimators.replay import replay_data_problem, replay_model
from hf_stage_attribution.integrations.replay import replay_trainer_stage


def _train(out: Path, ledger: Path, *, optimizers=None, lr_callback=False, model=None, name="sft", **kwargs):
    from transformers import Trainer, TrainerCallback

    class HalveEveryStep(TrainerCallback):  # changes the learning rate outside the scheduler
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            for group in optimizer.param_groups:
                group["lr"] *= 0.5

    model = model or F.gpt2()
    args = F.training_args(str(out), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=4)
    callbacks = [StageRecorder(ledger, name, save_replay_data=True)] + ([HalveEveryStep()] if lr_callback else [])
    if optimizers == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kwargs["optimizers"] = (opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(32), callbacks=callbacks, **kwargs).train()
    return model


def _forget_the_note(ledger_dir: Path) -> None:
    """What a ledger written before the recorder noted it looks like."""
    path = sorted(ledger_dir.glob("stages/*/stage.json"))[-1]
    info = json.loads(path.read_text())
    info["trainer"].pop("optimizer_given")
    info["notes"] = [n for n in info["notes"] if "a Trainer replay would rebuild" not in n]
    path.write_text(json.dumps(info))


def _start(ledger: StageLedger):
    model = F.gpt2()
    model.load_state_dict({k: v.clone() for k, v in ledger.initial_state().items()}, strict=False)
    return model


@pytest.mark.parametrize("given", ["optimizers", "optimizer_cls_and_kwargs"])
def test_a_given_optimizer_is_noted_and_replay_refuses_it_up_front(tmp_path, given):
    kwargs = (
        {"optimizers": "sgd"}
        if given == "optimizers"
        else {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})}
    )
    model = _train(tmp_path / "pre", tmp_path / "ledger", name="pre")  # the Trainer built its own optimizer
    _train(tmp_path / "out", tmp_path / "ledger", model=model, **kwargs)
    stage = StageLedger.load(tmp_path / "ledger").stages[1]
    assert f"Trainer({given}" in stage.info["trainer"]["optimizer_given"]
    assert any("a Trainer replay would rebuild the optimizer" in n for n in stage.info["notes"])
    assert "stage_fns={'sft': fn}" in replay_data_problem(stage)
    behavior = lambda m: m(input_ids=torch.arange(8)[None]).logits[0, -1, :3]  # noqa: E731
    attributor = StageAttributor(tmp_path / "ledger", model, show_progress=False)
    with pytest.raises(ReplayError, match=rf"Trainer\({given}.*stage_fns="):  # before any work
        attributor.attribute({"logits": behavior}, validate=True)
    report = attributor.attribute({"logits": behavior})  # `auto` does not pick an estimator that replays it
    assert "replay" not in report.estimator


def test_replay_checks_the_optimizer_where_the_ledger_does_not_say(tmp_path):
    model = _train(tmp_path / "out", tmp_path / "ledger", optimizers="sgd")
    _forget_the_note(tmp_path / "ledger")
    ledger = StageLedger.load(tmp_path / "ledger")
    assert replay_data_problem(ledger.stages[0]) is None
    with pytest.raises(
        ReplayError, match=r"does not run the recorded optimizer: the optimizer is AdamW, recorded SGD"
    ):
        replay_model(ledger, model, None)


def test_replay_checks_the_applied_learning_rates(tmp_path):
    _train(tmp_path / "out", tmp_path / "ledger", lr_callback=True)
    ledger = StageLedger.load(tmp_path / "ledger")
    with pytest.raises(ReplayError, match=r"does not apply the recorded learning rates: at step 0"):
        replay_trainer_stage(ledger.stages[0], _start(ledger))


def test_a_stage_the_trainer_built_itself_replays_exactly_under_the_check(tmp_path):
    model = _train(tmp_path / "out", tmp_path / "ledger")
    ledger = StageLedger.load(tmp_path / "ledger")
    assert "optimizer_given" not in ledger.stages[0].info["trainer"]
    replayed = replay_trainer_stage(ledger.stages[0], _start(ledger))
    for name, param in model.named_parameters():
        torch.testing.assert_close(dict(replayed.named_parameters())[name], param, atol=1e-7, rtol=0)
