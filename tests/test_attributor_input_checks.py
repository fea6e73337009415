"""StageAttributor's input checks: every misuse is refused with a message that says what was expected, before the
(slow) estimation; a single stage name is one stage."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.errors import BehaviorError, BudgetError, EstimatorError, ReportError
from tests.helpers.tiny import linear_ledger


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return linear_ledger(tmp_path_factory.mktemp("ledger"), ("sft", "dpo"), seed=0)


def output(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.eye(2)).reshape(-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "x"}, r"Expected seed to be an integer .* found str 'x'"),
        ({"seed": 1.5}, r"Expected seed to be an integer"),
        ({"seed": True}, r"Expected seed to be an integer"),
        ({"n_resamples": "100"}, r"Expected n_resamples to be an integer .* found str '100'"),
        ({"n_resamples": 0}, r"Expected n_resamples to be at least 40"),
        ({"n_resamples": -5}, r"at least 40"),
    ],
)
def test_seed_and_n_resamples_are_checked_in_the_constructor(tiny, kwargs, match):
    ledger, model = tiny
    with pytest.raises(ReportError, match=match):
        StageAttributor(ledger, model, estimator="delta-fd", **kwargs)


def test_integer_like_seed_and_resamples_are_kept():
    import numpy as np

    from hf_stage_attribution.attributor import _check_int

    assert _check_int("seed", np.int64(3), minimum=None, example="seed=0") == 3
    assert type(_check_int("seed", np.int64(3), minimum=None, example="seed=0")) is int


def test_a_list_of_behaviors_is_refused_clearly(tiny):
    ledger, model = tiny
    attributor = StageAttributor(ledger, model, estimator="delta-fd", diagnostics=False)
    with pytest.raises(BehaviorError, match=r"Expected behaviors as a \{name: behavior\} mapping .* found a list"):
        attributor.attribute([output])


def test_one_stage_name_is_one_stage_and_an_empty_list_is_refused(tiny):
    ledger, model = tiny
    attributor = StageAttributor(ledger, model, estimator="delta-fd", diagnostics=False, n_resamples=50)
    report = attributor.attribute({"out": output}, stages="dpo")
    assert {row.stage for row in report.rows} == {"dpo"}
    report = attributor.attribute({"out": output}, stages=0)
    assert {row.stage for row in report.rows} == {"sft"}
    with pytest.raises(ReportError, match="Expected stages to name at least one stage, found an empty list"):
        attributor.attribute({"out": output}, stages=[])
    with pytest.raises(ReportError, match="Expected stages to be stage names or indices"):
        attributor.attribute({"out": output}, stages=1.5)


@pytest.mark.parametrize("options", [{"budget": -0.1}, {"budget": "0.25"}, {"budget": 1.5}, {"budget_unit": "flops"}])
def test_a_budget_is_checked_even_where_auto_would_not_use_it(tiny, options):
    """This ledger has no replay data and no stage functions, so `auto` picks an estimator without a budget and used
    to drop it silently; a bad budget is a mistake whatever the estimator, and is refused in the constructor."""
    ledger, model = tiny
    with pytest.raises(BudgetError, match="budget"):
        StageAttributor(ledger, model, estimator_options=options, show_progress=False)
    StageAttributor(ledger, model, estimator_options={"budget": 0.1}, show_progress=False)  # a good one is kept


@pytest.mark.parametrize("what", ["stage_fns", "ref_models", "loss_fns"])
def test_a_misspelt_stage_name_is_refused_with_the_closest_one(tiny, what):
    """A typo left the real stage without its function: replay then said the stage had none, never why."""
    ledger, model = tiny
    with pytest.raises(ReportError, match=r"found 'dop', which the ledger does not have\. Did you mean 'dpo'\?"):
        StageAttributor(ledger, model, show_progress=False, **{what: {"dop": object()}})


@pytest.mark.parametrize("stages", [["sft", "sft"], [0, "sft"]])
def test_a_stage_named_twice_is_refused_before_the_estimation(tiny, stages):
    ledger, model = tiny
    attributor = StageAttributor(ledger, model, estimator="delta-fd", show_progress=False)
    with pytest.raises(ReportError, match=r"found 'sft' more than once \(by name or by index\)"):
        attributor.attribute({"out": output}, stages=stages)


def test_a_misspelt_estimator_option_is_refused_with_the_closest_one(tiny):
    """Every estimator took ``**options``: ``budgt=0.1`` was ignored and the estimate ran at the default budget."""
    ledger, model = tiny
    with pytest.raises(EstimatorError, match=r"no option 'budgt'\. Did you mean 'budget'\?.*Its options: .*budget"):
        StageAttributor(ledger, model, estimator="partial-replay", estimator_options={"budgt": 0.1})
    with pytest.raises(EstimatorError, match=r"no option 'carry_moment'\. Did you mean 'carry_moments'\?"):
        StageAttributor(ledger, model, estimator_options={"carry_moment": False})  # auto


def test_an_option_of_another_estimator_names_the_estimators_that_read_it(tiny):
    ledger, model = tiny
    with pytest.raises(EstimatorError, match=r"'aa-fd' has no option 'budget'\. It is an option of auto, "):
        StageAttributor(ledger, model, estimator="aa-fd", estimator_options={"budget": 0.1})
    with pytest.raises(EstimatorError, match=r"'replay' has no option 'step_scale'.*delta-fd"):
        StageAttributor(ledger, model, estimator="replay", estimator_options={"step_scale": 0.5})
    # auto takes the options of every estimator it can pick (each goes to the chosen one) ...
    StageAttributor(ledger, model, estimator_options={"budget": 0.1, "factual": "interpolated", "step_scale": 0.5})
    StageAttributor(ledger, model, estimator_options={"recompute_embeddings": True})  # aa-ggn-fd's, aa-fd's
    # ... and no other: every estimator it picks reads by finite difference, none reads per example linearly
    with pytest.raises(EstimatorError, match=r"'auto' has no option 'per_example'\. It is an option of aa-ggn, "):
        StageAttributor(ledger, model, estimator_options={"per_example": False})
    StageAttributor(ledger, model, estimator="strided-replay", estimator_options={"budget": 0.5})


def test_every_option_an_estimator_reads_is_declared():
    """The declared options (``Estimator.options``) cover every ``options.get("…")`` of the estimators' code, so
    the check above never refuses an option that works."""
    import re
    from pathlib import Path

    from hf_stage_attribution import estimators
    from hf_stage_attribution.estimators import base

    root = Path(estimators.__file__).parent
    read = {m for f in root.rglob("*.py") for m in re.findall(r"options\.get\(\"(\w+)\"", f.read_text())}
    declared = set().union(*(type(estimators.get(n)).accepted_options() for n in estimators.names()))
    assert read and read <= declared, sorted(read - declared)
    assert all(type(estimators.get(n)).accepted_options() >= base.COMMON_OPTIONS for n in estimators.names())
