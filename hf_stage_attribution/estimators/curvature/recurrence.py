"""The optimizer recurrence of one later stage with curvature, in a projected (Ritz) basis.

``propagation.rules.run_recurrence`` carries a perturbation through a stage for one
scalar curvature ``c`` per coordinate. Curvature-aware propagation (ESTIMATORS.md §4a) needs the same recurrence
on the coordinates ``y`` of a perturbation in an ``r``-dimensional Krylov/Ritz basis, where

* the curvature is the diagonal matrix of Ritz values ``Θ``;
* everything that is per *param group* (learning rate, decay, momentum, ...) becomes, in the basis, the
  combination ``Σ_g a_g E_g`` of the projected group masks ``E_g = Vᵀ diag(1_g) V`` (Galerkin projection); when all
  groups share the same scalars this is ``a·I`` and every Ritz mode follows its own scalar (2×2 with momentum)
  recurrence, exactly as ``run_recurrence`` would run it.

Written in the symmetrised coordinates ``u = x / s``, ``b' = s·b`` with ``s² = P·ᾱ_g`` (``P`` the frozen
preconditioner ``1/(√v̂+ε)``, ``1`` for SGD; ``ᾱ_g`` the group's mean learning rate relative to the reference
group), one optimizer step of every family the curvature propagation supports is::

    g' = sign·(K u + f) + λ_c s² u         # loss-gradient difference (K = S C̄ S) + forcing, coupled decay
    b' = cb·b' + cg·g'                     # first moment (SGD momentum buffer / Adam exp_avg / RMSprop buffer)
    step = sg·g' + sb·b'
    u = keep·u − eta·step                  # keep = 1 − η λ_decoupled, eta = η·κ/ᾱ_g

with per step and group: SGD ``μ = 0``: ``(cb, cg, sg, sb) = (1, 0, 1, 0)`` (no buffer, dampening ignored as in
torch); SGD ``μ > 0``: ``(μ, 1−d, 0, 1)``, ``(μ, 1−d, 1, μ)`` with nesterov, and ``(0, 1, ·, ·)`` at the first step of
a fresh optimizer (torch clones the gradient into the buffer). Adam/AdamW: ``m_t = β1 m + (1−β1) g`` from ``m = 0``
and ``θ −= η/(1−β1^s) · P m``: momentum ``μ = β1`` with dampening ``1−β1`` *without* the clone-first-step rule, plus
the bias correction ``κ_s = 1/(1−β1^s)`` folded into ``eta`` (``s`` counts the optimizer's steps since it was
created, so a continued optimizer keeps counting). RMSprop: ``(μ, 1, 0, 1)`` from a zero buffer (``(1, 0, 1, 0)`` at
``μ = 0``). Adagrad: no buffer, ``eta = η/(1 + (s−1)·lr_decay)``.

Example:
    >>> import numpy as np
    >>> from hf_stage_attribution.estimators.propagation.rules import run_recurrence
    >>> co = group_coefficients("sgd", {"momentum": 0.9, "weight_decay": 0.1}, [0.1] * 5, buffer_fresh=True)
    >>> x, b = run_projected([co], np.array([1.0]), np.array([0.0]), theta=np.array([2.0]), decay=co.lam_c)
    >>> ref, _ = run_recurrence([0.1] * 5, {"momentum": 0.9, "weight_decay": 0.1}, "SGD", curvature=2.0)
    >>> bool(abs(x[0] - ref) < 1e-12)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UnsupportedOptimizerError

#: Families whose linearised update the curvature propagation models (the others: see ``curvature.py``).
CURVATURE_FAMILIES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


def _f(group: dict[str, Any], key: str, default: float) -> float:
    value = group.get(key, default)
    return float(default if value is None else value)


@dataclass
class GroupCoefficients:
    """Per-step scalars (float64 arrays of length T) of one param group's linearised update, see module doc."""

    keep: np.ndarray
    eta: np.ndarray
    cb: np.ndarray
    cg: np.ndarray
    sg: np.ndarray
    sb: np.ndarray
    lam_c: float
    sign: float

    def __len__(self) -> int:
        return len(self.eta)


def group_coefficients(
    family: str,
    group: dict[str, Any],
    lrs: Sequence[float],
    *,
    step0: int = 0,
    buffer_fresh: bool = False,
    alpha: float = 1.0,
) -> GroupCoefficients:
    """The per-step scalars of ``family``'s update for one param group over the learning rates ``lrs``.

    ``step0``: optimizer steps taken before ``lrs[0]`` (bias correction); ``buffer_fresh``: SGD's buffer does not
    exist yet (fresh optimizer, first step of the stage); ``alpha``: the group's ``ᾱ_g`` (see module doc).
    """
    if family not in CURVATURE_FAMILIES:
        raise UnsupportedOptimizerError(
            f"Expected an optimizer family with a curvature recurrence ({', '.join(CURVATURE_FAMILIES)}), "
            f"got {family!r}. Use a curvature-free estimator (aa-fd) for such stages."
        )
    lr = np.asarray(lrs, dtype=np.float64)
    n = len(lr)
    ones, zeros = np.ones(n), np.zeros(n)
    wd = _f(group, "weight_decay", 0.0)
    sign = -1.0 if group.get("maximize") else 1.0
    steps = step0 + np.arange(1, n + 1, dtype=np.float64)  # the optimizer's step count s at each step
    keep, lam_c = ones.copy(), wd
    cb, cg, sg, sb = ones.copy(), zeros.copy(), ones.copy(), zeros.copy()  # plain gradient step by default
    eta = lr.copy()
    if family == "sgd":
        mu, damp = _f(group, "momentum", 0.0), _f(group, "dampening", 0.0)
        if mu != 0.0:
            cb, cg = np.full(n, mu), np.full(n, 1.0 - damp)
            sg, sb = (ones.copy(), np.full(n, mu)) if group.get("nesterov") else (zeros.copy(), ones.copy())
            if buffer_fresh and n:
                cb[0], cg[0] = 0.0, 1.0
    elif family in ("adam", "adamw"):
        beta1 = float((group.get("betas") or (0.9, 0.999))[0])
        cb, cg, sg, sb = np.full(n, beta1), np.full(n, 1.0 - beta1), zeros.copy(), ones.copy()
        eta = lr / (1.0 - beta1**steps)
        if family == "adamw":
            keep, lam_c = 1.0 - lr * wd, 0.0
    elif family == "rmsprop":
        mu = _f(group, "momentum", 0.0)
        if mu > 0:
            cb, cg, sg, sb = np.full(n, mu), ones.copy(), zeros.copy(), ones.copy()
    else:  # adagrad
        eta = lr / (1.0 + (steps - 1.0) * _f(group, "lr_decay", 0.0))
    return GroupCoefficients(keep, eta / alpha, cb, cg, sg, sb, lam_c, sign)


def run_projected(
    coefs: list[GroupCoefficients],
    x: np.ndarray,
    b: np.ndarray,
    *,
    theta: np.ndarray | None = None,
    masks: list[np.ndarray] | None = None,
    decay: np.ndarray | float = 0.0,
    forcing: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the recurrence of the module doc on coordinates ``x``, ``b`` (float64, shape ``(r,)``).

    ``theta``: Ritz values (curvature, diagonal in the basis; ``None`` = no curvature); ``masks``: the projected
    group masks ``E_g`` (``r×r``), one per entry of ``coefs``; omitted for a single group; ``decay``: the coupled
    decay ``Vᵀ diag(λ_c s²) V`` as an ``r×r`` matrix, or a scalar when it is ``λ_c s²·I``; ``forcing``: ``f`` in the
    basis (constant over the run). With one group, diagonal ``decay`` and no forcing, every coordinate is an
    independent Ritz mode.
    """
    x, b = np.array(x, dtype=np.float64), np.array(b, dtype=np.float64)
    if len(coefs) > 1 and (masks is None or len(masks) != len(coefs)):
        raise ValueError("run_projected: one projected mask per param group is required with several groups.")
    sign = coefs[0].sign
    dense_decay = isinstance(decay, np.ndarray) and decay.ndim == 2
    curve = None if theta is None else sign * np.asarray(theta, dtype=np.float64)
    push = None if theta is None or forcing is None else sign * np.asarray(forcing, dtype=np.float64)
    if len(coefs) == 1 or all(_same(coefs[0], c) for c in coefs[1:]):
        c = coefs[0]
        for keep, eta, cb, cg, sg, sb in zip(c.keep.tolist(), c.eta.tolist(), c.cb.tolist(), c.cg.tolist(),
                                             c.sg.tolist(), c.sb.tolist()):  # fmt: skip
            g = decay @ x if dense_decay else decay * x
            if curve is not None:
                g = g + curve * x if push is None else g + curve * x + push
            b = cb * b + cg * g
            x = keep * x - eta * (sg * g + sb * b)
        return x, b
    rows = [np.stack([getattr(c, k) for c in coefs], axis=1) for k in _KEYS]

    def scale(k: int, t: int, v: np.ndarray) -> np.ndarray:
        return sum(a * (m @ v) for a, m in zip(rows[k][t], masks))

    for t in range(len(coefs[0])):
        g = decay @ x if dense_decay else decay * x
        if curve is not None:
            g = g + curve * x if push is None else g + curve * x + push
        b = scale(2, t, b) + scale(3, t, g)
        step = scale(4, t, g) + scale(5, t, b)
        x = scale(0, t, x) - scale(1, t, step)
    return x, b


_KEYS = ("keep", "eta", "cb", "cg", "sg", "sb")


def _same(a: GroupCoefficients, b: GroupCoefficients) -> bool:
    return a.sign == b.sign and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in _KEYS)


def segment_map(co: GroupCoefficients, theta: np.ndarray, decay: float | np.ndarray) -> np.ndarray:
    """Per mode, the ``2×2`` map ``(x, b) → (x, b)`` of the whole run (shape ``(r, 2, 2)``); one batched run."""
    r = len(theta)
    d = np.concatenate([decay, decay]) if isinstance(decay, np.ndarray) else decay
    x, b = run_projected([co], np.r_[np.ones(r), np.zeros(r)], np.r_[np.zeros(r), np.ones(r)],
                         theta=np.r_[theta, theta], decay=d)  # fmt: skip
    return np.stack([np.stack([x[:r], x[r:]], -1), np.stack([b[:r], b[r:]], -1)], -2)


def unstable_modes(
    co: GroupCoefficients, theta: np.ndarray, decay: float | np.ndarray, tol: float = 1e-9
) -> np.ndarray:
    """Boolean mask of Ritz modes whose recurrence grows: spectral radius of the run's map above that of a
    curvature-free mode (and above 1). Non-finite maps count as growing."""
    r = len(theta)
    d = np.concatenate([decay, decay]) if isinstance(decay, np.ndarray) else decay
    with np.errstate(all="ignore"):
        maps = segment_map(co, np.r_[theta, np.zeros(r)], d)
        curved, flat = maps[:r], maps[r:]
        bad = ~np.isfinite(curved).all(axis=(1, 2))
        rho = np.abs(np.linalg.eigvals(np.where(np.isfinite(curved), curved, 0.0))).max(axis=1)
        rho0 = np.abs(np.linalg.eigvals(flat)).max(axis=1)
    return bad | (rho > np.maximum(rho0, 1.0) * (1.0 + tol))


def independent_modes(
    co: GroupCoefficients,
    theta: np.ndarray,
    decay: float,
    x: np.ndarray,
    b: np.ndarray,
    forcing: np.ndarray,
    tol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Curved and curvature-free runs of modes that do not couple (one group, scalar decay), in ONE batched run.

    Each mode's run is affine in its start: ``(x, b) ↦ M (x, b) + F`` (``F`` from the forcing). One pass over the
    steps gives the maps with and without curvature and the forced response; then per mode: *unstable* as in
    :func:`unstable_modes`, and ``(x_C, b_C)`` (zero for unstable modes) and ``(x_0, b_0)`` as :func:`run_projected`
    would give them (same arithmetic up to rounding). Returns ``(x_C, b_C, x_0, b_0, unstable)``.
    """
    r = len(theta)
    zero, one = np.zeros(r), np.ones(r)
    with np.errstate(all="ignore"):
        xs, bs = run_projected([co], np.r_[one, zero, one, zero, zero], np.r_[zero, one, zero, one, zero],
                               theta=np.r_[theta, theta, zero, zero, theta], decay=decay,
                               forcing=np.r_[zero, zero, zero, zero, forcing])  # fmt: skip
        xs, bs = xs.reshape(5, r), bs.reshape(5, r)
        curved = np.stack([np.stack([xs[0], xs[1]], -1), np.stack([bs[0], bs[1]], -1)], -2)
        flat = np.stack([np.stack([xs[2], xs[3]], -1), np.stack([bs[2], bs[3]], -1)], -2)
        bad = ~np.isfinite(curved).all(axis=(1, 2)) | ~np.isfinite(xs[4]) | ~np.isfinite(bs[4])
        rho = np.abs(np.linalg.eigvals(np.where(np.isfinite(curved), curved, 0.0))).max(axis=1)
        rho0 = np.abs(np.linalg.eigvals(flat)).max(axis=1)
        bad |= rho > np.maximum(rho0, 1.0) * (1.0 + tol)
        keep = ~bad
        xc = np.where(keep, xs[0] * x + xs[1] * b + xs[4], 0.0)
        bc = np.where(keep, bs[0] * x + bs[1] * b + bs[4], 0.0)
    return xc, bc, xs[2] * x + xs[3] * b, bs[2] * x + bs[3] * b, bad
