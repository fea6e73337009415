"""Recording never perturbs training: with the recorder attached (curvature capture, replay data, a stage
boundary) the final parameters and the RNG state are bit-identical to a run without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger  # noqa: E402


def _train_trainer(out: Path, recorder) -> tuple[dict, torch.Tensor]:
    from transformers import Trainer

    torch.manual_seed(1234)  # the same global RNG state before each run
    model = F.gpt2()
    args = F.training_args(
        str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
        max_grad_norm=0.5,
    )
    callbacks = [recorder] if recorder is not None else []
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=callbacks).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, torch.random.get_rng_state()


def _train_sft(out: Path, recorder) -> tuple[dict, torch.Tensor]:
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(1234)
    model = F.gpt2()
    args = F.trl_args(SFTConfig, str(out), max_steps=4, per_device_train_batch_size=4, max_length=32)
    callbacks = [recorder] if recorder is not None else []
    SFTTrainer(
        model=model, args=args, train_dataset=F.sft_dataset(), processing_class=F.tokenizer(), callbacks=callbacks
    ).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, torch.random.get_rng_state()


@pytest.mark.parametrize("train", [_train_trainer, _train_sft], ids=["Trainer", "SFTTrainer"])
def test_recorder_leaves_training_bit_identical(tmp_path, train):
    from hf_stage_attribution import StageRecorder

    plain, rng_plain = train(tmp_path / "plain", None)
    recorder = StageRecorder(
        tmp_path / "ledger",
        "stage",
        save_replay_data=True,
        curvature_segments=3,
        curvature_examples=16,
        stage_boundaries={"late": 3},
    )
    recorded, rng_recorded = train(tmp_path / "recorded", recorder)
    assert plain.keys() == recorded.keys()
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name
    assert torch.equal(rng_plain, rng_recorded)  # no extra RNG draws
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [s.name for s in ledger.stages] == ["stage", "late"]
    assert sum(seg.num_examples for s in ledger.stages for seg in s.segments) > 0
