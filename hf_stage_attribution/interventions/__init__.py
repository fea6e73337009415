"""Interventions on an accountable stage: ``sweep`` scales a stage down over a sweep of α, ``metrics`` measures
target and utility, ``result`` holds what the sweep found, ``save`` writes the chosen model and ``card`` its card
section.

Example:
    >>> from hf_stage_attribution import interventions
    >>> sorted(interventions.KINDS)
    ['aa-ggn', 'aa-hvp', 'aa-linear', 'delta']
"""

from .sweep import (
    KINDS,
    Accuracy,
    BehaviorMean,
    Constraint,
    InterventionResult,
    SweepPoint,
    check_alphas,
    choose,
    resolve_stage,
    scale_stage,
    stage_vectors,
)

__all__ = [
    "KINDS",
    "Accuracy",
    "BehaviorMean",
    "Constraint",
    "InterventionResult",
    "SweepPoint",
    "check_alphas",
    "choose",
    "resolve_stage",
    "scale_stage",
    "stage_vectors",
]
