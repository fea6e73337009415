"""The report's plot: small multiples, one panel per behavior with its own y-axis (units in the panel title),
stages on the x-axis in ledger order, the estimate as a bar with its interval and the replay value as a marker.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, no GUI backend), so it works
in headless training jobs and never changes the caller's matplotlib backend. The figure sits on a light card
(white, rounded frame) on a transparent page, with mid-contrast colors, so it reads in the Hub's light and dark
themes alike.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ReportError
from .files import atomic_write_bytes
from .text import has_interval, terminal_safe, unsettled_sign_reasons

if TYPE_CHECKING:
    from .attribution import AttributionReport

DPI = 100
PANEL_IN = (3.6, 3.0)  # width, height of one behavior's panel in inches
MAX_COLUMNS = 3
RAISED, LOWERED, REPLAY = "#3b7dd8", "#d9822b", "#1f1f1f"  # mid-contrast blue / orange; replay markers near-black
UNCHANGED = "#9a9a9a"  # a stage whose effect is exactly 0 neither raised nor lowered the behavior
UNSETTLED = "#c8c8c8"  # a stage whose sign the report does not claim (report/text.py unsettled_sign_reasons)
#: Longest names drawn (characters); longer ones end in "…" (the full names are in the table beside the plot).
TICK_CHARS, TITLE_CHARS = 18, 32
CARD = "#ffffff"


def grid_shape(num_behaviors: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: up to three panels a row."""
    columns = max(1, min(MAX_COLUMNS, num_behaviors))
    return math.ceil(max(1, num_behaviors) / columns), columns


def figure_size(num_stages: int, num_behaviors: int = 1) -> tuple[float, float]:
    """Figure size in inches for ``num_behaviors`` panels of ``num_stages`` bars (the PNG is ``size × DPI`` px)."""
    rows, columns = grid_shape(num_behaviors)
    width = max(PANEL_IN[0], 0.55 * num_stages + 1.4)
    return (round(width * columns + 0.4, 2), round(PANEL_IN[1] * rows + 0.6, 2))


def _label(text: str, limit: int | None = None) -> str:
    """``text`` safe to draw, cut to ``limit`` characters with an ellipsis.

    Example:
        >>> _label("a" * 30, limit=10)
        'aaaaaaaaa…'
    """
    text = terminal_safe(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    # matplotlib would parse "$...$" as mathtext (and fail on bad TeX); control characters have no glyph
    return text.replace("$", r"\$")


def report_figure(report: AttributionReport) -> Any:
    """A ``Figure`` with one panel (axes) per behavior: bars = estimates with interval error bars, diamonds =
    replay values where replay ran; each panel has its own y-axis and its unit in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Patch

    stages = sorted(report.stages, key=lambda s: s.index)
    if not stages or not report.behaviors:
        raise ReportError("Expected a report with at least one stage and one behavior to plot, got an empty report.")
    rows, columns = grid_shape(len(report.behaviors))
    fig = Figure(figsize=figure_size(len(stages), len(report.behaviors)), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_alpha(0.0)  # transparent page; the white card below carries the plot in dark themes too
    fig.patches.append(
        FancyBboxPatch(
            (0.005, 0.005), 0.99, 0.99, boxstyle="round,pad=0,rounding_size=0.015", transform=fig.transFigure,
            facecolor=CARD, edgecolor="#9a9a9a", linewidth=1.0, zorder=-10,
        )
    )  # fmt: skip
    x = np.arange(len(stages))
    conf = float((report.interval or {}).get("confidence", 0.95)) * 100
    any_replay = any_open = False
    for j, summary in enumerate(report.behaviors):
        ax = fig.add_subplot(rows, columns, j + 1)
        ax.set_facecolor(CARD)
        by_stage = {row.stage: row for row in report.rows if row.behavior == summary.name}
        effect = np.array([by_stage[s.name].effect if s.name in by_stage else np.nan for s in stages])
        banded = {name: row for name, row in by_stage.items() if has_interval(row)}  # one example: no interval
        low = np.array([_or_nan(banded[s.name].ci_low) if s.name in banded else np.nan for s in stages])
        high = np.array([_or_nan(banded[s.name].ci_high) if s.name in banded else np.nan for s in stages])
        yerr = np.nan_to_num(np.vstack([effect - low, high - effect]).clip(min=0.0))
        # a sign the prose withholds (another estimator's sign or size, an interval across 0) is not drawn as one
        open_ = unsettled_sign_reasons(report, summary.name)
        any_open = any_open or any(s.name in open_ for s in stages)
        colors = [
            UNSETTLED if s.name in open_ else RAISED if e > 0 else LOWERED if e < 0 else UNCHANGED
            for s, e in zip(stages, np.nan_to_num(effect))
        ]
        ax.bar(x, np.nan_to_num(effect), 0.6, yerr=yerr, capsize=3, color=colors, ecolor="#4d4d4d", label="estimate")
        replay = [by_stage[s.name].replay_effect if s.name in by_stage else None for s in stages]
        if any(v is not None for v in replay):
            any_replay = True
            shown = [(k, v) for k, v in enumerate(replay) if v is not None]
            ax.plot(
                [k for k, _ in shown], [v for _, v in shown], linestyle="none", marker="D", markersize=6,
                markerfacecolor="none", markeredgecolor=REPLAY, markeredgewidth=1.5, label="replay", zorder=5,
            )  # fmt: skip
        ax.axhline(0.0, color="#4d4d4d", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([_label(s.name, TICK_CHARS) for s in stages], rotation=20, ha="right", fontsize="small")
        unit = summary.unit or "behavior units"
        ax.set_title(f"{_label(summary.name, TITLE_CHARS)}\n({_label(unit, TITLE_CHARS)})", fontsize="medium")
        ax.tick_params(labelsize="small")
        ax.grid(axis="y", color="#d0d0d0", linewidth=0.6)
        ax.set_axisbelow(True)
    handles = [Patch(color=RAISED, label="raised it"), Patch(color=LOWERED, label="lowered it")]
    if any_open:
        handles.append(Patch(color=UNSETTLED, label="sign not settled"))
    if any_replay:
        handles.append(
            Line2D([], [], linestyle="none", marker="D", markerfacecolor="none", markeredgecolor=REPLAY,
                   label="replay (ground truth)")
        )  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
    fig.suptitle(
        f"Stage effects ({_label(report.estimator, TITLE_CHARS)}); positive = stage raised it\n"
        f"error bars: {conf:g} % intervals (example sampling only)",
        fontsize="small",
    )
    fig.tight_layout(rect=(0.01, 0.06, 0.99, 0.99))
    return fig


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else float(value)


def plot_png_bytes(report: AttributionReport) -> bytes:
    """The PNG bytes of :func:`report_figure` (no software tag: identical bytes for the same report)."""

    buffer = io.BytesIO()
    report_figure(report).savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save_report_plot(report: AttributionReport, path: Path) -> Path:
    """Render :func:`report_figure` to a PNG at ``path`` (atomically; byte-identical for the same report)."""

    atomic_write_bytes(Path(path), plot_png_bytes(report))
    return Path(path)
