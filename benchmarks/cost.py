"""Cost figure: each estimator's wall time against one forward+backward pass and against replay, same run.

The floor is one forward+backward pass of the mean behavior over the whole behavior set, with respect to every
base parameter (``estimators.linear.mean_gradient``: what ``aa-linear`` with ``per_example=False`` does before its
dot products), median of repetitions filling at least a second. Estimator times come from :mod:`.fidelity`
(measured in the same process, right after the floor): *embeddings* (computing the stage embeddings into an
empty cache), *readout* (the per-example estimate with the cache warm), *cold* = embeddings + readout, and *means
only* (linear estimators with ``per_example=False``: ESTIMATORS.md §4's "one backward pass + K dot products").

Example:
    >>> run = {"floor": {"forward_backward": 2.0}, "replay_seconds": 8.0, "times": {"aa-fd": {"cold": 4.0}}}
    >>> ratios(run)
    {'aa-fd': {'cold_seconds': 4.0, 'cold_over_fb': 2.0, 'cold_over_replay': 0.5}}
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch

from .common import repeated


def floor_seconds(model: torch.nn.Module, behavior: Any, min_seconds: float = 1.0) -> dict[str, float]:
    """Median seconds of one forward pass and of one forward+backward pass over the behavior set (repeated until
    ``min_seconds`` have passed, after one warm-up pass)."""
    from hf_stage_attribution.estimators.base import eval_mode
    from hf_stage_attribution.estimators.linear import mean_gradient, parameter_paths

    paths = parameter_paths(model)

    def forward() -> None:
        with torch.no_grad():
            behavior(model)

    with eval_mode(model):
        mean_gradient(model, behavior, paths)  # warm-up (allocator, lazy kernels)
        fwd = repeated(forward, min_seconds)[1]
        fb = repeated(lambda: mean_gradient(model, behavior, paths), min_seconds)[1]
    return {"forward": fwd, "forward_backward": fb}


def ratios(run: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per estimator of one pipeline run: its times over the forward+backward floor and over replay's time."""
    fb = run["floor"]["forward_backward"]
    replay = run["replay_seconds"]
    out: dict[str, dict[str, float]] = {}
    for name, times in run["times"].items():
        entry = {f"{kind}_seconds": seconds for kind, seconds in times.items()}
        entry.update(
            {f"{kind}_over_fb": times[kind] / fb for kind in ("cold", "readout", "means_only") if kind in times}
        )
        entry["cold_over_replay"] = times["cold"] / replay
        out[name] = entry
    return out


def summarise(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Median over seeds of every ratio, per pipeline and estimator, with the floor and replay seconds."""
    by_pipeline: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_pipeline.setdefault(run["pipeline"], []).append(run)
    out: dict[str, Any] = {}
    for pipeline, group in by_pipeline.items():
        per_seed = [ratios(run) for run in group]
        names = list(dict.fromkeys(n for r in per_seed for n in r))
        table = {}
        for name in names:
            keys = list(dict.fromkeys(k for r in per_seed if name in r for k in r[name]))
            table[name] = {k: statistics.median([r[name][k] for r in per_seed if k in r.get(name, {})]) for k in keys}
        out[pipeline] = {
            "estimators": table,
            "forward_seconds": statistics.median([g["floor"]["forward"] for g in group]),
            "forward_backward_seconds": statistics.median([g["floor"]["forward_backward"] for g in group]),
            "replay_seconds": statistics.median([g["replay_seconds"] for g in group]),
            "replay_stage_runs": group[0].get("replay_stage_runs"),
            "seeds": len(group),
        }
    return out
