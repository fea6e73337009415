"""Small recorded pipelines shared by the replaying estimators' tests (partial and strided replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger
from hf_stage_attribution.testing.digits import build_digits_pipeline


def small_digits(root: Path) -> Any:
    """``{config: pipeline}``: a small 3-stage digits pipeline per configuration (AdamW + warmup/decay; SGD
    momentum/nesterov + decay), under ``root/<config>``."""
    return {
        config: build_digits_pipeline(config, root / config, seed=0, steps_scale=0.1, base_steps_scale=0.1)
        for config in ("hf", "decay")
    }


def count_stage_runs(monkeypatch: Any, module: Any) -> list[str]:
    """The names of the stages ``module.run_stage`` re-runs from now on (``monkeypatch`` wraps it), in order."""
    ran: list[str] = []
    run_stage = module.run_stage

    def counted(stage: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append(stage.name)
        return run_stage(stage, *args, **kwargs)

    monkeypatch.setattr(module, "run_stage", counted)
    return ran


def assert_same_effects(result: Any, truth: Any, rtol: float, atol: float) -> None:
    """Every stage's per-example effects of ``result`` equal ``truth``'s (e.g. a replaying estimate at budget 1 and
    replay) within ``rtol``/``atol``."""
    for stage in truth.per_example:
        torch.testing.assert_close(result.per_example[stage], truth.per_example[stage], rtol=rtol, atol=atol)


def joint(pipe: Any) -> Any:
    """Three of the digits behaviors concatenated into one."""
    parts = [pipe.behaviors[n] for n in ("patch_gap", "margin_7", "loss_unseen")]
    return lambda model: torch.cat([b(model) for b in parts])


def trainer_stages(root: Path, names: tuple[str, ...]) -> tuple[Any, Any, Any]:
    """Trainer stages ``names`` (6 steps each, warmup + linear decay, AdamW) of a tiny GPT-2, recorded with replay
    data under ``root``; returns ``(ledger, final model, a log-probability behavior)``."""
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    model = F.gpt2()
    for i, name in enumerate(names):
        args = F.training_args(str(root / name), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                               lr_scheduler_type="linear", warmup_steps=2, seed=i)  # fmt: skip
        recorder = StageRecorder(root / "ledger", name, save_replay_data=True, curvature_segments=0)
        Trainer(model=model, args=args, train_dataset=F.lm_dataset(seed=i), callbacks=[recorder]).train()
    ids = torch.tensor([[1, 5, 9, 12, 7], [3, 4, 8, 2, 6]])

    def behavior(m):
        return torch.log_softmax(m(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum((1, 2))

    model.eval()
    return StageLedger.load(root / "ledger"), model, behavior
