"""The recorder's optimizer-state policy and its list of tensors the optimizer never stepped.

torch's ``Adagrad`` builds its state (``sum`` = 0, ``step`` = 0) in ``__init__``: a stage that starts with a new one
is *fresh*, not a continuation. A trainable tensor that never gets a gradient in a stage is skipped by torch (no
update, no weight decay); the stage record lists it under ``unstepped_parameters`` (optional: absent means none).
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerFormatError
from hf_stage_attribution.ledger.format import validate_stage
from hf_stage_attribution.ledger.optimizer_info import has_state, no_step_taken
from tests.helpers.tiny import TwoLinear


def _train(ledger, name, model, opt, loss, steps=3):
    with ledger.record_stage(name, model=model, optimizer=opt) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
            rec.step()
    return ledger.stages[-1]


def test_new_adagrad_is_fresh_and_a_used_one_is_continued(tmp_path):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 2), torch.randn(8, 4)
    ledger = StageLedger(tmp_path / "ledger")
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, weight_decay=0.5)
    assert not has_state(opt)  # sum = 0, step = 0 from the constructor
    first = _train(ledger, "s1", model, opt, lambda: model(x).pow(2).mean())
    assert first.optimizer_state_policy == "fresh"
    assert first.info.get("optimizer_state_file") is None
    assert has_state(opt)  # the same optimizer after steps: a stage that keeps it continues its state
    second = _train(ledger, "s2", model, opt, lambda: model(x).pow(2).mean())
    assert second.optimizer_state_policy == "continued"
    assert not no_step_taken(second.optimizer_state_at_start())


def test_sgd_momentum_state_counts_as_continued(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert has_state(opt)  # no step counter, a momentum buffer: state from a step taken


def test_unused_tensor_is_listed_as_unstepped(tmp_path):
    torch.manual_seed(0)
    model, x = TwoLinear(), torch.randn(8, 3)
    ledger = StageLedger(tmp_path / "ledger")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.6)
    both = _train(ledger, "both", model, opt, lambda: model(x).pow(2).mean())
    assert both.unstepped_parameters == []
    assert "unstepped_parameters" not in json.loads((both.dir / "stage.json").read_text())  # optional: absent
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.6)
    only_a = _train(ledger, "only-a", model, opt, lambda: -model.a.weight.sum())
    assert only_a.trainable_parameters == ["a.weight", "b.weight"]
    assert only_a.unstepped_parameters == ["b.weight"]
    reloaded = StageLedger.load(tmp_path / "ledger").stages[1]
    assert reloaded.unstepped_parameters == ["b.weight"]


def test_unstepped_parameters_must_be_trainable_names(tmp_path):
    data = {
        "format_version": 1, "index": 0, "name": "s", "kind": "custom", "num_steps": 0, "learning_rates": [],
        "trainable_parameters": ["w"], "unstepped_parameters": ["v"],
    }  # fmt: skip
    with pytest.raises(LedgerFormatError, match="unstepped_parameters"):
        validate_stage(tmp_path / "stage.json", data, "s")
    data["unstepped_parameters"] = ["w"]
    assert validate_stage(tmp_path / "stage.json", data, "s")["unstepped_parameters"] == ["w"]
