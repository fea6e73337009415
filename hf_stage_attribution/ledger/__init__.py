"""The stage ledger: versioned JSON + safetensors on disk, and the framework-free recorder.

``format`` (names, versions, validation), ``storage`` (atomic files, locks, safe paths), ``tensor_reader``
(validated safetensors reads), ``optimizer_info``, ``stage`` and ``segments`` (what one stage holds), ``state``
(lazy parameter states), ``core`` (reading and checking a ledger), ``writer`` (appending imported stages),
``recorder`` (recording a custom loop) and ``ledger`` (:class:`StageLedger`, the public facade).

The names below are imported lazily: the facade imports the checkpoint importer, which itself imports
``ledger.core``, so an eager import here would make ``import hf_stage_attribution.checkpoints`` circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "FORMAT_VERSION": "format",
    "LedgerCore": "core",
    "Segment": "stage",
    "Stage": "stage",
    "StageLedger": "ledger",
    "StageRecording": "recorder",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .core import LedgerCore  # noqa: F401
    from .format import FORMAT_VERSION  # noqa: F401
    from .ledger import StageLedger  # noqa: F401
    from .recorder import StageRecording  # noqa: F401
    from .stage import Segment, Stage  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_stage_attribution.ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
