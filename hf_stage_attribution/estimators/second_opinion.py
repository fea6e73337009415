"""The second opinion of a trust verdict (``report/trust.py``): which estimator checks the chosen one.

A replaying estimate (``partial-replay``, ``strided-replay``) is checked against the other replay family at the
same budget where the ledger allows it; every other estimate against task-vector negation (``delta-fd``). The
attributor runs the second opinion beside the estimate when ``diagnostics=True`` and replay does not run.

Example:
    >>> REPLAY_CHECKS["partial-replay"], REPLAY_CHECKS["strided-replay"]
    ('strided-replay', 'partial-replay')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import EstimatorError
from ..ledger.core import LedgerCore
from .propagation.stage import trains
from .replay import can_replay
from .selection import PARTIAL_REPLAY, PARTIAL_REPLAY_BUDGET
from .strided_replay import plan_strided_replay

STRIDED_REPLAY = "strided-replay"
#: the second opinion of a trust verdict (report/trust.py) when nothing better applies: task-vector negation, one
#: evaluation of the behaviors per stage at θ_K − Δ_k; it shares nothing with the propagation of the aa-* estimators.
#: For ``aa-fd`` (``auto`` without replay or curvature material) it gives the same numbers wherever the later stages
#: carry an update unchanged (Adam without weight decay), and the verdict then does not count it
#: (``same_as_estimate``) and, with no other second opinion, says "unreliable: no independent second opinion" (the
#: linear sibling reads the same embeddings). Measured (BENCHMARKS.md §1, seven pipelines): aa-fd's "agree" named
#: replay's top stage in 23 of 32 behaviors (replay verified 15), aa-ggn's in 12 of 13 (12); before that rule, when
#: the sibling alone could make "agree", aa-fd's were 54 of 64 (43).
DEFAULT_SECOND_OPINION = "delta-fd"
#: the second opinion of a replaying estimate: the other replay family at the same budget. Partial replay runs the
#: next stage's first steps exactly and carries the rest to first order; strided replay runs every later stage with
#: stale gradients: two estimates of the same v_k whose errors come from different places. Task-vector negation
#: ignores how the later stages react to a removed update altogether. Measured against replay (BENCHMARKS.md §8,
#: the default's trust verdicts over six pipelines): with strided replay as the check, "estimators agree" named
#: replay's top stage in 44 of 44 behaviors and replay verified 41 under the size bar of "verified" (all 44 before it;
#: the linearisation gap is then not counted, report/trust.py ``gap_counts``), with task-vector negation in 38 of 38,
#: 31 verified (34 before the size bar).
#: Partial replay itself at 10 % (a cheaper check: 0.16–0.54 × replay's time, where strided replay costs about one
#: replay on these models) was measured too and not adopted: 57 of 59 right, replay verified 48 of them (strided
#: replay: 44 of 45); two budgets of one family share the errors of its carry (BENCHMARKS.md §8, §9).
REPLAY_CHECKS = {
    PARTIAL_REPLAY: STRIDED_REPLAY,
    "partial-replay-linear": STRIDED_REPLAY,
    STRIDED_REPLAY: PARTIAL_REPLAY,
}
#: what ``StageAttributor(second_opinion=...)`` accepts: the rule above, task-vector negation, or a replay family
SECOND_OPINIONS = ("auto", DEFAULT_SECOND_OPINION, STRIDED_REPLAY, PARTIAL_REPLAY)
#: why a replay family as the check is not free: said on the console whenever one runs
REPLAY_CHECK_COST = (
    "it re-runs every later stage in two branches, which can take as long as replay itself or longer (BENCHMARKS.md "
    "§8, §9; SmolLM2-135M, 28 steps: the default with this check 177 s, with validate=True 120 s, replay alone 99 s): "
    "validate=True answers the question outright for less, second_opinion='delta-fd' is the cheap check"
)


def check_second_opinion(value: Any) -> str:
    """``value`` if it is one of :data:`SECOND_OPINIONS`, else :class:`EstimatorError` saying what is accepted.

    Example:
        >>> check_second_opinion("delta-fd")
        'delta-fd'
        >>> try:
        ...     check_second_opinion("replay")
        ... except ValueError as err:
        ...     print(str(err).split(". ")[-1])
        To check the estimates against replay itself, pass validate=True to attribute().
    """
    if isinstance(value, str) and value in SECOND_OPINIONS:
        return value
    hint = ""
    if value == "replay":
        hint = " To check the estimates against replay itself, pass validate=True to attribute()."
    raise EstimatorError(
        f"second_opinion={value!r}: expected one of {', '.join(repr(v) for v in SECOND_OPINIONS)}.{hint}"
    )


def choose_second_opinion(
    ledger: LedgerCore,
    estimator: str,
    stages: list[int] | None = None,
    stage_fns: Mapping[str, Any] | None = None,
    budget: float = PARTIAL_REPLAY_BUDGET,
    requested: str = "auto",
    *,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """``(estimator name, reason)`` of the second opinion a trust verdict checks ``estimator`` against, for the
    attributed stage indices ``stages`` (default: all).

    ``requested`` (:data:`SECOND_OPINIONS`) overrides the rule below: ``"delta-fd"`` always gives task-vector
    negation; a replay family is used where it applies (the same conditions) and is not ``estimator`` itself, else
    task-vector negation with the reason why.

    A replaying estimate (``partial-replay``, ``strided-replay``) is checked against the other replay family at the
    same ``budget`` (:data:`REPLAY_CHECKS`) when every later stage of every attributed stage can be re-run in the form
    it needs (strided replay: the gradient-reuse form, ``fn(model, grad_every=1)`` or replay data of a kind that
    allows it, and a budget that buys a pass per later stage; partial replay: the step-limited form) and
    ``0 < budget < 1``: at budget 0 both are ``aa-fd``, at budget 1 both are replay. Anything else is checked
    against task-vector negation (:data:`DEFAULT_SECOND_OPINION`). ``ref_models`` and ``reward_funcs`` are what
    replay would be given (:func:`~.replay.can_replay`).

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
        >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), steps_scale=0.1, base_steps_scale=0.1)
        >>> choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns)[0]
        'strided-replay'
        >>> choose_second_opinion(pipe.ledger, "partial-replay")[0]  # no stage functions: nothing to re-run
        'delta-fd'
        >>> choose_second_opinion(pipe.ledger, "aa-linear", stage_fns=pipe.stage_fns)[0]
        'delta-fd'
    """
    requested = check_second_opinion(requested)
    if requested == DEFAULT_SECOND_OPINION:
        return DEFAULT_SECOND_OPINION, f"{estimator} is checked against task-vector negation (as asked: delta-fd)"
    other = REPLAY_CHECKS.get(estimator) if requested == "auto" else requested
    if other is None:
        return DEFAULT_SECOND_OPINION, f"{estimator} is checked against task-vector negation"
    if other == estimator or estimator.startswith(f"{other}-"):  # partial-replay-linear: partial replay's embeddings
        return DEFAULT_SECOND_OPINION, (
            f"{other} would give {estimator}'s own estimate, so task-vector negation checks {estimator}"
        )
    budget = float(budget)
    if not 0.0 < budget < 1.0:
        return DEFAULT_SECOND_OPINION, (
            f"at budget {budget:g} {other} would give the same estimate as {estimator} "
            f"({'aa-fd' if budget <= 0 else 'replay'}), so task-vector negation checks it"
        )
    fns = dict(stage_fns or {})
    indices = list(range(len(ledger.stages))) if stages is None else [int(k) for k in stages]
    later = {j for k in indices for j in range(k + 1, len(ledger.stages)) if trains(ledger.stages[j])}
    strided = other == STRIDED_REPLAY
    need: dict[str, Any] = {"grad_reuse": True} if strided else {"step_limited": True}
    need.update(ref_models=ref_models, reward_funcs=reward_funcs)
    missing = [ledger.stages[j].name for j in sorted(later) if not can_replay(ledger.stages[j], fns, **need)]
    short = [
        ledger.stages[k].name
        for k in indices
        if strided and any(j > k for j in later) and plan_strided_replay(ledger, k, budget).stride < 2
    ]
    form = (
        "the gradient-reuse form (fn(model, grad_every=1), or replay data of a kind that allows it)"
        if strided
        else "the step-limited form (fn(model, max_steps=None), or replay data)"
    )
    if missing or short:
        why = f"later stage(s) {missing} lack {form}" if missing else f"budget {budget:g} buys no pass for {short}"
        return DEFAULT_SECOND_OPINION, f"{other} does not apply ({why}), so task-vector negation checks {estimator}"
    return other, (
        f"{estimator} is checked against {other} at the same budget ({budget:g}), which estimates every stage's "
        f"effect by another route; the verdict says 'agree' only when both do; {REPLAY_CHECK_COST}"
    )


__all__ = [
    "DEFAULT_SECOND_OPINION",
    "REPLAY_CHECKS",
    "REPLAY_CHECK_COST",
    "SECOND_OPINIONS",
    "check_second_opinion",
    "choose_second_opinion",
]
