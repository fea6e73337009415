"""The framework-free recorder and the ledger format on plain torch models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError, LedgerFormatError, LedgerMismatchError, UnsafeInputError


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(ledger, model, name, opt, steps=6, sched=None, **kw):
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 2

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    with ledger.record_stage(
        name, model=model, optimizer=opt, scheduler=sched, loss_fn=loss_fn, num_steps=steps, **kw
    ) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
            rec.step((x, y))
            if sched is not None:
                sched.step()
    return rec


def test_deltas_reconstruct_final_parameters_and_lrs_are_applied_rates(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path / "ledger")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 3 if s < 2 else 0.5)
    _train(ledger, model, "pre", opt, sched=sched)
    _train(ledger, model, "ft", torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    ledger = StageLedger.load(tmp_path / "ledger")
    assert [s.name for s in ledger.stages] == ["pre", "ft"]
    final = ledger.final_state()
    for name, param in model.named_parameters():
        torch.testing.assert_close(final[name], param.detach(), atol=1e-6, rtol=0)
    expected = [0.1 * f for f in (1 / 3, 2 / 3, 0.5, 0.5, 0.5, 0.5)]
    assert [row[0] for row in ledger.stages[0].learning_rates] == pytest.approx(expected)
    opt_info = ledger.stages[0].optimizer
    assert opt_info["type"] == "AdamW" and opt_info["decoupled_weight_decay"] is True
    assert sorted(opt_info["param_groups"][0]["params"]) == sorted(n for n, _ in model.named_parameters())
    ledger.check_model(model)


def test_curvature_segments_hold_midpoints_examples_and_moments(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path)
    _train(ledger, model, "s", torch.optim.Adam(model.parameters(), lr=0.01), steps=9)
    stage = ledger.stages[0]
    assert [(g.step_start, g.mid_step, g.step_end) for g in stage.segments] == [(0, 1, 3), (3, 4, 6), (6, 7, 9)]
    seg = stage.segments[1]
    x, y = seg.examples()[0]
    assert x.shape == (12, 3) and y.dtype == torch.int64
    moments = seg.second_moments()
    assert set(moments) == {"exp_avg_sq", "step"} and float(moments["step"]["0.weight"]) == 5.0
    assert set(seg.params_delta()) == {n for n, _ in model.named_parameters()}


def test_continued_optimizer_state_is_stored(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(ledger, model, "a", opt)
    _train(ledger, model, "b", opt)
    assert [s.optimizer_state_policy for s in ledger.stages] == ["fresh", "continued"]
    assert set(ledger.stages[1].optimizer_state_at_start()) == {"momentum_buffer"}


def test_untracked_edit_between_stages_becomes_a_stage(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path)
    _train(ledger, model, "a", torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.no_grad():
        model[0].bias += 1.0
    with pytest.warns(UserWarning, match="untracked"):
        _train(ledger, model, "b", torch.optim.SGD(model.parameters(), lr=0.1))
    assert [s.kind for s in ledger.stages] == ["custom", "untracked", "custom"]
    torch.testing.assert_close(ledger.stages[1].delta()["0.bias"], torch.ones(8))
    ledger.check_model(model)


def test_exception_during_stage_leaves_earlier_stages(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path)
    _train(ledger, model, "a", torch.optim.SGD(model.parameters(), lr=0.1))
    with (
        pytest.raises(RuntimeError),
        ledger.record_stage("b", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
    ):
        raise RuntimeError("boom")
    assert [s.name for s in StageLedger.load(tmp_path).stages] == ["a"]
    assert not (tmp_path / "ledger.lock").exists()


def test_another_models_ledger_is_refused(tmp_path):
    ledger = StageLedger(tmp_path)
    model = _mlp()
    _train(ledger, model, "a", torch.optim.SGD(model.parameters(), lr=0.1))
    other = torch.nn.Linear(3, 3)
    with pytest.raises(LedgerMismatchError, match="ledger.json"):
        _train(ledger, other, "b", torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(LedgerError, match="already has a stage named 'a'"):
        _train(ledger, model, "a", torch.optim.SGD(model.parameters(), lr=0.1))
    assert [s.name for s in StageLedger.load(tmp_path).stages] == ["a"]


def test_corrupt_unknown_version_and_escaping_ledgers(tmp_path):
    model = _mlp()
    ledger = StageLedger(tmp_path)
    _train(ledger, model, "a", torch.optim.SGD(model.parameters(), lr=0.1))
    path = tmp_path / "ledger.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:50])
    with pytest.raises(LedgerFormatError, match="ledger.json"):
        StageLedger.load(tmp_path)
    path.write_text(json.dumps(dict(good, format_version=99)))
    with pytest.raises(LedgerFormatError, match="newer than this library"):
        StageLedger.load(tmp_path)
    bad = json.loads(json.dumps(good))
    bad["stages"][0]["dir"] = "stages/../../etc"
    path.write_text(json.dumps(bad))
    with pytest.raises(UnsafeInputError):
        StageLedger.load(tmp_path)
    path.write_text(json.dumps(dict(good, surprise=1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(StageLedger.load(tmp_path).stages) == 1
    assert any("surprise" in str(w.message) for w in caught)


def test_a_stage_that_changes_buffers_is_warned_about(tmp_path):
    """The ledger holds parameters only: a stage that moves BatchNorm's running statistics gets a warning saying that
    replay starts from the final model's buffers; a model without such buffers gets none."""
    torch.manual_seed(0)
    for name in ("bn", "plain", "frozen-bn"):
        layers = [torch.nn.Linear(3, 4)] + ([] if name == "plain" else [torch.nn.BatchNorm1d(4)])
        model = torch.nn.Sequential(*layers)
        if name == "frozen-bn":
            model[1].eval()  # running statistics kept as they are: nothing to warn about
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ledger = StageLedger(tmp_path / name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ledger.record_stage("s1", model=model, optimizer=opt) as rec:
                model(torch.randn(8, 3)).pow(2).sum().backward()
                opt.step()
                rec.step()
        said = [str(w.message) for w in caught if "buffer" in str(w.message)]
        if name == "bn":
            assert len(said) == 1 and "'1.running_mean'" in said[0] and "final model's buffers" in said[0]
        else:
            assert said == []
