"""hf-stage-attribution: which training stage is accountable for a model's behavior, and by how much.

The public surface is small and imported lazily, so ``import hf_stage_attribution`` does not import
transformers, trl, peft, accelerate or matplotlib.

Example:
    >>> import hf_stage_attribution as hsa
    >>> "aa-linear" in hsa.estimators.names()
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

_LAZY = {
    "AttributionReport": ("hf_stage_attribution.report", "AttributionReport"),
    "CurvatureConfig": ("hf_stage_attribution.estimators.curvature.config", "CurvatureConfig"),
    "StageAttributor": ("hf_stage_attribution.attributor", "StageAttributor"),
    "StageLedger": ("hf_stage_attribution.ledger.ledger", "StageLedger"),
    "StageRecorder": ("hf_stage_attribution.integrations.transformers", "StageRecorder"),
    "behaviors": ("hf_stage_attribution.behaviors", None),
    "estimators": ("hf_stage_attribution.estimators", None),
    "interventions": ("hf_stage_attribution.interventions", None),
    "write_model_card": ("hf_stage_attribution.model_card", "write_model_card"),
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover  (names for type checkers and IDEs)
    from . import behaviors, estimators, interventions  # noqa: F401
    from .attributor import StageAttributor  # noqa: F401
    from .estimators.curvature.config import CurvatureConfig  # noqa: F401
    from .integrations.transformers import StageRecorder  # noqa: F401
    from .ledger.ledger import StageLedger  # noqa: F401
    from .model_card import write_model_card  # noqa: F401
    from .report import AttributionReport  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_stage_attribution' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
