"""Behavior library: per-example scalar behaviors of a model, registered by kind.

Kinds: ``classification``, ``spurious-reliance``, ``lm-toxicity-teacher-forced``, ``lm-toxicity-generations``,
``reward`` (a reward model's score of a policy's responses), ``reward-model`` (the reward model's own score),
``custom`` (a user function). Build them from Python, or from specs (:func:`from_spec`, :func:`load_specs`).
A bare callable ``f(model) -> Tensor[n]`` is accepted through :func:`as_behavior`.

Example:
    >>> import torch
    >>> from hf_stage_attribution import behaviors
    >>> b = behaviors.get("classification")([{"input": [1.0, 0.0], "label": 1}], measure="probability")
    >>> b(torch.nn.Linear(2, 2)).shape
    torch.Size([1])
"""

from __future__ import annotations

from .base import Behavior, ExampleBehavior, eval_mode
from .classification import Classification
from .custom import CallableBehavior, PerExample, as_behavior, as_behavior_set
from .data import ExampleData
from .registry import get, names, register
from .reward import PolicyReward, RewardModelScore
from .scorers import Scorer, get_scorer, offline_scorers
from .spec import from_spec, load_specs, specs_document
from .spurious import SpuriousReliance
from .toxicity import GenerationToxicity, TeacherForcedToxicity

__all__ = [
    "Behavior",
    "CallableBehavior",
    "Classification",
    "ExampleBehavior",
    "ExampleData",
    "GenerationToxicity",
    "PerExample",
    "PolicyReward",
    "RewardModelScore",
    "Scorer",
    "SpuriousReliance",
    "TeacherForcedToxicity",
    "as_behavior",
    "as_behavior_set",
    "eval_mode",
    "from_spec",
    "get",
    "get_scorer",
    "load_specs",
    "names",
    "offline_scorers",
    "register",
    "specs_document",
]
