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
    assert "n/a (needs an effect for every stage of the ledger; not attributed: patch)" in line
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


# --- H1: a top stage among some of the ledger's stages says so, and names the stages left out -------------------


def test_headline_of_a_subset_says_the_top_stage_is_among_the_attributed_stages_only():
    report = _subset(replay={"loss": {"base": [0.1] * 3, "clean": [-0.46] * 3}})
    scope = "Among the 2 attributed stages of 3 only (not attributed: patch): a stage left out may have moved it more."
    (line,) = [x for x in report.table().splitlines() if x.startswith("* ")]
    assert line.startswith("* clean lowered loss the most (") and scope in line
    assert "share of Σ|effect| = |effect| over the sum of |effects| of the attributed stages" in report.table()
    md = report.to_markdown()
    assert "Only 2 of the ledger's 3 stages were attributed (not attributed: patch)" in md
    assert "the most (-0.46 behavior units" in md and scope in md
    assert "absolute effects (2 of 3; not attributed: patch; the report's JSON" in md


def test_a_report_that_attributes_every_stage_says_nothing_about_coverage():
    report = AttributionReport.build(
        {"loss": {"base": [0.1, 0.1], "clean": [-0.5, -0.5], "patch": [-1.6, -1.6]}}, estimator="aa-linear",
        ledger=LEDGER, versions={}, n_resamples=200,
    )  # fmt: skip
    assert "attributed stage" not in report.table() + report.to_markdown()


def test_an_old_report_without_stage_names_numbers_the_stages_left_out():
    report = _subset(ledger={"num_stages": 3})
    assert "(not attributed: #2)" in report.table()  # base is #0, clean #1 by position: #2 has no name here


# --- M7: a headline where replay ran gives replay's measured size beside the estimate's ---------------------------


def test_verified_headline_gives_replays_size_beside_the_estimate():
    report = AttributionReport.build(
        {"f": {"pre": [0.1, 0.12, 0.11, 0.1], "sft": [1.9, 1.95, 1.85, 1.9], "dpo": [-0.5, -0.55, -0.45, -0.5]}},
        estimator="aa-linear", replay={"f": {"pre": [0.1] * 4, "sft": [1.0] * 4, "dpo": [-0.5] * 4}}, versions={},
        n_resamples=200,
    )  # fmt: skip
    assert report.trust("f")["verdict"] == "verified"
    (line,) = [x for x in report.table().splitlines() if x.startswith("* ")]
    assert line.startswith("* sft raised f the most (+1.9 behavior units, 95 % interval (example sampling) [")
    assert "; replay measured +1). Verdict: verified by replay." in line
    assert "; replay measured +1). Verdict: verified by replay." in report.to_markdown()


# --- L4: the plot draws no sign the prose withholds ---------------------------------------------------------------


def test_plot_does_not_colour_an_unsettled_sign_as_raised_or_lowered():
    from matplotlib.colors import to_hex

    from hf_stage_attribution.report.plot import LOWERED, RAISED, UNSETTLED

    report = AttributionReport.build(
        {"f": {"pre": [0.5, 0.6, 0.55, 0.5], "sft": [3.0, -1.0, 2.5, -0.9]}}, estimator="aa-linear", versions={},
        n_resamples=200,
    )  # fmt: skip
    fig = report.plot_figure()
    colours = [to_hex(bar.get_facecolor()) for bar in fig.axes[0].patches]
    assert colours == [RAISED, UNSETTLED]  # sft's interval includes 0: the card says its sign is not settled
    assert "sign not settled" in [text.get_text() for text in fig.legends[0].get_texts()]
    settled = AttributionReport.build({"f": {"a": [1.0, 1.1], "b": [-2.0, -2.1]}}, estimator="x", versions={})
    assert [to_hex(bar.get_facecolor()) for bar in settled.plot_figure().axes[0].patches] == [RAISED, LOWERED]
