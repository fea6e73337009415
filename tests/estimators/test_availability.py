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
    assert name == "delta-fd" and "without optimizer information" in reason
    result = estimators.get("auto").estimate(ledger, model, _behavior)
    assert result.estimator == "delta-fd"
    with pytest.raises(UnsupportedOptimizerError, match="imported from checkpoints"):
        estimators.get("aa-fd").estimate(ledger, model, _behavior)
    forced = estimators.get("aa-fd").estimate(ledger, model, _behavior, allow_identity_propagation=True)
    for stage in result.per_example:
        torch.testing.assert_close(forced.per_example[stage], result.per_example[stage])


@pytest.mark.parametrize("name", ["partial-replay", "strided-replay"])
def test_the_replaying_estimators_refuse_stages_without_optimizer_information_before_any_replay(tmp_path, name):
    """They compute ``aa-linear`` embeddings only for the stages they do not replay, but still refuse up front, as
    ``aa-linear`` does, when a later stage's optimizer is unknown: no stage function runs."""
    _, folders, _ = recorded_run(tmp_path, stage_steps=(2, 2))
    boundaries = [{"model": str(folders[0]), "name": "base"}]
    boundaries += [{"model": str(f), "name": f"s{i}", "kind": "sft"} for i, f in enumerate(folders[1:], start=1)]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "imported")
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folders[-1], attn_implementation="eager")
    ran = []

    def stage_fn(model, max_steps=None, grad_every=1):
        ran.append(max_steps)
        return model

    fns = {stage.name: stage_fn for stage in ledger.stages}
    with pytest.raises(UnsupportedOptimizerError, match="imported from checkpoints"):
        estimators.get(name).estimate(ledger, model, _behavior, stage_fns=fns, budget=0.5)
    assert ran == []
