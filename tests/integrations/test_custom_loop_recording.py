"""Custom-loop recording (``ledger.record_stage``) with real Accelerate and real torch optimizers.

Pins what an audit of custom loops found: gradient-accumulation micro-batches are not optimizer steps; the order of
``rec.step()`` and ``optimizer.zero_grad()`` does not change which tensors the stage records as never stepped;
``step()``/``end()`` outside a begun stage and a second ``begin()`` raise clear errors; an optimizer that does not
train the model is refused before anything is written; the scheduler is recorded; the README's size sentence counts
a continued optimizer's state.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError, LedgerLockedError
from tests.helpers.tiny import TwoLinear

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def accelerate_state():
    """accelerate keeps process-wide singletons: start from a clean one and leave none behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --- 1. gradient accumulation ---------------------------------------------------------------------------------------


def test_accumulation_micro_batches_are_not_optimizer_steps(tmp_path, accelerate_state):
    """The README's loop under ``accelerator.accumulate`` (rec.step after every opt.step): 8 micro-batches with
    gradient_accumulation_steps=2 are 4 optimizer steps, each recorded once with the rate it applied; the curvature
    segments planned for 4 steps are all reached, and each keeps both micro-batches of its step.
    (Before the fix: num_steps 8, every rate twice, half the segments.)"""
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    applied, moves = [], 0
    ledger = StageLedger(tmp_path / "ledger")
    with ledger.record_stage("acc", model=model, optimizer=opt, scheduler=sched, loss_fn=loss_fn, num_steps=4,
                             curvature_segments=2, curvature_examples=64) as rec:  # fmt: skip
        for x, y in loader:
            with acc.accumulate(model):
                before = [p.detach().clone() for p in model.parameters()]
                acc.backward(loss_fn(model, (x, y)))
                opt.step()
                if acc.sync_gradients:
                    applied.append([g["lr"] for g in opt.param_groups])
                moves += any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
                rec.step((x, y))
                sched.step()
                opt.zero_grad()
    stage = StageLedger.load(tmp_path / "ledger").stages[0]
    assert moves == 4 and len(applied) == 4  # the real optimizer steps
    assert stage.num_steps == 4
    assert stage.learning_rates == applied == [[0.1], [0.05], [0.1 / 3], [0.025]]
    assert [s.step_end for s in stage.segments] == [2, 4]  # both planned segments reached
    assert [s.num_examples for s in stage.segments] == [8, 8]  # 2 steps x 2 micro-batches x 2 rows each
    final = {n: p.detach() for n, p in acc.unwrap_model(model).named_parameters()}
    recorded = StageLedger.load(tmp_path / "ledger").state_at(0)
    assert all(torch.allclose(recorded[n], final[n], atol=1e-6) for n in final)


# --- 2. rec.step() before or after zero_grad ------------------------------------------------------------------------


def _two_stage(tmp_path, tag: str, zero_grad_first: bool, continued: bool, opt_cls=torch.optim.AdamW, **kw):
    """Stage s1 trains ``a`` and ``b``; stage s2 trains only ``a`` (``b`` gets no gradient, so torch skips it: no
    update, no weight decay). ``zero_grad_first``: the README's old order (zero_grad, then rec.step)."""
    torch.manual_seed(0)
    model, x = TwoLinear(), torch.randn(8, 3)
    ledger = StageLedger(tmp_path / tag)
    o1 = opt_cls(model.parameters(), lr=0.1, **kw)
    with ledger.record_stage("s1", model=model, optimizer=o1) as rec:
        for _ in range(3):
            model(x).pow(2).mean().backward()
            o1.step()
            rec.step()
            o1.zero_grad()
    o2 = o1 if continued else opt_cls(model.parameters(), lr=0.1, **kw)
    with ledger.record_stage("s2", model=model, optimizer=o2) as rec:
        for _ in range(4):
            model.a(x).pow(2).mean().backward()
            o2.step()
            if zero_grad_first:
                o2.zero_grad()
                rec.step()
            else:
                rec.step()
                o2.zero_grad()
    return StageLedger.load(tmp_path / tag).stages[1]


@pytest.mark.parametrize("continued", [False, True], ids=["fresh-optimizer", "continued-optimizer"])
def test_unstepped_parameters_do_not_depend_on_zero_grad_order(tmp_path, continued):
    """Both call orders record ``b`` as never stepped in s2, so propagation applies no AdamW decay to it (before the
    fix, zero_grad first lost the list: aa-linear decayed ``b``, -0.190 instead of the exact -0.259 in the audit)."""
    readme = _two_stage(tmp_path, "old-order", zero_grad_first=True, continued=continued, weight_decay=0.5)
    fixed = _two_stage(tmp_path, "new-order", zero_grad_first=False, continued=continued, weight_decay=0.5)
    assert fixed.unstepped_parameters == ["b.weight"]
    assert readme.unstepped_parameters == fixed.unstepped_parameters
    assert readme.optimizer_state_policy == ("continued" if continued else "fresh")


def test_without_gradients_or_optimizer_state_nothing_is_claimed(tmp_path):
    """SGD without momentum keeps no per-parameter state: after zero_grad the recorder knows nothing of which tensor
    was stepped, and lists none (as before) rather than guessing."""
    stage = _two_stage(tmp_path, "sgd", zero_grad_first=True, continued=False, opt_cls=torch.optim.SGD)
    assert stage.unstepped_parameters == []


# --- 3. and 4. life-cycle misuse ------------------------------------------------------------------------------------


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _one_step(model, opt):
    opt.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    opt.step()


def test_step_and_end_without_begin_raise(tmp_path):
    model, opt = _model_opt()
    rec = StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=opt)
    _one_step(model, opt)
    with pytest.raises(LedgerError, match=r"step\(\) before begin\(\).*with ledger.record_stage"):
        rec.step()
    with pytest.raises(LedgerError, match=r"end\(\) before begin\(\)"):
        rec.end()
    assert not (tmp_path / "ledger").exists()  # nothing written


def test_step_after_the_stage_ended_raises_and_the_stage_is_kept(tmp_path):
    model, opt = _model_opt()
    ledger = StageLedger(tmp_path / "ledger")
    with ledger.record_stage("s", model=model, optimizer=opt) as rec:
        _one_step(model, opt)
        rec.step()
    _one_step(model, opt)
    with pytest.raises(LedgerError, match=r"step\(\) after the stage ended.*new stage"):
        rec.step()
    assert [(s.name, s.num_steps) for s in StageLedger.load(tmp_path / "ledger").stages] == [("s", 1)]


def test_non_main_process_steps_silently(tmp_path):
    model, opt = _model_opt()
    with StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=opt, is_main_process=False) as rec:
        _one_step(model, opt)
        rec.step()  # only the main process records: nothing to say here
    assert rec.stage is None and not (tmp_path / "ledger").exists()


def test_begin_twice_says_already_begun(tmp_path):
    model, opt = _model_opt()
    rec = StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=opt)
    rec.begin()
    with pytest.raises(LedgerError, match="already begun") as info:
        rec.begin()
    assert not isinstance(info.value, LedgerLockedError) and "delete" not in str(info.value)
    _one_step(model, opt)
    rec.step()
    assert rec.end().num_steps == 1  # the first begin() is still recording


def test_two_open_stages_in_one_process_name_the_open_one(tmp_path):
    model, opt = _model_opt()
    ledger = StageLedger(tmp_path / "ledger")
    with pytest.raises(LedgerLockedError) as info, ledger.record_stage("a", model=model, optimizer=opt):
        ledger.record_stage("b", model=model, optimizer=opt).begin()
    message = str(info.value)
    assert "this process is already recording stage 'a'" in message and "end it first" in message
    assert "another process" not in message and "delete it" not in message.replace("do not delete it", "")
    assert not (tmp_path / "ledger" / "ledger.lock").exists()


# --- 5. an optimizer that does not train the model ------------------------------------------------------------------


def test_another_models_optimizer_is_refused_before_anything_is_written(tmp_path):
    model, _ = _model_opt()
    other = torch.optim.Adam(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    with pytest.raises(LedgerError, match=r"expected `optimizer=`.*none of its 2 tensors.*Nothing was written"):
        StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=other).begin()
    assert not (tmp_path / "ledger").exists()


def test_optimizer_with_tensors_outside_the_model_is_refused(tmp_path):
    model, _ = _model_opt()
    extra = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(LedgerError, match=r"1 of its 3 tensors are not parameters of the model \(shapes \(5,\)\)"):
        StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=opt).begin()


def test_optimizer_over_some_trainable_parameters_is_accepted(tmp_path):
    """Param groups over part of the model (the rest frozen in the optimizer's eyes) are the model's own tensors."""
    model, _ = _model_opt()
    opt = torch.optim.SGD([model.weight], lr=0.1)
    with StageLedger(tmp_path / "ledger").record_stage("s", model=model, optimizer=opt) as rec:
        _one_step(model, opt)
        rec.step()
    assert rec.stage.num_steps == 1


def test_lora_model_with_its_optimizer_is_accepted(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["0"], lora_alpha=4, init_lora_weights=False)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with StageLedger(tmp_path / "ledger").record_stage("lora", kind=None, model=model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        rec.step()
    assert rec.stage.kind == "lora" and rec.stage.num_steps == 1


# --- 6. ledger size with a continued optimizer ----------------------------------------------------------------------


def test_continued_optimizer_state_is_in_the_size_the_readme_states(tmp_path):
    """The README says a stage that continues an optimizer also stores its state, 2x its trainable parameters with
    Adam; the recorder's projection and the written file agree with it."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    size = re.search(r"\*\*Ledger size\.\*\*(.*?)The recorder prints", text).group(1)
    assert "continues an optimizer" in size and "2 × its trainable parameters with Adam" in size
    model = torch.nn.Linear(64, 32)  # 2080 float32 parameters
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ledger = StageLedger(tmp_path / "ledger")
    for name in ("s1", "s2"):
        rec = ledger.record_stage(name, model=model, optimizer=opt, curvature_segments=0)
        projected = rec.projected_bytes()["optimizer_state"]
        with rec:
            opt.zero_grad()
            model(torch.ones(2, 64)).sum().backward()
            opt.step()
            rec.step()
    assert projected == 2 * 4 * 2080
    written = (ledger.stages[1].dir / "optimizer_state.safetensors").stat().st_size
    assert projected <= written < projected * 1.1


# --- 7. the scheduler is recorded -----------------------------------------------------------------------------------


def test_scheduler_type_and_start_state_are_recorded(tmp_path, recwarn):
    model, opt = _model_opt()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ledger = StageLedger(tmp_path / "ledger")
    with ledger.record_stage("s", model=model, optimizer=opt, scheduler=sched, metadata={"seed": 7}) as rec:
        for _ in range(3):
            _one_step(model, opt)
            rec.step()
            sched.step()
    info = json.loads((ledger.stages[0].dir / "stage.json").read_text())
    assert info["seed"] == 7
    assert info["scheduler"]["type"] == "StepLR" and info["scheduler"]["module"] == "torch.optim.lr_scheduler"
    start = info["scheduler"]["state_at_start"]
    assert (
        start["step_size"] == 2 and start["gamma"] == 0.5 and start["last_epoch"] == 0 and start["base_lrs"] == [0.01]
    )
    StageLedger.load(tmp_path / "ledger")
    assert not [w for w in recwarn if "ignoring keys" in str(w.message)]  # a known key of the stage format
