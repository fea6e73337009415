"""Optimizer steps skipped on a mixed-precision overflow are recorded as skipped and left out of propagation.

A real Trainer run on CPU with a real ``torch.amp.GradScaler`` installed in accelerate's ``AcceleratedOptimizer`` (what
``fp16=True`` does on a GPU): at chosen steps a gradient is made infinite before the optimizer step, the scaler
skips the update, accelerate sets ``step_was_skipped`` and the Trainer does not advance the scheduler — an fp16
overflow, step for step. The model's loss is linear in its parameters, so two runs from starts ``ε·u`` apart end
``D·ε·u`` apart with ``D = Π_applied (1 − lr_t·wd)`` for SGD with weight decay: the measured ratio is the ground truth
that ``D_j`` must match.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.estimators.propagation.stage import StagePropagator

WD, LR, STEPS, SKIP = 0.5, 0.2, 6, (1, 4)  # SKIP: 0-based optimizer steps that overflow


class LinearLoss(torch.nn.Module):
    """loss = mean(x)·w: the gradient (x) does not depend on w, so parameter differences evolve linearly."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(start.clone())

    def forward(self, x):
        return {"loss": (x.mean(0) * self.w).sum()}


def _overflow_callback(skip):
    from accelerate.optimizer import patch_optimizer_step
    from transformers import TrainerCallback

    class Overflow(TrainerCallback):
        """Installs a GradScaler (scale 1) the way accelerate does for fp16, and overflows at the chosen steps."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
            optimizer.scaler.scale(torch.ones(()))  # creates the scale tensor (Trainer scales no loss on CPU)
            optimizer._accelerate_step_called = False
            optimizer._optimizer_original_step_method = optimizer.optimizer.step
            optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step in skip:
                model.w.grad[0] = float("inf")

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            optimizer.scaler.update(1.0)  # keep the scale at 1 (the loss is not scaled here)

    return Overflow()


def _train(tmp_path, tag, start, skip, ledger_dir=None):
    from transformers import Trainer, TrainingArguments

    from hf_stage_attribution import StageRecorder

    model = LinearLoss(start)
    gen = torch.Generator().manual_seed(0)
    data = [{"x": x} for x in torch.randn(STEPS * 2, 3, generator=gen)]
    args = TrainingArguments(
        str(tmp_path / f"out-{tag}"), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=LR,
        lr_scheduler_type="linear", use_cpu=True, report_to=[], disable_tqdm=True, seed=0, save_strategy="no",
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    callbacks = [_overflow_callback(skip)]
    if ledger_dir is not None:
        callbacks.append(StageRecorder(ledger_dir, "sft", curvature_segments=0))
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks, optimizers=(opt, None)).train()
    return model.w.detach().clone()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skipped")
    start = torch.tensor([1.0, -2.0, 0.5])
    u = torch.tensor([1.0, 1.0, 1.0])
    end = _train(tmp, "a", start, SKIP, ledger_dir=tmp / "ledger")
    moved = _train(tmp, "b", start + u, SKIP)  # the loss is linear: any ε is exact; 1 keeps float32 error small
    return {"ledger": StageLedger.load(tmp / "ledger"), "dir": tmp / "ledger", "ratio": moved - end}


def test_the_ledger_records_which_steps_were_skipped(run):
    (stage,) = run["ledger"].stages
    assert stage.num_steps == STEPS and stage.skipped_steps == list(SKIP)
    assert any("skipped global steps [2, 5]" in note for note in stage.info["notes"])


def test_d_j_decays_only_over_applied_steps_and_matches_the_real_runs(run):
    (stage,) = run["ledger"].stages
    applied = [row[0] for t, row in enumerate(stage.learning_rates) if t not in SKIP]
    expected = math.prod(1 - lr * WD for lr in applied)
    everything = math.prod(1 - row[0] * WD for row in stage.learning_rates)
    measured = run["ratio"]
    d_j = StagePropagator(stage).factor("w")
    print(f"measured {measured[0].item():.6f}  D_j {d_j:.6f}  (all recorded steps: {everything:.6f})")
    torch.testing.assert_close(measured, torch.full((3,), expected), atol=1e-5, rtol=0)
    assert d_j == pytest.approx(expected, abs=1e-9)
    assert abs(everything - expected) > 0.05  # what counting the skipped steps would have given


def test_old_ledgers_without_the_field_read_as_all_steps_applied(run, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(run["dir"], copy)
    (stage_json,) = copy.glob("stages/*/stage.json")
    info = json.loads(stage_json.read_text())
    info.pop("skipped_steps")
    stage_json.write_text(json.dumps(info))
    (stage,) = StageLedger.load(copy).stages
    assert stage.skipped_steps == [] and stage.applied_learning_rates() == stage.learning_rates
    assert StagePropagator(stage).factor("w") == pytest.approx(math.prod(1 - r[0] * WD for r in stage.learning_rates))


def test_a_custom_loop_can_say_a_step_was_skipped(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    ledger = StageLedger(tmp_path / "l")
    with ledger.record_stage("a", model=model, optimizer=opt) as rec:
        for t in range(3):
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            if t != 1:
                opt.step()
            rec.step(skipped=t == 1)
    (stage,) = ledger.stages
    assert stage.skipped_steps == [1] and len(stage.learning_rates) == 3
    assert StagePropagator(stage).factor("weight") == pytest.approx(0.95**2)
