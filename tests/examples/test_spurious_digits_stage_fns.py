"""The spurious-digits stage functions in the forms partial and strided replay use (``estimators.replay``): the
step-limited form is the first ``m`` steps of the whole recipe, the gradient-reuse form re-uses every ``s``-th
gradient with the batch order unchanged, and ``run_stage`` reads the optimizer state they return."""

from __future__ import annotations

import torch

from hf_stage_attribution.estimators.replay import run_stage, takes_grad_every, takes_max_steps
from hf_stage_attribution.examples.spurious_digits import DigitsStage, _HFLike, _replayer, train_stage


def _stage(steps: int) -> DigitsStage:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(32, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    return DigitsStage("s", "custom", images, labels, steps, 1e-2, 4, 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _HFLike(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_step_limited_form_is_the_first_steps_of_the_whole_recipe():
    fn = _replayer(_stage(6))
    assert takes_max_steps(fn) and takes_grad_every(fn)
    limited, _ = fn(_model(), max_steps=3)
    short = _model()
    train_stage(short, _stage(3))  # the same recipe (constant rate, same batch order), three steps long
    whole, _ = fn(_model())
    assert _same(limited, short) and not _same(limited, whole)


def test_the_gradient_reuse_form_takes_every_step_with_fewer_gradients():
    fn = _replayer(_stage(6))
    plain, opt = fn(_model())
    once, _ = fn(_model(), grad_every=1)
    reused, reused_opt = fn(_model(), grad_every=3)
    assert _same(plain, once) and not _same(plain, reused)
    steps = {int(s["step"]) for s in reused_opt.state.values()}
    assert steps == {6} == {int(s["step"]) for s in opt.state.values()}  # every optimizer step ran


def test_run_stage_reads_the_optimizer_state_of_a_step_limited_run(tmp_path):
    from hf_stage_attribution import StageLedger

    ledger = StageLedger(tmp_path / "ledger")
    train_stage(_model(), _stage(6), ledger)  # recorded as the recipe records it
    model, state = run_stage(ledger.stages[0], _model(), {"s": _replayer(_stage(6))}, {}, max_steps=2)
    assert set(state) == {"inner.1.weight", "inner.1.bias"} and int(state["inner.1.weight"]["step"]) == 2
