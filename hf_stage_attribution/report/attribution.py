"""The result of a stage attribution: effects with intervals, diagnostics, fidelity; JSON, markdown, plot.

Sign convention everywhere: a stage's *effect* is ``f(θ_K) − f(θ_K without stage k)`` in the behavior's unit;
**positive = the stage raised the behavior**. Effects are estimated one stage at a time and are not a
decomposition of the total change (``ESTIMATORS.md`` §5): the interaction residual says how far they are from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReportError
from .build import build_report, json_safe, last_stage_name, replay_top_separation, unseparated_top_two
from .files import atomic_write_bytes, load_report_dict
from .plot import report_figure, save_report_plot
from .schema import (
    REPORT_FORMAT,
    REPORT_FORMAT_VERSION,
    BehaviorDiagnostics,
    BehaviorSummary,
    ReportRow,
    StageSummary,
    type_problem,
)
from .text import render_markdown, render_table
from .trust import (
    AGREE,
    LABEL_AGREE,
    LABEL_GROUND_TRUTH,
    LABEL_VERIFIED,
    VERDICTS,
    VERIFIED,
    assess_trust,
    stored_figures_trust,
)


@dataclass
class AttributionReport:
    """Stage effects per behavior with 95 % bootstrap intervals, diagnostics, fidelity and provenance.

    Example:
        >>> report = AttributionReport.build(
        ...     {"toxicity": {"pretraining": [0.1, 0.3], "sft": [0.9, 1.1]}},
        ...     estimator="aa-linear", estimator_reason="no curvature material in the ledger",
        ...     total_change={"toxicity": 1.5}, versions={})
        >>> report.top_stage("toxicity")
        'sft'
        >>> AttributionReport.from_json(report.to_json()) == report
        True
    """

    rows: list[ReportRow]
    stages: list[StageSummary]
    behaviors: list[BehaviorSummary]
    estimator: str
    estimator_reason: str = ""
    approximations: list[str] = field(default_factory=list)
    diagnostics: dict[str, BehaviorDiagnostics] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    ledger: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    interval: dict[str, Any] = field(default_factory=dict)

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def build(cls, per_example: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> AttributionReport:
        """Build a report from per-example effects ``{behavior: {stage: Tensor | list}}``.

        Keyword arguments (all optional but ``estimator``): ``estimator``, ``estimator_reason``, ``stages`` (ledger
        ``Stage`` objects, :class:`StageSummary`, dicts or names, in ledger order), ``behaviors`` (``Behavior``
        objects, :class:`BehaviorSummary`, dicts, names), ``approximations`` (a list, or ``{behavior: list}``),
        ``total_change`` (``{behavior: per-example f_i(θ_K) − f_i(θ_0) or its mean}``), ``alternates``
        (``{estimator: {behavior: {stage: per-example}}}``: other estimators' results, used for the linearisation
        gap and the trust verdict; the key ``"replay"`` is exact replay, which verifies or refutes the estimate,
        see :mod:`~.trust`), ``unstable_modes`` (int or ``{behavior: int}``), ``notes`` (``{behavior: JSON-safe
        dict}``), ``fidelity``, ``replay`` (``{behavior: {stage: per-example replay effects}}``, the ground truth
        shown beside each estimate; defaults to ``alternates["replay"]``), ``ledger`` (a ``StageLedger`` or a dict),
        ``versions``, ``n_resamples`` (1000), ``seed`` (0), ``confidence`` (0.95).
        """
        return cls(**build_report(per_example, **kwargs))

    @classmethod
    def from_estimates(cls, results: Mapping[str, Any], **kwargs: Any) -> AttributionReport:
        """Build a report from ``{behavior: EstimateResult}`` (``.estimator``, ``.per_example``, ``.diagnostics``,
        ``.approximations``); other keyword arguments as :meth:`build`."""
        if not results:
            raise ReportError("Expected at least one behavior's estimate, got none: attribute at least one behavior.")
        per_example = {name: dict(res.per_example) for name, res in results.items()}
        estimators = {res.estimator for res in results.values()}
        if len(estimators) != 1 and "estimator" not in kwargs:
            raise ReportError(f"Expected one estimator for all behaviors, got {sorted(estimators)}: pass `estimator`.")
        kwargs.setdefault("estimator", estimators.pop())
        reasons = [str(getattr(res, "reason", "") or "") for res in results.values()]
        kwargs.setdefault("estimator_reason", next((r for r in reasons if r), ""))
        kwargs.setdefault("approximations", {name: list(res.approximations) for name, res in results.items()})
        diag = {name: dict(getattr(res, "diagnostics", None) or {}) for name, res in results.items()}
        if "unstable_modes" not in kwargs:
            kwargs["unstable_modes"] = {name: int(d.pop("unstable_modes", 0) or 0) for name, d in diag.items()}
        if "total_change" not in kwargs:
            totals = {name: d.pop("total_change") for name, d in diag.items() if d.get("total_change") is not None}
            kwargs["total_change"] = totals or None
        kwargs.setdefault("notes", {name: _small_notes(d) for name, d in diag.items() if d})
        return cls.build(per_example, **kwargs)

    # --- queries --------------------------------------------------------------------------------------

    def rows_for(self, behavior: str) -> list[ReportRow]:
        """The rows of one behavior, in stage order."""
        rows = [row for row in self.rows if row.behavior == behavior]
        if not rows:
            known = ", ".join(b.name for b in self.behaviors)
            raise ReportError(f"Behavior {behavior!r} is not in this report. Known behaviors: {known}.")
        return sorted(rows, key=lambda row: row.stage_index)

    def top_stage(self, behavior: str, by: str = "abs") -> str:
        """The most accountable stage for ``behavior``: largest ``|effect|`` (``by="abs"``), most raised
        (``"raise"``) or most lowered (``"lower"``); ties go to the earlier stage.

        How far to trust the ``by="abs"`` claim is :meth:`trust` (``"verified"``, ``"agree"`` or ``"unreliable"``);
        :meth:`top_stage_claim` returns both together."""
        keys = {"abs": lambda r: -abs(r.effect), "raise": lambda r: -r.effect, "lower": lambda r: r.effect}
        if by not in keys:
            raise ReportError(f"`by` must be one of {sorted(keys)}, got {by!r}.")
        return min(self.rows_for(behavior), key=lambda r: (keys[by](r), r.stage_index)).stage

    def replay_top_stage(self, behavior: str) -> str | None:
        """The stage of largest ``|replay effect|`` (ties to the earlier stage) when replay ran for every stage of
        ``behavior`` and moved it; else None. Where it differs from :meth:`top_stage`, replay's is the measured answer.

        Example:
            >>> r = AttributionReport.build({"f": {"a": [0.1], "b": [1.0]}}, estimator="x", versions={},
            ...                             replay={"f": {"a": [2.0], "b": [1.0]}})
            >>> r.top_stage("f"), r.replay_top_stage("f")
            ('b', 'a')
        """
        rows = self.rows_for(behavior)
        if any(r.replay_effect is None for r in rows) or all(r.replay_effect == 0 for r in rows):
            return None
        return min(rows, key=lambda r: (-abs(float(r.replay_effect or 0.0)), r.stage_index)).stage

    def moved(self, behavior: str) -> bool:
        """Whether any stage moved ``behavior`` (a nonzero estimate, or a nonzero replay value where replay ran):
        a behavior no stage moved has no top stage to name."""
        return any(r.effect != 0 or (r.replay_effect or 0.0) != 0 for r in self.rows_for(behavior))

    def trust(self, behavior: str) -> dict[str, Any]:
        """The verdict on ``behavior``'s top-stage claim and ranking: ``{"verdict", "label", "reason",
        "evidence"}`` (:func:`~.trust.assess_trust`). A report written before verdicts existed gets one assessed
        from what it stores (effects, intervals, the linearisation pair's two readings, ``replay_effect``).

        Example:
            >>> report = AttributionReport.build({"f": {"a": [0.1, 0.3], "b": [0.9, 1.1]}}, estimator="aa-linear",
            ...     alternates={"replay": {"f": {"a": [0.2, 0.2], "b": [1.0, 1.0]}}}, versions={})
            >>> report.trust("f")["label"]
            'verified by replay'
        """
        rows = self.rows_for(behavior)  # unknown behavior: a clear ReportError
        diag = self.diagnostics.get(behavior)
        stored, unsupported = None, ""
        if diag is not None and diag.trust:
            stored = dict(diag.trust)
            if self.estimator == "replay" and stored.get("label") == LABEL_VERIFIED:
                stored["label"] = LABEL_GROUND_TRUTH  # written before replay stopped "verifying" itself
            unsupported = self._unsupported(rows, stored)
            if unsupported:
                stored = None
            elif not _label_fits(stored, self.estimator):  # no label, or one that is not this verdict's
                stored["stored_label"], stored["label"] = stored.get("label"), _label_for(stored, self.estimator)
        if stored is None:
            # the ledger's last stage: from the ledger's stage count, else where the stored gap marks it exact
            flagged = [s for s, g in (diag.linearisation_gap if diag else {}).items() if g.get("fd_exact")]
            last = last_stage_name(self.stages, self.ledger, given=False) or next(iter(flagged), None)
            stored = json_safe(stored_figures_trust(rows, diag, self.estimator, self.fidelity, last))
            if diag is not None and diag.trust:
                kept = {k: diag.trust.get(k) for k in ("verdict", "label")}
                stored["evidence"]["stored_verdict_unsupported"] = {**kept, "why": unsupported}
                stored["evidence"]["assessed_from"] = (
                    f"the report's stored figures (its stored verdict is not backed by what it stores: {unsupported})"
                )
        return self._ground_truth_separation(rows, stored) if self.estimator == "replay" else stored

    def _unsupported(self, rows: list[ReportRow], stored: Mapping[str, Any]) -> str:
        """Why a stored verdict is not backed by the evidence this report stores ('' when it is): "verified" needs
        replay (the report's effects, replay values in every row, or ``evidence["replay"]``'s comparison), "agree"
        needs the second opinions it agreed with and no replay of every stage; an unknown verdict is no verdict."""
        verdict, evidence = stored.get("verdict"), stored.get("evidence")
        evidence = evidence if isinstance(evidence, Mapping) else {}
        replayed = all(r.replay_effect is not None for r in rows)
        if verdict not in VERDICTS:
            return f"unknown verdict {verdict!r}"
        if verdict == VERIFIED:
            compared = evidence.get("replay")
            if (
                self.estimator == "replay"
                or replayed
                or (isinstance(compared, Mapping) and "top_stage_equal" in compared)
            ):
                return ""
            return "it says verified, but no replay value or replay comparison is stored"
        if verdict == AGREE:
            if replayed:
                return "it says the estimators agree, but replay ran for every stage"
            opinions = evidence.get("second_opinions")
            if not (isinstance(opinions, Mapping) and opinions):
                return "it says the estimators agree, but no second opinion is stored"
        return ""

    def _ground_truth_separation(self, rows: list[ReportRow], verdict: dict[str, Any]) -> dict[str, Any]:
        """A ground-truth verdict (the effects are replay) with replay's own paired bootstrap of its top two stages
        (``evidence["replay"]["top_separation"]``), for a report written before the verdict kept it: where the
        examples do not separate the two, the label says so (:func:`~.trust.assess_trust`)."""
        held = (verdict.get("evidence") or {}).get("replay")
        if isinstance(held, Mapping) and "top_separation" in held:
            return verdict
        separation = replay_top_separation(
            {r.stage: r.per_example for r in rows}, int(self.interval.get("resamples", 1000)),
            int(self.interval.get("seed", 0)), float(self.interval.get("confidence", 0.95)),
        )  # fmt: skip
        if separation is None:  # one example (or none stored): nothing to separate by
            return verdict
        rebuilt = assess_trust(
            {r.stage: r.effect for r in rows}, estimator="replay", replay_tie=unseparated_top_two(separation)
        )
        rebuilt["evidence"]["replay"]["top_separation"] = separation
        rebuilt["evidence"]["assessed_from"] = "the report's per-example replay effects (stored without a separation)"
        return json_safe(rebuilt)

    def verify_with_replay(self, replay: AttributionReport | Mapping[str, Mapping[str, float]]) -> None:
        """Re-assess every behavior's trust verdict against exact replay run separately (a replay report, or
        ``{behavior: {stage: mean effect}}``): "verified by replay" or "unreliable: replay disagrees — …". The
        estimated verdict it replaces is kept in ``evidence["without_replay"]``; behaviors replay does not cover
        keep theirs. Each covered row gets replay's value as ``replay_effect``, so the table, the plot and the card
        show the replay column as they do after ``attribute(..., validate=True)``.

        Example:
            >>> est = AttributionReport.build({"f": {"a": [0.9], "b": [1.0]}}, estimator="aa-linear", versions={})
            >>> est.verify_with_replay({"f": {"a": 1.5, "b": 1.0}})
            >>> est.trust("f")["label"]
            'unreliable: replay disagrees — replay names a as the top stage, the estimate b'
            >>> [r.replay_effect for r in est.rows_for("f")]
            [1.5, 1.0]
        """
        if isinstance(replay, AttributionReport):
            if replay.estimator != "replay":
                raise ReportError(
                    f"Expected a report of exact replay (estimator 'replay') to verify against, got one of estimator "
                    f"{replay.estimator!r}: its numbers are another estimate, not the ground truth. Run "
                    "StageAttributor(..., estimator='replay') or attribute(..., validate=True); nothing was changed."
                )
            examples = {b.name: {r.stage: r.per_example for r in replay.rows_for(b.name)} for b in replay.behaviors}
            replay = {b.name: {r.stage: r.effect for r in replay.rows_for(b.name)} for b in replay.behaviors}
        else:
            examples = {}
        for summary in self.behaviors:
            truth = replay.get(summary.name)
            rows = self.rows_for(summary.name)
            if not truth or any(r.stage not in truth for r in rows):
                continue
            before = self.trust(summary.name)
            per = examples.get(summary.name) or {}  # a replay report's examples: do they separate its top two?
            ordered = {r.stage: per[r.stage] for r in rows} if all(r.stage in per for r in rows) else None
            separation = replay_top_separation(ordered)
            verdict = assess_trust(
                {r.stage: r.effect for r in rows}, estimator=self.estimator,
                intervals={r.stage: (r.ci_low, r.ci_high) for r in rows},
                replay={r.stage: float(truth[r.stage]) for r in rows},
                replay_tie=unseparated_top_two(separation),
            )  # fmt: skip
            if separation is not None:
                verdict["evidence"]["replay"]["top_separation"] = separation
            verdict["evidence"]["without_replay"] = {k: before.get(k) for k in ("verdict", "label")}
            self.diagnostics.setdefault(summary.name, BehaviorDiagnostics()).trust = json_safe(verdict)
            for row in rows:
                row.replay_effect = float(truth[row.stage])

    def top_stage_claim(self, behavior: str) -> dict[str, Any]:
        """The stage the report names as accountable for ``behavior``, with its effect and how far to trust it:
        ``{"stage", "effect", "verdict", "label", "source", "estimated_stage"}`` (and ``"replay_effect"`` where replay
        ran for it). Where replay ran for every stage, its top stage is the answer (``source`` ``"replay"``), as in
        the headline and the card; ``estimated_stage`` is the estimate's own (:meth:`top_stage`). A behavior no stage
        moved names none (``stage`` None).

        Example:
            >>> report = AttributionReport.build({"f": {"a": [0.1, 0.3], "b": [0.9, 1.1]}}, estimator="x", versions={})
            >>> claim = report.top_stage_claim("f")
            >>> claim["stage"], claim["verdict"], claim["source"]
            ('b', 'unreliable', 'estimate')
            >>> r = AttributionReport.build({"f": {"a": [0.1], "b": [1.0]}}, estimator="x", versions={},
            ...                             replay={"f": {"a": [2.0], "b": [1.0]}})
            >>> c = r.top_stage_claim("f")
            >>> c["stage"], c["source"], c["estimated_stage"], c["replay_effect"]
            ('a', 'replay', 'b', 2.0)
        """
        trust = self.trust(behavior)
        claim: dict[str, Any] = {"verdict": trust["verdict"], "label": trust["label"]}
        if not self.moved(behavior):
            return {"stage": None, "effect": 0.0, **claim, "source": "estimate", "estimated_stage": None}
        estimated = self.top_stage(behavior)
        measured = self.replay_top_stage(behavior)
        stage = measured or estimated
        row = next(r for r in self.rows_for(behavior) if r.stage == stage)
        claim = {"stage": stage, "effect": row.effect, **claim}
        claim.update({"source": "replay" if measured else "estimate", "estimated_stage": estimated})
        if row.replay_effect is not None:
            claim["replay_effect"] = row.replay_effect
        return claim

    def behavior(self, name: str) -> BehaviorSummary:
        """The summary of one behavior."""
        for summary in self.behaviors:
            if summary.name == name:
                return summary
        known = ", ".join(b.name for b in self.behaviors)
        raise ReportError(f"Behavior {name!r} is not in this report. Known behaviors: {known}.")

    # --- serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the format written by :meth:`to_json`)."""
        return {"format": REPORT_FORMAT, "format_version": REPORT_FORMAT_VERSION, **asdict(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON (floats kept exactly); also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_bytes(Path(path), text.encode("utf-8"))
        return text

    @classmethod
    def from_json(cls, path_or_str: str | Path) -> AttributionReport:
        """Read a report written by :meth:`to_json` from a path or a JSON string."""

        data = load_report_dict(path_or_str, REPORT_FORMAT, REPORT_FORMAT_VERSION)

        def unfit(problem: str) -> ReportError:
            return ReportError(
                f"Expected an hf-stage-attribution report with rows, stages, behaviors and estimator; the JSON does "
                f"not fit ({problem}). Regenerate it with `AttributionReport.to_json`."
            )

        containers = {"rows": list, "stages": list, "behaviors": list, "estimator": str, "estimator_reason": str,
                      "approximations": list, "diagnostics": dict, "fidelity": (dict, type(None)), "ledger": dict,
                      "versions": dict, "interval": dict}  # fmt: skip
        for key, kind in containers.items():
            if key in data and not isinstance(data[key], kind):
                found = type(data[key]).__name__
                raise unfit(f"{key}: expected {getattr(kind, '__name__', 'an object or null')}, found {found}")
        try:
            report = cls(
                rows=[ReportRow(**row) for row in data["rows"]],
                stages=[StageSummary(**s) for s in data["stages"]],
                behaviors=[BehaviorSummary(**b) for b in data["behaviors"]],
                estimator=data["estimator"],
                estimator_reason=data.get("estimator_reason", ""),
                approximations=list(data.get("approximations", [])),
                diagnostics={k: BehaviorDiagnostics(**v) for k, v in data.get("diagnostics", {}).items()},
                fidelity=data.get("fidelity"),
                ledger=dict(data.get("ledger", {})),
                versions=dict(data.get("versions", {})),
                interval=dict(data.get("interval", {})),
            )
        except (KeyError, TypeError) as exc:
            raise unfit(repr(exc)) from exc
        if not any(isinstance(row, dict) and "share_of_abs_effects" in row for row in data["rows"]):
            report._fill_shares_of_abs_effects()  # a report written before the field existed
        parts = [
            *((row, f"rows[{i}]") for i, row in enumerate(report.rows)),
            *((stage, f"stages[{i}]") for i, stage in enumerate(report.stages)),
            *((behavior, f"behaviors[{i}]") for i, behavior in enumerate(report.behaviors)),
            *((diag, f"diagnostics[{name!r}]") for name, diag in report.diagnostics.items()),
        ]
        for part, where in parts:
            problem = type_problem(part, where)
            if problem:
                raise unfit(problem)
        return report

    def _fill_shares_of_abs_effects(self) -> None:
        """Set every row's ``share_of_abs_effects`` from the effects (``|effect| / Σ|effect|`` per behavior)."""
        for summary in self.behaviors:
            rows = [row for row in self.rows if row.behavior == summary.name]
            scale = sum(abs(float(row.effect)) for row in rows if isinstance(row.effect, int | float))
            for row in rows:
                if isinstance(row.effect, int | float):
                    row.share_of_abs_effects = abs(float(row.effect)) / scale if scale > 0 else None

    # --- presentation ---------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """Markdown: one table per behavior (units, intervals, sign convention) and the diagnostics."""

        return render_markdown(self)

    def table(self) -> str:
        """A plain-text table for a terminal (names made terminal-safe)."""

        return render_table(self)

    def plot_figure(self) -> Any:
        """A matplotlib ``Figure``: one bar group per stage, one bar per behavior, error bars = intervals."""

        return report_figure(self)

    def plot(self, path: str | Path) -> Path:
        """Write :meth:`plot_figure` as a PNG to ``path`` (Agg backend, no GUI); returns the path."""

        return save_report_plot(self, Path(path))


def _label_fits(verdict: Mapping[str, Any], estimator: str) -> bool:
    """Whether a stored verdict's label is one its verdict gives (:mod:`~.trust`)."""
    label, kind = verdict.get("label"), verdict.get("verdict")
    if not isinstance(label, str) or not label:
        return False
    if kind == VERIFIED:
        return label.startswith(LABEL_GROUND_TRUTH if estimator == "replay" else LABEL_VERIFIED)
    if kind == AGREE:
        return label == LABEL_AGREE
    return label.startswith(("estimated — unreliable: ", "unreliable: replay disagrees — "))


def _label_for(verdict: Mapping[str, Any], estimator: str) -> str:
    """The label of a stored verdict that lost its own: from the verdict, and for "unreliable" from its reason.

    Example:
        >>> _label_for({"verdict": "unreliable", "reason": "Not checked by replay; nothing to check. Note: x."}, "x")
        'estimated — unreliable: nothing to check'
        >>> _label_for({"verdict": "unreliable"}, "x")
        'estimated — unreliable: the stored verdict gives no reason'
    """
    kind = verdict.get("verdict")
    if kind == VERIFIED:
        return LABEL_GROUND_TRUTH if estimator == "replay" else LABEL_VERIFIED
    if kind == AGREE:
        return LABEL_AGREE
    reason = str(verdict.get("reason") or "").split(" Note: ")[0].strip().rstrip(".")
    for start, label in (
        ("Exact replay disagrees: ", "unreliable: replay disagrees — "),
        ("Exact replay disagrees ", "unreliable: replay disagrees — "),  # on the stages it ran for (...): ...
        ("; ", "estimated — unreliable: "),
    ):
        if start in reason:
            return label + reason.split(start, 1)[1]
    return "estimated — unreliable: " + (reason or "the stored verdict gives no reason")


def _small_notes(diagnostics: Mapping[str, Any], limit: int = 2000) -> dict[str, Any]:
    """The estimator diagnostics worth carrying in a report: JSON-safe values of at most ``limit`` characters
    (per-tensor factors and the like stay out of the report and the card)."""
    notes = {}
    for key, value in diagnostics.items():
        safe = json_safe(value)
        if len(json.dumps(safe)) <= limit:
            notes[str(key)] = safe
    return notes
