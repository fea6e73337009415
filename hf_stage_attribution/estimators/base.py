"""The estimator interface, its result, the registry, and helpers every estimator shares.

An estimator answers ESTIMATORS.md §2's question for a behavior ``f(model) -> Tensor[n]``: per stage ``k``, the
per-example effects ``τ_k(f_i)`` (positive: stage ``k`` raised the behavior).

Example:
    >>> from hf_stage_attribution import estimators
    >>> "aa-linear" in estimators.names()
    True
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> result = estimators.get("aa-linear").estimate(ledger, model, behavior)
    >>> per_example = result.per_example["digits-patch"]
    >>> per_example.shape == behavior(model).shape, abs(float(per_example.mean()) - result.mean["digits-patch"]) < 1e-5
    (True, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._internal.model_state import has_autocast_wrapper
from .._internal.precision import half_precision_dtype
from ..behaviors.base import (
    eval_mode,  # noqa: F401  (re-exported for the estimators)
    needs_preparing,
)
from ..errors import BehaviorError, EstimatorError, did_you_mean, unknown_name
from ..ledger.core import LedgerCore

Behavior = Callable[[torch.nn.Module], torch.Tensor]


@dataclass
class EstimateResult:
    """Per-example stage effects of one behavior, as estimated by one estimator.

    Attributes:
        estimator: the registry name of the estimator that produced the numbers (for ``auto``: the one it chose).
        per_example: ``{stage name: float64 Tensor[n]}``; empty when only means were asked for.
        diagnostics: anything the estimator measured on the way (``D_j`` factors, norms, call counts...).
        approximations: sentences naming the approximations the numbers rest on.
        reason: why this estimator was used (filled by ``auto``).
        means: ``{stage name: float}``; by default the means of ``per_example``.

    Example:
        >>> r = EstimateResult("aa-linear", {"sft": torch.tensor([1.0, 3.0], dtype=torch.float64)})
        >>> r.mean
        {'sft': 2.0}
    """

    estimator: str
    per_example: dict[str, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    approximations: list[str] = field(default_factory=list)
    reason: str = ""
    means: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.means is None:
            self.means = {k: float(v.to(torch.float64).mean()) for k, v in self.per_example.items()}

    @property
    def mean(self) -> dict[str, float]:
        return dict(self.means or {})


class Estimator:
    """Base class; subclasses set ``name`` and implement :meth:`estimate`.

    Example:
        >>> class Zero(Estimator):
        ...     name = "zero-example"
        ...     def estimate(self, ledger, model, behavior, stages=None, **options):
        ...         return EstimateResult(self.name, {})
        >>> Zero().estimate(None, None, None).estimator
        'zero-example'
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the option names :meth:`estimate` reads (``None``: not declared, every name is passed on unchecked — a
    #: third-party estimator); :func:`check_options` refuses any other name before any work
    options: ClassVar[frozenset[str] | None] = None
    #: each stage's estimate is its own work (a replay of the later stages from that stage's start), which dominates
    #: the cost: under several processes the attributor gives each process whole stages and every example, rather
    #: than every stage and a share of the examples (each replay then runs once, not once per process)
    per_stage_work: ClassVar[bool] = False
    #: diagnostics keys (at any depth) that count work, summed when results on disjoint stages are merged
    #: (:meth:`merge_diagnostics`); every other number is a setting and must agree
    additive_diagnostics: ClassVar[frozenset[str]] = frozenset({"forward", "backward", "jvp", "double_backward"})
    #: diagnostics keys that are the ratio of two others beside them (``{key: (numerator, denominator)}``), computed
    #: again from the merged counts
    ratio_diagnostics: ClassVar[Mapping[str, tuple[str, str]]] = {}

    @classmethod
    def accepted_options(cls) -> frozenset[str] | None:
        """The option names this estimator reads (:attr:`options`; ``None``: not declared, not checked)."""
        return cls.options

    def estimate(
        self, ledger: LedgerCore, model: torch.nn.Module, behavior: Behavior, stages: Any = None, **options: Any
    ):
        raise NotImplementedError

    def stage_work(self, ledger: LedgerCore, index: int, options: Mapping[str, Any]) -> float:
        """The relative work of the estimate for stage ``index`` with ``options``, by which the attributor shares a
        :attr:`per_stage_work` estimator's stages between processes; the replaying estimators count their re-run
        optimizer steps at the recorded cost of each (:func:`~.replay.step_costs`). Here: 1 per stage."""
        return 1.0

    @classmethod
    def merge_diagnostics(cls, parts: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> dict[str, Any]:
        """The diagnostics of this estimator's results on disjoint sets of stages (one per process, when the work is
        split by stage) as those of one result: :func:`merge_diagnostics` with :attr:`additive_diagnostics` and
        :attr:`ratio_diagnostics`."""
        return merge_diagnostics(parts, cls.additive_diagnostics, order, cls.ratio_diagnostics)

    def prepare(
        self, ledger: LedgerCore, stages: Any = None, model: torch.nn.Module | None = None, **options: Any
    ) -> None:
        """Precompute what does not depend on the behavior (stage embeddings); a no-op by default.

        The attributor calls it on the main process first, so that other processes read the cache.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def merge_diagnostics(
    parts: Sequence[Mapping[str, Any]],
    additive: Collection[str] = (),
    order: Sequence[str] = (),
    ratios: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Diagnostics of results on disjoint sets of stages merged into one: mappings key by key (a mapping by stage
    gets every part's stages, in ``order`` where its keys are all in it), the counts named in ``additive`` summed, the
    ratios named in ``ratios`` (``{key: (numerator, denominator)}``, 0 for a zero denominator) computed again from
    them, and every other value kept where the parts agree; where they do not, the list of the parts' values.

    Example:
        >>> a = {"calls": {"forward": 2}, "norms": {"sft": 1.0}, "kind": "aa-linear", "budget": 0.25}
        >>> b = {"calls": {"forward": 3}, "norms": {"base": 2.0}, "kind": "aa-linear", "budget": 0.25}
        >>> merge_diagnostics([a, b], {"forward"}, order=["base", "sft"])
        {'calls': {'forward': 5}, 'norms': {'base': 2.0, 'sft': 1.0}, 'kind': 'aa-linear', 'budget': 0.25}
        >>> plan = {"run": {"steps": 2, "of": 8, "fraction": 0.25}}
        >>> merge_diagnostics([plan, {"run": {"steps": 1, "of": 4, "fraction": 0.25}}], {"steps", "of"},
        ...                   ratios={"fraction": ("steps", "of")})
        {'run': {'steps': 3, 'of': 12, 'fraction': 0.25}}
    """
    ratios = dict(ratios or {})
    keys: dict[str, None] = {}
    for part in parts:
        keys.update(dict.fromkeys(part))
    rank = {name: i for i, name in enumerate(order)}
    if keys and all(k in rank for k in keys):
        keys = dict.fromkeys(sorted(keys, key=rank.__getitem__))
    merged: dict[str, Any] = {}
    for key in keys:
        values = [part[key] for part in parts if key in part]
        if all(isinstance(v, Mapping) for v in values):
            merged[key] = merge_diagnostics(values, additive, order, ratios)
        elif key in ratios and all(part in keys for part in ratios[key]):
            merged[key] = None  # in its place; computed below, from the merged counts
        elif key in additive and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = list(values)
    for key, (numerator, denominator) in ratios.items():
        if merged.get(key, 0) is None:
            merged[key] = merged[numerator] / merged[denominator] if merged[denominator] else 0.0
    return merged


_REGISTRY: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Register an :class:`Estimator` subclass under its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"Estimator class {cls.__name__} needs a non-empty `name` to be registered.")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> Estimator:
    """An instance of the estimator registered as ``name``."""
    if name not in _REGISTRY:
        raise unknown_name("estimator", name, list(_REGISTRY))
    return _REGISTRY[name]()


def names() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(_REGISTRY)


#: the options every built-in estimator reads (:func:`check_inputs`)
COMMON_OPTIONS = frozenset({"check_model", "prepare_behavior", "precision_noted"})


def check_options(estimator: str, options: Any) -> None:
    """Refuse option names that estimator ``estimator`` does not read (a misspelt ``budgt=0.1`` was ignored
    silently, and the estimate ran at the default budget): :class:`EstimatorError` naming the closest option and
    the estimators that do read a name meant for another one. Estimators that declare no :attr:`Estimator.options`
    are not checked.

    Example:
        >>> check_options("partial-replay", {"budget": 0.1})
        >>> try:
        ...     check_options("partial-replay", {"budgt": 0.1})
        ... except EstimatorError as err:
        ...     print(str(err).split("?")[0] + "?")
        Estimator 'partial-replay' has no option 'budgt'. Did you mean 'budget'?
    """
    if estimator not in _REGISTRY:
        raise unknown_name("estimator", estimator, list(_REGISTRY))
    accepted = _REGISTRY[estimator].accepted_options()
    if accepted is None:
        return
    unknown = [key for key in options if key not in accepted]
    if not unknown:
        return
    key, more = unknown[0], unknown[1:]
    readers = sorted(n for n, cls in _REGISTRY.items() if key in (cls.accepted_options() or ()))
    if readers:
        hint = f" It is an option of {', '.join(readers)}: pass it with one of those estimators, or drop it."
    else:
        hint = did_you_mean(key, sorted(accepted))
    also = f" Also not an option of it: {', '.join(map(repr, more))}." if more else ""
    raise EstimatorError(
        f"Estimator {estimator!r} has no option {key!r}.{hint}{also} Its options: {', '.join(sorted(accepted))}."
    )


# --- shared helpers ------------------------------------------------------------------------------------------


def behavior_name(behavior: Any) -> str:
    return str(getattr(behavior, "name", None) or getattr(behavior, "__name__", None) or repr(behavior))


def check_finite(values: torch.Tensor, behavior: Any, where: str) -> torch.Tensor:
    """``values`` as a float64 CPU vector; :class:`BehaviorError` naming the behavior and ``where`` if not finite."""
    if not isinstance(values, torch.Tensor):
        raise BehaviorError(
            f"Behavior {behavior_name(behavior)!r} must return a Tensor[n] of per-example values, got "
            f"{type(values).__name__} ({where})."
        )
    out = values.detach().to("cpu", torch.float64).reshape(-1)
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise BehaviorError(
            f"Behavior {behavior_name(behavior)!r} returned {bad} non-finite value(s) out of {out.numel()} ({where}). "
            "Expected finite per-example values: check the behavior (log of 0, division by 0) or the model weights."
        )
    if out.numel() == 0:
        raise BehaviorError(f"Behavior {behavior_name(behavior)!r} returned no values ({where}); give it examples.")
    return out


def evaluate(behavior: Behavior, model: torch.nn.Module, where: str) -> torch.Tensor:
    """Evaluate the behavior without gradients; a checked float64 vector."""
    with torch.no_grad():
        return check_finite(behavior(model), behavior, where)


def evaluate_final(behavior: Behavior, model: torch.nn.Module) -> torch.Tensor:
    """``f(θ_K)``: the behavior on the final model, without gradients, in eval mode; a checked float64 vector.

    A behavior that keeps these values — one with a ``cached_final_values(model)`` method, such as the joint behavior
    of :class:`~hf_stage_attribution.StageAttributor`, which evaluates the final model once per ``attribute()`` for
    the estimator, its second opinions, replay and the total change — serves them instead of evaluating again.

    Example:
        >>> import torch
        >>> evaluate_final(lambda m: m(torch.eye(2)).reshape(-1), torch.nn.Linear(2, 1)).dtype
        torch.float64
    """
    keep = getattr(behavior, "cached_final_values", None)
    if callable(keep):
        return keep(model)
    with eval_mode(model):
        return evaluate(behavior, model, "evaluated on the final model")


def evaluate_shifted(behavior: Behavior, model: torch.nn.Module, where: str) -> torch.Tensor:
    """The behavior at the parameters ``model`` holds now (a finite-difference read-out's ``θ_K − v_k``), without
    gradients; a checked float64 vector. A behavior with a ``cached_values(model, where)`` method (the joint behavior
    of :class:`~hf_stage_attribution.StageAttributor`) serves the values of a parameter state it has evaluated
    before: the estimate and its second opinion both leave the last stage out as ``θ_K − Δ_K``, one evaluation.

    Example:
        >>> import torch
        >>> evaluate_shifted(lambda m: m(torch.eye(2)).reshape(-1), torch.nn.Linear(2, 1), "shifted").shape
        torch.Size([2])
    """
    keep = getattr(behavior, "cached_values", None)
    if callable(keep):
        return keep(model, where)
    return evaluate(behavior, model, where)


def resolve_stages(ledger: LedgerCore, stages: Any = None) -> list[Any]:
    """Ledger stages from names/indices (all stages when ``None``), in ledger order."""
    if stages is None:
        return list(ledger.stages)
    if isinstance(stages, (str, int)):
        stages = [stages]
    chosen = {ledger.stage(s).index for s in stages}
    return [s for s in ledger.stages if s.index in chosen]


def check_inputs(ledger: LedgerCore, model: torch.nn.Module, behavior: Behavior, options: dict[str, Any]) -> None:
    """Checks every estimator runs first: the model is the ledger's final model; the behavior is prepared on it.

    Options: ``check_model`` (default True; the attributor, which checks once, may pass False),
    ``prepare_behavior`` (default True: a behavior not prepared on the final model yet — or prepared on a model with
    other weights — is prepared on it),
    and ``precision_noted`` (default False: a model with bf16/fp16 weights gets a warning that the estimate is taken
    in that dtype; the attributor, whose report says it, passes True)."""
    if options.get("check_model", True):
        ledger.check_model(model)
    half = str(half_precision_dtype(model)).replace("torch.", "")
    # StageAttributor passes its float32 copy, or says in the report that it evaluates in half precision
    if half != "None" and not options.get("precision_noted"):
        warnings.warn(
            f"The model's weights are {half}: this estimator evaluates and shifts them in {half}, whose rounding "
            "noise can swamp small effects (SmolLM2: delta-fd -0.005 in bf16 where float32 gives -0.042). Use "
            "StageAttributor, which evaluates a float32 copy and replays in the model's dtype, or pass a float32 "
            "copy (copy.deepcopy(model).float(); replays then train in float32).",
            UserWarning,
            stacklevel=3,
        )
    if has_autocast_wrapper(model):  # StageAttributor evaluates a view without it (a float32 run leaves none)
        warnings.warn(
            "The model still carries accelerate's mixed-precision forward wrapper (a Trainer with bf16/fp16 trained "
            "this object): this estimator evaluates it under that autocast, not in its weights' precision. Use "
            "StageAttributor, which evaluates the same weights without the wrapper, or pass "
            "hf_stage_attribution._internal.model_state.without_accelerate_wrapper(model).",
            UserWarning,
            stacklevel=3,
        )
    if options.get("prepare_behavior", True) and needs_preparing(behavior, model):
        behavior.prepare(model)
