"""The attribution report: ``attribution`` (:class:`AttributionReport`), ``schema`` (its row dataclasses),
``build`` (from estimator results), ``text`` (Markdown tables), ``plot`` (figures) and
``files`` (writing a report folder)."""

from .attribution import AttributionReport
from .schema import (
    REPORT_FORMAT,
    REPORT_FORMAT_VERSION,
    BehaviorDiagnostics,
    BehaviorSummary,
    ReportRow,
    StageSummary,
)

__all__ = [
    "REPORT_FORMAT",
    "REPORT_FORMAT_VERSION",
    "AttributionReport",
    "BehaviorDiagnostics",
    "BehaviorSummary",
    "ReportRow",
    "StageSummary",
]
