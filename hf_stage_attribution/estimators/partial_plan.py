"""The plan of partial replay (ESTIMATORS.md §4b): which later stages it replays, for how many optimizer steps, within
a budget (a fraction of replay's optimizer steps or learning-rate mass). Kept apart from the estimator
(:mod:`~hf_stage_attribution.estimators.partial_replay`) so that ``auto`` and the second-opinion rule can read a
plan without importing the estimator.

Example:
    >>> check_budget(0.25), DEFAULT_BUDGET
    (0.25, 0.25)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BudgetError
from ..ledger.core import LedgerCore
from ..ledger.stage import Stage
from .propagation.stage import trains

DEFAULT_BUDGET = 0.25
BUDGET_UNITS = ("steps", "lr-mass")


def check_budget(budget: Any, unit: str = "steps") -> float:
    """``budget`` as a float in [0, 1]; :class:`~hf_stage_attribution.errors.BudgetError` otherwise.

    Example:
        >>> check_budget(0.25)
        0.25
    """
    if unit not in BUDGET_UNITS:
        raise BudgetError(f"`budget_unit` must be one of {BUDGET_UNITS}, got {unit!r}.")
    ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(float(budget))
    if not ok or not 0.0 <= float(budget) <= 1.0:
        raise BudgetError(
            f"`budget` is the fraction of replay's cost that partial replay may spend: a number in [0, 1] (0: the "
            f"propagation-only aa-linear/aa-fd, 1: replay itself), got {budget!r}. Pass e.g. budget={DEFAULT_BUDGET}."
        )
    return float(budget)


#: where a partial leg's factual branch (the parameters after ``steps`` from θ_k) comes from: replayed
#: (``"replay"``, two branches), a recorded segment's midpoint parameters (``"segment"``), the stage's recorded early
#: checkpoint (``"early"``), or the recorded stage delta scaled by the learning-rate mass of the steps
#: (``"interpolated"``); every source but ``"replay"`` runs the counterfactual branch only
FACTUAL_SOURCES = ("replay", "segment", "early", "interpolated")


@dataclass
class Leg:
    """One later stage in a plan: ``steps`` optimizer steps replayed; ``full`` when the whole stage is replayed;
    ``factual``: where a partial leg's factual branch comes from (:data:`FACTUAL_SOURCES`), ``segment`` the
    recorded segment's index when that is ``"segment"``."""

    index: int
    steps: int
    full: bool
    factual: str = "replay"
    segment: int | None = None

    @property
    def one_branch(self) -> bool:
        """Whether only the counterfactual branch runs (the factual one is read from what was recorded)."""
        return not self.full and self.factual != "replay"


@dataclass
class PartialReplayPlan:
    """What partial replay runs for stage ``stage``: its legs, their cost and replay's, in optimizer steps."""

    stage: int
    budget: float
    unit: str
    legs: list[Leg] = field(default_factory=list)
    cost_steps: int = 0
    replay_steps: int = 0

    @property
    def fraction(self) -> float:
        """Optimizer steps run ÷ replay's (0 when replay runs none, e.g. for the terminal stage)."""
        return self.cost_steps / self.replay_steps if self.replay_steps else 0.0

    def describe(self, ledger: LedgerCore) -> str:
        if not self.legs:
            return "no replay (propagation only)"
        parts = []
        for leg in self.legs:
            stage = ledger.stages[leg.index]
            how = "whole" if leg.full else f"{leg.steps}/{stage.num_steps} steps"
            if not leg.full:
                how += {
                    "early": " (factual: recorded early checkpoint)",
                    "interpolated": " (factual: interpolated)",
                    "segment": f" (factual: segment {leg.segment})",
                }.get(leg.factual, " ×2")
            parts.append(f"{stage.name} {how}")
        return ", ".join(parts)


def _weights(stage: Stage, unit: str) -> list[float]:
    """Per optimizer step of ``stage``: its cost in the budget's unit (1 per step, or the applied rate)."""
    if unit == "steps":
        return [1.0] * int(stage.num_steps)
    return [float(max(step)) if step else 0.0 for step in stage.learning_rates][: int(stage.num_steps)]


def _checkpoints(stage: Stage) -> list[tuple[int, int]]:
    """``(optimizer steps taken, segment index)`` of the recorded mid-stage parameters of ``stage``."""
    out = []
    for segment in getattr(stage, "segments", None) or []:
        if (segment.dir / "params_delta.safetensors").exists():
            out.append((segment.mid_step + 1, segment.index))  # recorded right after optimizer step mid_step
    return sorted(out)


def plan_partial_replay(
    ledger: LedgerCore,
    k: int,
    budget: float,
    unit: str = "steps",
    use_checkpoints: bool = False,
    use_early_checkpoints: bool = True,
    factual: str = "replay",
) -> PartialReplayPlan:
    """The legs partial replay runs for stage index ``k`` at ``budget`` (see the module docstring, step 1).

    Example:
        >>> class S:  # a stand-in for ledger stages: 3 stages of 100 optimizer steps
        ...     def __init__(self, i): self.index, self.num_steps, self.learning_rates = i, 100, [[0.1]] * 100
        >>> class L: stages = [S(0), S(1), S(2)]
        >>> p = plan_partial_replay(L(), 0, 0.75)
        >>> [(leg.index, leg.steps, leg.full) for leg in p.legs], p.cost_steps, p.replay_steps
        ([(1, 100, True), (2, 25, False)], 150, 200)
    """
    budget = check_budget(budget, unit)
    stages = ledger.stages
    later = [s for s in stages[k + 1 :] if trains(s)]
    plan = PartialReplayPlan(k, budget, unit, replay_steps=sum(int(s.num_steps) for s in later))
    weights = {s.index: _weights(s, unit) for s in later}
    left = budget * sum(sum(w) for w in weights.values())
    if budget == 0.0:
        return plan  # nothing replayed (not even a step that costs no learning-rate mass): the aa-linear embedding
    for stage in stages[k + 1 :]:
        if not trains(stage):
            plan.legs.append(Leg(stage.index, 0, True))  # re-applied as its recorded delta: free
            continue
        w = weights[stage.index]
        if budget >= 1.0 or left >= sum(w) * (1 - 1e-12):
            plan.legs.append(Leg(stage.index, len(w), True))
            plan.cost_steps += len(w)
            left -= sum(w)
            continue
        m, spent, legs = 0, 0.0, 1 if factual == "interpolated" else 2
        while m < len(w) and legs * (spent + w[m]) <= left * (1 + 1e-12):
            spent += w[m]
            m += 1
        leg = Leg(stage.index, m, False, "interpolated" if factual == "interpolated" else "replay")
        for steps, segment in _checkpoints(stage) if use_checkpoints else []:
            if steps > leg.steps and steps < len(w) and sum(w[:steps]) <= left * (1 + 1e-12):
                leg = Leg(stage.index, steps, False, "segment", segment)  # only the counterfactual branch runs
        early = getattr(stage, "early_checkpoint", None) if use_early_checkpoints else None
        if early is not None and early.steps < len(w) and sum(w[: early.steps]) <= left * (1 + 1e-12):
            leg = Leg(stage.index, early.steps, False, "early")  # the factual branch is read, not run
        if leg.steps:
            plan.legs.append(leg)
            plan.cost_steps += leg.steps if leg.one_branch else 2 * leg.steps
        break
    if not any(leg.steps for leg in plan.legs):
        plan.legs = []  # only edits without optimizer steps: the propagation (D = 1) re-applies them exactly
    return plan


def unreplayed_stages(ledger: LedgerCore, indices: Iterable[int], budget: float) -> list[str]:
    """Stages among ``indices`` with a later stage that trains, for which partial replay at ``budget`` replays no
    optimizer step (one step from each of the two starts costs more than the budget): their estimate is the
    propagation-only carry, which no replay checks.

    Example:
        >>> class S:  # stand-ins for ledger stages: 8, 2 and 2 optimizer steps
        ...     def __init__(self, i, n):
        ...         self.index, self.name, self.num_steps, self.learning_rates = i, f"s{i}", n, [[0.1]] * n
        >>> class L: stages = [S(0, 8), S(1, 2), S(2, 2)]
        >>> unreplayed_stages(L(), [0, 1, 2], 0.25), unreplayed_stages(L(), [0, 1, 2], 0.5)
        (['s0', 's1'], ['s1'])
    """
    stages = ledger.stages
    out = []
    for k in indices:
        if any(trains(s) for s in stages[k + 1 :]) and not plan_partial_replay(ledger, k, budget).legs:
            out.append(stages[k].name)
    return out
