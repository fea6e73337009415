"""What users see is no more certain than its evidence (the trust audit: H1, M2, M4, M5, M7).

A report that attributes only some of the ledger's stages says so wherever it names a top stage or a share, and
computes no interaction residual; replay values in the rows count as replay having run; a sign the prose withholds is
not stated in the card's YAML; a "verified" headline gives replay's measured size beside the estimate's.
"""

from __future__ import annotations

from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report.text import diagnostics_lines

LEDGER = {"name": "ledger", "num_stages": 3, "stage_names": ["base", "clean", "patch"]}


def _subset(**kwargs) -> AttributionReport:
    """Stages base and clean of a 3-stage ledger; the total change includes patch's (left out) -1.6."""
    return AttributionReport.build(
        {"loss": {"base": [0.1, 0.12, 0.11], "clean": [-0.46, -0.47, -0.45]}},
        estimator="aa-linear", stages=["base", "clean"], total_change={"loss": [-1.9, -1.9, -1.9]},
        ledger=kwargs.pop("ledger", LEDGER), versions={}, n_resamples=200, **kwargs,
    )  # fmt: skip


# --- M4: no interaction residual unless every stage of the ledger was attributed ---------------------------------


def test_a_subset_of_the_ledgers_stages_has_no_interaction_residual():
    report = _subset()
    assert report.diagnostics["loss"].interaction_residual is None
    line = next(x for x in diagnostics_lines(report, "loss", "units") if "interaction residual" in x)
    assert "n/a (needs an effect for every stage of the ledger; the effects cover the 2 attributed stages of 3" in line
    assert "Interaction residual (total change − sum of effects)" not in report.to_markdown()
    every = AttributionReport.build(
        {"loss": {"base": [0.1, 0.1], "clean": [-0.5, -0.5], "patch": [-1.6, -1.6]}}, estimator="aa-linear",
        total_change={"loss": [-1.9, -1.9]}, ledger=LEDGER, versions={}, n_resamples=200,
    )  # fmt: skip
    assert abs(every.diagnostics["loss"].interaction_residual - 0.1) < 1e-9


def test_a_stored_residual_of_a_subset_is_not_shown():
    """A report written before the check stored total − (sum over the subset): it is not shown as a residual."""
    report = _subset()
    report.diagnostics["loss"].interaction_residual = -1.55
    assert "-1.55" not in report.to_markdown()
