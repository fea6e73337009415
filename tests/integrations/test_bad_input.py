"""Bad input to StageRecorder: an optimizer the estimators do not support, another model's ledger, bad
boundaries, a second train() on a finished recorder — each a recorded warning or a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger  # noqa: E402
from hf_stage_attribution.errors import LedgerError, LedgerMismatchError  # noqa: E402


@pytest.mark.parametrize("how", ["optim=adafactor", "torch Adamax"])
def test_unsupported_optimizer_gives_a_recorded_warning_naming_it(tmp_path, how):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    model = F.gpt2()
    recorder = StageRecorder(tmp_path / "ledger", "odd")
    if how == "torch Adamax":
        args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8)
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
        trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder],
                          optimizers=(optimizer, None))  # fmt: skip
        expected = "Adamax"
    else:
        args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, optim="adafactor")
        trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder])
        expected = "Adafactor"
    with pytest.warns(UserWarning, match=f"Optimizer '{expected}' is not one the estimators support"):
        trainer.train()
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    assert stage.optimizer["type"] == expected
    assert any(f"Optimizer '{expected}'" in note for note in stage.info["notes"])


def test_supported_optimizer_records_no_warning(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, optim="sgd")
    model = F.gpt2()
    recorder = StageRecorder(tmp_path / "ledger", "sgd", trainer_class="my_lab.trainers.CurriculumTrainer")
    trainer = Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "estimators support" in str(w.message)]
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    assert stage.optimizer["type"] == "SGD" and stage.info["notes"] == []
    assert (
        stage.info["trainer"]["class"] == "CurriculumTrainer" and stage.info["trainer"]["module"] == "my_lab.trainers"
    )
    assert not model._forward_pre_hooks  # the recorder's hook is gone after training


def test_another_models_ledger_is_refused_and_left_intact(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8)
    Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(),
            callbacks=[StageRecorder(tmp_path / "ledger", "a")]).train()  # fmt: skip
    bigger = F.gpt2(n_embd=48)
    trainer = Trainer(model=bigger, args=args, train_dataset=F.lm_dataset(),
                      callbacks=[StageRecorder(tmp_path / "ledger", "b")])  # fmt: skip
    with pytest.raises(LedgerMismatchError, match="ledger.json"):
        trainer.train()
    assert [s.name for s in StageLedger.load(tmp_path / "ledger").stages] == ["a"]
    assert not (tmp_path / "ledger" / "ledger.lock").exists()


def test_bad_boundaries_and_a_second_train_call_are_clear_errors(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    with pytest.raises(LedgerError, match=r"stage_boundaries\['late'\]"):
        StageRecorder(tmp_path / "ledger", "s", stage_boundaries={"late": -3})
    with pytest.raises(LedgerError, match="distinct stage names"):
        StageRecorder(tmp_path / "ledger", "s", stage_boundaries={"s": 3})
    recorder = StageRecorder(tmp_path / "ledger", "s")
    args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8)
    trainer = Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(), callbacks=[recorder])
    trainer.train()
    with pytest.raises(LedgerError, match="create a new StageRecorder"):
        trainer.train()
    assert [s.name for s in StageLedger.load(tmp_path / "ledger").stages] == ["s"]
