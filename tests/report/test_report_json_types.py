"""A report.json of the right format whose fields have the wrong types is refused by ``from_json`` with a
ReportError naming the field, never a traceback from deeper in the rendering (the card command reads these files)."""

from __future__ import annotations

import copy
import json

import pytest

from hf_stage_attribution.errors import ReportError
from hf_stage_attribution.report import AttributionReport


@pytest.fixture(scope="module")
def stored() -> dict:
    report = AttributionReport.build(
        {"toxicity": {"sft": [1.0, 2.0, 0.5], "dpo": [0.2, -0.1, 0.4]}}, estimator="aa-fd", versions={}
    )
    return json.loads(report.to_json())


def _set(path: list, value):
    def mutate(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (_set(["diagnostics"], None), "diagnostics: expected dict"),
        (_set(["ledger"], "x"), "ledger: expected dict"),
        (_set(["rows", 0, "stage_index"], None), "rows[0].stage_index: expected int"),
        (_set(["rows", 0, "effect"], "x"), "rows[0].effect: expected float"),
        (_set(["rows", 0, "ci_low"], "x"), "rows[0].ci_low: expected float"),
        (_set(["rows", 0, "per_example"], None), "rows[0].per_example: expected list"),
        (_set(["rows", 0, "per_example"], [1.0, "x"]), "rows[0].per_example"),
        (_set(["stages", 0, "num_steps"], "ten"), "stages[0].num_steps: expected int or null"),
        (_set(["behaviors", 0, "num_examples"], 2.5), "behaviors[0].num_examples: expected int"),
        (_set(["estimator"], 3), "estimator: expected str"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(stored, mutate, named):
    data = copy.deepcopy(stored)
    mutate(data)
    with pytest.raises(ReportError, match="Regenerate it") as info:
        AttributionReport.from_json(json.dumps(data))
    assert named in str(info.value)


def test_the_report_as_written_reads_back(stored):
    assert AttributionReport.from_json(json.dumps(stored)).rows[0].stage == "sft"
