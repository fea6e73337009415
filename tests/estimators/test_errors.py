"""Bad input gives clear errors naming the stage, behavior or tensor."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import estimators
from hf_stage_attribution.errors import (
    BehaviorError,
    EstimatorError,
    MissingCurvatureError,
    ModelMismatchError,
    UnknownNameError,
    UnsupportedOptimizerError,
)
from hf_stage_attribution.ledger import StageLedger


def build(tmp_path, makers, **record_options):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ledger = StageLedger(tmp_path / "ledger")
    for i, make in enumerate(makers):
        opt = make(model.parameters())
        with ledger.record_stage(f"s{i + 1}", model=model, optimizer=opt, **record_options) as rec:
            for _ in range(4):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()
    return ledger, model, lambda m: m(x)[:, 0]


SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1)  # noqa: E731
ADAMAX = lambda ps: torch.optim.Adamax(ps, lr=0.01)  # noqa: E731


def test_unsupported_optimizer_in_a_later_stage(tmp_path):
    ledger, model, behavior = build(tmp_path, [SGD, ADAMAX, SGD])
    with pytest.raises(UnsupportedOptimizerError, match=r"Stage 1 's2'.*'Adamax'.*allow_identity_propagation=True"):
        estimators.get("aa-linear").estimate(ledger, model, behavior)
    result = estimators.get("aa-linear").estimate(ledger, model, behavior, allow_identity_propagation=True)
    assert any("Adamax" in a and "D = 1" in a for a in result.approximations)
    # only later stages matter: the last stage's own optimizer is never propagated through
    estimators.get("aa-linear").estimate(ledger, model, behavior, stages=["s2", "s3"])
    estimators.get("delta-linear").estimate(ledger, model, behavior)  # the baseline needs no propagation


def test_aa_ggn_without_curvature_material(tmp_path):
    ledger, model, behavior = build(tmp_path, [SGD, SGD])
    with pytest.raises(MissingCurvatureError, match=r"'s2'.*curvature_segments=3.*StageRecorder"):
        estimators.get("aa-ggn").estimate(ledger, model, behavior)
    result = estimators.get("auto").estimate(ledger, model, behavior)
    assert result.estimator == "aa-fd" and "curvature" in result.reason and "'s2'" in result.reason


def test_behavior_returning_nan(tmp_path):
    ledger, model, behavior = build(tmp_path, [SGD, SGD])

    def nan_behavior(m):
        return behavior(m) * float("nan")

    nan_behavior.name = "broken-margin"
    for name in ("aa-linear", "delta-fd"):
        with pytest.raises(BehaviorError, match="broken-margin.*non-finite"):
            estimators.get(name).estimate(ledger, model, nan_behavior)
    final = model.weight.detach().clone()

    def nan_off_final(m):  # finite on the final model, NaN once a stage is removed
        out = behavior(m)
        return out if torch.equal(m.weight.detach(), final) else out * float("nan")

    with pytest.raises(BehaviorError, match="nan_off_final.*stage 's1' removed"):
        estimators.get("aa-fd").estimate(ledger, model, nan_off_final)
    assert torch.equal(model.weight.detach(), final)  # restored after the error


def test_model_not_matching_the_ledger(tmp_path):
    ledger, model, behavior = build(tmp_path, [SGD, SGD])
    with torch.no_grad():
        model.bias.add_(0.5)
    for name in ("aa-linear", "delta-fd", "replay"):
        with pytest.raises(ModelMismatchError, match="'bias'"):
            estimators.get(name).estimate(ledger, model, behavior)


def test_unknown_estimator_and_misused_lora_exact(tmp_path):
    with pytest.raises(UnknownNameError, match="Unknown estimator 'aa-magic'.*aa-linear"):
        estimators.get("aa-magic")
    ledger, model, behavior = build(tmp_path, [SGD, SGD])
    with pytest.raises(EstimatorError, match="only applies to the last stage"):
        estimators.get("lora-exact").estimate(ledger, model, behavior, stages=["s1"])
    with pytest.raises(EstimatorError, match="LoRA stage"):
        estimators.get("lora-exact").estimate(ledger, model, behavior)
