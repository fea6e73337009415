"""The intervention's model-card section (between its own markers) and the plot of the sweep.

The section is kept apart from the attribution section (``<!-- hf-stage-attribution:begin -->``) so both can live in
one card: re-writing it replaces only the text between :data:`SECTION_BEGIN` and :data:`SECTION_END`; everything
else in the README is kept byte for byte.

Example:
    >>> card = splice("# My model\\n", SECTION_BEGIN + "\\nx\\n" + SECTION_END)
    >>> card.startswith("# My model\\n\\n" + SECTION_BEGIN), splice(card, SECTION_BEGIN + SECTION_END).count("x")
    (True, 0)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ModelCardError
from ..ledger.storage import atomic_write_bytes
from ..report.text import append_block, dominant_line_break, escape_markdown

SECTION_BEGIN = "<!-- hf-stage-attribution-intervention:begin -->"
SECTION_END = "<!-- hf-stage-attribution-intervention:end -->"
_KIND_TEXT = {
    "aa-linear": "the stage embedding v_k (the stage's delta carried through the later stages' optimizer recurrences)",
    "aa-ggn": "the curvature-aware stage embedding v_k (Gauss–Newton propagation through the later stages)",
    "aa-hvp": "the curvature-aware stage embedding v_k (Hessian propagation through the later stages)",
    "delta": "the stage's own parameter delta Δ_k (task-vector negation)",
}


def splice(content: str, section: str) -> str:
    """``content`` with our section replaced (or appended); ModelCardError for broken markers. The section's lines
    end as most lines of ``content`` do (a ``\\r\\n`` card gets ``\\r\\n`` lines).

    Example:
        >>> splice("# M\\r\\n", SECTION_BEGIN + "\\nx\\n" + SECTION_END).count("\\r\\n")
        5
    """
    line_break = dominant_line_break(content)
    if line_break != "\n":
        section = section.replace("\r\n", "\n").replace("\n", line_break)
    begins = [m.start() for m in re.finditer(re.escape(SECTION_BEGIN), content)]
    ends = [m.start() for m in re.finditer(re.escape(SECTION_END), content)]
    if not begins and not ends:
        return append_block(content, section, line_break)
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return content[: begins[0]] + section + content[ends[0] + len(SECTION_END) :]
    raise ModelCardError(
        f"Expected at most one '{SECTION_BEGIN}' followed by one '{SECTION_END}' in the README, found "
        f"{len(begins)} begin and {len(ends)} end marker(s). Remove the broken intervention section by hand and retry."
    )


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text and "\n" not in text and "\r" not in text else escape_markdown(text)


def render_section(
    result: Any, saved: Any = None, plot_name: str | None = "intervention_sweep.png", derived_from: str | None = None
) -> str:
    """The markdown section: what was done (and from which model, ``derived_from``, when given), the sweep table,
    the trade-off, the plot and the reload check."""

    point = result.chosen if saved is None else _saved_point(result, saved)
    lines = [SECTION_BEGIN, f"## Intervention: scaling down training stage `{result.stage}`", ""]
    what = _KIND_TEXT.get(result.kind, result.kind)
    if point is not None and point.variant == "replay":
        lines.append(
            f"This model is the pipeline re-trained without stage `{result.stage}` (index {result.stage_index}): "
            "every later stage was re-run with its recorded recipe (replay)."
        )
    elif point is not None:
        used = _KIND_TEXT.get(point.variant, point.variant)
        lines.append(
            f"This model is the final model of the recorded pipeline with the contribution of stage `{result.stage}` "
            f"(index {result.stage_index}) scaled down: θ = θ_K − α · v, v = {used}, **α = {point.alpha:g}**."
        )
    else:
        lines.append(f"A sweep of θ_K − α · v over α, v = {what}; no model was chosen (see the choice below).")
    if derived_from:
        lines.append(f"It is derived from the model {_code(str(derived_from))}.")
    if saved is not None:
        form = "a LoRA adapter (its B factors scaled by 1 − α)" if saved.form == "adapter" else "a full model"
        lines.append(f"It is saved as {form}.")
    unit = f" ({result.target_unit})" if result.target_unit else ""
    lines += [
        "",
        f"- Target behavior: `{result.target_name}`{unit}, to {result.target_direction}.",
        f"- Constraint: {result.constraint.describe() if result.constraint is not None else 'none'}; "
        f"objective: {result.objective}.",
        f"- Choice: {result.message}",
        f"- Trade-off: {result.headline()}",
    ]
    if result.replay_note:
        lines.append(f"- {result.replay_note}.")
    lines += ["", "### Sweep", "", result.to_markdown(), ""]
    legend = _legend(result)
    if result.accuracy_metrics:
        legend += " Accuracies are in percent on held-out data"
        if "worst_group" in result.accuracy_metrics:
            legend += "; worst-group accuracy is the lowest accuracy over the groups (spurious feature × label)"
        legend += "."
    lines.append(legend)
    if plot_name:
        lines += ["", f"![Intervention sweep]({plot_name})"]
    if saved is not None and saved.max_difference is not None:
        lines += ["", f"Reloaded with `from_pretrained`, the saved model reproduces the evaluated figures (largest "
                      f"absolute difference {saved.max_difference:.2g})."]  # fmt: skip
    lines += ["", f"_Written by hf-stage-attribution {__version__}._", SECTION_END]
    return "\n".join(lines)


def _legend(result: Any) -> str:
    """What each ``variant`` of the sweep table is, for the variants the table holds."""
    parts = ["`original` is the unedited final model"]
    if result.kind == "delta":
        parts.append("`delta` subtracts α·Δ_k, the stage's own parameter delta (task-vector negation)")
    else:
        parts.append(f"`{result.kind}` subtracts α·v_k, {_KIND_TEXT.get(result.kind, result.kind)}")
        if any(p.variant == "delta" for p in result.points):
            parts.append("`delta` subtracts α·Δ_k (task-vector negation, for comparison)")
        elif result.delta_note:
            parts.append(result.delta_note)
    if result.replay is not None:
        parts.append("`replay` is the pipeline re-trained without the stage")
    return "`variant`: " + ", ".join(parts) + "."


def _saved_point(result: Any, saved: Any) -> Any:
    if saved.variant == "replay":
        return result.replay
    return result.point(saved.alpha, saved.variant)


def write_card_section(
    readme: str | Path, result: Any, saved: Any = None, base_text: str | None = None, derived_from: str | None = None
) -> Path:
    """Write our section into ``readme`` (``base_text`` replaces its current content first, e.g. the original
    model's card); the rest of the card is kept byte for byte. ``derived_from`` names the edited model."""

    path = Path(readme)
    if base_text is not None:
        content = base_text
    else:
        content = path.read_bytes().decode("utf-8") if path.exists() else ""  # bytes: keep \r\n line endings
    section = render_section(result, saved, derived_from=derived_from)
    atomic_write_bytes(path, splice(content, section).encode("utf-8"))
    return path


def plot_sweep(result: Any, path: str | Path) -> Path:
    """Target (left) and accuracies or other utilities (right) against α, one line per variant; PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    acc = [result.accuracy_metrics[k] for k in ("average", "worst_group") if k in result.accuracy_metrics]
    utilities = acc or [m for m in result.baseline.metrics if "[" not in m][:3]
    variants = [v for v in dict.fromkeys(p.variant for p in result.points)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = ["-", "--", ":", "-."]
    for i, variant in enumerate(variants):
        pts = [result.baseline, *result.sweep(variant)]
        xs = [p.alpha for p in pts]
        axes[0].plot(xs, [p.target for p in pts], styles[i % 4], marker="o", label=variant)
        for j, metric in enumerate(utilities):
            axes[1].plot(xs, [p.metrics[metric] for p in pts], styles[i % 4], marker="o", color=f"C{j}",
                         label=f"{metric} ({variant})")  # fmt: skip
    if result.replay is not None:
        axes[0].plot([1.0], [result.replay.target], "k*", markersize=12, label="replay without stage")
        for j, metric in enumerate(utilities):
            axes[1].plot([1.0], [result.replay.metrics[metric]], "*", color=f"C{j}", markersize=12)
    if result.chosen is not None:
        for ax in axes:
            ax.axvline(result.chosen.alpha, color="grey", alpha=0.5, linestyle=":")
    axes[0].set(xlabel="α", ylabel=result.target_name, title=f"target: {result.target_name}")
    axes[1].set(xlabel="α", ylabel="utility" + (" (%)" if acc else ""), title="utility")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Scaling down stage '{result.stage}' (θ_K − α·v)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["SECTION_BEGIN", "SECTION_END", "plot_sweep", "render_section", "splice", "write_card_section"]
