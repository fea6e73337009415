"""The report's plot: one bar group per stage, one bar per behavior, error bars = the bootstrap intervals.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, no GUI backend), so it works
in headless training jobs and never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ReportError
from .files import atomic_write_bytes
from .text import terminal_safe

if TYPE_CHECKING:
    from .attribution import AttributionReport

DPI = 100
HEIGHT_IN = 4.0


def figure_size(num_stages: int) -> tuple[float, float]:
    """Figure size in inches for ``num_stages`` bar groups (the PNG is ``size × DPI`` pixels)."""
    return (max(6.4, 1.2 * num_stages + 3.0), HEIGHT_IN)


def _label(text: str) -> str:
    # matplotlib would parse "$...$" as mathtext (and fail on bad TeX); control characters have no glyph
    return terminal_safe(text).replace("$", r"\$")


def report_figure(report: AttributionReport) -> Any:
    """A ``Figure`` with one bar group per stage (x axis) and one bar per behavior, error bars = intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = sorted(report.stages, key=lambda s: s.index)
    if not stages or not report.behaviors:
        raise ReportError("Expected a report with at least one stage and one behavior to plot, got an empty report.")
    fig = Figure(figsize=figure_size(len(stages)), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(stages))
    width = 0.8 / len(report.behaviors)
    for j, summary in enumerate(report.behaviors):
        by_stage = {row.stage: row for row in report.rows if row.behavior == summary.name}
        effect = np.array([by_stage[s.name].effect if s.name in by_stage else np.nan for s in stages])
        low = np.array([by_stage[s.name].ci_low if s.name in by_stage else np.nan for s in stages])
        high = np.array([by_stage[s.name].ci_high if s.name in by_stage else np.nan for s in stages])
        yerr = np.nan_to_num(np.vstack([effect - low, high - effect]).clip(min=0.0))
        label = f"{summary.name} ({summary.unit})" if summary.unit else summary.name
        offset = (j - (len(report.behaviors) - 1) / 2.0) * width
        ax.bar(x + offset, np.nan_to_num(effect), width, yerr=yerr, capsize=3, label=_label(label))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(f"{s.index}: {s.name}") for s in stages], rotation=15, ha="right")
    ax.set_ylabel("stage effect (behavior units)\npositive = stage raised it")
    conf = float((report.interval or {}).get("confidence", 0.95)) * 100
    ax.set_title(_label(f"Stage effects per behavior ({report.estimator}; error bars: {conf:g} % intervals)"))
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_png_bytes(report: AttributionReport) -> bytes:
    """The PNG bytes of :func:`report_figure` (no software tag: identical bytes for the same report)."""

    buffer = io.BytesIO()
    report_figure(report).savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save_report_plot(report: AttributionReport, path: Path) -> Path:
    """Render :func:`report_figure` to a PNG at ``path`` (atomically; byte-identical for the same report)."""

    atomic_write_bytes(Path(path), plot_png_bytes(report))
    return Path(path)
