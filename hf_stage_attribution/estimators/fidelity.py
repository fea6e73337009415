"""Fidelity of estimated stage effects against replay ground truth (ESTIMATORS.md §5).

One function, :func:`fidelity`, used by tests, the CLI and the benchmarks. Figures are given for all
(stage, behavior) pairs and for the non-terminal pairs separately: for the last stage every ``-fd`` estimator is exact
by definition, which flatters "all pairs".

Example:
    >>> est = {("s1", "b"): 0.9, ("s2", "b"): -0.1, ("s3", "b"): 2.0}
    >>> true = {("s1", "b"): 1.0, ("s2", "b"): 0.1, ("s3", "b"): 2.0}
    >>> out = fidelity(est, true, terminal_stage="s3")
    >>> round(out["all"]["spearman"], 9), out["non_terminal"]["top_stage_agreement"]
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

Pair = tuple[str, str]
METRICS = (
    "pearson",
    "spearman",
    "sign_agreement",
    "top_stage_agreement",
    "scale_free_error",
    "per_example_spearman",
)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    ranks = torch.empty_like(values)
    i, n = 0, len(values)
    while i < n:
        j = i
        while j + 1 < n and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation in float64 (``nan`` when fewer than 2 values or one side is constant)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation with tied ranks averaged (``nan`` when undefined)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    return pearson(_ranks(a), _ranks(b))


def _as_pairs(values: Mapping[Any, Any]) -> dict[Pair, torch.Tensor]:
    """Normalise ``{(stage, behavior): value}`` or ``{behavior: EstimateResult}`` into per-example float64 tensors."""
    out: dict[Pair, torch.Tensor] = {}
    for key, value in values.items():
        if hasattr(value, "per_example"):
            for stage, per_example in value.per_example.items():
                out[(str(stage), str(key))] = torch.as_tensor(per_example, dtype=torch.float64).flatten()
        else:
            stage, behavior = key
            out[(str(stage), str(behavior))] = torch.as_tensor(value, dtype=torch.float64).flatten()
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _block(pairs: list[Pair], est: dict[Pair, torch.Tensor], true: dict[Pair, torch.Tensor]) -> dict[str, Any]:
    if not pairs:
        return {"n_pairs": 0, **{m: math.nan for m in METRICS}, "scale_free_error_per_behavior": {}}
    e = torch.stack([est[p].mean() for p in pairs])
    t = torch.stack([true[p].mean() for p in pairs])
    behaviors = sorted({b for _, b in pairs})
    top, scale_free = [], {}
    for behavior in behaviors:
        idx = [i for i, (_, b) in enumerate(pairs) if b == behavior]
        e_b, t_b = e[idx], t[idx]
        top.append(float(int(torch.argmax(e_b.abs())) == int(torch.argmax(t_b.abs()))))
        scale = float(t_b.abs().max())
        err = float((e_b - t_b).abs().quantile(0.5))
        scale_free[behavior] = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    per_example = [spearman(est[p], true[p]) for p in pairs if len(est[p]) > 1 and len(est[p]) == len(true[p])]
    return {
        "n_pairs": len(pairs),
        "pearson": pearson(e, t),
        "spearman": spearman(e, t),
        "sign_agreement": float((torch.sign(e) == torch.sign(t)).double().mean()),
        "top_stage_agreement": _mean(top),
        "scale_free_error": _mean(list(scale_free.values())),
        "per_example_spearman": _mean(per_example),
        "scale_free_error_per_behavior": scale_free,
    }


def fidelity(
    estimates: Mapping[Any, Any],
    truth: Mapping[Any, Any],
    terminal_stage: str | None = None,
) -> dict[str, Any]:
    """Compare estimated stage effects with replay ground truth.

    Args:
        estimates, truth: either ``{(stage name, behavior name): value}`` where a value is a float or a per-example
            tensor, or ``{behavior name: EstimateResult}``. Only pairs present in both are compared; pair-level
            figures use the mean over examples.
        terminal_stage: the last stage's name (its pairs are left out of ``"non_terminal"``). ``None``: the last stage
            in the order the truth lists them.

    Returns ``{"all": {...}, "non_terminal": {...}, "terminal_stage": name}``; each block holds ``n_pairs``,
    ``pearson``, ``spearman`` (ties averaged), ``sign_agreement``, ``top_stage_agreement`` (per behavior: does the
    largest |effect| fall on the same stage, averaged over behaviors), ``scale_free_error`` (per behavior
    ``median_k |τ̂_k − τ_k| / max_k |τ_k|`` over the block's stages, averaged over behaviors; the per-behavior values
    are in ``scale_free_error_per_behavior``) and ``per_example_spearman`` (mean over pairs of the Spearman
    correlation between per-example estimates and truth). Undefined figures are ``nan``.
    """
    est, true = _as_pairs(estimates), _as_pairs(truth)
    pairs = [p for p in true if p in est]
    if terminal_stage is None and true:
        terminal_stage = list(dict.fromkeys(s for s, _ in true))[-1]
    return {
        "all": _block(pairs, est, true),
        "non_terminal": _block([p for p in pairs if p[0] != terminal_stage], est, true),
        "terminal_stage": terminal_stage,
    }
