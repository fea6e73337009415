"""Text views of a report: escaped markdown (for the report and the model card) and a plain terminal table.

Every name that comes from a user or a ledger (stage, behavior, dataset, unit) goes through
:func:`escape_markdown` or :func:`terminal_safe` before it is laid out, so a name cannot break a table, inject
HTML or end the card section early. Every number says its unit; positive = the stage raised the behavior.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attribution import AttributionReport

SIGN_CONVENTION = (
    "Effect of stage k = f(θ_K) − f(θ_K without stage k), in the behavior's unit: **positive = the stage raised "
    "the behavior**. Effects are estimated one stage at a time; they are not a decomposition of the total change "
    "and need not add up to it (see the interaction residual)."
)
_TABLE_MARK = {"verified": "*v", "agree": "*a", "unreliable": "*?"}
_MD_ESCAPED = set("\\`*_[]|~$#!")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
_FIDELITY_LABELS = {
    "num_pairs": "pairs",
    "n_pairs": "pairs",
    "pearson": "Pearson r",
    "spearman": "Spearman ρ",
    "sign_agreement": "sign agreement",
    "top_stage_agreement": "top-stage agreement",
    "scale_free_error": "median |τ̂ − τ| / max |τ|",
    "per_example_spearman": "per-example Spearman",
}


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def escape_markdown(text: Any) -> str:
    """``text`` safe inside a markdown table cell, heading or paragraph: markdown and HTML characters escaped,
    line breaks and other control/format characters replaced by spaces."""
    out = []
    for ch in str(text):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MD_ESCAPED:
            out.append("\\" + ch)
        elif ch in "\t\r\n" or _is_control(ch):
            out.append(" ")
        else:
            out.append(ch)
    return _escape_line_start("".join(out))


_BULLET = re.compile(r"^[-+*](?=\s|$)")
_RULE = re.compile(r"^[-=_*](?:\s*[-=_*])+\s*$")
_ORDERED_ITEM = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def _escape_line_start(text: str) -> str:
    """Neutralise the block markers a text could start a line with: indented code, list items, rules, setext."""
    stripped = text.lstrip(" ")
    if stripped and len(text) - len(stripped) >= 4:
        text = stripped
    if _BULLET.match(text) or _RULE.match(text):
        return "\\" + text
    return _ORDERED_ITEM.sub(r"\1\\\2", text)


def terminal_safe(text: Any) -> str:
    """``text`` with control characters (ANSI escapes, line breaks) shown as ``\\xNN`` / ``\\uNNNN``."""
    return "".join(_escape_code(c) if _is_control(c) else c for c in str(text))


def _escape_code(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"


def fmt_number(value: float | None, signed: bool = True) -> str:
    """4 significant digits, signed by default; ``n/a`` for None."""
    if value is None:
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def fmt_share(value: float | None) -> str:
    """A share of the total change as a signed percentage."""
    return "n/a" if value is None else f"{100.0 * value:+.1f} %"


def fmt_lr(low: float | None, high: float | None) -> str:
    """The applied learning-rate range of a stage."""
    if low is None or high is None:
        return "n/a"
    return f"{low:.3g}" if low == high else f"{low:.3g} – {high:.3g}"


def data_label(data: dict[str, Any] | None) -> str:
    """A one-line, unescaped description of a dataset identity (name, config, split, revision, fingerprint, size)."""
    if not data:
        return "not recorded"
    if "datasets" in data and isinstance(data["datasets"], list):
        return "; ".join(data_label(d if isinstance(d, dict) else {"name": d}) for d in data["datasets"])
    name = next((str(data[k]) for k in ("name", "path", "repo_id", "id") if data.get(k)), "unnamed")
    parts = [name] + [f"{k} {data[k]}" for k in ("config", "split", "revision") if data.get(k)]
    if data.get("fingerprint"):
        parts.append(f"fingerprint {str(data['fingerprint'])[:16]}")
    size = next((data[k] for k in ("num_rows", "size", "num_examples") if data.get(k) is not None), None)
    if size is not None:
        parts.append(f"{size} rows")
    return ", ".join(parts)


def unit_label(unit: str) -> str:
    """The escaped unit, or a neutral word when the behavior declared none."""
    return escape_markdown(unit) if unit else "behavior units"


def interval_label(report: AttributionReport) -> str:
    """How the intervals were computed, in words."""
    iv = report.interval or {}
    conf = float(iv.get("confidence", 0.95))
    return (
        f"{conf * 100:g} % {iv.get('method', 'bootstrap intervals')}, {iv.get('resamples', 'n/a')} resamples, "
        f"seed {iv.get('seed', 'n/a')}"
    )


def behavior_view(report: AttributionReport, name: str) -> dict[str, Any]:
    """Escaped strings for one behavior: heading parts, table header and rows, top stage, diagnostics lines."""
    summary = report.behavior(name)
    unit = unit_label(summary.unit)
    conf = f"{float((report.interval or {}).get('confidence', 0.95)) * 100:g} %"
    rows = []
    for row in report.rows_for(name):
        top = ", ".join(f"#{i} ({fmt_number(v)})" for i, v in row.top_examples(3))
        interval = f"[{fmt_number(row.ci_low)}, {fmt_number(row.ci_high)}]"
        cells = [str(row.stage_index), escape_markdown(row.stage), fmt_number(row.effect), interval]
        rows.append([*cells, fmt_share(row.share), top])
    header = ["#", "stage", f"effect ({unit})", f"{conf} interval ({unit})", "effect ÷ total change"]
    header.append("most moved examples")
    top_name = report.top_stage(name)
    top_row = next(r for r in report.rows_for(name) if r.stage == top_name)
    return {
        "name": escape_markdown(name),
        "unit": unit,
        "description": escape_markdown(summary.description),
        "num_examples": summary.num_examples,
        "header": header,
        "align": ["---:", "---", "---:", "---", "---:", "---"],
        "rows": rows,
        "top": f"**{escape_markdown(top_name)}** (effect {fmt_number(top_row.effect)} {unit})",
        "trust": escape_markdown(report.trust(name)["label"]),
        "diagnostics": diagnostics_lines(report, name, unit),
    }


def _amount(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{fmt_number(value)} {unit}"


def diagnostics_lines(report: AttributionReport, name: str, unit: str) -> list[str]:
    """ESTIMATORS.md §4 diagnostics of one behavior as escaped markdown bullet texts."""
    diag = report.diagnostics.get(name)
    if diag is None:
        return ["No diagnostics were recorded for this behavior."]
    if diag.total_change is None:
        lines = ["Total change f(θ_K) − f(θ_0): not evaluated, so shares and the interaction residual are n/a."]
    else:
        lines = [f"Total change f(θ_K) − f(θ_0): {_amount(diag.total_change, unit)}."]
    if diag.interaction_residual is None:
        residual = "n/a (needs the total change and an effect for every stage)"
    else:
        residual = _amount(diag.interaction_residual, unit)
    lines.append(
        f"Sum of the stage effects: {_amount(diag.sum_of_effects, unit)}; interaction residual (total − sum): "
        f"{residual}. A large residual means the stages interact."
    )
    if diag.linearisation_pair:
        linear, fd = (escape_markdown(x) for x in diag.linearisation_pair)
        gaps = ", ".join(
            f"{escape_markdown(s)} {fmt_number(g['gap'])} ({100 * g['relative_gap']:.0f} %)"
            for s, g in diag.linearisation_gap.items()
        )
        lines.append(
            f"Linearisation gap ({fd} − {linear}) per stage, {unit} (share of the largest effect): {gaps}. "
            "A large gap means the first-order step in f is not trustworthy for that stage."
        )
    else:
        lines.append("Linearisation gap: not computed (needs both a linear and a finite-difference estimate).")
    if diag.approximations and diag.approximations != report.approximations:
        lines.append("Approximations: " + "; ".join(escape_markdown(a) for a in diag.approximations) + ".")
    lines.append(f"Unstable curvature modes damped to zero: {diag.unstable_modes}.")
    for key, value in diag.notes.items():
        if isinstance(value, str | int | float | bool) and len(str(value)) <= 200:
            shown = fmt_number(value, signed=False) if isinstance(value, float) else str(value)
            lines.append(f"{escape_markdown(key)}: {escape_markdown(shown)}.")
    return lines


def fidelity_view(report: AttributionReport) -> dict[str, Any] | None:
    """The fidelity figures as an escaped table (rows = groups of pairs, columns = metrics), or None."""
    fid = report.fidelity
    if not fid:
        return None
    blocks = {k: v for k, v in fid.items() if isinstance(v, dict)}
    groups = blocks if blocks and all(isinstance(v, dict) for v in blocks.values()) else {"all pairs": fid}
    if "all" in groups or "non_terminal" in groups:  # estimators.fidelity(): {"all", "non_terminal", "terminal_stage"}
        terminal = fid.get("terminal_stage")
        excluded = f" (all but {terminal})" if terminal else ""
        names = {"all": "all pairs", "non_terminal": "non-terminal pairs" + excluded}
        groups = {names.get(k, k): v for k, v in groups.items()}
    metrics: list[str] = []
    for figures in groups.values():  # per-behavior breakdowns (dict values) stay in the JSON sidecar
        metrics.extend(k for k, v in figures.items() if k not in metrics and not isinstance(v, dict))
    rows = []
    for group, figures in groups.items():
        cells = [escape_markdown(group)]
        for metric in metrics:
            value = figures.get(metric)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            cells.append(fmt_number(value, signed=False) if is_number or value is None else escape_markdown(value))
        rows.append(cells)
    header = ["pairs of (stage, behavior)"] + [escape_markdown(_FIDELITY_LABELS.get(m, m)) for m in metrics]
    return {"header": header, "align": ["---"] + ["---:"] * len(metrics), "rows": rows}


def md_table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table from already escaped cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in rows)
    return "\n".join(lines)


def render_markdown(report: AttributionReport) -> str:
    """The report as markdown: one table per behavior, its diagnostics, the approximations and the fidelity."""
    out = [f"## Stage attribution (estimator: {escape_markdown(report.estimator)})", "", SIGN_CONVENTION, ""]
    if report.estimator_reason:
        out += [f"Why this estimator: {escape_markdown(report.estimator_reason)}.", ""]
    out += [f"Intervals: {escape_markdown(interval_label(report))}.", ""]
    for summary in report.behaviors:
        view = behavior_view(report, summary.name)
        out += [f"### Behavior: {view['name']} (unit: {view['unit']}; {view['num_examples']} examples)", ""]
        if view["description"]:
            out += [view["description"], ""]
        out += [md_table(view["header"], view["align"], view["rows"]), ""]
        out += [f"Most accountable stage: {view['top']} — {view['trust']}.", ""]
        out += [f"- {line}" for line in view["diagnostics"]] + [""]
    if report.approximations:
        out += ["### Approximations", ""] + [f"- {escape_markdown(a)}" for a in report.approximations] + [""]
    fid = fidelity_view(report)
    out += ["### Fidelity against replay", ""]
    if fid is None:
        out += ["Replay was not run: these effects have not been checked against ground truth.", ""]
    else:
        out += [md_table(fid["header"], fid["align"], fid["rows"]), ""]
    return "\n".join(out)


def render_table(report: AttributionReport) -> str:
    """A plain-text table (behavior, stage, effect, interval, share, unit) for a terminal."""
    conf = f"{float((report.interval or {}).get('confidence', 0.95)) * 100:g}%"
    header = ["behavior", "#", "stage", "effect", f"{conf} interval", "÷ total", "unit", "top"]
    body = []
    for summary in report.behaviors:
        top = report.top_stage(summary.name)
        for row in report.rows_for(summary.name):
            interval = f"[{fmt_number(row.ci_low)}, {fmt_number(row.ci_high)}]"
            body.append(
                [
                    terminal_safe(summary.name),
                    str(row.stage_index),
                    terminal_safe(row.stage),
                    fmt_number(row.effect),
                    interval,
                    fmt_share(row.share),
                    terminal_safe(summary.unit or "-"),
                    (_TABLE_MARK[report.trust(summary.name)["verdict"]]) if row.stage == top else "",
                ]
            )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"estimator: {terminal_safe(report.estimator)}; positive effect = the stage raised the behavior; "
        "* = most accountable stage (*v verified by replay, *a estimators agree, *? unreliable); effects do not add "
        "up to the total change."
    )
    return "\n".join(lines)
