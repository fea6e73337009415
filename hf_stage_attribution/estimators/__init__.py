"""Estimators of stage effects (ESTIMATORS.md): registry, propagation, embeddings, replay, fidelity."""

from __future__ import annotations
