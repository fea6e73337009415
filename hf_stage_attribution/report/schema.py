"""The rows and summaries an attribution report is made of (plain dataclasses, JSON-safe).

Sign convention everywhere: a stage's *effect* is ``f(θ_K) − f(θ_K without stage k)`` in the behavior's unit;
**positive = the stage raised the behavior**. Effects are estimated one stage at a time and are not a
decomposition of the total change (``ESTIMATORS.md`` §5): the interaction residual says how far they are from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REPORT_FORMAT = "hf-stage-attribution/report"
REPORT_FORMAT_VERSION = 1


def top_examples(per_example: Sequence[float], k: int = 5) -> list[tuple[int, float]]:
    """``(index, value)`` of the ``k`` largest ``|value|``, largest first, ties by index."""
    order = sorted(range(len(per_example)), key=lambda i: (-abs(per_example[i]), i))
    return [(i, float(per_example[i])) for i in order[: max(0, int(k))]]


@dataclass
class ReportRow:
    """One (stage, behavior) effect: mean over examples, its bootstrap interval and the per-example effects.

    ``share`` is ``effect / (f(θ_K) − f(θ_0))``, the signed share of the total change, when the total change is known
    (these need not sum to 1). ``share_of_abs_effects`` is ``|effect| / Σ_j |effect_j|`` over the behavior's stages,
    the "share of Σ|effect|" the console, report.md and card show (None in reports written before it existed, and
    when every effect is 0). ``ci_low``/``ci_high`` are None for a behavior of one example: one example gives no
    sampling interval.

    Example:
        >>> row = ReportRow("sft", 1, "toxicity", "aa-linear", 0.5, 0.2, 0.8, [0.1, 0.9], share=0.4)
        >>> row.top_examples(1)
        [(1, 0.9)]
    """

    stage: str
    stage_index: int
    behavior: str
    estimator: str
    effect: float
    ci_low: float | None
    ci_high: float | None
    per_example: list[float]
    share: float | None = None
    #: The effect measured by exact replay (``f(θ_K) − f(θ̃_K^(−k))``) when replay ran for this stage (``validate``),
    #: else ``None``: the ground truth to show beside the estimate.
    replay_effect: float | None = None
    #: ``|effect| / Σ_j |effect_j|`` over the behavior's stages (what the tables call "share of Σ|effect|").
    share_of_abs_effects: float | None = None

    def top_examples(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` examples this stage moved most, as ``(example index, effect)``, largest ``|effect|`` first."""
        return top_examples(self.per_example, k)


@dataclass
class StageSummary:
    """What a reader needs to know about one training stage (from the ledger's ``stage.json``).

    Example:
        >>> StageSummary(0, "sft", kind="sft", num_steps=40, optimizer="AdamW", lr_min=1e-5, lr_max=2e-5).kind
        'sft'
    """

    index: int
    name: str
    kind: str = "custom"
    num_steps: int | None = None
    optimizer: str | None = None
    lr_min: float | None = None
    lr_max: float | None = None
    data: dict[str, Any] | None = None
    #: Where the stage's end state came from when it was imported from published checkpoints:
    #: ``{"model", "location" ("hub" | "local"), "revision", "commit", "subfolder"}`` (None for recorded stages).
    source: dict[str, Any] | None = None


@dataclass
class BehaviorSummary:
    """A behavior's name, unit, description and number of examples.

    Example:
        >>> BehaviorSummary("toxicity", unit="nats", num_examples=64).unit
        'nats'
    """

    name: str
    unit: str = ""
    description: str = ""
    num_examples: int = 0


@dataclass
class BehaviorDiagnostics:
    """``ESTIMATORS.md`` §4 diagnostics of one behavior.

    ``linearisation_gap`` maps a stage name to ``{"linear", "fd", "gap", "relative_gap"}`` for the estimator pair in
    ``linearisation_pair`` (e.g. ``["aa-linear", "aa-fd"]``); ``relative_gap`` is ``|gap| / max_k |effect_k|``; the
    ledger's last stage also carries ``"fd_exact": True`` (the finite-difference reading is replay itself there).

    Example:
        >>> d = BehaviorDiagnostics(total_change=1.0, sum_of_effects=0.7, interaction_residual=0.3)
        >>> d.interaction_residual
        0.3
    """

    total_change: float | None = None
    sum_of_effects: float = 0.0
    interaction_residual: float | None = None
    linearisation_pair: list[str] | None = None
    linearisation_gap: dict[str, dict[str, float | bool | None]] = field(default_factory=dict)  # None: not finite
    approximations: list[str] = field(default_factory=list)
    unstable_modes: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    #: How far to trust this behavior's top-stage claim and ranking (empty when not assessed):
    #: ``{"verdict": "verified" | "agree" | "unreliable", "label": text for the card (e.g. "verified by replay",
    #: "estimated — estimators agree", "estimated — unreliable: <why>"), "reason": str, "evidence": {name: figure}}``.
    #: Intervals only cover example sampling; the verdict covers the estimator's own error.
    trust: dict[str, Any] = field(default_factory=dict)


def type_problem(obj: Any, where: str) -> str | None:
    """What in the dataclass ``obj`` (read from JSON) does not have its field's declared type, as
    ``"<where>.<field>: expected <type>, found <what>"``; None when every field fits. Fields typed ``Any`` or with
    types this does not know pass.

    Example:
        >>> type_problem(ReportRow("sft", 1, "tox", "aa-fd", "x", 0.0, 1.0, []), "rows[0]")
        "rows[0].effect: expected float, found str 'x'"
        >>> type_problem(StageSummary(0, "sft"), "stages[0]") is None
        True
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = hints.get(f.name, Any)
        if not _fits(value, expected):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{where}.{f.name}: expected {_type_name(expected)}, found {type(value).__name__} {shown}"
    return None


def _fits(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
        )
    if expected is dict or expected is list:
        return isinstance(value, expected)
    return True


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return "null"
    return getattr(expected, "__name__", None) if typing.get_origin(expected) is None else str(expected)
