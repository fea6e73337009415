"""The second opinion of a trust verdict (``report/trust.py``): which estimator checks the chosen one.

A replaying estimate (``partial-replay``, ``strided-replay``) is checked against replay itself where every stage
replay needs can be re-run whole (the attributor then runs as with ``validate=True``: the verdicts say "verified by
replay" or why not); every other estimate, and a replaying one that replay cannot check, against task-vector
negation (``delta-fd``). The other replay family at the same budget is a check on request. The attributor runs the
second opinion beside the estimate when ``diagnostics=True``.

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
from .replay import can_replay, replay_needs
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
#: the second opinion of a replaying estimate where every later stage can be re-run whole: replay itself. The other
#: replay family at the same budget (partial replay runs the next stage's first steps exactly and carries the rest to
#: first order; strided replay runs every later stage with stale gradients) re-runs every later stage in two branches
#: for a second estimate, not the answer, at about the same cost (:data:`REPLAY_COST`, :data:`REPLAY_CHECK_COST`).
#: Measured (BENCHMARKS.md §8, seven pipelines, the default at 25 %): with strided replay as the check the verdicts
#: said "estimators agree" for 46 of 182 behaviors × seeds (45 named replay's top stage, replay verified 41); with
#: replay as the check replay verifies 68 of the 182, and every other verdict says how replay disagrees, with replay's
#: values beside the estimate. Task-vector negation as the check: "agree" right in 38 of 38 (31 verified, six
#: pipelines); partial replay at 10 % (0.16–0.54 × replay's time): 57 of 59 right, 48 verified (two budgets of one
#: family share their carry's errors).
REPLAY = "replay"
#: the other replay family at the same budget: the check when it is asked for (``second_opinion="strided-replay"`` /
#: ``"partial-replay"``)
REPLAY_CHECKS = {
    PARTIAL_REPLAY: STRIDED_REPLAY,
    "partial-replay-linear": STRIDED_REPLAY,
    STRIDED_REPLAY: PARTIAL_REPLAY,
}
#: what ``StageAttributor(second_opinion=...)`` accepts: the rule above, task-vector negation, or a replay family
SECOND_OPINIONS = ("auto", DEFAULT_SECOND_OPINION, REPLAY, STRIDED_REPLAY, PARTIAL_REPLAY)
#: why a replay family as the check is not free: said on the console whenever one runs
REPLAY_CHECK_COST = (
    "it re-runs every later stage in two branches, which can take as long as replay itself or longer (BENCHMARKS.md "
    "§8, §9; SmolLM2-135M, 28 steps: the default with this check 199 s, with replay as the check 188 s): "
    "second_opinion='replay' answers the question outright for about as much, second_opinion='delta-fd' is the "
    "cheap check"
)
#: what replay as the check costs, and the cheap alternative: said on the console whenever it runs
REPLAY_COST = (
    "it costs one replay beside the estimate (BENCHMARKS.md §8: 1.32–1.60 × replay's time in all, the strided check "
    "1.13–1.51 ×; §9, SmolLM2-135M: 188 s, with the strided check 199 s); second_opinion='delta-fd' is the cheap "
    "check (no replay)"
)


def check_second_opinion(value: Any) -> str:
    """``value`` if it is one of :data:`SECOND_OPINIONS`, else :class:`EstimatorError` saying what is accepted.

    Example:
        >>> check_second_opinion("delta-fd")
        'delta-fd'
        >>> try:
        ...     check_second_opinion("strided")
        ... except ValueError as err:
        ...     print(str(err))
        second_opinion='strided': expected one of 'auto', 'delta-fd', 'replay', 'strided-replay', 'partial-replay'.
    """
    if isinstance(value, str) and value in SECOND_OPINIONS:
        return value
    raise EstimatorError(f"second_opinion={value!r}: expected one of {', '.join(repr(v) for v in SECOND_OPINIONS)}.")


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

    ``"auto"``: a replaying estimate (``partial-replay``, ``strided-replay``) at ``0 < budget < 1`` is checked against
    replay itself (:data:`REPLAY`) when every stage that replay of the attributed stages re-runs can be re-run
    (:func:`~.replay.replay_needs`: a stage function or replay data, with the reference models and reward functions
    ``ref_models`` and ``reward_funcs`` that replay would be given); at budget 0 the estimate is ``aa-fd`` and at
    budget 1 replay, and anything else is checked against task-vector negation (:data:`DEFAULT_SECOND_OPINION`).

    ``requested`` (:data:`SECOND_OPINIONS`) overrides that rule: ``"delta-fd"`` always gives task-vector negation;
    ``"replay"`` gives replay wherever it can run (for any estimator but replay, and a replaying one at budget 1,
    which is replay); a replay family is used where the later stages have the form it needs (strided replay: the
    gradient-reuse form, ``fn(model, grad_every=1)`` or replay data of a kind that allows it, and a budget that buys a
    pass per later stage; partial replay: the step-limited form), ``0 < budget < 1``, and it is not ``estimator``
    itself. Where the check asked for does not apply, task-vector negation, with the reason why.

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
        >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), steps_scale=0.1, base_steps_scale=0.1)
        >>> choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=pipe.stage_fns)[0]
        'replay'
        >>> choose_second_opinion(pipe.ledger, "partial-replay")[0]  # no stage functions: nothing to re-run
        'delta-fd'
        >>> fns = pipe.stage_fns
        >>> choose_second_opinion(pipe.ledger, "partial-replay", stage_fns=fns, requested="strided-replay")[0]
        'strided-replay'
        >>> choose_second_opinion(pipe.ledger, "aa-linear", stage_fns=pipe.stage_fns)[0]
        'delta-fd'
    """
    requested = check_second_opinion(requested)
    if requested == DEFAULT_SECOND_OPINION:
        return DEFAULT_SECOND_OPINION, f"{estimator} is checked against task-vector negation (as asked: delta-fd)"
    budget = float(budget)
    fns = dict(stage_fns or {})
    indices = list(range(len(ledger.stages))) if stages is None else [int(k) for k in stages]
    if requested == REPLAY or (requested == "auto" and estimator in REPLAY_CHECKS):
        if estimator == REPLAY or (estimator in REPLAY_CHECKS and budget >= 1.0):  # a second replay adds nothing
            return DEFAULT_SECOND_OPINION, f"{estimator} is replay itself here: task-vector negation stands beside it"
        if requested == "auto" and budget <= 0.0:
            return DEFAULT_SECOND_OPINION, (
                f"{estimator} at budget {budget:g} is aa-fd, a propagation-only estimate, which task-vector negation "
                "checks as it checks aa-fd (second_opinion='replay' checks it against replay)"
            )
        problems = replay_needs(ledger, indices, fns, ref_models, reward_funcs).problems
        if problems:
            return DEFAULT_SECOND_OPINION, (
                f"replay cannot check {estimator} ({'; '.join(problems)}), so task-vector negation checks it"
            )
        return REPLAY, f"{estimator} is checked against replay itself, which every later stage allows: {REPLAY_COST}"
    if requested == "auto":  # an estimate that does not replay: the cheap check
        return DEFAULT_SECOND_OPINION, f"{estimator} is checked against task-vector negation"
    other = requested  # a replay family, asked for
    if other == estimator or estimator.startswith(f"{other}-"):  # partial-replay-linear: partial replay's embeddings
        return DEFAULT_SECOND_OPINION, (
            f"{other} would give {estimator}'s own estimate, so task-vector negation checks {estimator}"
        )
    if not 0.0 < budget < 1.0:
        return DEFAULT_SECOND_OPINION, (
            f"at budget {budget:g} {other} would give the same estimate as {estimator} "
            f"({'aa-fd' if budget <= 0 else 'replay'}), so task-vector negation checks it"
        )
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
    "REPLAY",
    "REPLAY_CHECKS",
    "REPLAY_CHECK_COST",
    "REPLAY_COST",
    "SECOND_OPINIONS",
    "check_second_opinion",
    "choose_second_opinion",
]
