"""Per-tensor propagation of perturbations through one recorded later stage (ESTIMATORS.md §3).

:class:`StagePropagator` turns a ledger stage (optimizer dict, applied learning rates, optimizer state) into a map
``(x, buf) -> (x', buf')`` per parameter tensor, built on :func:`~.propagation.run_recurrence`. ``x`` is the
perturbation of the parameters entering the stage (factual minus counterfactual), ``buf`` the difference of the first
moment entering it (``None`` when the stage started a fresh optimizer). :func:`momentum_tail` gives the first-moment
difference that enters stage ``k+1`` when stage ``k`` is removed and stage ``k+1`` continued the optimizer state.

Example (a runnable one is in :class:`StagePropagator`)::

    prop = StagePropagator(ledger.stages[2])
    x, buf = prop.apply("fc.weight", delta.double())
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import UnsupportedOptimizerError
from ...ledger.core import LedgerCore
from ...ledger.optimizer_info import no_step_taken
from ...ledger.stage import Stage
from .rules import (
    first_moment_key,
    preconditioner,
    recorded_family,
    run_recurrence,
    second_moment_key,
)


@dataclass
class _Rule:
    family: str
    group_index: int
    group: dict[str, Any]
    lrs: list[float]


@dataclass
class _Run:
    start: int
    end: int
    moments: dict[str, dict[str, torch.Tensor]] | None


def _per_coordinate(rule: _Rule) -> bool:
    """Coupled weight decay under a preconditioner (Adam, RMSprop, Adagrad): the transfer is per coordinate."""
    return bool(float(rule.group.get("weight_decay") or 0.0)) and rule.family in ("adam", "rmsprop", "adagrad")


@dataclass
class StagePropagator:
    """Carries per-tensor perturbations through ``stage`` without curvature.

    Args:
        stage: a ledger :class:`~hf_stage_attribution.ledger.stage.Stage`.
        next_stage: the stage after it (its start state is this stage's end state when it continued the optimizer).
        allow_identity_propagation: propagate with ``D = 1`` where the optimizer is unknown instead of refusing.

    Attributes: ``family`` (``None`` for an identity stage), ``approximations`` (sentences for the report).

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
        >>> for name, decay in (("a", 0.0), ("b", 0.5)):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=decay)
        ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
        ...         for _ in range(2):
        ...             opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> prop = StagePropagator(ledger.stages[1])
        >>> round(prop.factor("weight"), 4)
        0.9025
        >>> x, buf = prop.apply("weight", torch.ones(1, 2, dtype=torch.float64))
        >>> [round(v, 4) for v in x.flatten().tolist()], buf
        ([0.9025, 0.9025], None)
    """

    stage: Stage
    next_stage: Any = None
    allow_identity_propagation: bool = False
    approximations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        stage = self.stage
        self.family: str | None = None
        self._groups: dict[str, int] = {}
        self._cache: dict[tuple, tuple] = {}
        self._runs: list[_Run] | None = None
        self._start_state: dict | None = None
        self._lrs = _applied(stage)  # skipped (overflow) steps never moved θ; read once, used per tensor
        if stage.num_steps == 0 or not self._lrs:
            return  # no optimizer step was applied: the stage leaves every perturbation as it is (exactly)
        family = recorded_family(stage.optimizer)
        if family is None:
            found = (stage.optimizer or {}).get("type") or "not recorded"
            if not self.allow_identity_propagation:
                raise UnsupportedOptimizerError(
                    f"Stage {stage.index} {stage.name!r} was trained with optimizer {found!r}, whose update rule the "
                    "propagation rules do not know (known: SGD, Adam, AdamW and HF adamw_* variants, Lion, RMSprop, "
                    "Adagrad). Pass allow_identity_propagation=True to propagate its deltas with D = 1 (approximate), "
                    "or use the `replay` / `delta-*` estimators."
                )
            self.approximations.append(
                f"Stage {stage.name!r}: optimizer {found!r} unknown; deltas passed through it with D = 1 "
                "(allow_identity_propagation)."
            )
            return
        self.family = family
        # tensors the optimizer never stepped here (grad None throughout: torch skipped them) pass unchanged (D = 1)
        trainable = set(stage.trainable_parameters) - set(getattr(stage, "unstepped_parameters", ()))
        for index, group in enumerate(stage.optimizer.get("param_groups", [])):
            for name in group.get("params", []):
                if name in trainable:
                    self._groups[name] = index
        if family in ("adam", "rmsprop", "adagrad") and any(
            float(g.get("weight_decay") or 0.0) for g in stage.optimizer.get("param_groups", [])
        ):
            self.approximations.append(
                f"Stage {stage.name!r}: {stage.optimizer.get('type')} with coupled weight decay propagated per "
                "coordinate with the preconditioner 1/(sqrt(v)+eps) frozen at the recorded second-moment state."
                + (
                    " Coordinates whose accumulated sum is 0 (no gradient reached them) pass unchanged."
                    if family == "adagrad"
                    else ""
                )
            )
        if family == "rmsprop" and any(g.get("centered") for g in stage.optimizer.get("param_groups", [])):
            self.approximations.append(
                f"Stage {stage.name!r}: centered RMSprop propagated with the preconditioner 1/(sqrt(v)+eps); torch "
                "divides by sqrt(v - mean(g)^2)+eps, so the response is off where the mean gradient is large."
            )

    # --- lookup ----------------------------------------------------------------------------------------

    def rule(self, name: str) -> _Rule | None:
        """How the stage trains tensor ``name`` (``None``: not at all, ``D = 1``)."""
        if self.family is None or name not in self._groups:
            return None
        index = self._groups[name]
        group = self.stage.optimizer["param_groups"][index]
        lrs = [float(step[index]) for step in self._lrs]
        return _Rule(self.family, index, group, lrs)

    def start_state(self) -> dict | None:
        """The optimizer state the stage continued (``{state key: {name: tensor}}``; empty when it holds none or
        when that state was taken before any step, e.g. torch Adagrad's constructor state in older ledgers)."""
        if self._start_state is None and self.stage.optimizer_state_policy == "continued":
            self._start_state = _stepped_state(self.stage.optimizer_state_at_start())
        return self._start_state

    def _step0(self, name: str) -> int:
        state = self.start_state() or {}
        step = state.get("step", {}).get(name)
        return int(float(step)) if step is not None else 0

    def factor(self, name: str) -> float | None:
        """``D_j`` for ``name`` when it is one number (fresh state); ``None`` when it is per coordinate."""
        rule = self.rule(name)
        if rule is None:
            return 1.0
        if _per_coordinate(rule):
            return None
        return float(self._coefficients(rule, self._step0(name), False)[0])

    def leaves_unchanged(self, name: str) -> bool:
        """Whether carrying tensor ``name`` through this stage (fresh, without a momentum tail) returns it unchanged,
        bit for bit: the stage does not train it, or its recurrence is ``D = 1`` with no buffer carried on (Adam or
        SGD without weight decay). Lets the embedding cache point at the recorded delta instead of copying it.

        Example:
            >>> import tempfile, torch
            >>> from hf_stage_attribution import StageLedger
            >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
            >>> for name, decay in (("a", 0.0), ("b", 0.0), ("c", 0.5)):
            ...     opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=decay)
            ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            ...         opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
            >>> [StagePropagator(s).leaves_unchanged("weight") for s in ledger.stages]
            [True, True, False]
        """
        rule = self.rule(name)
        if rule is None:
            return True
        if _per_coordinate(rule):
            return False
        a, _, c, _ = self._coefficients(rule, self._step0(name), False)
        return a == 1.0 and not c

    # --- application -----------------------------------------------------------------------------------

    def apply(self, name: str, x: torch.Tensor, buf: torch.Tensor | None = None):
        """Carry ``(x, buf)`` (float64 tensors; ``x`` may be stacked over a leading axis) through the stage."""
        rule = self.rule(name)
        if rule is None:
            return x, buf
        adam_tail = buf is not None and rule.family in ("adam", "adamw")
        if _per_coordinate(rule) or adam_tail:
            return self._apply_per_coordinate(name, rule, x, buf)
        return self._apply_linear(name, rule, x, buf)

    def _coefficients(self, rule: _Rule, step0: int, with_buf: bool) -> tuple:
        """The stage's scalar transfer ``(a, b, c, d)``: ``(x, buf) ↦ (a·x + b·buf, c·x + d·buf)`` (``b``, ``d``
        None for a fresh start), run once per parameter group and starting step."""
        key = (rule.group_index, step0, with_buf)
        if key not in self._cache:
            if not with_buf:
                a, c = run_recurrence(rule.lrs, rule.group, rule.family, step0=step0)
                self._cache[key] = (a, None, c, None)
            else:
                a, c = run_recurrence(rule.lrs, rule.group, rule.family, x0=1.0, buf0=0.0, step0=step0)
                b, d = run_recurrence(rule.lrs, rule.group, rule.family, x0=0.0, buf0=1.0, step0=step0)
                self._cache[key] = (a, b, c, d)
        return self._cache[key]

    def _apply_linear(self, name: str, rule: _Rule, x: torch.Tensor, buf: torch.Tensor | None):
        a, b, c, d = self._coefficients(rule, self._step0(name), buf is not None)
        if buf is None:
            return a * x, (c * x if c else None)
        if c is None and d is None:
            return a * x + b * buf, None
        return a * x + b * buf, (c or 0.0) * x + (d or 0.0) * buf

    def _apply_per_coordinate(self, name: str, rule: _Rule, x: torch.Tensor, buf: torch.Tensor | None):
        base_step = self._step0(name)
        for run in self._preconditioner_runs():
            moments = run.moments or {}
            key = second_moment_key(rule.family, moments)
            if key is None or name not in moments[key]:
                raise UnsupportedOptimizerError(self._missing_state_message(name))
            step = moments.get("step", {}).get(name)
            step = float(step) if step is not None else float(base_step + run.start + 1)
            precond = preconditioner(rule.family, rule.group, moments[key][name], step)
            x, buf = run_recurrence(
                rule.lrs[run.start : run.end], rule.group, rule.family, x0=x, buf0=buf, precond=precond,
                step0=base_step + run.start,
            )  # fmt: skip
        if isinstance(buf, float):
            buf = None
        return x, buf

    def _preconditioner_runs(self) -> list[_Run]:
        """Step ranges with the second-moment state that stands for each: segments, else the stage's start or end."""
        if self._runs is not None:
            return self._runs
        n = len(self._lrs)  # runs count applied steps, as rule().lrs does
        segments = sorted(
            ((s, s.second_moments()) for s in getattr(self.stage, "segments", [])), key=lambda p: p[0].step_start
        )
        segments = [(s, m) for s, m in segments if m]
        if segments:
            starts = [0] + [_applied_before(self.stage, s.step_start) for s, _ in segments[1:]]
            ends = starts[1:] + [n]
            self._runs = [_Run(a, b, m) for (a, b), (_, m) in zip(zip(starts, ends), segments)]
            return self._runs
        state = self.start_state()
        if not state and self.next_stage is not None and self.next_stage.optimizer_state_policy == "continued":
            state = _stepped_state(self.next_stage.optimizer_state_at_start())
        self._runs = [_Run(0, n, state or None)]
        return self._runs

    def _missing_state_message(self, name: str) -> str:
        stage = self.stage
        return (
            f"Stage {stage.index} {stage.name!r} ({stage.optimizer.get('type')}) needs the recorded second-moment "
            f"state of {name!r} to propagate coupled weight decay or a momentum tail, and the ledger holds none. "
            "Record curvature segments (curvature_segments=3 with num_steps and loss_fn in record_stage / "
            "StageRecorder), or pass allow_identity_propagation=True to ignore the decay (approximate)."
        )


def _stepped_state(state: dict | None) -> dict:
    """``state`` unless it was taken before any optimizer step (its moments are then the constructor's, such as
    Adagrad's zero ``sum``: a preconditioner 1/(0+eps) from it would blow a perturbation up), else ``{}``."""
    return {} if state is None or no_step_taken(state) else state


def carry_problem(stage: Stage, next_stage: Any = None) -> str | None:
    """Why the curvature-free carry (:class:`StagePropagator`) cannot take perturbations through ``stage``, in one
    sentence naming the stage and its optimizer; ``None`` when it can. Two causes: an optimizer whose update rule the
    rules do not know, and coupled weight decay under a second-moment preconditioner (Adam, RMSprop, Adagrad) with no
    recorded second moments (no curvature segments, no continued state). Reads no model-sized tensor when the stage
    has curvature segments.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
        >>> opt = torch.optim.Adamax(model.parameters(), lr=0.1)
        >>> with ledger.record_stage("a", model=model, optimizer=opt) as rec:
        ...     opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> carry_problem(ledger.stages[0]).split(",")[0]
        "stage 'a' was trained with optimizer 'Adamax'"
    """
    if not trains(stage):
        return None
    found = (stage.optimizer or {}).get("type") or "not recorded"
    if recorded_family(stage.optimizer) is None:
        return (
            f"stage {stage.name!r} was trained with optimizer {found!r}, whose update rule the propagation does not "
            "know"
        )
    prop = StagePropagator(stage, next_stage)
    needs = [n for n in prop._groups if _per_coordinate(prop.rule(n))]
    if not needs or any((seg.dir / "second_moments.safetensors").exists() for seg in getattr(stage, "segments", [])):
        return None
    for run in prop._preconditioner_runs():  # no segment holds moments: the continued start or end state
        moments = run.moments or {}
        key = second_moment_key(prop.family, moments)
        if key is None or any(n not in moments[key] for n in needs):
            return (
                f"stage {stage.name!r} was trained with {found} and coupled weight decay, whose propagation needs the "
                "optimizer's recorded second moments, and the ledger holds none for it (no curvature segments)"
            )
    return None


def _applied(stage: Stage) -> list[list[float]]:
    """The learning rates of the steps the optimizer applied (all of them for stages without ``skipped_steps``)."""
    method = getattr(stage, "applied_learning_rates", None)
    return method() if callable(method) else list(stage.learning_rates)


def _applied_before(stage: Stage, step: int) -> int:
    method = getattr(stage, "applied_steps_before", None)
    return method(step) if callable(method) else step


def trains(stage: Stage) -> bool:
    """Whether the stage applied optimizer steps (stages without any, e.g. ``untracked`` edits or stages whose every
    step was skipped, are transparent)."""
    return bool(stage.num_steps and _applied(stage))


def next_trained(stages: list[Any], k: int) -> Any:
    """The first stage after index ``k`` that took optimizer steps (``None`` if there is none)."""
    return next((s for s in stages[k + 1 :] if trains(s)), None)


def momentum_tail(removed: Any, following: Any, name: str, states: dict[int, dict | None]) -> torch.Tensor | None:
    """First-moment difference ``m_k − m_cf`` entering stage ``following`` (= k+1) when ``removed`` (= k) is removed.

    ``m_k`` is the state ``following`` continued from; the counterfactual state is ``removed``'s own start state when
    it continued one, else a fresh (zero) state. ``states`` caches ``optimizer_state_at_start()`` per stage index.
    Returns ``None`` when ``following`` started a fresh optimizer or keeps no first moment, or when ``removed`` took
    no optimizer step (removing it leaves the optimizer state as it was).
    """
    if following.optimizer_state_policy != "continued" or not trains(removed):
        return None
    key = first_moment_key(recorded_family(following.optimizer) or "")
    if key is None:
        return None
    for stage in (following, removed):
        if stage.index not in states:
            continued = stage.optimizer_state_policy == "continued"
            states[stage.index] = stage.optimizer_state_at_start() if continued else None
    m_k = (states[following.index] or {}).get(key, {}).get(name)
    if m_k is None:
        return None
    m_cf = (states[removed.index] or {}).get(key, {}).get(name)
    tail = m_k.to(torch.float64)
    return tail - m_cf.to(torch.float64) if m_cf is not None else tail


def iter_propagated(
    ledger: LedgerCore,
    name: str,
    ks: list[int],
    props: dict[int, StagePropagator],
    states: dict[int, Any],
    tails: set[int],
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(k, v_k of tensor name)`` one stage at a time (one float64 copy alive), adding to ``tails`` the
    stages whose momentum tail was used. The recurrences are elementwise per stage, so this is exact."""
    stages = ledger.stages
    for k in ks:
        x, buf = stages[k].delta_tensor(name).to(torch.float64), None
        following = getattr(next_trained(stages, k), "index", None)
        for j in range(k + 1, len(stages)):
            if j == following:
                buf = momentum_tail(stages[k], stages[j], name, states)
                if buf is not None:
                    tails.add(k)
            elif trains(stages[j]) and stages[j].optimizer_state_policy != "continued":
                buf = None
            x, buf = props[j].apply(name, x, buf)
        yield k, x
        del x, buf
