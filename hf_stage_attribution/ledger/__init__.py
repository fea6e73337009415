"""The stage ledger: versioned JSON + safetensors on disk, and the framework-free recorder."""

from __future__ import annotations

from .format import FORMAT_VERSION
from .ledger import StageLedger
from .recorder import StageRecording
from .stage import Segment, Stage

__all__ = ["FORMAT_VERSION", "Segment", "Stage", "StageLedger", "StageRecording"]
