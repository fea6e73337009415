"""Estimator availability follows the information: without optimizer information only task-vector estimators."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import StageLedger, estimators
from hf_stage_attribution.errors import UnsupportedOptimizerError
from tests.checkpoints.test_fixtures import recorded_run


def _behavior(model):
    ids = torch.arange(8).reshape(1, 8)
    return model(input_ids=ids).logits[0, :, 0]


def test_checkpoints_without_optimizer_information_allow_only_delta_estimators(tmp_path):
    _, folders, _ = recorded_run(tmp_path, stage_steps=(2, 2))
    boundaries = [{"model": str(folders[0]), "name": "base"}]
    boundaries += [{"model": str(f), "name": f"s{i}", "kind": "sft"} for i, f in enumerate(folders[1:], start=1)]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "imported")
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folders[-1], attn_implementation="eager")
    name, reason = estimators.selection.choose_estimator(ledger)
    assert name == "delta-linear" and "without optimizer information" in reason
    result = estimators.get("auto").estimate(ledger, model, _behavior)
    assert result.estimator == "delta-linear"
    with pytest.raises(UnsupportedOptimizerError, match="imported from checkpoints"):
        estimators.get("aa-linear").estimate(ledger, model, _behavior)
    forced = estimators.get("aa-linear").estimate(ledger, model, _behavior, allow_identity_propagation=True)
    for stage in result.per_example:
        torch.testing.assert_close(forced.per_example[stage], result.per_example[stage])
