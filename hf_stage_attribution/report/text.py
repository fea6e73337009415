"""Text views of a report: escaped markdown (for the report and the model card) and a plain terminal table.

Every name that comes from a user or a ledger (stage, behavior, dataset, unit) goes through
:func:`escape_markdown` or :func:`terminal_safe` before it is laid out, so a name cannot break a table, inject
HTML or end the card section early. Every number says its unit; positive = the stage raised the behavior.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

from .._internal.table import render_table as text_table
from .trust import AGREE, VERIFIED, replay_checks

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


def dominant_line_break(text: str) -> str:
    """The line ending most lines of ``text`` use, ``"\\r\\n"`` or ``"\\n"`` (a tie, or no line at all: ``"\\r\\n"``
    when there is one, else ``"\\n"``); the ending of the lines the card writers add to an existing card.

    Example:
        >>> dominant_line_break("---\\nlicense: mit\\n---\\n# M\\r\\nline\\n"), dominant_line_break("a\\r\\nb\\n")
        ('\\n', '\\r\\n')
    """
    crlf = text.count("\r\n")
    return "\r\n" if crlf and crlf >= text.count("\n") - crlf else "\n"


_LINE_END = re.compile(r"(?:\r\n|\r|\n)\Z")


def line_ending(text: str) -> str:
    """The line break that ends ``text`` ('' for none)."""
    match = _LINE_END.search(text)
    return match.group(0) if match else ""


def ends_with_blank_line(text: str) -> bool:
    """Whether ``text`` ends with an empty line (two line breaks, of any kind)."""
    last = line_ending(text)
    return bool(last) and bool(line_ending(text[: len(text) - len(last)]))


def append_block(text: str, block: str, line_break: str) -> str:
    """``text`` with ``block`` appended after a blank line and ended by ``line_break`` (the card writers' sections).

    Example:
        >>> append_block("# M\\r\\n", "ours", "\\r\\n"), append_block("", "ours", "\\n")
        ('# M\\r\\n\\r\\nours\\r\\n', 'ours\\n')
    """
    if not text:
        return block + line_break
    if ends_with_blank_line(text):
        return text + block + line_break
    if line_ending(text):
        return text + line_break + block + line_break
    return text + line_break + line_break + block + line_break


def fmt_number(value: float | None, signed: bool = True) -> str:
    """4 significant digits, signed by default; ``n/a`` for None."""
    if value is None:
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


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


def shares_of_absolute(effects: list[float]) -> list[float | None]:
    """Each effect's share of the summed absolute effects, ``|e_k| / Σ_j |e_j|`` (None when every effect is 0).

    Unlike ``effect ÷ total change`` these are between 0 and 1 and add up to 1, whatever the stages' interaction.

    Example:
        >>> shares_of_absolute([-3.0, 1.0])
        [0.75, 0.25]
    """
    scale = sum(abs(e) for e in effects)
    return [abs(e) / scale if scale else None for e in effects]


def fmt_percent(value: float | None) -> str:
    """An unsigned percentage (``n/a`` for None)."""
    return "n/a" if value is None else f"{100.0 * value:.0f} %"


def direction_word(effect: float) -> str:
    """``raised`` / ``lowered`` / ``did not change`` for a stage effect (positive = raised)."""
    return "raised" if effect > 0 else "lowered" if effect < 0 else "did not change"


#: Printed wherever an interval is: what it covers (the estimator's own error is the verdict's business).
INTERVAL_SHORT = "example sampling"


def interval_header(report: AttributionReport, space: str = " ") -> str:
    """The interval column's name, with what it covers: ``95 % interval (example sampling)``."""
    conf = f"{float((report.interval or {}).get('confidence', 0.95)) * 100:g}{space}%"
    return f"{conf} interval ({INTERVAL_SHORT})"


def has_interval(row: Any) -> bool:
    """Whether a row has a sampling interval (a behavior of one example has none; a report written before that was
    said stores a zero-width one, which is not shown either)."""
    return row.ci_low is not None and row.ci_high is not None and len(row.per_example) >= 2


def fmt_interval(row: Any) -> str:
    """``[low, high]``, or ``n/a (1 example)`` where one example gives no sampling interval."""
    if not has_interval(row):
        return "n/a (1 example)"
    return f"[{fmt_number(row.ci_low)}, {fmt_number(row.ci_high)}]"


def examples_label(count: int) -> str:
    """``1 example`` / ``N examples``."""
    return f"{count} example" if count == 1 else f"{count} examples"


def _sign(value: float | None) -> int:
    return 0 if not value else (1 if value > 0 else -1)


def unsettled_sign_reasons(report: AttributionReport, name: str) -> dict[str, str]:
    """``{stage: why}`` for the stages of ``name`` whose estimated sign is not a claim: another estimator gives the
    other sign, or a size more than 2-fold off (the verdict's evidence), or the interval includes 0. Stages replay
    measured are left out: replay's sign is the answer there (:func:`opposite_directions` says which it is)."""
    evidence = report.trust(name).get("evidence") or {}
    out: dict[str, str] = {}
    for opinion, stages in (evidence.get("sign_disagreements") or {}).items():
        for stage in stages or []:
            out.setdefault(str(stage), f"{opinion} gives the other sign")
    for opinion, stages in (evidence.get("unsettled_signs") or {}).items():
        for stage in stages or []:
            out.setdefault(str(stage), f"{opinion}'s size differs more than 2-fold")
    for row in report.rows_for(name):
        if has_interval(row) and row.effect != 0 and row.ci_low <= 0.0 <= row.ci_high:
            out.setdefault(row.stage, "its interval includes 0")
    replayed = {r.stage for r in report.rows_for(name) if r.replay_effect is not None}
    return {stage: why for stage, why in out.items() if stage not in replayed}


def stage_coverage(report: AttributionReport, name: str | None = None) -> dict[str, Any] | None:
    """``{"attributed", "of", "left_out"}`` where the report (or behavior ``name``) attributes only some of the
    ledger's stages (``report.ledger["num_stages"]``): how many were attributed, of how many, and the names of those
    left out (``#index`` where the report does not know a name); None where every stage was attributed or the ledger's
    stage count is not known. A top stage, a share of Σ|effect| or an interaction residual covers the attributed
    stages only: a stage left out may have moved the behavior more.

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"f": {"pre": [1.0], "sft": [2.0]}}, estimator="x", versions={},
        ...     ledger={"num_stages": 3, "stage_names": ["pre", "sft", "patch"]})
        >>> stage_coverage(r)
        {'attributed': 2, 'of': 3, 'left_out': ['patch']}
    """
    ledger = report.ledger or {}
    count = ledger.get("num_stages")
    indices = {s.index for s in report.stages}
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        indices |= set(range(count))
    attributed = {s.index for s in report.stages} if name is None else {r.stage_index for r in report.rows_for(name)}
    left_out = sorted(indices - attributed)
    if not left_out:
        return None
    names = ledger.get("stage_names")
    known = {i: str(n) for i, n in enumerate(names)} if isinstance(names, list) else {}
    known.update({s.index: s.name for s in report.stages})
    return {
        "attributed": len(attributed),
        "of": len(indices),
        "left_out": [known.get(i, f"#{i}") for i in left_out],
    }


def coverage_note(report: AttributionReport, escape: Any = None) -> str:
    """The sentence the card and report.md put before the effects where only some of the ledger's stages were
    attributed ('' otherwise)."""
    cover, left_out = _coverage(report, None, escape)
    if cover is None:
        return ""
    verb = "was" if cover["attributed"] == 1 else "were"
    return (
        f"Only {cover['attributed']} of the ledger's {cover['of']} stages {verb} attributed (not attributed: "
        f"{left_out}): each top stage and share below is among those, and a stage left out may be more accountable."
    )


def coverage_clause(report: AttributionReport, name: str | None = None, escape: Any = None) -> str:
    """``2 attributed stages of 3 only (not attributed: patch)`` where only some stages were attributed, else '';
    names escaped with ``escape`` (default: :func:`escape_markdown`)."""
    cover, left_out = _coverage(report, name, escape)
    if cover is None:
        return ""
    plural = "s" if cover["attributed"] != 1 else ""
    return f"{cover['attributed']} attributed stage{plural} of {cover['of']} only (not attributed: {left_out})"


def _coverage(report: AttributionReport, name: str | None, escape: Any) -> tuple[dict[str, Any] | None, str]:
    """(:func:`stage_coverage`, the escaped names of the stages left out)."""
    cover = stage_coverage(report, name)
    escape = escape or escape_markdown
    return cover, ", ".join(escape(s) for s in (cover or {}).get("left_out", []))


def _namers(escape: Any) -> tuple[Any, Any]:
    """(stage-name formatter, plain formatter): bold escaped markdown by default, ``escape`` for both otherwise."""
    if escape is None:
        return (lambda text: f"**{escape_markdown(text)}**"), escape_markdown
    return escape, escape


def headline(report: AttributionReport, name: str, escape: Any = None) -> str:
    """One sentence: which stage moved the behavior most and which way, with its effect, unit and interval; where
    only some of the ledger's stages were attributed, a second one saying the comparison covers those only and
    naming the stages left out (:func:`stage_coverage`).

    Names are escaped for markdown (stage in bold) by default; pass ``escape=terminal_safe`` for a console.

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"tox": {"sft": [1.0, 1.2], "dpo": [-3.0, -2.8]}}, estimator="x",
        ...                             behaviors={"tox": {"unit": "nats"}}, n_resamples=40, versions={})
        >>> headline(r, "tox", escape=str)
        'dpo lowered tox the most (-2.9 nats, 95 % interval (example sampling) [-3, -2.8]).'
    """
    sentence = _top_claim(report, name, escape)
    partial = coverage_clause(report, name, _namers(escape)[1])
    if partial:
        sentence += f" Among the {partial}: a stage left out may have moved it more."
    return sentence


def _top_claim(report: AttributionReport, name: str, escape: Any = None) -> str:
    """The first sentence of :func:`headline`: the top stage among the rows of ``name``."""
    stage_name, plain = _namers(escape)
    raw_unit = report.behavior(name).unit
    unit = unit_label(raw_unit) if escape is None else (escape(raw_unit) if raw_unit else "behavior units")
    top = next(r for r in report.rows_for(name) if r.stage == report.top_stage(name))
    if not report.moved(name):
        return f"No stage moved {plain(name)}: every estimated effect is 0."

    def amount(row: Any) -> str:
        if not has_interval(row):
            return f"{fmt_number(row.effect)} {unit}; one example: no sampling interval"
        return f"{fmt_number(row.effect)} {unit}, {interval_header(report)} {fmt_interval(row)}"

    measured = report.replay_top_stage(name)
    ground_truth = report.estimator == "replay"  # the effects are replay's own
    tie = replay_tie(report, name) if measured is not None or ground_truth else None
    if tie is not None:  # replay's own examples do not separate its top two stages: it names neither alone
        first, second = (next(r for r in report.rows_for(name) if r.stage == s) for s in tie)
        a, b = (r.effect if ground_truth else r.replay_effect for r in (first, second))
        sentence = (
            f"Replay (ground truth): {stage_name(first.stage)} and {stage_name(second.stage)} moved {plain(name)} "
            f"about as much ({fmt_number(a)} and {fmt_number(b)} {unit}; their "
            "difference is within example sampling, so replay does not tell which moved it more)."
        )
        if ground_truth:
            return sentence
        if top.effect == 0:
            return sentence + " The estimate put every effect at 0."
        return sentence + f" The estimate named {stage_name(top.stage)} ({amount(top)})."
    if measured is not None and (measured != top.stage or _sign(top.replay_effect) != _sign(top.effect)):
        truth = next(r for r in report.rows_for(name) if r.stage == measured)
        sentence = (
            f"Replay (ground truth): {stage_name(measured)} {direction_word(truth.replay_effect or 0.0)} "
            f"{plain(name)} "
            f"the most ({fmt_number(truth.replay_effect)} {unit})."
        )
        if top.effect == 0:
            return sentence + " The estimate put every effect at 0."
        if measured != top.stage:
            return sentence + f" The estimate named {stage_name(top.stage)} instead ({amount(top)})."
        return sentence + f" The estimate gave it the other sign ({amount(top)})."
    unsettled = unsettled_sign_reasons(report, name).get(top.stage)
    if unsettled and unsettled != "its interval includes 0":
        return (
            f"{stage_name(top.stage)} moved {plain(name)} the most ({amount(top)}); its sign is not settled: "
            f"{plain(unsettled)}."
        )
    # where replay measured it, its size stands beside the estimate's: "verified" bounds sizes within 2-fold only
    measured_size = "" if top.replay_effect is None else f"; replay measured {fmt_number(top.replay_effect)}"
    sentence = (
        f"{stage_name(top.stage)} {direction_word(top.effect)} {plain(name)} the most ({amount(top)}{measured_size})."
    )
    if has_interval(top) and top.ci_low <= 0.0 <= top.ci_high:
        sentence += " Its interval includes 0: the examples cannot tell this effect from none."
    return sentence


def opposite_directions(report: AttributionReport, name: str, escape: Any = None) -> str:
    """Where stages pushed the behavior in opposite directions, which raised and which lowered it ('' otherwise).

    A sign is claimed only where it is settled: where replay ran, replay's sign (and the estimate's, when it differs);
    elsewhere a stage whose sign another estimator contradicts, or whose interval includes 0, is listed as "sign not
    settled" (:func:`unsettled_sign_reasons`).

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"tox": {"sft": [1.0, 1.1], "lora": [0.5, 0.6], "dpo": [-3.0, -2.9]}},
        ...                             estimator="x", versions={})
        >>> opposite_directions(r, "tox", escape=str)
        'Stages pushed tox in opposite directions: raised by sft (+1.05), lora (+0.55); lowered by dpo (-2.95).'
    """
    stage_name, plain = _namers(escape)
    rows = report.rows_for(name)
    unsettled = unsettled_sign_reasons(report, name)
    up, down, open_ = [], [], []
    for r in rows:
        if r.replay_effect is not None:
            if _sign(r.replay_effect) == 0:
                continue
            text = f"{stage_name(r.stage)} ({fmt_number(r.effect)}; replay {fmt_number(r.replay_effect)})"
            if _sign(r.effect) not in (0, _sign(r.replay_effect)):
                text = (
                    f"{stage_name(r.stage)} (replay {fmt_number(r.replay_effect)}; the estimate, "
                    f"{fmt_number(r.effect)}, has the other sign)"
                )
            (up if r.replay_effect > 0 else down).append(text)
        elif r.effect != 0 and r.stage in unsettled:
            open_.append(
                f"{stage_name(r.stage)} ({fmt_number(r.effect)}, sign not settled: {plain(unsettled[r.stage])})"
            )
        elif r.effect != 0:
            (up if r.effect > 0 else down).append(f"{stage_name(r.stage)} ({fmt_number(r.effect)})")
    signs = {_sign(r.effect) for r in rows} | {_sign(r.replay_effect) for r in rows}
    if not ({1, -1} <= signs):
        return ""
    unnamed = _unnamed_sign_disagreements(report, name)
    if unnamed:  # replay checked it apart, in a report that did not keep replay's values: which sign is off is unknown
        return (
            f"The estimates point {plain(name)} in opposite directions ({', '.join(up + down + open_)}), but replay "
            f"gives the other sign for {unnamed}; this report, written before replay's values were kept beside the "
            "estimates, does not say which, so no stage's sign is claimed here."
        )
    if up and down:
        text = (
            f"Stages pushed {plain(name)} in opposite directions: raised by {', '.join(up)}; "
            f"lowered by {', '.join(down)}"
        )
        return text + (f"; and {', '.join(open_)}." if open_ else ".")
    parts = ([f"raised by {', '.join(up)}"] if up else []) + ([f"lowered by {', '.join(down)}"] if down else [])
    return (
        f"The estimates point {plain(name)} in opposite directions, but not every sign is settled: "
        + "; ".join(parts + open_)
        + "."
    )


def replay_tie(report: AttributionReport, name: str) -> tuple[str, str] | None:
    """``(replay's top stage, the runner-up)`` where replay ran for every stage of ``name`` (or is the report's
    estimator) and its own examples do not separate the two (``trust(name)["evidence"]["replay"]["top_separation"]``,
    a paired bootstrap stored when the report was built); None otherwise (separated, or nothing stored: replay given
    as means only)."""
    replay = ((report.trust(name).get("evidence") or {}).get("replay")) or {}
    sep = replay.get("top_separation") if isinstance(replay, dict) else None
    if not isinstance(sep, dict) or sep.get("separated", True):
        return None
    measured = report.top_stage(name) if report.estimator == "replay" else report.replay_top_stage(name)
    if measured != sep.get("top"):
        return None  # stored for other replay values than the rows carry (re-verified since): not this replay's
    return str(sep["top"]), str(sep["runner_up"])


def claimed_top_stage(report: AttributionReport, name: str) -> str | None:
    """The stage the report names as the answer for ``name``: replay's top stage where replay ran for every stage
    (the measured answer), else the estimate's; None when no stage moved the behavior."""
    return report.top_stage_claim(name)["stage"]


def _unnamed_sign_disagreements(report: AttributionReport, name: str) -> str:
    """ "N of M stages" where the verdict says replay disagrees on N signs but the rows carry no replay values to say
    which ('' otherwise): a report whose replay ran apart before ``verify_with_replay`` kept them."""
    if has_replay(report, name):
        return ""
    figures = (report.trust(name).get("evidence") or {}).get("replay") or {}
    agreement, compared = figures.get("sign_agreement"), figures.get("signs_compared")
    if not isinstance(agreement, int | float) or not isinstance(compared, int) or agreement >= 1.0:
        return ""
    return f"{round((1.0 - agreement) * compared)} of these {compared} stages"


def has_replay(report: AttributionReport, name: str | None = None) -> bool:
    """Whether any row (of ``name``, or of the whole report) carries a replay value."""
    rows = report.rows if name is None else report.rows_for(name)
    return any(r.replay_effect is not None for r in rows)


def replay_hint(report: AttributionReport, escape: Any = None) -> str:
    """What would check the estimates against replay — the command and the optimizer steps replay re-runs — or why
    replay cannot run from this ledger; escaped with ``escape`` (default: :func:`escape_markdown`). Empty when replay
    ran, when there is nothing to re-run, or for a report written before the attributor recorded it
    (``report.ledger["replay_needs"]``, from :func:`~hf_stage_attribution.estimators.replay.replay_needs`).

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"b": {"sft": [1.0], "dpo": [0.5]}}, estimator="partial-replay", versions={},
        ...     ledger={"replay_needs": {"optimizer_steps": 40, "stages": ["dpo"], "problems": []}})
        >>> replay_hint(r, str).split(": ")[-1]
        'replay re-runs 40 optimizer steps in all, of stage(s) dpo.'
    """
    escape = escape or escape_markdown
    needs = (report.ledger or {}).get("replay_needs")
    if not isinstance(needs, dict) or _checked_by_replay(report):
        return ""
    problems = [str(p) for p in needs.get("problems") or []]
    if problems:
        return escape(
            "Replay cannot run from this ledger, so nothing can check these estimates against ground truth: "
            + "; ".join(problems)
            + "."
        )
    if not needs.get("optimizer_steps"):
        return ""
    how = (
        "hf-stage-attribution validate with the same --stage-fn (or attribute(..., validate=True) with the same "
        "stage_fns)"
        if needs.get("by_function")
        else "hf-stage-attribution validate (or attribute(..., validate=True))"
    )
    return escape(f"To check these estimates against replay, run {how}: replay {replay_work(needs)}.")


def replay_checked(report: AttributionReport) -> bool:
    """Whether replay checked every behavior: fidelity figures, or replay values in every row of a behavior (or, in
    a report written before ``verify_with_replay`` kept them, replay evidence in its verdict). The card's
    ``replay_validated`` key; where it is False, :func:`replay_note` says what replay did cover.

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"f": {"a": [0.9], "b": [1.0]}}, estimator="aa-linear", versions={})
        >>> before = replay_checked(r)
        >>> r.verify_with_replay({"f": {"a": 0.8, "b": 1.1}})
        >>> before, replay_checked(r)
        (False, True)
    """
    if report.fidelity is not None:
        return True
    return all(_replay_in(report, b.name) == "all" for b in report.behaviors)


def _replay_in(report: AttributionReport, name: str) -> str:
    """``"all"`` (replay values in every row of ``name``, or its verdict rests on replay run apart), ``"some"`` or
    ``"none"``."""
    rows = report.rows_for(name)
    if all(r.replay_effect is not None for r in rows) or _verdict_rests_on_replay(report, name):
        return "all"
    return "some" if any(r.replay_effect is not None for r in rows) else "none"


def replay_note(report: AttributionReport) -> str:
    """Escaped: what replay checked where it ran without fidelity figures (``verify_with_replay``, a partial replay
    that replayed every later stage whole); '' where it did not run (the card and report.md then say so) or where
    fidelity figures stand in the fidelity section."""
    if report.fidelity is not None:
        return ""
    coverage = {b.name: _replay_in(report, b.name) for b in report.behaviors}
    if all(c == "none" for c in coverage.values()):
        return ""
    if all(c == "all" for c in coverage.values()):
        kept = all(r.replay_effect is not None for r in report.rows)
        where = (
            "its measured effects are the replay (ground truth) column above, and the verdicts rest on them"
            if kept
            else "the verdicts that say so rest on it (this report does not keep every measured value)"
        )
        return f"Replay re-ran the later stages without each stage: {where}. No fidelity figures were computed."
    checked = [escape_markdown(n) for n, c in coverage.items() if c != "none"]
    partly = [escape_markdown(n) for n, c in coverage.items() if c != "all"]
    return (
        f"Replay checked only part of this report (behavior(s) {', '.join(checked)}: the replay (ground truth) "
        f"column above); the other effects, of {', '.join(partly)}, have not been checked against ground truth."
    )


def _verdict_rests_on_replay(report: AttributionReport, name: str) -> bool:
    """Whether replay run apart from the attribution (``report.verify_with_replay``) decided ``name``'s verdict."""
    return "replay" in (report.trust(name).get("evidence") or {})


def _checked_by_replay(report: AttributionReport) -> bool:
    """Whether replay run apart from the attribution (``report.verify_with_replay``) already decided a verdict."""
    return any(_verdict_rests_on_replay(report, b.name) for b in report.behaviors)


def replay_work(needs: dict[str, Any]) -> str:
    """What replay re-runs — ``replay_needs(...).to_dict()`` (:mod:`~hf_stage_attribution.estimators.replay`) — as
    the clause the card, the terminal table and ``inspect`` print (plain text; the caller escapes it).

    Example:
        >>> replay_work({"optimizer_steps": 24, "stages": ["lora", "dpo"], "problems": []})
        're-runs 24 optimizer steps in all, of stage(s) lora, dpo'
    """
    stages = ", ".join(str(s) for s in needs.get("stages") or [])
    return f"re-runs {int(needs.get('optimizer_steps') or 0)} optimizer steps in all, of stage(s) {stages}"


def trust_label(report: AttributionReport, name: str) -> str:
    """The escaped trust verdict label of a behavior ('' when the report has none)."""
    label = report.trust(name).get("label")  # assessed from stored figures for a report written without one
    return escape_markdown(label) if label else ""


def trust_evidence(report: AttributionReport, name: str) -> str:
    """What supports a behavior's verdict, escaped: the verdict's reason when it is "verified by replay" or
    "estimated — estimators agree" (which checks agreed, on what); '' for "unreliable", whose label says why.

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> report = AttributionReport.build({"f": {"a": [0.1, 0.3], "b": [0.9, 1.1]}}, estimator="aa-linear",
        ...     alternates={"replay": {"f": {"a": [0.2, 0.2], "b": [1.0, 1.0]}}}, versions={})
        >>> trust_evidence(report, "f").split(":")[0]
        'Exact replay agrees'
    """
    trust = report.trust(name)
    if trust.get("verdict") in (AGREE, VERIFIED) and trust.get("reason"):
        return escape_markdown(str(trust["reason"]))
    return ""


_GAP_MEANS = "A large gap means the first-order step in f is not trustworthy for that stage."


def _gap_meaning(report: AttributionReport, name: str) -> str:
    """The last sentence of the linearisation-gap diagnostic: what a large gap means, that a verdict verified by
    replay does not rest on it, or — where an estimated verdict does not count it (:func:`~.trust.gap_counts`) — why
    not."""
    trust = report.trust(name)
    evidence = trust.get("evidence") or {}
    if trust.get("verdict") == VERIFIED:
        return f"{_GAP_MEANS[:-1]}; the verdict rests on replay, not on this reading."
    if evidence.get("linearisation_gap_counted") is False:
        checkers = replay_checks(report.estimator, evidence.get("second_opinions") or {})
        by = ", ".join(escape_markdown(n) for n in checkers) or "another replay family"
        return (
            f"Not counted in the verdict: {escape_markdown(report.estimator)} reads the embedding it replayed "
            f"exactly, and {by} checked that embedding by another route, so the gap is the linear read-out's error."
        )
    return _GAP_MEANS


def behavior_view(report: AttributionReport, name: str) -> dict[str, Any]:
    """Escaped strings for one behavior: heading parts, table caption, header and rows, the direction sentences,
    the trust label and the diagnostics lines."""
    summary = report.behavior(name)
    unit = unit_label(summary.unit)
    rows_in = report.rows_for(name)
    replay = has_replay(report, name)
    shares = shares_of_absolute([r.effect for r in rows_in])
    rows = []
    for row, share in zip(rows_in, shares):
        moved = [(i, v) for i, v in row.top_examples(3) if v != 0]
        top = ", ".join(f"#{i} ({fmt_number(v)})" for i, v in moved) or "none (every example's effect is 0)"
        cells = [str(row.stage_index), escape_markdown(row.stage), fmt_number(row.effect), fmt_interval(row)]
        if replay:
            cells.append(fmt_number(row.replay_effect))
        rows.append([*cells, fmt_percent(share), top])
    header = ["#", "stage", "estimate", interval_header(report)]
    align = ["---:", "---", "---:", "---"]
    if replay:
        header.append("replay (ground truth)")
        align.append("---:")
    header += ["share of Σ\\|effect\\|", "most moved examples"]
    align += ["---:", "---"]
    diag = report.diagnostics.get(name)
    caption = f"Unit: {unit}. Positive = the stage raised {escape_markdown(name)}."
    if replay:
        caption += " Replay = the effect measured by re-running the later stages without the stage."
    cover, left_out = _coverage(report, name, None)
    over = "all stages' absolute effects ("
    if cover is not None:
        over = f"the attributed stages' absolute effects ({cover['attributed']} of {cover['of']}; not attributed: "
        over += f"{left_out}; "
    caption += (
        f" Share of Σ\\|effect\\| = the stage's absolute effect over the sum of {over}the"
        " report's JSON carries it as `share_of_abs_effects`; its `share` is another figure, the signed share of the"
        " total change)."
    )
    if all(has_interval(r) for r in rows_in):
        caption += " The intervals cover example sampling only, not the estimator's own error (see the verdict)."
    else:
        caption += " One example: no sampling interval; the verdict says how far to trust the estimate."
    if diag is not None and diag.interaction_residual is not None and stage_coverage(report, name) is None:
        caption += (
            f" Interaction residual (total change − sum of effects): {fmt_number(diag.interaction_residual)} {unit}."
        )
    return {
        "name": escape_markdown(name),
        "unit": unit,
        "description": escape_markdown(summary.description),
        "num_examples": summary.num_examples,
        "examples": examples_label(summary.num_examples),
        "caption": caption,
        "header": header,
        "align": align,
        "rows": rows,
        "headline": headline(report, name),
        "opposite": opposite_directions(report, name),
        "trust": trust_label(report, name),
        "evidence": trust_evidence(report, name),
        "diagnostics": diagnostics_lines(report, name, unit),
    }


def _amount(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{fmt_number(value)} {unit}"


def _uses_curvature(*names: Any) -> bool:
    """Whether an estimator (or embedding kind) propagates with curvature (``aa-ggn*``, ``aa-hvp*``): only those
    have unstable modes to report; a "0" beside any other estimator would suggest curvature it never used.

    Example:
        >>> _uses_curvature("aa-ggn-fd", None), _uses_curvature("partial-replay", "partial-replay")
        (True, False)
    """
    return any(isinstance(n, str) and ("ggn" in n or "hvp" in n) for n in names)


def diagnostics_lines(report: AttributionReport, name: str, unit: str) -> list[str]:
    """ESTIMATORS.md §4 diagnostics of one behavior as escaped markdown bullet texts."""
    diag = report.diagnostics.get(name)
    if diag is None:
        return ["No diagnostics were recorded for this behavior."]
    if diag.total_change is None:
        lines = [
            "Total change f(θ_K) − f(θ_0): not evaluated, so the interaction residual and the report JSON's `share` "
            "(the signed share of the total change) are n/a; the share of Σ\\|effect\\| above does not need it."
        ]
    else:
        lines = [f"Total change f(θ_K) − f(θ_0): {_amount(diag.total_change, unit)}."]
    cover, left_out = _coverage(report, name, None)
    if cover is not None:  # the total change covers every stage of the ledger, the sum only the attributed ones
        residual = f"n/a (needs an effect for every stage of the ledger; not attributed: {left_out})"
    elif diag.interaction_residual is None:
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
        unread = [r.stage for r in report.rows_for(name) if r.stage not in diag.linearisation_gap]
        if unread and report.estimator == diag.linearisation_pair[1]:
            gaps += (
                f"; not read linearly: {', '.join(escape_markdown(s) for s in unread)} (the last stage, where the "
                "finite-difference reading is replay itself)"
            )
        lines.append(
            f"Linearisation gap ({fd} − {linear}) per stage, {unit} (share of the largest effect): {gaps}. "
            + _gap_meaning(report, name)
        )
    elif report.estimator == "replay":
        lines.append("Linearisation gap: none (the effects are replay itself).")
    elif report.fidelity is not None:
        lines.append("Linearisation gap: not computed (replay ran and measured the estimate's error itself).")
    else:
        lines.append("Linearisation gap: not computed (needs both a linear and a finite-difference estimate).")
    if diag.approximations and diag.approximations != report.approximations:
        lines.append("Approximations: " + "; ".join(escape_markdown(a) for a in diag.approximations) + ".")
    if diag.unstable_modes or _uses_curvature(report.estimator, diag.notes.get("embedding_kind")):
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
    """The report as markdown: per behavior the direction sentence, a captioned table (estimate, interval, replay
    when it ran, share of the summed |effects|) and its diagnostics; then the approximations and the fidelity."""
    out = [f"## Stage attribution (estimator: {escape_markdown(report.estimator)})", "", SIGN_CONVENTION, ""]
    out += [coverage_note(report), ""] if coverage_note(report) else []
    if report.estimator_reason:
        out += [f"Why this estimator: {escape_markdown(report.estimator_reason)}.", ""]
    out += [f"Intervals: {escape_markdown(interval_label(report))}.", ""]
    for summary in report.behaviors:
        view = behavior_view(report, summary.name)
        out += [f"### Behavior: {view['name']} ({view['examples']})", ""]
        if view["description"]:
            out += [view["description"], ""]
        claim = view["headline"] + (f" Verdict: {view['trust']}." if view["trust"] else "")
        out += [claim, ""] + ([f"Evidence: {view['evidence']}", ""] if view["evidence"] else [])
        out += [view["opposite"], ""] if view["opposite"] else []
        out += [view["caption"], "", md_table(view["header"], view["align"], view["rows"]), ""]
        out += [f"- {line}" for line in view["diagnostics"]] + [""]
    if report.approximations:
        out += ["### Approximations", ""] + [f"- {escape_markdown(a)}" for a in report.approximations] + [""]
    fid = fidelity_view(report)
    out += ["### Fidelity against replay", ""]
    if fid is None and replay_note(report):  # replay ran without fidelity figures (verify_with_replay)
        out += [replay_note(report), ""]
    elif fid is None:
        hint = replay_hint(report)
        out += [
            "Replay was not run: these effects have not been checked against ground truth."
            + (f" {hint}" if hint else ""),
            "",
        ]
    else:
        out += [md_table(fid["header"], fid["align"], fid["rows"]), ""]
    return "\n".join(out)


def render_table(report: AttributionReport) -> str:
    """A plain-text table for a terminal (one row per stage and behavior; a replay column when replay ran), then
    one line per behavior with its unit and which stage moved it most, and which way."""
    replay = has_replay(report)
    header = ["behavior", "#", "stage", "estimate", interval_header(report, space="")]
    header += ["replay"] if replay else []
    header += ["share of Σ|effect|", "top"]
    body = []
    for summary in report.behaviors:
        top = claimed_top_stage(report, summary.name)
        marked = set(replay_tie(report, summary.name) or ()) | {top}  # replay's top two where it cannot rank them
        rows = report.rows_for(summary.name)
        for row, share in zip(rows, shares_of_absolute([r.effect for r in rows])):
            cells = [terminal_safe(summary.name), str(row.stage_index), terminal_safe(row.stage)]
            cells += [fmt_number(row.effect), fmt_interval(row)] + ([fmt_number(row.replay_effect)] if replay else [])
            mark = _TABLE_MARK.get(report.trust(summary.name).get("verdict"), "*") if row.stage in marked else ""
            body.append([*cells, fmt_percent(share), mark])
    lines = [text_table(header, body)]
    for summary in report.behaviors:
        label = report.trust(summary.name).get("label")
        verdict = f" Verdict: {terminal_safe(label)}." if label else ""
        lines.append(f"* {headline(report, summary.name, terminal_safe)}{verdict}")
    hint = replay_hint(report, terminal_safe)  # empty once replay decided the verdicts
    if hint and any(report.trust(b.name).get("verdict") == "unreliable" for b in report.behaviors):
        lines.append(f"Unreliable verdict(s): {hint}")
    lines.append(
        f"estimator: {terminal_safe(report.estimator)}; positive = the stage raised the behavior; intervals cover "
        "example sampling only, not the estimator's own error; share of Σ|effect| = |effect| over the sum of "
        "|effects|"
        + (" of the attributed stages" if any(stage_coverage(report, b.name) for b in report.behaviors) else "")
        + " (report.json: share_of_abs_effects)"
        + (
            (
                "; replay = ground truth, and top = replay's top stage"
                if all(r.replay_effect is not None for r in report.rows)
                else "; replay = ground truth where it ran, and top = replay's top stage where it ran for every "
                "stage (else the estimate's)"
            )
            if replay
            else ""
        )
        + (
            " (its top two where replay's examples do not separate them)"
            if replay and any(replay_tie(report, b.name) for b in report.behaviors)
            else ""
        )
        + (
            "; top: *v replay (ground truth)."
            if report.estimator == "replay"
            else "; top: *v verified by replay, *a estimators agree, *? unreliable."
        )
    )
    return "\n".join(lines)


def render_fidelity_table(report: AttributionReport) -> str:
    """The fidelity figures as a plain-text table ('' when replay did not run)."""
    fid = fidelity_view(report)
    if fid is None:
        return ""
    unescape = lambda text: re.sub(r"\\(.)", r"\1", text)  # noqa: E731 (cells were escaped for markdown)
    header = [unescape(h) for h in fid["header"]]
    return text_table(header, [[unescape(c) for c in row] for row in fid["rows"]])
