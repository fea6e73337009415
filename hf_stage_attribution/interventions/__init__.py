"""Interventions on an accountable stage: ``sweep`` scales a stage down over a sweep of α, ``metrics`` measures
target and utility, ``result`` holds what the sweep found, ``save`` writes the chosen model and ``card`` its card
section.

Example:
    >>> from hf_stage_attribution import interventions
    >>> sorted(interventions.KINDS)
    ['aa-ggn', 'aa-hvp', 'aa-linear', 'delta']
"""

from . import sweep
from .sweep import *  # noqa: F403  (the public names, listed once in sweep.__all__)

__all__ = list(sweep.__all__)
