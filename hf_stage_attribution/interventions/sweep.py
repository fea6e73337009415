"""Interventions on an accountable stage: scale its contribution down and measure what it buys and what it costs.

For a stage ``k`` and a sweep of ``α``, :func:`scale_stage` evaluates the models ``θ_K − α · v_k`` (``v_k`` the stage
embedding of ``kind``, ESTIMATORS.md §3) and, for comparison, ``θ_K − α · Δ_k`` (task-vector negation), plus the
replay-without-stage model ``θ̃_K^(−k)`` where replay is available; on each it measures a target behavior (e.g.
spurious reliance) and utility metrics (e.g. average and worst-group accuracy) on held-out data, then picks ``α``
under a :class:`~hf_stage_attribution.interventions.metrics.Constraint`. The final model is edited in place only
inside a ``try/finally`` that restores it exactly; :meth:`InterventionResult.save` writes the chosen model with
``save_pretrained`` (a LoRA adapter stays an adapter when only the adapter changes), a card section and a plot.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> from hf_stage_attribution import interventions
    >>> reliance = pipe.behaviors["patch_gap"]  # class-7 margin with the corner patch minus without
    >>> result = interventions.scale_stage(ledger, model, "digits-patch", [0.5, 1.0], target=reliance)
    >>> [(p.variant, p.alpha) for p in result.points]
    [('aa-linear', 0.5), ('aa-linear', 1.0), ('delta', 0.5), ('delta', 1.0)]

With utility metrics and a constraint, and a ``save_pretrained`` model to write::

    result = interventions.scale_stage(ledger, model, "patch", [0.25, 0.5, 1.0], target=reliance,
        utilities=[Accuracy(rows, group_key="group")], constraint=Constraint("accuracy", max_drop=1.0))
    print(result.table()); result.save("out/intervened")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..behaviors import as_behavior
from ..behaviors.base import needs_preparing
from ..errors import InterventionError, ReplayError
from ..estimators.finite_difference import subtract_embedding
from ..estimators.replay import replay_model
from ..ledger import StageLedger
from ..ledger.core import LedgerCore
from .metrics import Accuracy, BehaviorMean, Constraint, as_metrics, evaluate_metrics, mean_value
from .result import InterventionResult, SweepPoint
from .vectors import KINDS, resolve_stage, stage_vectors


def check_alphas(alphas: Any) -> list[float]:
    """The sweep as sorted unique floats; :class:`InterventionError` for an empty or non-finite sweep, an α outside
    [0, 1], or a sweep without an α > 0.

    ``θ_K − α · v_k`` scales the stage's contribution down: α = 0 keeps it whole (the original model), α = 1 removes
    it. α > 1 would push past removing the stage and α < 0 would amplify it; neither is scaling it down.
    """
    if isinstance(alphas, (int, float)):
        alphas = [alphas]
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError) as exc:
        raise InterventionError(f"Expected a sequence of numbers for the α sweep, got {alphas!r} ({exc}).") from None
    if not values:
        raise InterventionError("The α sweep is empty; pass at least one α (e.g. [0.25, 0.5, 0.75, 1.0]).")
    bad = [a for a in values if not math.isfinite(a)]
    if bad:
        raise InterventionError(f"The α sweep holds non-finite values {bad}; every α must be a finite number.")
    outside = [a for a in values if not 0.0 <= a <= 1.0]
    if outside:
        raise InterventionError(
            f"Expected every α in [0, 1], got {', '.join(f'{a:g}' for a in outside)}. The intervention θ_K − α·v_k "
            "scales the stage's contribution down (α = 0 keeps it, α = 1 removes it); α > 1 would overshoot the "
            "removal and α < 0 would amplify the stage. Pass values in [0, 1] (e.g. 0.25,0.5,0.75,1)."
        )
    if max(values) == 0.0:
        raise InterventionError(
            "The α sweep holds only α = 0, the original model itself; add at least one α in (0, 1] (e.g. 0.5,1)."
        )
    return sorted(set(values))


def check_stage_changed(stage: Any) -> None:
    """:class:`InterventionError` when the stage changed no parameter (no tensor, or an all-zero Δ_k): scaling it
    down would change nothing. Reads Δ_k tensor by tensor and stops at the first non-zero one."""
    for _, delta in stage.iter_delta():
        if bool(delta.any()):
            return
    raise InterventionError(
        f"Expected stage {stage.name!r} (index {stage.index}) to have changed the model's parameters, but its "
        "recorded delta is zero (e.g. a learning rate of 0, or every step skipped): there is nothing to scale down, "
        "and every α would give the original model. Choose a stage that trained; nothing was evaluated or written."
    )


def _evaluate(model: torch.nn.Module, target: Any, metrics: list, variant: str, alpha: float) -> SweepPoint:
    values = mean_value(target, model, getattr(target, "name", "target"))
    return SweepPoint(variant, alpha, values, evaluate_metrics(model, metrics))


def _sweep(model, emb, k: int, alphas: list[float], target, metrics, variant: str) -> list[SweepPoint]:

    points = []
    for alpha in alphas:
        with subtract_embedding(model, emb, k, scale=alpha):
            points.append(_evaluate(model, target, metrics, variant, alpha))
    return points


def _replay_point(ledger, model, stage, target, metrics, stage_fns, replay: bool | None):
    """``(point, model, note)`` for the replay-without-stage model, or ``(None, None, why not)``."""

    later = ledger.stages[stage.index + 1 :]
    available = stage_fns is not None or all(s.replay_dir is not None for s in later)
    if replay is False or (replay is None and not available):
        why = (
            "not requested"
            if replay is False
            else ("no stage functions were given and the later stages hold no replay data")
        )
        return None, None, f"Replay without stage {stage.name!r} not run: {why}"
    try:
        cf = replay_model(ledger, model, stage.index, stage_fns=stage_fns)
    except ReplayError as exc:
        if replay:
            raise
        return None, None, f"Replay without stage {stage.name!r} not available: {exc}"
    cf.eval()
    note = (
        f"Replay without stage {stage.name!r}: the stage removed and the {len(later)} later stage(s) re-run with "
        "their recorded recipe"
    )
    return _evaluate(cf, target, metrics, "replay", 1.0), cf, note


def choose(
    points: Sequence[SweepPoint],
    baseline: SweepPoint,
    constraint: Constraint | None,
    objective: str = "target",
    direction: str = "decrease",
) -> tuple[SweepPoint | None, str]:
    """Mark each point feasible or not (None without a constraint); return the best feasible point with α > 0 by
    ``objective`` and a sentence saying why, or ``(None, why not)`` when no α > 0 meets the constraint or the best
    one does not improve ``objective`` on the original model (then no model is worth saving).

    ``objective`` is ``"target"`` (its mean moved in ``direction``) or a utility metric name (``direction`` then says
    whether lower or higher is better: ``"decrease"`` or ``"increase"``).
    """
    if direction not in ("decrease", "increase"):
        raise InterventionError(f"`direction` must be 'decrease' or 'increase', got {direction!r}.")
    if objective != "target" and points and objective not in points[0].metrics:
        known = ", ".join(sorted(points[0].metrics)) or "none"
        raise InterventionError(f"The objective {objective!r} is neither 'target' nor a utility metric ({known}).")
    for p in points:
        p.feasible = None if constraint is None else constraint.allows(p.metrics, baseline.metrics)
    candidates = [p for p in points if p.alpha != 0.0]  # α = 0 is the original model, not an intervention
    if not candidates:
        return None, "No α > 0 in the sweep (α = 0 is the original model), so no model was chosen."
    feasible = [p for p in candidates if p.feasible is not False]
    if not feasible:
        best = max(candidates, key=lambda p: _constraint_margin(p, baseline, constraint))
        return None, (
            f"No α met the constraint ({constraint.describe()}): the closest was α={best.alpha:g} with "
            f"{constraint.metric} = {best.metrics[constraint.metric]:.4g} (original model "
            f"{baseline.metrics[constraint.metric]:.4g}). Try smaller α values or relax the constraint."
        )

    def value(p: SweepPoint) -> float:
        return p.target if objective == "target" else p.metrics[objective]

    def score(p: SweepPoint) -> float:
        return value(p) if direction == "decrease" else -value(p)

    chosen = min(feasible, key=lambda p: (score(p), abs(p.alpha)))
    rule = "no constraint" if constraint is None else constraint.describe()
    if score(chosen) >= score(baseline):
        among = "" if constraint is None else f" among those that meet the constraint ({rule})"
        return None, (
            f"No α improves on the original model: the best{among} is α={chosen.alpha:g}, with {objective} = "
            f"{value(chosen):.4g} (original model {value(baseline):.4g}). Scaling this stage down does not "
            f"{direction} {objective} here, so no model was chosen."
        )
    message = (
        f"α={chosen.alpha:g} chosen: the {'lowest' if direction == 'decrease' else 'highest'} {objective} among the "
        f"{len(feasible)} of {len(candidates)} α values that meet the constraint ({rule})."
    )
    return chosen, message


def _check_names(baseline: SweepPoint, constraint: Constraint | None, objective: str) -> None:
    """Fail before the sweep when the constraint or the objective names a metric no utility reports."""
    if constraint is not None:
        constraint.allows(baseline.metrics, baseline.metrics)
    if objective != "target" and objective not in baseline.metrics:
        known = ", ".join(sorted(baseline.metrics)) or "none"
        raise InterventionError(f"The objective {objective!r} is neither 'target' nor a utility metric ({known}).")


def _constraint_margin(point: SweepPoint, baseline: SweepPoint, constraint: Constraint) -> float:
    sign = 1.0 if constraint.higher_is_better else -1.0
    return sign * (point.metrics[constraint.metric] - baseline.metrics[constraint.metric])


def scale_stage(
    ledger: LedgerCore,
    model: torch.nn.Module,
    stage: int | str,
    alphas: Sequence[float],
    kind: str = "aa-linear",
    *,
    target: Any,
    utilities: Any = None,
    constraint: Constraint | None = None,
    objective: str = "target",
    target_direction: str = "decrease",
    compare_delta: bool = True,
    stage_fns: Mapping[str, Any] | None = None,
    replay: bool | None = None,
    embedding_options: Mapping[str, Any] | None = None,
    check_model: bool = True,
) -> InterventionResult:
    """Sweep ``θ_K − α · v_k`` over ``alphas`` (and ``θ_K − α · Δ_k`` with ``compare_delta``), evaluate, choose ``α``.

    Args:
        ledger: a ``StageLedger`` or its directory; ``model``: the final model θ_K (left exactly as it was).
        stage: the stage to act on (name or index); ``kind``: ``aa-linear`` (default), ``delta``, ``aa-ggn``,
            ``aa-hvp``; ``alphas``: the sweep (non-empty, each α in [0, 1], at least one α > 0; 0 keeps the stage
            whole, 1 removes it).
        target: the behavior to move (``f(model) -> Tensor[n]``); its mean is reported; ``target_direction``:
            ``"decrease"`` (default) or ``"increase"``.
        utilities: :class:`Accuracy` (with ``group_key`` for worst-group accuracy), behaviors (their mean), or a
            dict ``{name: behavior}``; evaluated on held-out data.
        constraint: which utility may lose how much (e.g. ``Constraint("accuracy", max_drop=1.0)``); ``objective``:
            ``"target"`` or a utility metric to optimise among the α values that meet it.
        stage_fns: stage functions for the replay-without-stage model (``estimators.replay``); ``replay``:
            ``None`` runs it when available, ``True`` requires it, ``False`` skips it.
        embedding_options: ``allow_identity_propagation``, ``loss_fns``, ``curvature_options`` for ``v_k``.

    Returns an :class:`InterventionResult` (``chosen`` is None, with a message, when no α > 0 meets the constraint
    or improves ``objective`` on the original model). A stage that changed no parameter is an
    :class:`InterventionError` before anything is evaluated.
    """

    ledger = ledger if isinstance(ledger, StageLedger) else StageLedger.load(ledger)
    chosen_stage = resolve_stage(ledger, stage)
    sweep = check_alphas(alphas)
    if kind not in KINDS:
        raise InterventionError(f"Unknown intervention kind {kind!r}; known kinds: {', '.join(KINDS)}.")
    if target_direction not in ("decrease", "increase"):
        raise InterventionError(f"`target_direction` must be 'decrease' or 'increase', got {target_direction!r}.")
    check_stage_changed(chosen_stage)
    if check_model:
        ledger.check_model(model)
    target = as_behavior(target, name=getattr(target, "name", None) or "target")
    if needs_preparing(target, model):
        target.prepare(model)
    metrics = as_metrics(utilities)
    for metric in metrics:  # a utility built from a generation-based behavior is prepared on θ_K, as the target is
        behavior = getattr(metric, "behavior", None)
        if behavior is not None and needs_preparing(behavior, model):
            behavior.prepare(model)
    was_training = model.training
    model.eval()
    try:
        baseline = _evaluate(model, target, metrics, "original", 0.0)
        _check_names(baseline, constraint, objective)
        k = chosen_stage.index
        vectors = stage_vectors(ledger, model, chosen_stage, kind, embedding_options)
        points = _sweep(model, vectors, k, sweep, target, metrics, kind)
        delta_note = ""
        if compare_delta and kind != "delta":
            equals_delta = getattr(vectors, "equals_delta", None)
            if callable(equals_delta) and equals_delta(k):  # the same edit: its sweep would repeat every row
                delta_note = (
                    f"`delta` (task-vector negation) is the same edit as `{kind}` here: the stage's embedding is its "
                    "recorded delta tensor for tensor (the later stages' updates carry it unchanged, e.g. Adam(W) "
                    "without weight decay), so it was not swept twice"
                )
            else:
                delta = stage_vectors(ledger, model, chosen_stage, "delta")
                points += _sweep(model, delta, k, sweep, target, metrics, "delta")
        replay_point, replay_model_, replay_note = _replay_point(
            ledger, model, chosen_stage, target, metrics, stage_fns, replay
        )
    finally:
        model.train(was_training)
    main = [p for p in points if p.variant == kind]
    chosen, message = choose(main, baseline, constraint, objective, target_direction)
    for p in points:
        if p.variant != kind:
            p.feasible = None if constraint is None else constraint.allows(p.metrics, baseline.metrics)
    return InterventionResult(
        stage=chosen_stage.name,
        stage_index=chosen_stage.index,
        kind=kind,
        target_name=target.name,
        target_unit=str(getattr(target, "unit", "") or ""),
        target_direction=target_direction,
        baseline=baseline,
        points=points,
        replay=replay_point,
        replay_note=replay_note,
        delta_note=delta_note,
        constraint=constraint,
        objective=objective,
        chosen=chosen,
        message=message,
        accuracy_metrics=_accuracy_names(metrics),
        ledger=ledger,
        model=model,
        embedding_options=dict(embedding_options or {}),
        replay_model=replay_model_,
        target_behavior=target,
        utility_metrics=metrics,
    )


def _accuracy_names(metrics: list) -> dict[str, str]:
    """``{"average": name, "worst_group": name}`` of the first accuracy metrics, for headlines and plots."""
    out: dict[str, str] = {}
    for m in metrics:
        if isinstance(m, Accuracy):
            if m.groups is not None:
                out.setdefault("worst_group", m.worst_group_name)
            out.setdefault("average", m.name)
    return out


__all__ = [
    "KINDS",
    "Accuracy",
    "BehaviorMean",
    "Constraint",
    "InterventionResult",
    "SweepPoint",
    "check_alphas",
    "check_stage_changed",
    "choose",
    "resolve_stage",
    "scale_stage",
    "stage_vectors",
]
