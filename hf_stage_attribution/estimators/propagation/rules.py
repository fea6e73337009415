"""Optimizer recurrences that carry a perturbation through one later stage (ESTIMATORS.md §3).

A perturbation ``x`` of the parameters at the start of a later stage ``j`` (factual minus counterfactual, e.g.
``Δ_k`` when stage ``k`` is removed) leaves the stage as ``D_j ⊙ x`` under the first-order, Hessian-free
approximation. This module holds the recurrence that gives ``D_j`` and that the curvature-aware propagation reuses
with a curvature eigenvalue.

Reusable function (imported by ``estimators/curvature.py``)::

    run_recurrence(lrs, group, opt_type, curvature=0.0, x0=1.0, buf0=None, precond=1.0, step0=0) -> (x, buf)

- ``lrs``: the learning rates *applied* at each optimizer step of the run (``stage.learning_rates[t][g]``).
- ``group``: the recorded param-group dict (``weight_decay``, ``momentum``, ``dampening``, ``nesterov``, ``betas``,
  ``maximize``, ``lr_decay`` ...; missing keys take torch's defaults).
- ``opt_type``: a recorded optimizer class name (``"SGD"``, ``"AdamW"``, ``"PagedAdamW8bit"``, ``"Lion"`` ...), an HF
  ``optim`` name (``"adamw_torch_fused"``) or a family from :data:`FAMILIES`. ``"Adam"`` with decoupled decay must be
  passed as ``"adamw"`` (see :func:`optimizer_family`).
- ``curvature``: ``c`` such that the loss-gradient difference at each step is ``c · x`` (a float, or a float64 tensor
  broadcasting against ``x`` for a batch of Ritz modes). Coupled weight decay adds ``λ · x`` on top; ``maximize`` flips
  the sign of the loss part only, as torch does. ``curvature=0`` gives exactly ``D_j``.
- ``x0``: the perturbation entering the run (float or float64 tensor). ``buf0``: the difference of the optimizer's
  first-moment state entering the run (SGD ``momentum_buffer``, Adam ``exp_avg``, RMSprop ``momentum_buffer``);
  ``None`` means both trajectories start fresh (for SGD: no buffer, the first step clones the gradient).
- ``precond``: Adam-family/RMSprop/Adagrad preconditioner ``1/(√v̂+ε)`` frozen for the run (float or tensor).
- ``step0``: optimizer steps already taken before the run (Adam bias correction, Adagrad ``lr_decay``).
- Returns ``(x, buf)``: the perturbation after the run and the first-moment difference leaving it (``None`` where the
  optimizer keeps no such state). All arithmetic is float64 (Python floats or float64 tensors).

Torch semantics are followed step by step: SGD with momentum 0 keeps no buffer (dampening is then ignored), the first
momentum step clones the gradient, nesterov adds ``μ·buf``; AdamW decays the parameter before the moment update; Lion's
sign update has no first-order response, so only its decoupled decay moves ``x``.

Example:
    >>> x, _ = run_recurrence([0.1] * 10, {"weight_decay": 0.5, "momentum": 0.0}, "SGD")
    >>> round(x, 6) == round(0.95 ** 10, 6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import UnsupportedOptimizerError
from ...ledger.optimizer_info import (  # noqa: F401  (re-exported: the families are part of this module's API)
    COUPLED_FAMILIES,
    FAMILIES,
    PRECONDITIONED_FAMILIES,
    optimizer_family,
    recorded_family,
)

Number = float | torch.Tensor


def _resolve(opt_type: str) -> str:
    family = opt_type if opt_type in FAMILIES else optimizer_family(opt_type)
    if family is None:
        raise UnsupportedOptimizerError(
            f"Expected an optimizer the propagation rules know ({', '.join(FAMILIES)} or their class names), "
            f"got {opt_type!r}. Pass a known family name, or opt into identity propagation."
        )
    return family


def _f(group: dict[str, Any], key: str, default: float) -> float:
    value = group.get(key, default)
    return float(default if value is None else value)


def _betas(group: dict[str, Any]) -> tuple[float, float]:
    betas = group.get("betas") or (0.9, 0.999)
    return float(betas[0]), float(betas[1])


def _as64(value: Number) -> Number:
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    return float(value)


def run_recurrence(
    lrs: Sequence[float],
    group: dict[str, Any],
    opt_type: str,
    curvature: Number = 0.0,
    x0: Number = 1.0,
    buf0: Number | None = None,
    precond: Number = 1.0,
    step0: int = 0,
) -> tuple[Number, Number | None]:
    """Run one stage's optimizer recurrence on a perturbation; see the module docstring for the semantics.

    With scalar ``curvature`` and ``precond`` the run is linear in ``(x0, buf0)`` with scalar coefficients, so a
    tensor perturbation is carried by running the recurrence on Python floats (its 2×2 transfer) and applying it
    once, instead of step by step on the tensor."""
    tensors = isinstance(x0, torch.Tensor) and (buf0 is None or isinstance(buf0, torch.Tensor))
    if tensors and not isinstance(curvature, torch.Tensor):
        if not isinstance(precond, torch.Tensor):
            return _transfer(lrs, group, opt_type, float(curvature), x0, buf0, float(precond), step0)
        family = _resolve(opt_type)
        if _gradient_coefficient(family, group, float(curvature)) == 0.0:
            # No gradient difference: P only scales Adam's first-moment difference in the update of x.
            scale = precond if family in ("adam", "adamw") else None
            return _transfer(lrs, group, opt_type, float(curvature), x0, buf0, 1.0, step0, buf_scale=scale)
    return _run(lrs, group, opt_type, curvature, x0, buf0, precond, step0)


def _gradient_coefficient(family: str, group: dict[str, Any], curvature: float) -> float:
    """``c`` in "the loss-gradient difference is ``c·x``" for scalar curvature, coupled decay included."""
    sign = -1.0 if group.get("maximize") else 1.0
    return sign * curvature + (_f(group, "weight_decay", 0.0) if family in COUPLED_FAMILIES else 0.0)


def _transfer(lrs: Sequence[float], group: dict[str, Any], opt_type: str, curvature: float, x0: torch.Tensor,
              buf0: torch.Tensor | None, precond: float, step0: int,
              buf_scale: torch.Tensor | None = None) -> tuple[Number, Number | None]:  # fmt: skip
    """:func:`run_recurrence` on tensors through the scalar transfer ``(x, b) ↦ (a·x + b·buf, c·x + d·buf)``. A
    fresh start (``buf0=None``: SGD's first step clones the gradient) is linear in ``x0`` alone. ``buf_scale``
    multiplies ``buf`` where it enters ``x`` (Adam's preconditioner when there is no gradient difference)."""
    x0 = x0.to(torch.float64)
    a, c = _run(lrs, group, opt_type, curvature, 1.0, None if buf0 is None else 0.0, precond, step0)
    if buf0 is None:
        return a * x0, (None if c is None else c * x0)
    b, d = _run(lrs, group, opt_type, curvature, 0.0, 1.0, precond, step0)
    buf0 = buf0.to(torch.float64)
    # a·x0 + b·(P·buf0) and c·x0 + d·buf0 with one temporary at a time (same operations, in place where possible)
    term = buf0 * b if buf_scale is None else (buf_scale.to(torch.float64) * buf0).mul_(b)
    x1 = a * x0
    x1 = x1.add_(term) if x1.shape == torch.broadcast_shapes(x1.shape, term.shape) else x1 + term
    del term
    if c is None:
        return x1, None
    b1, term = c * x0, d * buf0
    return x1, b1.add_(term) if b1.shape == torch.broadcast_shapes(b1.shape, term.shape) else b1 + term


def _run(
    lrs: Sequence[float],
    group: dict[str, Any],
    opt_type: str,
    curvature: Number,
    x0: Number,
    buf0: Number | None,
    precond: Number,
    step0: int,
) -> tuple[Number, Number | None]:
    family = _resolve(opt_type)
    x, c, p = _as64(x0), _as64(curvature), _as64(precond)
    buf = None if buf0 is None else _as64(buf0)
    if family == "frozen":
        return x, buf
    wd = _f(group, "weight_decay", 0.0)
    sign = -1.0 if group.get("maximize") else 1.0
    coef = sign * c + (wd if family in COUPLED_FAMILIES else 0.0)
    if family == "sgd":
        return _sgd(lrs, group, coef, x, buf)
    if family in ("adam", "adamw"):
        decay = wd if family == "adamw" else 0.0
        beta1 = _betas(group)[0]
        m = 0.0 if buf is None else buf
        for t, lr in enumerate(lrs):
            g = coef * x
            if decay:
                x = x * (1.0 - lr * decay)
            m = beta1 * m + (1.0 - beta1) * g
            x = x - (lr / (1.0 - beta1 ** (step0 + t + 1))) * p * m
        return x, m
    if family == "lion":
        decay = wd
        for lr in lrs:
            x = x * (1.0 - lr * decay)
        return x, buf
    if family == "rmsprop":
        mu = _f(group, "momentum", 0.0)
        b = 0.0 if buf is None else buf
        for lr in lrs:
            g = coef * x
            if mu > 0:
                b = mu * b + p * g
                x = x - lr * b
            else:
                x = x - lr * p * g
        return x, (b if mu > 0 else None)
    # adagrad
    lr_decay = _f(group, "lr_decay", 0.0)
    for t, lr in enumerate(lrs):
        clr = lr / (1.0 + (step0 + t) * lr_decay)
        x = x - clr * p * (coef * x)
    return x, None


def _sgd(lrs: Sequence[float], group: dict[str, Any], coef: Number, x: Number, buf: Number | None):
    mu = _f(group, "momentum", 0.0)
    damp = _f(group, "dampening", 0.0)
    nesterov = bool(group.get("nesterov", False))
    for lr in lrs:
        g = coef * x
        if mu == 0:
            step = g  # torch keeps no buffer at momentum 0; dampening is ignored
        else:
            buf = g if buf is None else mu * buf + (1.0 - damp) * g
            step = g + mu * buf if nesterov else buf
        x = x - lr * step
    return x, (buf if mu != 0 else None)


def first_moment_key(family: str) -> str | None:
    """The optimizer-state key that holds the first moment ``run_recurrence`` carries as ``buf``."""
    return {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg", "rmsprop": "momentum_buffer"}.get(family)


def second_moment_key(family: str, state: dict[str, Any]) -> str | None:
    """The key of the second-moment state (``exp_avg_sq``, ``square_avg`` or ``sum``) present in ``state``."""
    candidates = {
        "adam": ("max_exp_avg_sq", "exp_avg_sq"),
        "adamw": ("max_exp_avg_sq", "exp_avg_sq"),
        "rmsprop": ("square_avg", "exp_avg_sq"),
        "adagrad": ("sum", "state_sum", "exp_avg_sq"),
    }.get(family, ())
    for key in candidates:
        if state.get(key):
            return key
    return None


def preconditioner(family: str, group: dict[str, Any], second_moment: torch.Tensor, step: float) -> torch.Tensor:
    """``1/(√v̂ + ε)`` in float64 from a recorded second moment (Adam: bias-corrected by ``step``).

    Adagrad: where the accumulated sum is exactly 0 no gradient (and no coupled decay: the parameter was 0 too) ever
    reached the coordinate, and its update ``g/(√(Σg²)+ε)`` is sign-like there, bounded by the learning rate, with no
    first-order response to freeze: the preconditioner is 0 (the perturbation passes that coordinate unchanged)
    instead of ``1/ε = 1e10``, which would blow the carried perturbation up by ``η·λ/ε`` per step.

    Example:
        >>> float(preconditioner("rmsprop", {"eps": 0.0}, torch.tensor([4.0]), step=3))
        0.5
        >>> preconditioner("adagrad", {}, torch.tensor([4.0, 0.0]), step=3).tolist()
        [0.499999999975, 0.0]
    """
    v = second_moment.to(torch.float64, copy=True)  # the one float64 tensor: every step below is in place on it
    if family in ("adam", "adamw"):
        beta2 = _betas(group)[1]
        v.div_(1.0 - beta2 ** max(float(step), 1.0))
        eps = _f(group, "eps", 1e-8)
    elif family == "rmsprop":
        eps = _f(group, "eps", 1e-8)
    else:
        eps = _f(group, "eps", 1e-10)
        unreached = second_moment == 0
        if bool(unreached.any()):
            v.clamp_min_(0).sqrt_().add_(eps)
            return torch.div(1.0, v, out=v).masked_fill_(unreached, 0.0)
    v.clamp_min_(0).sqrt_().add_(eps)
    return torch.div(1.0, v, out=v)
