"""Estimators of stage effects (ESTIMATORS.md): registry, propagation, embeddings, replay, fidelity.

Example:
    >>> from hf_stage_attribution import estimators
    >>> estimators.names()[:3]
    ['aa-fd', 'aa-ggn', 'aa-ggn-fd']
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> result = estimators.get("auto").estimate(ledger, model, behavior)
    >>> result.estimator, sorted(result.mean) == sorted(s.name for s in ledger.stages)
    ('aa-ggn-fd', True)
"""

from __future__ import annotations

from .._internal.reuse import reusing_replays
from . import finite_difference as _finite_difference  # noqa: F401  (registers delta-fd, aa-fd, aa-*-fd)
from . import linear as _linear  # noqa: F401  (registers delta-linear, aa-linear, aa-ggn, aa-hvp)
from . import lora_exact as _lora_exact  # noqa: F401  (registers lora-exact)
from . import partial_replay as _partial_replay  # noqa: F401  (registers partial-replay, partial-replay-linear)
from . import replay as _replay  # noqa: F401  (registers replay)
from . import selection as _selection  # noqa: F401  (registers auto)
from . import strided_replay as _strided_replay  # noqa: F401  (registers strided-replay)
from .base import EstimateResult, Estimator, check_options, get, names, register
from .curvature.config import CurvatureConfig
from .embeddings.cache import StageEmbeddings, stage_embeddings
from .fidelity import fidelity
from .finite_difference import subtract_embedding
from .propagation.rules import run_recurrence
from .replay import first_order_response, replay_gap, replay_model
from .second_opinion import choose_second_opinion
from .selection import choose_estimator

__all__ = [
    "CurvatureConfig",
    "EstimateResult",
    "Estimator",
    "StageEmbeddings",
    "check_options",
    "choose_estimator",
    "choose_second_opinion",
    "fidelity",
    "first_order_response",
    "get",
    "names",
    "register",
    "replay_gap",
    "replay_model",
    "reusing_replays",
    "run_recurrence",
    "stage_embeddings",
    "subtract_embedding",
]
