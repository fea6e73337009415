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

from .common import by_pipeline, repeated


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
    out: dict[str, Any] = {}
    for pipeline, group in by_pipeline(runs).items():
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


CHEAP = {"preset": "cheap"}  # curvature_options: ESTIMATORS.md §5's "cheap configuration" (CURVATURE_PRESETS)


def length_sweep(settings: Any, work: Any) -> dict[str, Any]:
    """``aa-ggn``'s cold cost against replay's as the later stages get longer (digits, HF defaults, first seed).

    The first stage keeps its length; the later stages' step counts are multiplied by each of
    ``settings.sweep_scales``. Replay re-runs those steps; ``aa-ggn`` runs a fixed number of curvature products per
    segment, whatever the segment's length (ESTIMATORS.md §4a)."""
    import time

    start = time.perf_counter()
    rows = [_sweep_point(scale, settings.digits_seeds[0], work) for scale in settings.sweep_scales]
    return {"rows": rows, "figure_seconds": time.perf_counter() - start}


def _sweep_point(scale: float, seed: int, work: Any) -> dict[str, Any]:
    import shutil

    from hf_stage_attribution import estimators
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    from .common import quiet

    with quiet():
        p = build_digits_pipeline("hf", work / f"sweep-{scale}", seed=seed, steps_scale=scale)
    behaviors = list(p.behaviors.values())
    opts = {"check_model": False, "stage_fns": p.stage_fns, "loss_fns": {s.name: p.loss_fn for s in p.ledger.stages}}

    def joint(model: Any) -> torch.Tensor:
        return torch.cat([b(model).reshape(-1) for b in behaviors])

    def replay() -> None:
        estimators.get("replay").estimate(p.ledger, p.model, joint, **opts)

    replay_seconds = repeated(replay, 1.0)[1]
    row: dict[str, Any] = {"scale": scale, "later_steps": sum(s.num_steps for s in p.ledger.stages[1:]),
                           "replay_seconds": replay_seconds}  # fmt: skip
    for label, extra in (("aa-ggn", {}), ("aa-ggn (cheap)", CHEAP)):

        def cold(extra: dict = extra) -> None:
            shutil.rmtree(p.ledger.embeddings_dir, ignore_errors=True)
            estimators.get("aa-ggn").estimate(p.ledger, p.model, joint, **opts, curvature_options=extra)

        seconds = repeated(cold, 1.0)[1]
        row[label] = {"seconds": seconds, "over_replay": seconds / replay_seconds}
    return row
