"""Strided replay: every later stage replayed from both starts with a fresh gradient only every ``s`` steps.

Partial replay (:mod:`.partial_replay`) runs the first steps of the next stage exactly and carries the rest with
first-order rules; where the next stage keeps reacting to the removed stage for all of its steps (warmup + linear
decay, a long stage), the carry is what goes wrong. Strided replay spends the same budget differently: for stage
``k`` it re-runs *all* later stages ``k+1..K`` from the counterfactual start ``θ_{k−1}`` and from the factual start
``θ_k``, each with its full recorded recipe (data order, seeds, optimizer, the learning-rate schedule, clipping), but
runs the forward and backward pass only on optimizer steps ``t`` with ``t % s == 0`` and lets the steps in between
re-use that gradient. Both branches make the same approximation on the same batches, so most of its error cancels in
their difference, ``v_k = θ_fact − θ_cf``, which is read out at the final model like every embedding:
``f(θ_K) − f(θ_K − v_k)``.

Budget ``b ∈ [0, 1]``: a fraction of replay's forward/backward passes for the stage (``R_k`` = the optimizer steps
of stages ``k+1..K``). The stride is the smallest ``s ≥ 2`` whose two branches fit (``2 · Σ_j ⌈n_j / s⌉ ≤ b·R_k``);
``b = 1`` replays exactly (one branch: the factual end is ``θ_K``), so ``strided-replay`` equals ``replay`` to float
tolerance; ``b = 0``, or a budget too small for one pass per stage, is the ``aa-linear`` embedding (``aa-fd``). The
terminal stage has nothing to replay: ``v_K = Δ_K``. Both limits are tests.

Stages are run by :func:`~.replay.run_stage` with ``grad_every=s``: a stage function in the gradient-reuse form
``fn(model, grad_every=1)`` (e.g. ``testing.digits``), or Trainer/TRL replay data through
:func:`~hf_stage_attribution.integrations.replay.with_gradient_reuse` (not GRPO/RLOO: they generate inside the
training step).

Memory and disk: as partial replay's branches — each branch's end parameters go to a scratch file as soon as it
stops, ``v_k`` is written tensor by tensor; a trainer replay keeps one extra copy of the gradients.

Measured (``python benchmarks/run.py --sections partial-replay``, BENCHMARKS.md §9 "Strided replay"; 25 % budget,
Spearman / sign / top stage against replay on all pairs, partial replay's figures in brackets): digits-hf (AdamW,
warmup + linear decay) 0.962 / 97 % / 71 % [0.742 / 84 % / 46 %], non-terminal 0.952 [0.683]; digits-decay 0.809 /
78 % / 77 % [0.797 / 64 % / 74 %] but non-terminal top stage 37 % [91 %]; digits-undo 0.949 [0.941]; digits-first
0.997 [0.996]; the LM pipeline (Trainer/TRL replay data) 0.906 / 88 % / 92 % [0.980 / 94 % / 67 %] and toxicity
0.960 / 98 % / 67 % [0.976 / 98 % / 87 %]. So it stays opt-in: far better where the next stages keep reacting for
all their steps (warmup + decay), worse where a short exact replay of the next stage's transient is what matters.
Its cost is the forward/backward passes it skips: on these small models every optimizer step (still run, twice)
costs about as much as a pass, so it took 0.77–1.03 × replay's time there; on a model whose passes dominate the
step, about ``b``.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution import estimators
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), steps_scale=0.1, base_steps_scale=0.1)
    >>> r = estimators.get("strided-replay").estimate(
    ...     pipe.ledger, pipe.model, pipe.behaviors["margin_7"], stage_fns=pipe.stage_fns, budget=0.25)
    >>> r.diagnostics["strided_replay"]["plans"]["digits-base"]
    'stride 15: digits-patch, digits-clean ×2'
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._internal.memory import collections_of_new_objects, release_freed_memory
from .._internal.params import iter_merged_state
from .._internal.reuse import kept_replays, reusing
from ..errors import PartialReplayError
from ..ledger.core import LedgerCore
from .base import COMMON_OPTIONS, register, resolve_stages
from .finite_difference import FiniteDifferenceEstimator
from .partial_replay import (
    DEFAULT_BUDGET,
    PartialReplayEmbeddings,
    ScratchTensors,
    _in_memory,
    _ScratchFiles,
    _started,
    check_budget,
    check_partial_replay_disk,
    propagated_embeddings,
)
from .propagation.stage import trains
from .replay import (
    can_replay,
    no_gradient_reuse_message,
    no_replay_data,
    recording_helps,
    replay_inputs_key,
    replay_work,
    run_stage,
    stage_replay_problem,
    takes_grad_every,
)

_MEMO: dict[str, Any] = kept_replays({})


@dataclass
class StridedReplayPlan:
    """What strided replay runs for stage ``stage``: the later stages, the stride, and the cost in forward/backward
    passes next to replay's (``stride`` 1: exact replay of the counterfactual branch; 0: nothing replayed)."""

    stage: int
    budget: float
    stride: int = 0
    stages: list[int] = field(default_factory=list)
    cost_passes: int = 0
    replay_passes: int = 0

    def describe(self, ledger: LedgerCore) -> str:
        if not self.stride:
            return "no replay (propagation only)"
        names = ", ".join(ledger.stages[j].name for j in self.stages)
        return f"exact replay: {names}" if self.stride == 1 else f"stride {self.stride}: {names} ×2"


def plan_strided_replay(ledger: LedgerCore, k: int, budget: float) -> StridedReplayPlan:
    """The stride strided replay uses for stage index ``k`` at ``budget`` (see the module docstring).

    Example:
        >>> class S:  # a stand-in for ledger stages: 3 stages of 100 optimizer steps
        ...     def __init__(self, i): self.index, self.num_steps, self.learning_rates = i, 100, [[0.1]] * 100
        >>> class L: stages = [S(0), S(1), S(2)]
        >>> p = plan_strided_replay(L(), 0, 0.25)
        >>> p.stride, p.stages, p.cost_passes, p.replay_passes
        (9, [1, 2], 48, 200)
        >>> plan_strided_replay(L(), 0, 1.0).stride, plan_strided_replay(L(), 2, 0.5).stride
        (1, 0)
    """
    budget = check_budget(budget)
    later = [s for s in ledger.stages[k + 1 :] if trains(s)]
    steps = [int(s.num_steps) for s in later]
    plan = StridedReplayPlan(k, budget, replay_passes=sum(steps))
    if not later or budget == 0.0:
        return plan
    plan.stages = [s.index for s in ledger.stages[k + 1 :]]
    if budget >= 1.0:
        plan.stride, plan.cost_passes = 1, plan.replay_passes
        return plan
    for stride in range(2, max(steps) + 1):
        cost = 2 * sum(math.ceil(n / stride) for n in steps)
        if cost <= budget * plan.replay_passes * (1 + 1e-12):
            plan.stride, plan.cost_passes = stride, cost
            return plan
    plan.stages = []  # not even one pass per stage fits: the aa-linear embedding
    return plan


def check_strided_replayable(
    ledger: LedgerCore, plan: StridedReplayPlan, stage_fns: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`PartialReplayError` before anything runs when a later stage cannot be replayed with gradient
    reuse; the message says how to give it the form (``inputs``: ``ref_models`` and ``reward_funcs``, as for
    :func:`~.replay.run_stage`)."""
    inputs = dict(inputs or {})
    removed = ledger.stages[plan.stage].name
    for j in plan.stages:
        stage = ledger.stages[j]
        if can_replay(stage, stage_fns, grad_reuse=plan.stride > 1, **inputs):
            continue
        fn = stage_fns.get(stage.name)
        if fn is not None and not takes_grad_every(fn):
            raise PartialReplayError(
                f"Strided replay of stage {removed!r} (budget {plan.budget:g}): "
                + no_gradient_reuse_message(stage, plan.stride, fn)
            )
        problem = stage_replay_problem(stage, **inputs) if fn is None else None
        if problem:
            why = problem
        elif fn is None and stage.replay_dir is not None:
            why = f"it is a {stage.kind} stage, which generates its training data inside the training step"
        else:
            why = no_replay_data(stage)
        unrecorded = not problem and recording_helps(stage)
        record = "Record it with StageRecorder(..., save_replay_data=True), or pass " if unrecorded else "Pass "
        raise PartialReplayError(
            f"Strided replay of stage {removed!r} (budget {plan.budget:g}) needs to re-run stage {stage.index} "
            f"{stage.name!r}, but {why}. {record}"
            f"stage_fns={{{stage.name!r}: fn}} with fn(model, grad_every=1) training the model in place as that "
            "stage did; or use estimator='partial-replay' (aa-fd at budget 0)."
        )


def _branch_end(
    ledger: LedgerCore,
    model: torch.nn.Module,
    plan: StridedReplayPlan,
    start: int,
    stage_fns,
    box: ScratchTensors,
    inputs: Mapping[str, Any],
):
    """Run the later stages of ``plan`` from ``θ_start`` with the plan's stride; the end parameters into ``box``."""
    work = _started(model, ledger.state_at(start))
    counterfactual = start < plan.stage  # θ_{k−1}: stage k removed; θ_k: nothing removed
    removed, scale = (plan.stage, 0.0) if counterfactual else (None, 1.0)
    for j in plan.stages:
        stage = ledger.stages[j]
        info = {"stage": stage, "removed": removed, "scale": scale}
        work, _ = run_stage(stage, work, stage_fns, info, grad_every=plan.stride, **inputs)
    box.write(iter_merged_state(work))
    del work
    release_freed_memory()  # a trained model can be a reference cycle: freed only by a collection


def strided_embedding(
    ledger: LedgerCore,
    model: torch.nn.Module,
    plan: StridedReplayPlan,
    stage_fns: Mapping[str, Any],
    scratch: _ScratchFiles | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> ScratchTensors | dict[str, torch.Tensor]:
    """``v_k = θ_fact − θ_cf`` of ``plan`` (float32 per base parameter name, zeros left out); in a scratch file of
    ``scratch`` when given, else a dict. ``inputs``: ``ref_models`` and ``reward_funcs`` of
    :func:`~.replay.run_stage`."""
    inputs = dict(inputs or {})
    branches = _ScratchFiles("hfsa-strided-replay-branches-", in_memory=_in_memory(ledger))
    try:
        k = plan.stage
        cf = branches.file("cf")
        _branch_end(ledger, model, plan, k - 1, stage_fns, cf, inputs)
        if plan.stride == 1:
            fact_get = ledger.state_at(len(ledger.stages) - 1).__getitem__  # exact replay: the factual end is θ_K
        else:
            fact = branches.file("fact")
            _branch_end(ledger, model, plan, k, stage_fns, fact, inputs)
            fact_get = fact.get

        def differences():
            for name in ledger.parameter_names:
                x = fact_get(name).to(torch.float64) - cf.get(name).to(torch.float64)
                if bool(x.any()):
                    yield name, x.to(torch.float32)

        if scratch is None:
            return dict(differences())
        box = scratch.file(f"v-{k}")
        box.write(differences())
        return box
    finally:
        branches.remove()


def strided_replay_embeddings(
    ledger: LedgerCore,
    model: torch.nn.Module,
    stages: list[Any],
    *,
    budget: float = DEFAULT_BUDGET,
    stage_fns: Mapping[str, Any] | None = None,
    allow_identity_propagation: bool = False,
    reuse: bool = True,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> PartialReplayEmbeddings:
    """The strided-replay embeddings of ``stages`` (ledger stages) at ``budget``; inside
    :func:`~hf_stage_attribution.estimators.reusing_replays` the last result is kept for the same ledger, stages,
    budget, stage functions, reference models and reward functions (``reuse=False`` recomputes; outside such a block
    every call replays)."""
    budget = check_budget(budget)
    stage_fns = dict(stage_fns or {})
    inputs = {"ref_models": dict(ref_models or {}), "reward_funcs": dict(reward_funcs or {})}
    indices = [s.index for s in stages]
    fns = tuple(sorted((n, id(f)) for n, f in stage_fns.items()))
    key = (
        str(ledger.dir), ledger.fingerprint, budget, tuple(indices), fns, replay_inputs_key(inputs),
        allow_identity_propagation,
    )  # fmt: skip
    if reuse and reusing() and _MEMO.get("key") == key:
        return _MEMO["embeddings"]
    plans = {k: plan_strided_replay(ledger, k, budget) for k in indices}
    for plan in plans.values():
        check_strided_replayable(ledger, plan, stage_fns, inputs)
    check_partial_replay_disk(ledger, sum(1 for p in plans.values() if p.stride))
    strided = {k for k, p in plans.items() if p.stride}
    base = propagated_embeddings(ledger, indices, strided, allow_identity_propagation)
    vectors: dict[int, ScratchTensors | dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    _MEMO.clear()
    scratch = _ScratchFiles("hfsa-strided-replay-", in_memory=_in_memory(ledger))
    with collections_of_new_objects():
        for k, plan in plans.items():
            if not plan.stride:
                continue
            start = time.perf_counter()
            vectors[k] = strided_embedding(ledger, model, plan, stage_fns, scratch, inputs)
            seconds[ledger.stages[k].name] = time.perf_counter() - start
    emb = PartialReplayEmbeddings(vectors, base, ledger.parameter_shapes, scratch)
    emb.kind = "strided-replay"
    strides = sorted({p.stride for p in plans.values() if p.stride > 1})
    if strides:
        emb.approximations = [
            f"Strided replay: the later stages re-run from both starts with a fresh gradient every {strides} "
            "optimizer step(s), re-used in between (same batches, optimizer and schedule in both branches)."
        ]
    cost = sum(p.cost_passes for p in plans.values())
    total = sum(p.replay_passes for p in plans.values())
    emb.diagnostics = {
        "strided_replay": {
            "budget": budget,
            "plans": {ledger.stages[k].name: p.describe(ledger) for k, p in plans.items()},
            "strides": {ledger.stages[k].name: p.stride for k, p in plans.items()},
            "passes_run": cost,
            "replay_passes": total,
            "cost_fraction": cost / total if total else 0.0,
            "seconds": seconds,
        }
    }
    if reusing():  # kept for the other read-out of this attribution only (estimators.reusing_replays)
        _MEMO.update(key=key, embeddings=emb)
    return emb


@register
class StridedReplay(FiniteDifferenceEstimator):
    """``f(θ_K) − f(θ_K − v_k)`` with ``v_k`` the difference of two strided replays of the later stages (module
    docstring). Options: ``budget`` (default 0.25, a fraction of replay's forward/backward passes in [0, 1]),
    ``stage_fns`` (gradient-reuse form), ``ref_models`` and ``reward_funcs`` (``{stage name: ...}`` for stages
    replayed from replay data, as for ``replay``), ``allow_identity_propagation``, and the read-out's options.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("strided-replay").kind
        'strided-replay'
    """

    name, kind = "strided-replay", "strided-replay"
    options = COMMON_OPTIONS | {
        "budget", "stage_fns", "allow_identity_propagation", "step_scale", "ref_models", "reward_funcs",
    }  # fmt: skip
    description = (
        "Re-run every later stage from both starts with a fresh gradient only every s steps (a budget, fraction of "
        "replay's passes), read the difference out by finite difference."
    )
    per_stage_work = True
    additive_diagnostics = FiniteDifferenceEstimator.additive_diagnostics | {"passes_run", "replay_passes"}
    ratio_diagnostics = {"cost_fraction": ("passes_run", "replay_passes")}

    def stage_work(self, ledger, index, options):
        return replay_work(ledger, index)  # both branches over every later stage, thinned alike by the stride

    def embeddings(self, ledger, stages, options, model):
        return strided_replay_embeddings(
            ledger, model, stages, budget=options.get("budget", DEFAULT_BUDGET), stage_fns=options.get("stage_fns"),
            allow_identity_propagation=bool(options.get("allow_identity_propagation", False)),
            ref_models=options.get("ref_models"), reward_funcs=options.get("reward_funcs"),
        )  # fmt: skip

    def prepare(self, ledger, stages=None, model=None, **options):
        """Validate the budget and cache the ``aa-linear`` embeddings of the stages left to propagation (as partial
        replay's ``prepare``); the replays need the stage functions, so they run in ``estimate``."""
        budget = check_budget(options.get("budget", DEFAULT_BUDGET))
        indices = [s.index for s in resolve_stages(ledger, stages)]
        strided = {k for k in indices if plan_strided_replay(ledger, k, budget).stride}
        propagated_embeddings(ledger, indices, strided, bool(options.get("allow_identity_propagation", False)))


__all__ = ["StridedReplay", "StridedReplayPlan", "plan_strided_replay", "strided_replay_embeddings"]
