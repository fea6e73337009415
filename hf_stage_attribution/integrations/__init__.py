"""Front ends that feed the framework-free recorder: the ``transformers``/TRL callback, PEFT helpers, and
Trainer replay. Imported lazily: importing this package does not import transformers, TRL or PEFT.

Example:
    >>> from hf_stage_attribution import integrations
    >>> sorted(integrations.__all__)
    ['StageRecorder', 'replay_trainer_stage']
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "StageRecorder": ("hf_stage_attribution.integrations.transformers", "StageRecorder"),
    "replay_trainer_stage": ("hf_stage_attribution.integrations.replay", "replay_trainer_stage"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_stage_attribution.integrations' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
