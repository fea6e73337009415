"""Linear estimators: ``τ_k ≈ ∇f(θ_K) · v_k`` (``delta-linear``, ``aa-linear``, ``aa-ggn``, ``aa-hvp``).

Per-example effects come from one forward-mode JVP per stage (``torch.func.jvp`` through ``functional_call``): the
tangent is ``v_k`` on the tensors it touches, and the JVP of ``f`` is ``∇f_i · v_k`` for every example ``i`` at the
cost of about one forward pass. Where an operation has no forward-mode rule, the JVP is taken by double backward
(two backward passes) and the diagnostics say so. With ``per_example=False`` the mean is read with ONE backward
pass of ``mean_i f_i`` and a streamed dot product with each ``v_k`` (ESTIMATORS.md §4's cost), and ``per_example``
is left empty.

Example:
    >>> from hf_stage_attribution import estimators
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> r = estimators.get("aa-linear").estimate(ledger, model, behavior)
    >>> list(r.mean), tuple(r.per_example["digits-base"].shape) == tuple(behavior(model).shape)
    (['digits-base', 'digits-patch', 'digits-clean'], True)
    >>> r_mean = estimators.get("aa-linear").estimate(ledger, model, behavior, per_example=False)
    >>> abs(r_mean.mean["digits-patch"] - r.mean["digits-patch"]) < 1e-4, r_mean.per_example
    (True, {})
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._internal.params import base_parameters
from ..ledger.core import LedgerCore
from .base import (
    COMMON_OPTIONS,
    EstimateResult,
    Estimator,
    check_finite,
    check_inputs,
    eval_mode,
    register,
    resolve_stages,
)
from .embeddings.cache import StageEmbeddings, stage_embeddings

LINEAR_READOUT = "Linear read-out: first-order Taylor step of the behavior along v_k (gradient at the final model)."


def embeddings_for(
    ledger: LedgerCore, kind: str, stages: list[Any], options: dict[str, Any], model: torch.nn.Module | None = None
) -> StageEmbeddings:
    """The embeddings an estimator reads, from the options it was given (see :class:`LinearEstimator`).

    For ``aa-ggn``/``aa-hvp`` the final ``model`` lends its architecture to the curvature products.
    """
    kwargs: dict[str, Any] = {}
    if kind in ("aa-ggn", "aa-hvp"):
        kwargs.update(options.get("curvature_options") or {})
        kwargs["loss_fns"] = options.get("loss_fns")
        kwargs.setdefault("model", model)
    return stage_embeddings(
        ledger, kind, [s.index for s in stages],
        allow_identity_propagation=bool(options.get("allow_identity_propagation", False)),
        recompute=bool(options.get("recompute_embeddings", False)), **kwargs,
    )  # fmt: skip


def parameter_paths(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """Base parameter name → (path in ``model.named_parameters()``, parameter)."""

    by_id = {id(p): n for n, p in model.named_parameters()}
    return {base: (by_id[id(p)], p) for base, p in base_parameters(model).items() if id(p) in by_id}


def _math_attention() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention through its composite kernel: the fused CPU/GPU kernels have no forward-mode
    (nor double-backward) derivative."""
    return sdpa_kernel([SDPBackend.MATH])


class _Call(torch.nn.Module):
    """Lets ``functional_call`` run an arbitrary behavior ``f(model)`` with substituted parameters."""

    def __init__(self, model: torch.nn.Module, behavior: Any) -> None:
        super().__init__()
        self.model = model
        self._behavior = behavior

    def forward(self) -> torch.Tensor:
        return self._behavior(self.model)


@contextlib.contextmanager
def requires_grad(params: list[torch.nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def jvp_per_example(model, behavior, tangents: dict[str, torch.Tensor], paths, stats: dict[str, Any]) -> torch.Tensor:
    """``∇f_i(θ) · t`` for every example ``i``, with ``tangents`` keyed by base parameter name."""
    wrapper = _Call(model, behavior)
    primals = {f"model.{paths[n][0]}": paths[n][1].detach() for n in tangents}
    tans = {
        f"model.{paths[n][0]}": t.to(device=paths[n][1].device, dtype=paths[n][1].dtype) for n, t in tangents.items()
    }
    if stats.get("mode") != "double-backward":
        try:
            # Forward-mode AD needs no autograd graph: under no_grad the forward keeps no activations for a
            # backward pass that never comes (at 135M parameters the read-out went from 8.1× to 1.6× the
            # parameter bytes of peak RSS rise).
            with torch.no_grad(), _math_attention():
                _, out = torch.func.jvp(lambda p: torch.func.functional_call(wrapper, p, ()), (primals,), (tans,))
            stats["jvp"] = stats.get("jvp", 0) + 1
            return out
        except (NotImplementedError, RuntimeError) as exc:
            stats["mode"] = "double-backward"
            stats["forward_mode_error"] = str(exc)[:300]
    params = [paths[n][1] for n in tangents]
    with requires_grad(params), torch.enable_grad(), _math_attention():
        out = behavior(model)
        w = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, params, grad_outputs=w, create_graph=True, allow_unused=True)
        dot = sum((g * tans[f"model.{paths[n][0]}"]).sum() for n, g in zip(tangents, grads) if g is not None)
        if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
            return torch.zeros_like(out)
        (jv,) = torch.autograd.grad(dot, w, allow_unused=True)
    stats["double_backward"] = stats.get("double_backward", 0) + 1
    return torch.zeros_like(out) if jv is None else jv


def mean_gradient(model, behavior, paths) -> tuple[dict[str, torch.Tensor], int]:
    """``∇ mean_i f_i`` per base parameter (one backward pass), and the number of examples."""
    names = list(paths)
    params = [paths[n][1] for n in names]
    with requires_grad(params), torch.enable_grad():
        out = behavior(model)
        values = check_finite(out, behavior, "evaluated on the final model")
        grads = torch.autograd.grad(out.mean(), params, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}, values.numel()


class EmbeddingEstimator(Estimator):
    """Base of the estimators that read stage embeddings of kind :attr:`kind`; ``prepare`` fills the cache."""

    kind = "aa-linear"
    #: read by :func:`embeddings_for` (``loss_fns``/``curvature_options`` by the curvature kinds)
    options = COMMON_OPTIONS | {"allow_identity_propagation", "recompute_embeddings", "loss_fns", "curvature_options"}

    def embeddings(
        self, ledger: LedgerCore, stages: list[Any], options: dict[str, Any], model: torch.nn.Module
    ) -> Any:
        """The ``v_k`` this estimator reads (:class:`StageEmbeddings` or an object with its read interface)."""
        return embeddings_for(ledger, self.kind, stages, options, model)

    def prepare(self, ledger, stages=None, model=None, **options):
        """Compute the stage embeddings into the cache. Curvature kinds need ``model`` (the architecture for the
        curvature products); without it nothing is precomputed and ``estimate`` computes them instead."""
        curvature_model = (options.get("curvature_options") or {}).get("model", model)
        if self.kind in ("aa-ggn", "aa-hvp") and curvature_model is None:
            return
        embeddings_for(ledger, self.kind, resolve_stages(ledger, stages), dict(options), model)


class LinearEstimator(EmbeddingEstimator):
    """``∇f(θ_K) · v_k`` with ``v_k`` of kind :attr:`kind`.

    Options: ``per_example`` (default True: one JVP per stage; False: one backward pass, means only),
    ``check_model`` (default True), ``prepare_behavior`` (default True), ``allow_identity_propagation``,
    ``recompute_embeddings``, and for ``aa-ggn``/``aa-hvp`` ``loss_fns={stage name: fn}`` and ``curvature_options``.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("delta-linear").kind
        'delta'
    """

    options = EmbeddingEstimator.options | {"per_example"}

    def estimate(self, ledger, model, behavior, stages=None, **options):
        chosen = resolve_stages(ledger, stages)
        check_inputs(ledger, model, behavior, options)
        emb = self.embeddings(ledger, chosen, options, model)
        paths = parameter_paths(model)
        stats: dict[str, Any] = {}
        per_example: dict[str, torch.Tensor] = {}
        means: dict[str, float] | None = None
        with eval_mode(model):
            if options.get("per_example", True):
                for stage in chosen:
                    tangents = {n: v for n, v in emb.items(stage.index) if n in paths}
                    if not tangents:
                        n = check_finite(_no_grad_call(behavior, model), behavior, "final model").numel()
                        per_example[stage.name] = torch.zeros(n, dtype=torch.float64)
                        continue
                    out = jvp_per_example(model, behavior, tangents, paths, stats)
                    per_example[stage.name] = check_finite(out, behavior, f"linear response to stage {stage.name!r}")
                    del tangents, out  # release v_k before the next stage's is read: one embedding in memory at a time
            else:
                grads, _ = mean_gradient(model, behavior, paths)
                stats["backward"] = 1
                means = {
                    stage.name: float(
                        sum(
                            (grads[n].double() * v.to(grads[n].device).double()).sum()
                            for n, v in emb.items(stage.index)
                            if n in grads
                        )  # fmt: skip
                    )
                    for stage in chosen
                }
        diagnostics = {
            "embedding_kind": emb.kind,
            "embedding_norms": {s.name: emb.norm(s.index) for s in chosen},
            "calls": stats,
            **emb.diagnostics,
        }
        approximations = [*emb.approximations, LINEAR_READOUT]
        return EstimateResult(self.name, per_example, diagnostics, approximations, means=means)


def _no_grad_call(behavior, model):
    with torch.no_grad():
        return behavior(model)


@register
class DeltaLinear(LinearEstimator):
    name, kind = "delta-linear", "delta"
    description = "∇f(θ_K)·Δ_k: gradient times the raw stage delta (no propagation)."


@register
class AaLinear(LinearEstimator):
    name, kind = "aa-linear", "aa-linear"
    description = "∇f(θ_K)·v_k with v_k propagated through later stages' optimizers (no curvature)."


@register
class AaGgn(LinearEstimator):
    name, kind = "aa-ggn", "aa-ggn"
    description = "∇f(θ_K)·v_k with v_k propagated with Gauss-Newton curvature (default where recorded)."


@register
class AaHvp(LinearEstimator):
    name, kind = "aa-hvp", "aa-hvp"
    description = "∇f(θ_K)·v_k with v_k propagated with Hessian curvature (negative modes flat)."
