"""Partial replay (ESTIMATORS.md §4b): a short exact replay of the next stage(s), then first-order propagation.

For stage ``k`` and a budget ``b ∈ [0, 1]`` (a fraction of replay's cost for that stage, ``R_k`` = the optimizer steps
of stages ``k+1..K``):

1. **Plan** (:func:`plan_partial_replay`). Walk the later stages with ``b · R_k`` steps to spend: a stage that fits
   is replayed whole from the counterfactual start (it costs its steps; its factual end ``θ_j`` is in the ledger);
   the first one that does not fit is replayed for its first ``m`` steps from *both* starts (it costs ``2m``), and
   the walk stops. ``budget_unit="lr-mass"`` spends the budget as a fraction of the later stages' learning-rate mass
   ``Σ_t η_t`` instead of their steps (a warmup's tiny first steps then count for little).
2. **Replay** the plan. The counterfactual branch starts at ``θ_{k−1}`` (the start the ``replay`` estimator uses)
   and runs the whole stages, then the first ``m`` steps of the partial one; the factual branch starts at
   ``θ_{j−1}`` (recorded) and runs the same ``m`` steps. A step-limited run uses the stage's *full* recipe and stops
   after ``m`` optimizer steps (:func:`~.replay.run_stage`: Trainer/TRL replay data, or ``stage_fns`` with a
   ``max_steps`` keyword); the learning-rate schedule is the whole stage's.
3. **Carry** the difference ``x = θ_fact − θ_cf`` (and the first-moment difference when both runs returned their
   optimizer) through the remaining steps of the partial stage — the stage's own recurrence at the remaining
   recorded learning rates, Adam's preconditioner taken from the factual run's second moments at step ``m`` — and
   through the later stages with the ``aa-linear`` rules (:class:`~.propagation.stage.StagePropagator`). The result
   is the stage embedding ``v_k``. Opt-in: ``carry="aa-ggn"`` (with ``loss_fns``/``curvature_options`` as for
   ``aa-ggn``) carries it with Gauss–Newton curvature instead (ESTIMATORS.md §4a), from step ``m`` of the partial
   stage on; ``use_checkpoints=True`` lets a recorded mid-segment checkpoint of the partial stage stand for the
   factual branch (only the counterfactual branch then runs, up to that step; the first-moment difference there is
   unknown and taken as zero; checkpoints exist only in ledgers recorded with ``curvature_material="full"``).
   A stage recorded with an *early checkpoint* (``record_stage(..., early_checkpoint=f)``, opt-in: θ and the whole
   optimizer state after ``⌊f·n⌋`` steps) is planned as one leg up to it whenever its steps fit the budget: the
   factual branch, first moments included, is read from the checkpoint and only the counterfactual branch runs (it
   costs its steps, not twice them); ``use_early_checkpoints=False`` ignores it. ``factual="interpolated"``
   (opt-in, nothing recorded) does the same without a checkpoint: the factual branch after ``m`` steps of stage
   ``j`` is taken as ``θ_{j−1} + μ_m Δ_j``, ``μ_m`` the share of the stage's learning-rate mass its first ``m``
   steps spent, so the budget buys twice the steps of the counterfactual branch; exact where the stage's trajectory
   is straight in learning-rate mass, the first-moment difference is then unknown (taken as zero).
4. **Read out** by finite difference, ``f(θ_K) − f(θ_K − v_k)`` (``partial-replay``), or linearly,
   ``∇f(θ_K) · v_k`` (``partial-replay-linear``), with the code of ``aa-fd`` / ``aa-linear``.

Limits that are tests: budget 0 gives the ``aa-linear`` embedding itself (so ``partial-replay`` equals ``aa-fd`` and
``partial-replay-linear`` equals ``aa-linear`` exactly); budget 1 replays every later stage whole, so
``θ_K − v_k = θ̃_K^(−k)`` and ``partial-replay`` equals ``replay`` to float tolerance. The terminal stage has nothing
to replay (``θ̃_K^(−K) = θ_{K−1}``): ``v_K = Δ_K`` at every budget, at no cost.

Measured (``python benchmarks/run.py --sections partial-replay``, see BENCHMARKS.md §8; non-terminal Spearman at
25 %): carrying Adam's first-moment difference helps (digits-hf 0.68 with it, 0.48 without), and carrying it as the
difference of the two branches' update directions ``m̂/(√v̂+ε)`` — each with its own second moment — rather than
as ``Δm`` preconditioned by the factual ``v̂`` alone avoids a blow-up after a few steps (LM pipeline: 0.96 against
0.59); ``carry_moments=False`` drops it. The finite-difference read-out beats the linear one at the default budget on
every pipeline and is exact at budget 1, so it is the default read-out. The Gauss–Newton carry fixes the decay
pipeline (0.39 → 0.81) but hurts digits-hf and costs about 3× more there, so it stays opt-in; the mid-segment
checkpoint loses the first-moment difference and was worse (0.70 vs 0.77 with the earlier carry), so it stays
opt-in. The early checkpoint (every stage recorded with ``early_checkpoint=0.25``, 25 % budget) cuts
time ÷ replay from 0.31 to 0.23 (digits-hf), 0.33 to 0.20 (digits-decay), 0.32 to 0.22 (digits-undo), 0.43 to 0.36
(digits-first) and 0.40 to 0.30 (LM), with the same or better fidelity except on the LM pipeline (non-terminal
Spearman 0.961 → 0.941); the toxicity recipe's cost is its stage functions' fixed setup (0.90 → 0.98). The
interpolated factual branch (``factual="interpolated"``, 25 %; Spearman / sign on all pairs) helps where the
next stage's path is nearly straight in learning-rate mass and the extra counterfactual steps matter — digits-hf
0.742 / 84 % → 0.854 / 100 %, digits-decay 0.797 / 64 % → 0.863 / 75 % — and hurts where it bends: digits-undo
0.941 → 0.894, LM 0.980 → 0.923, toxicity top stage 87 % → 73 %; so it stays opt-in.

Example:
    >>> from hf_stage_attribution import estimators
    >>> estimators.get("partial-replay").name, estimators.get("partial-replay-linear").kind
    ('partial-replay', 'partial-replay')

On a recorded pipeline (``fns``: step-limited stage functions, or none when the ledger holds replay data)::

    r = estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns=fns, budget=0.25)
    r.diagnostics["partial_replay"]["cost_fraction"]
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .._internal.hashing import byte_view
from .._internal.memory import collections_of_new_objects, human_bytes, release_freed_memory
from .._internal.params import iter_merged_state
from .._internal.reuse import kept_replays, reusing
from ..errors import BudgetError, EstimatorMemoryError, PartialReplayError
from ..ledger.core import LedgerCore
from ..ledger.segments import lr_mass_fraction
from ..ledger.state import LazyState
from .base import COMMON_OPTIONS, register, resolve_stages
from .curvature.propagation import curvature_settings, propagate
from .curvature.scratch import (
    SCRATCH_DIR_ENV,
    open_unlinked,
    read_into,
    scratch_dir,
    scratch_free_bytes,
    write_from,
)
from .embeddings.cache import StageEmbeddings, require_optimizer_information, stage_embeddings
from .embeddings.write import check_curvature_material
from .finite_difference import FiniteDifferenceEstimator
from .linear import LinearEstimator
from .partial_plan import (
    DEFAULT_BUDGET,
    PartialReplayPlan,
    check_budget,
    plan_partial_replay,
)
from .propagation.rules import _betas, first_moment_key, preconditioner, run_recurrence, second_moment_key
from .propagation.stage import StagePropagator, next_trained, trains
from .replay import (
    STEP_LIMITED_HOW,
    can_replay,
    load_state,
    no_replay_data,
    recording_helps,
    replay_inputs_key,
    run_stage,
    stage_replay_problem,
    step_costs,
    step_limitable,
    working_copy,
)

CARRIES = ("aa-linear", "aa-ggn")
FACTUALS = ("replay", "interpolated")


def check_replayable(
    ledger: LedgerCore, plan: PartialReplayPlan, stage_fns: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`PartialReplayError` before anything runs when a leg's stage cannot be (step-limited) replayed
    (``inputs``: the ``ref_models`` and ``reward_funcs`` given for replay, see :func:`~.replay.run_stage`)."""
    inputs = dict(inputs or {})
    for leg in plan.legs:
        stage = ledger.stages[leg.index]
        if can_replay(stage, stage_fns, step_limited=not leg.full, **inputs):
            continue
        removed = ledger.stages[plan.stage].name
        fn = stage_fns.get(stage.name)
        if fn is not None and not step_limitable(fn):
            raise PartialReplayError(
                f"Partial replay of stage {removed!r} (budget {plan.budget:g}) must stop stage {stage.index} "
                f"{stage.name!r} after {leg.steps} optimizer step(s), but its stage function has no step-limited "
                f"form. {STEP_LIMITED_HOW} Or use budget=0 / estimator='replay'."
            )
        problem = stage_replay_problem(stage, **inputs) if fn is None else None
        why = problem or no_replay_data(stage)
        unrecorded = not problem and recording_helps(stage)
        record = "Record it with StageRecorder(..., save_replay_data=True), or pass " if unrecorded else "Pass "
        raise PartialReplayError(
            f"Partial replay of stage {removed!r} (budget {plan.budget:g}) needs to replay stage {stage.index} "
            f"{stage.name!r}, but {why}. {record}"
            f"stage_fns={{{stage.name!r}: fn}} with fn(model, max_steps=None) training the model in place as that "
            "stage did; or use budget=0 (aa-fd / aa-linear)."
        )


# --- the embeddings --------------------------------------------------------------------------------------------


class ScratchTensors:
    """Named tensors in one scratch file on disk, written once and read back one tensor at a time with plain reads
    (no memory map, so nothing read stays in the process's resident set once the caller drops it).

    Partial replay keeps its model-sized vectors here — a branch's parameters, its optimizer's moments, the
    finished ``v_k`` — instead of in RAM: the peak holds one training step of a branch, not both branches plus their
    moments plus float64 differences (GPT-2 4.2M: 11.9× → about 5× the parameter bytes).

    The file is made in ``directory`` (default: :func:`~.curvature.scratch.scratch_dir`) and unlinked as soon as it is
    open, as the Krylov basis's is: its blocks go back to the file system when :meth:`close` runs, when this object
    is collected, or with the process — also one killed for memory, which used to leave up to ``K + 4`` model-sized
    files behind.

    Example:
        >>> import os, tempfile, torch
        >>> where = tempfile.mkdtemp()
        >>> box = ScratchTensors(where)
        >>> box.write([("w", torch.arange(6.0).reshape(2, 3)), ("b", torch.tensor(1.5, dtype=torch.float64))])
        >>> box.names(), box.get("w")[1].tolist(), float(box.get("b")), os.listdir(where)
        (['w', 'b'], [3.0, 4.0, 5.0], 1.5, [])
        >>> box.close()
    """

    def __init__(self, directory: str | Path | None = None, prefix: str = "hfsa-partial-replay-") -> None:
        self._index: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._end = 0
        self._fd = open_unlinked(prefix, ".bin", directory)
        self._close = weakref.finalize(self, os.close, self._fd)

    def write(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Append ``(name, tensor)`` pairs (each copied to the CPU and written, one at a time)."""
        for name, tensor in tensors:
            t = tensor.detach().to("cpu").contiguous()
            raw = byte_view(t)
            write_from(self._fd, raw, self._end)
            self._index[name] = (self._end, int(raw.size), t.dtype, tuple(t.shape))
            self._end += int(raw.size)

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from disk into a fresh CPU tensor."""
        offset, _, dtype, shape = self._index[name]
        out = torch.empty(shape, dtype=dtype)
        read_into(self._fd, byte_view(out), offset)
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._index:
            yield name, self.get(name)

    def close(self) -> None:
        """Give the file's blocks back (reads fail afterwards)."""
        self._close()


class _InMemoryTensors(ScratchTensors):
    """:class:`ScratchTensors` held in RAM (CPU copies, each read handing out a fresh copy): for a small model, where
    the file round trips cost more than the replayed steps and the copies take little room."""

    def __init__(self) -> None:  # no file is ever made
        self._tensors: dict[str, torch.Tensor] = {}

    def write(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self._tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._tensors:
            yield name, self.get(name)

    def close(self) -> None:
        self._tensors.clear()


#: Parameter bytes (float32) up to which partial replay keeps its model-sized vectors — both branches' parameters and
#: optimizer moments, ``v_k`` — in RAM instead of scratch files (at most ``(BRANCH_FILES + K) ×`` this: a few MiB).
#: Digits MLP (2.4k parameters): the file writes, reads and directory removals were a third of the embeddings' time.
#: Larger models keep the disk path, which bounds the peak memory (issue 16).
IN_MEMORY_BYTES = 1 << 20


def _in_memory(ledger: LedgerCore) -> bool:
    return 4 * sum(math.prod(shape) for shape in ledger.parameter_shapes.values()) <= IN_MEMORY_BYTES


class _ScratchFiles:
    """A maker of :class:`ScratchTensors` in :func:`~.curvature.scratch.scratch_dir` (each file unlinked as soon as it
    is open, so nothing is left behind even by a killed process), all given back by :meth:`remove`; with
    ``in_memory`` its "files" are :class:`_InMemoryTensors`."""

    def __init__(self, prefix: str, in_memory: bool = False) -> None:
        self.prefix, self.in_memory = prefix, in_memory
        self._files: list[ScratchTensors] = []

    def file(self, name: str) -> ScratchTensors:
        box = _InMemoryTensors() if self.in_memory else ScratchTensors(prefix=f"{self.prefix}{name}-")
        self._files.append(box)
        return box

    def remove(self) -> None:
        for box in self._files:
            box.close()
        self._files.clear()


class _StateOnDisk(Mapping):
    """``{base name: {state key: tensor or number}}`` of an optimizer, its tensors on disk (read per entry)."""

    def __init__(self, box: ScratchTensors, scalars: dict[str, dict[str, Any]], keys: dict[str, list[str]]) -> None:
        self._box, self._scalars, self._keys = box, scalars, keys

    @classmethod
    def save(cls, box: ScratchTensors, state: Mapping[str, Mapping[str, Any]]) -> _StateOnDisk:
        scalars: dict[str, dict[str, Any]] = {}
        keys: dict[str, list[str]] = {}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, entry in state.items():
                keys[name] = list(entry)
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        yield f"{name}\x00{key}", value
                    else:
                        scalars.setdefault(name, {})[key] = value

        box.write(tensors())
        return cls(box, scalars, keys)

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._keys:
            raise KeyError(name)
        small = self._scalars.get(name, {})
        return {k: small[k] if k in small else self._box.get(f"{name}\x00{k}") for k in self._keys[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class PartialReplayEmbeddings:
    """``v_k`` of partial replay: computed vectors (in scratch files on disk, read one tensor at a time) for the
    stages that replayed something, the ``aa-linear`` embeddings for the others (budget 0, a budget too small for one
    step, the terminal stage).

    Same read interface as :class:`~.embeddings.cache.StageEmbeddings` (``items``, ``get``, ``names``, ``norm``).
    """

    kind = "partial-replay"

    def __init__(
        self,
        vectors: Mapping[int, ScratchTensors | Mapping[str, torch.Tensor]],
        base: StageEmbeddings,
        shapes: Mapping,
        scratch: _ScratchFiles | None = None,
    ) -> None:
        self.vectors, self.base, self._shapes, self._scratch = dict(vectors), base, shapes, scratch
        self.approximations: list[str] = list(base.approximations)
        self.diagnostics: dict[str, Any] = {}
        self._norms: dict[int, float] = {}

    def names(self, k: int) -> list[str]:
        if k not in self.vectors:
            return self.base.names(k)
        v = self.vectors[k]
        return v.names() if isinstance(v, ScratchTensors) else list(v)

    def get(self, k: int, name: str) -> torch.Tensor:
        if k not in self.vectors:
            return self.base.get(k, name)
        v = self.vectors[k]
        if name in v:
            return v.get(name)
        return torch.zeros(self._shapes[name], dtype=torch.float32)

    def items(self, k: int) -> Iterator[tuple[str, torch.Tensor]]:
        if k not in self.vectors:
            yield from self.base.items(k)
            return
        yield from self.vectors[k].items()

    def norm(self, k: int) -> float:
        if k not in self.vectors:
            return self.base.norm(k)
        if k not in self._norms:
            self._norms[k] = float(sum(float(t.double().pow(2).sum()) for _, t in self.items(k)) ** 0.5)
        return self._norms[k]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.to(torch.float64) for name, t in iter_merged_state(model)}


def _started(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    work = working_copy(model)
    load_state(work, state)
    return work


class _RestOfStage:
    """Carries ``(x, buf)`` through the steps ``m..n`` of a stage (its recurrence at the remaining recorded rates)."""

    def __init__(
        self, prop: StagePropagator, m: int, factual_state: Mapping[str, Any] | None, cf_state: Mapping | None = None
    ) -> None:
        self.prop, self.m, self.state, self.cf_state = prop, m, factual_state or {}, cf_state or {}
        self.notes: set[str] = set()

    def _normalized(self, family: str, group: dict, entry: Mapping[str, Any]) -> torch.Tensor | None:
        """Adam's update direction at the stop, ``m̂ / (√v̂ + ε)``, from one branch's optimizer state."""
        key = second_moment_key(family, {k: {"_": v} for k, v in entry.items()})
        if key is None or "exp_avg" not in entry:
            return None
        step = float(entry.get("step", self.m))
        m_hat = entry["exp_avg"].to(torch.float64) / (1.0 - _betas(group)[0] ** max(step, 1.0))
        return m_hat * preconditioner(family, group, entry[key], step)

    def apply(self, name: str, x: torch.Tensor, buf: torch.Tensor | Callable[[], torch.Tensor | None] | None):
        """``(x, buf)`` after the rest of the stage; ``buf`` may be given as a function that computes it, called
        only when the first-moment difference itself is carried (not on the update-direction path of Adam)."""
        rule = self.prop.rule(name)
        if rule is None:
            return x, None
        lrs, family, group = rule.lrs[self.m :], rule.family, rule.group
        coupled = bool(float(group.get("weight_decay") or 0.0)) and family in ("adam", "rmsprop", "adagrad")
        if buf is not None and family in ("adam", "adamw") and not coupled:
            # No gradient difference is modelled after the stop, so the moments only decay (β1) and each branch's
            # momentum keeps moving it along its own update direction m̂/(√v̂+ε): carry the difference of the two
            # directions, each normalised by its own second moment (a difference of first moments normalised by
            # the factual branch's v̂ alone blows up where that v̂, from a few steps, is tiny).
            u_f = self._normalized(family, group, self.state.get(name) or {})
            u_c = self._normalized(family, group, self.cf_state.get(name) or {})
            if u_f is not None and u_c is not None:
                # run_recurrence's x update divides by 1 − β1^(t+1) itself: hand it the raw-moment scale
                step = float((self.state.get(name) or {}).get("step", self.m))
                scaled = (u_f - u_c) * (1.0 - _betas(group)[0] ** max(step, 1.0))
                x, _ = run_recurrence(lrs, group, family, x0=x, buf0=scaled, precond=1.0, step0=self.m)
                return x, None
        buf = buf() if callable(buf) else buf
        needs_p = coupled or (buf is not None and family in ("adam", "adamw"))
        precond: Any = 1.0
        if needs_p:
            entry = self.state.get(name) or {}
            key = second_moment_key(family, {k: {name: v} for k, v in entry.items()})
            # Adagrad's sum only grows: frozen after the first few replayed steps, 1/(√sum+ε) is far too large for the
            # rest of the stage and the carry diverges (η·λ/√sum ≫ 2); the recorded segment moments stand for it
            early_sum = family == "adagrad" and coupled and bool(self.prop._preconditioner_runs()[0].moments)
            if key is not None and not early_sum:
                step = float(entry.get("step", self.m))
                precond = preconditioner(family, group, entry[key], step)
            elif coupled:
                runs = [r for r in self.prop._preconditioner_runs() if r.moments] or [None]
                run = next((r for r in runs if r is not None and r.start <= self.m < r.end), runs[0])
                moments = (run.moments if run is not None else None) or {}
                rkey = second_moment_key(family, moments)
                if rkey is None or name not in moments[rkey]:
                    raise PartialReplayError(self.prop._missing_state_message(name))
                precond = preconditioner(family, group, moments[rkey][name], float(self.m + 1))
                why = (
                    "Adagrad's accumulated sum after the replayed steps is too small to stand for the rest"
                    if early_sum
                    else "the replay returned no optimizer state"
                )
                self.notes.add(
                    f"Stage {self.prop.stage.name!r}: rest of the stage after the partial replay carried with the "
                    f"recorded second moments ({why})."
                )
            else:
                buf = None
                self.notes.add(
                    f"Stage {self.prop.stage.name!r}: the first-moment difference at the end of the partial replay "
                    "was dropped (no second-moment state to precondition it)."
                )
        x, buf = run_recurrence(lrs, group, family, x0=x, buf0=buf, precond=precond, step0=self.m)
        return x, (None if isinstance(buf, float) else buf)


def _moved_from(start: Mapping[str, torch.Tensor], moved: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """A recorded checkpoint's parameters by name, float64: the stage's start plus the recorded move (if any)."""

    def get(name: str) -> torch.Tensor:
        value = start[name].to(torch.float64)
        return value + moved[name].to(torch.float64) if name in moved else value

    return get


def _moment_difference(family: str | None, fact: Mapping | None, cf: Mapping | None, name: str):
    key = first_moment_key(family or "")
    if key is None or not fact or not cf:
        return None
    a, b = (fact.get(name) or {}).get(key), (cf.get(name) or {}).get(key)
    if a is None or b is None:
        return None
    return a.to(torch.float64) - b.to(torch.float64)


def _carry_with_curvature(
    ledger: LedgerCore,
    last: int,
    v: dict[str, torch.Tensor],
    bufs: dict[str, torch.Tensor],
    curvature: dict,
    notes: set[str],
    partial_steps: int | None,
) -> dict[str, torch.Tensor]:
    """Carry ``v`` with Gauss–Newton curvature (ESTIMATORS.md §4a) through the rest of stage ``last`` after its
    first ``partial_steps`` steps (``None``: it was replayed whole), then through the later stages."""
    stages = ledger.stages
    buf: dict[str, torch.Tensor] | None = bufs or None
    if partial_steps is not None:
        v, info = propagate(v, ledger, last, mode="ggn", initial_buffer=buf, start_step=partial_steps, **curvature)
        buf = info.get("buffer")
        notes.update(info.get("approximations") or [])
    for j in range(last + 1, len(stages)):
        stage = stages[j]
        if not trains(stage):
            continue
        init = buf if stage.optimizer_state_policy == "continued" else None
        v, info = propagate(v, ledger, j, mode="ggn", initial_buffer=init, **curvature)
        buf = info.get("buffer")
        notes.update(info.get("approximations") or [])
    return {n: t.to(torch.float32) for n, t in v.items() if bool(t.any())}


def partial_embedding(
    ledger: LedgerCore,
    model: torch.nn.Module,
    plan: PartialReplayPlan,
    stage_fns: Mapping[str, Any],
    notes: set[str],
    curvature: dict[str, Any] | None = None,
    carry_moments: bool = True,
    scratch: _ScratchFiles | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> ScratchTensors | dict[str, torch.Tensor]:
    """``v_k`` of ``plan`` (float32 per base parameter name): replay its legs, carry the difference to ``θ_K``.

    ``curvature`` (keyword arguments of :func:`~.curvature.propagation.propagate`, ``loss_fns`` and ``model``
    included) carries it through the rest of the partially replayed stage and the later stages with Gauss–Newton
    curvature (Adam's preconditioner then frozen at the recorded segment midpoints) instead of the ``aa-linear``
    rules.

    Memory: each branch's end parameters and optimizer state go to scratch files as soon as the branch stops (its
    model copy, gradients and optimizer are then released), the factual end of a whole stage is read from the ledger
    one tensor at a time, and ``v_k`` is written to ``scratch`` tensor by tensor (returned as
    :class:`ScratchTensors`; a dict when ``scratch`` is None). The peak is one training step of one branch plus one
    model copy. The branch files are removed before returning. A model of at most :data:`IN_MEMORY_BYTES` parameter
    bytes keeps these vectors in RAM instead (same numbers, no file round trips). ``inputs``: the ``ref_models`` and
    ``reward_funcs`` of :func:`~.replay.run_stage`."""
    branches = _ScratchFiles("hfsa-partial-replay-branches-", in_memory=_in_memory(ledger))
    inputs = dict(inputs or {})
    try:
        return _partial_embedding(
            ledger, model, plan, stage_fns, notes, curvature, carry_moments, branches, scratch, inputs
        )
    finally:
        branches.remove()


def _partial_embedding(
    ledger: LedgerCore,
    model: torch.nn.Module,
    plan: PartialReplayPlan,
    stage_fns: Mapping[str, Any],
    notes: set[str],
    curvature: dict[str, Any] | None,
    carry_moments: bool,
    branches: _ScratchFiles,
    scratch: _ScratchFiles | None,
    inputs: dict[str, Any],
) -> ScratchTensors | dict[str, torch.Tensor]:
    stages, k = ledger.stages, plan.stage
    cf = _started(model, ledger.state_at(k - 1))
    last = plan.legs[-1]
    cf_opt: Mapping[str, Any] | None = None
    fact_opt: Mapping[str, Any] | None = None
    for leg in plan.legs:
        stage = stages[leg.index]
        info = {"stage": stage, "removed": k, "scale": 0.0}
        cf, opt = run_stage(stage, cf, stage_fns, info, max_steps=None if leg.full else leg.steps, **inputs)
        if not leg.full and opt is not None:
            cf_opt = _StateOnDisk.save(branches.file("cf-optimizer"), opt)
        del opt
    cf_params = branches.file("cf")
    cf_params.write(iter_merged_state(cf))
    del cf  # the counterfactual branch is on disk: the factual one runs in the room it leaves
    release_freed_memory()  # a trained model is a reference cycle (its patched forward): freed only by a collection
    if last.full:
        end = ledger.state_at(last.index)
        fact_get = end.__getitem__
    elif last.factual == "early":
        stage = stages[last.index]
        early = stage.early_checkpoint
        fact_get = _moved_from(ledger.state_at(last.index - 1), early.params_delta())
        fact_opt = early.optimizer_state()
        notes.add(
            f"Stage {stage.name!r}: the factual branch of the partial replay is the recorded early checkpoint (after "
            f"{last.steps} steps, with its optimizer state): only the counterfactual branch was replayed."
        )
    elif last.factual == "interpolated":
        stage = stages[last.index]
        share = lr_mass_fraction(stage.learning_rates, last.steps - 1)  # of the rates of steps 0..m-1
        scaled = LazyState(stage.delta_names(), lambda name: stage.delta_tensor(name) * share)
        fact_get = _moved_from(ledger.state_at(last.index - 1), scaled)
        fact_opt, cf_opt = cf_opt, None  # preconditioned by the counterfactual branch's moments; no Δm known
        notes.add(
            f"Stage {stage.name!r}: the factual branch of the partial replay (after {last.steps} steps) is the "
            "stage's start plus the recorded stage delta scaled by the learning-rate mass of those steps; only the "
            "counterfactual branch was replayed, the first-moment difference is taken as zero."
        )
    elif last.factual == "segment":
        stage = stages[last.index]
        segment = next(s for s in stage.segments if s.index == last.segment)
        fact_get = _moved_from(ledger.state_at(last.index - 1), segment.params_delta())
        moments = segment.second_moments() or {}
        by_name: dict[str, dict[str, Any]] = {}
        for key, values in moments.items():
            for name, value in values.items():
                by_name.setdefault(name, {})[key] = value
        fact_opt = by_name
        cf_opt = None  # the factual first moment was not recorded: no first-moment difference
        notes.add(
            f"Stage {stage.name!r}: the factual branch of the partial replay is the recorded mid-segment checkpoint "
            f"(after {last.steps} steps); the first-moment difference there is taken as zero."
        )
    else:
        stage = stages[last.index]
        fact = _started(model, ledger.state_at(last.index - 1))
        info = {"stage": stage, "removed": None, "scale": 1.0}
        fact, opt = run_stage(stage, fact, stage_fns, info, max_steps=last.steps, **inputs)
        fact_opt = _StateOnDisk.save(branches.file("fact-optimizer"), opt) if opt is not None else None
        del opt
        fact_params = branches.file("fact")
        fact_params.write(iter_merged_state(fact))
        del fact
        release_freed_memory()
        fact_get = fact_params.get
        if cf_opt is None or fact_opt is None:
            notes.add(
                f"Stage {stage.name!r}: its step-limited replay returned no optimizer, so the first-moment difference "
                "after the partial replay is taken as zero."
            )
    props = {j: StagePropagator(stages[j], next_trained(stages, j)) for j in range(last.index, len(stages))}
    rest = None if last.full else _RestOfStage(props[last.index], last.steps, fact_opt, cf_opt)
    out: dict[str, torch.Tensor] = {}
    bufs: dict[str, torch.Tensor] = {}

    def carried() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ledger.parameter_names:
            x = fact_get(name).to(torch.float64) - cf_params.get(name).to(torch.float64)
            buf = None
            if rest is not None:
                family = props[last.index].family
                if curvature is None:  # the float64 moment difference is computed only where it is carried
                    lazy = partial(_moment_difference, family, fact_opt, cf_opt, name) if carry_moments else None
                    x, buf = rest.apply(name, x, lazy)
                elif carry_moments:
                    buf = _moment_difference(family, fact_opt, cf_opt, name)
            if curvature is not None:  # carried below, whole vectors at a time
                out[name] = x
                if buf is not None:
                    bufs[name] = buf
                continue
            for j in range(last.index + 1, len(stages)):
                if trains(stages[j]) and stages[j].optimizer_state_policy != "continued":
                    buf = None
                x, buf = props[j].apply(name, x, buf)
            if bool(x.any()):
                yield name, x.to(torch.float32)

    result: ScratchTensors | dict[str, torch.Tensor]
    if curvature is not None or scratch is None:
        result = dict(carried())
    else:
        result = scratch.file(f"v-{k}")
        result.write(carried())
    if rest is not None:
        notes |= rest.notes
    if curvature is not None:
        result = _carry_with_curvature(
            ledger, last.index, out, bufs, curvature, notes, None if last.full else last.steps
        )
        if scratch is not None:
            box = scratch.file(f"v-{k}")
            box.write(result.items())
            result = box
    continued = [s.name for s in stages[last.index + 1 :] if trains(s) and s.optimizer_state_policy == "continued"]
    if continued and (last.full or cf_opt is None):
        notes.add(
            f"Stage(s) {continued} continued the optimizer state: the first-moment difference after the replayed "
            "part is not carried into them."
        )
    for prop in props.values():
        notes.update(prop.approximations)
    return result


#: Model-sized files the partial replay of one stage writes besides the ``v_k`` already kept: both branches' end
#: parameters and optimizer state (Adam: two moments each).
BRANCH_FILES = 6


def partial_replay_scratch_bytes(ledger: LedgerCore, replayed: int) -> int:
    """Scratch disk the partial replay of ``replayed`` stages needs at its peak: one ``v_k`` per replayed stage
    (float32) plus, while the last one's branches run, :data:`BRANCH_FILES` model-sized files (removed after it).

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
        >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
        >>> n = sum(math.prod(s) for s in pipe.ledger.parameter_shapes.values())
        >>> partial_replay_scratch_bytes(pipe.ledger, 2) == 4 * n * (2 + BRANCH_FILES)
        True
    """
    if replayed <= 0:
        return 0
    n = sum(math.prod(shape) for shape in ledger.parameter_shapes.values())
    return 4 * n * (replayed + BRANCH_FILES)


def check_partial_replay_disk(ledger: LedgerCore, replayed: int) -> None:
    """Refuse, before any replay, when the scratch directory cannot hold what the partial replay writes."""
    need, free = partial_replay_scratch_bytes(ledger, replayed), scratch_free_bytes()
    if need > free:
        raise EstimatorMemoryError(
            f"partial-replay needs about {human_bytes(need)} of scratch disk under {scratch_dir()} (the branches' "
            f"parameters and optimizer state and one embedding per replayed stage) but {human_bytes(free)} is free; "
            f"set {SCRATCH_DIR_ENV} to a larger disk, or use --estimator aa-fd."
        )


def propagated_embeddings(
    ledger: LedgerCore, indices: list[int], replayed: set[int], allow_identity_propagation: bool = False
) -> StageEmbeddings:
    """The ``aa-linear`` embeddings of the attributed stages ``indices`` that a replay family leaves to propagation
    (those not in ``replayed``: the last stage, or one the budget gives no replay) — the only ones it reads.

    Computing them for the replayed stages too cost a whole propagation and a model-sized cache entry per stage. A
    stage imported without its optimizer is still refused for every attributed stage, before any replay, as the
    embeddings of all of them would be (``allow_identity_propagation`` lifts it).
    """
    if not allow_identity_propagation:
        require_optimizer_information(ledger, "aa-linear", indices)
    propagated = [k for k in indices if k not in replayed]
    return stage_embeddings(ledger, "aa-linear", propagated, allow_identity_propagation=allow_identity_propagation)


_MEMO: dict[str, Any] = kept_replays({})


def _memo_key(
    ledger: LedgerCore, budget: float, unit: str, stage_fns: Mapping[str, Any], inputs: Mapping[str, Any]
) -> tuple:
    fns = tuple(sorted((n, id(f)) for n, f in stage_fns.items()))
    return (str(ledger.dir), ledger.fingerprint, budget, unit, fns, replay_inputs_key(inputs))


def _options_key(value: Any) -> Any:
    """A memo key for a mapping of options (curvature settings, loss functions by stage): values by identity unless
    they are plain numbers, strings, booleans or None."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _options_key(v)) for k, v in value.items()))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return ("id", id(value))


def partial_replay_embeddings(
    ledger: LedgerCore,
    model: torch.nn.Module,
    stages: list[Any],
    *,
    budget: float = DEFAULT_BUDGET,
    budget_unit: str = "steps",
    stage_fns: Mapping[str, Any] | None = None,
    allow_identity_propagation: bool = False,
    use_checkpoints: bool = False,
    carry: str = "aa-linear",
    loss_fns: Mapping[str, Any] | None = None,
    curvature_options: Mapping[str, Any] | None = None,
    carry_moments: bool = True,
    reuse: bool = True,
    use_early_checkpoints: bool = True,
    factual: str = "replay",
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> PartialReplayEmbeddings:
    """The partial-replay embeddings of ``stages`` (ledger stages) at ``budget``.

    A stage recorded with an early checkpoint (``record_stage(..., early_checkpoint=f)``) is replayed from the
    counterfactual start only, up to the checkpoint, when that fits the budget (``use_early_checkpoints=False``
    ignores the checkpoints). A stage replayed from its replay data gets ``ref_models[name]`` (its reference model or
    teacher) and ``reward_funcs[name]`` (GRPO/RLOO/OnlineDPO), as in :func:`~.replay.run_stage`.

    Inside :func:`~hf_stage_attribution.estimators.reusing_replays` (one ``StageAttributor.attribute`` call opens
    it) the last result is kept (for the same ledger, budget, options and stage functions) so that the linear and the
    finite-difference read-outs of one attribution replay once: it serves any subset of the stages it was computed
    for (each ``v_k`` is computed on its own); ``reuse=False`` recomputes, and outside such a block every call
    replays.
    """
    budget = check_budget(budget, budget_unit)
    stage_fns = dict(stage_fns or {})
    inputs = {"ref_models": dict(ref_models or {}), "reward_funcs": dict(reward_funcs or {})}
    indices = [s.index for s in stages]
    if carry not in CARRIES:
        raise BudgetError(f"`carry` must be one of {CARRIES}, got {carry!r}.")
    if factual not in FACTUALS:
        raise BudgetError(
            f"`factual` must be one of {FACTUALS} (replay the factual branch, or read it off the recorded stage delta "
            f"and spend the budget on the counterfactual branch alone), got {factual!r}."
        )
    key = (
        *_memo_key(ledger, budget, budget_unit, stage_fns, inputs),
        use_checkpoints,
        carry,
        carry_moments,
        use_early_checkpoints,
        factual,
        allow_identity_propagation,
        _options_key(curvature_options) if carry == "aa-ggn" else None,
        _options_key(loss_fns) if carry == "aa-ggn" else None,
    )
    if reuse and reusing() and _MEMO.get("key") == key and set(indices) <= set(_MEMO["indices"]):
        return _MEMO["embeddings"]
    plans = {
        k: plan_partial_replay(ledger, k, budget, budget_unit, use_checkpoints, use_early_checkpoints, factual)
        for k in indices
    }
    for plan in plans.values():
        check_replayable(ledger, plan, stage_fns, inputs)
    check_partial_replay_disk(ledger, sum(1 for p in plans.values() if p.legs))
    base = propagated_embeddings(ledger, indices, {k for k, p in plans.items() if p.legs}, allow_identity_propagation)
    notes: set[str] = set()
    curvature = None
    if carry == "aa-ggn" and any(p.legs for p in plans.values()):
        check_curvature_material(ledger, min(p.legs[-1].index for p in plans.values() if p.legs) - 1, "ggn")
        curvature = {**curvature_settings(dict(curvature_options or {})), "loss_fns": loss_fns, "model": model}
        curvature.pop("preset", None)
    vectors: dict[int, ScratchTensors | dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    _MEMO.clear()  # the previous embeddings' scratch files go before new ones are written
    scratch = _ScratchFiles("hfsa-partial-replay-", in_memory=_in_memory(ledger))
    with collections_of_new_objects():  # freeing each branch's model copy scans only what the replays made
        for k, plan in plans.items():
            if not plan.legs:
                continue
            start = time.perf_counter()
            vectors[k] = partial_embedding(
                ledger, model, plan, stage_fns, notes, curvature, carry_moments, scratch, inputs
            )
            seconds[ledger.stages[k].name] = time.perf_counter() - start
    emb = PartialReplayEmbeddings(vectors, base, ledger.parameter_shapes, scratch)
    if vectors:
        emb.approximations = sorted(notes) + [
            "Partial replay: the next stage(s) replayed exactly for part of their steps (see diagnostics), the rest "
            + (
                "carried with the first-order, curvature-free aa-linear rules."
                if curvature is None
                else "carried with Gauss–Newton curvature (aa-ggn)."
            )
        ]
    bare = [
        ledger.stages[k].name
        for k, plan in plans.items()
        if not plan.legs and any(trains(s) for s in ledger.stages[k + 1 :])
    ]
    if bare:  # said, since the estimator's name promises a replay that did not run there
        emb.approximations = list(emb.approximations) + [
            f"Partial replay at budget {budget:g} replayed no optimizer step for {bare}: one step from each of two "
            "starts costs more than the budget of their later stages' steps, so their estimates are the "
            "propagation-only carry (aa-linear rules, read like aa-fd), not checked by any replay; a larger budget "
            "or estimator='replay' replays them."
        ]
    cost = sum(p.cost_steps for p in plans.values())
    total = sum(p.replay_steps for p in plans.values())
    emb.diagnostics = {
        "partial_replay": {
            "budget": budget,
            "budget_unit": budget_unit,
            "carry": carry,
            "carry_moments": carry_moments,
            "use_checkpoints": use_checkpoints,
            "use_early_checkpoints": use_early_checkpoints,
            "plans": {ledger.stages[k].name: p.describe(ledger) for k, p in plans.items()},
            "steps_run": cost,
            "replay_steps": total,
            "cost_fraction": cost / total if total else 0.0,
            "seconds": seconds,
        }
    }
    _MEMO.clear()
    if reusing():  # kept for the other read-out of this attribution only (estimators.reusing_replays)
        _MEMO.update(key=key, indices=tuple(indices), embeddings=emb, stage_fns=stage_fns)
    return emb


#: what :meth:`_PartialReplayMixin.embeddings` reads
PARTIAL_REPLAY_OPTIONS = frozenset({
    "budget", "budget_unit", "stage_fns", "allow_identity_propagation", "use_checkpoints", "carry", "loss_fns",
    "curvature_options", "carry_moments", "use_early_checkpoints", "factual", "ref_models", "reward_funcs",
})  # fmt: skip


class _PartialReplayMixin:
    """Options: ``budget`` (default 0.25, a fraction of replay's cost in [0, 1]), ``budget_unit`` (``"steps"`` or
    ``"lr-mass"``), ``stage_fns`` (step-limited form, see :mod:`~.replay`), ``carry`` (``"aa-linear"`` or
    ``"aa-ggn"``, with ``loss_fns`` and ``curvature_options``), ``use_checkpoints``, ``carry_moments``,
    ``use_early_checkpoints`` (default True), ``allow_identity_propagation``, ``ref_models`` and ``reward_funcs``
    (``{stage name: ...}`` for stages replayed from replay data, as for ``replay``), plus the read-out's options
    (``per_example``, ``check_model``, ``prepare_behavior``)."""

    kind = "partial-replay"
    per_stage_work = True
    additive_diagnostics = FiniteDifferenceEstimator.additive_diagnostics | {"steps_run", "replay_steps"}
    ratio_diagnostics = {"cost_fraction": ("steps_run", "replay_steps")}

    def stage_work(self, ledger, index, options):
        """The recorded cost (:func:`~.replay.step_costs`) of the steps the plan of stage ``index`` replays, per
        branch."""
        costs = step_costs(ledger)
        legs = _planned(ledger, index, options).legs
        return sum((1 if leg.one_branch else 2) * leg.steps * costs[leg.index] for leg in legs)

    def embeddings(self, ledger, stages, options, model):
        return partial_replay_embeddings(
            ledger, model, stages,
            budget=options.get("budget", DEFAULT_BUDGET), budget_unit=options.get("budget_unit", "steps"),
            stage_fns=options.get("stage_fns"),
            allow_identity_propagation=bool(options.get("allow_identity_propagation", False)),
            use_checkpoints=bool(options.get("use_checkpoints", False)),
            carry=options.get("carry", "aa-linear"), loss_fns=options.get("loss_fns"),
            curvature_options=options.get("curvature_options"),
            carry_moments=bool(options.get("carry_moments", True)),
            use_early_checkpoints=bool(options.get("use_early_checkpoints", True)),
            factual=options.get("factual", "replay"),
            ref_models=options.get("ref_models"), reward_funcs=options.get("reward_funcs"),
        )  # fmt: skip

    def prepare(self, ledger, stages=None, model=None, **options):
        """Validate the budget and cache the ``aa-linear`` embeddings of the stages the plans leave to propagation
        (:func:`propagated_embeddings`); the replays need the stage functions, so they run in ``estimate``. The
        attributor prepares on the main process first: processes that attribute different stages then read the
        cache, and none writes it beside another (which left a process reading another's file without its stage)."""
        check_budget(options.get("budget", DEFAULT_BUDGET), options.get("budget_unit", "steps"))
        indices = [s.index for s in resolve_stages(ledger, stages)]
        replayed = {k for k in indices if _planned(ledger, k, options).legs}
        propagated_embeddings(ledger, indices, replayed, bool(options.get("allow_identity_propagation", False)))


def _planned(ledger: LedgerCore, index: int, options: Mapping[str, Any]) -> PartialReplayPlan:
    """The plan of stage ``index`` under the estimator's ``options`` (as :func:`partial_replay_embeddings` plans)."""
    unit = options.get("budget_unit", "steps")
    return plan_partial_replay(
        ledger, index, check_budget(options.get("budget", DEFAULT_BUDGET), unit), unit,
        bool(options.get("use_checkpoints", False)), bool(options.get("use_early_checkpoints", True)),
        options.get("factual", "replay"),
    )  # fmt: skip


@register
class PartialReplay(_PartialReplayMixin, FiniteDifferenceEstimator):
    """``f(θ_K) − f(θ_K − v_k)`` with ``v_k`` from a partial replay of the next stage(s) (module docstring).

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("partial-replay").name
        'partial-replay'
    """

    name = "partial-replay"
    options = COMMON_OPTIONS | PARTIAL_REPLAY_OPTIONS | {"step_scale"}
    description = (
        "Replay the first part of the next stage(s) from both starts (a budget, fraction of replay's cost), carry "
        "the difference on with the aa-linear rules, read out by finite difference."
    )


@register
class PartialReplayLinear(_PartialReplayMixin, LinearEstimator):
    """``∇f(θ_K) · v_k`` with ``v_k`` from a partial replay of the next stage(s) (module docstring).

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("partial-replay-linear").name
        'partial-replay-linear'
    """

    name = "partial-replay-linear"
    options = COMMON_OPTIONS | PARTIAL_REPLAY_OPTIONS | {"per_example"}
    description = "As partial-replay, read out linearly (gradient at the final model · v_k)."


__all__ = [
    "DEFAULT_BUDGET",
    "PartialReplay",
    "PartialReplayEmbeddings",
    "PartialReplayLinear",
    "PartialReplayPlan",
    "check_budget",
    "partial_replay_embeddings",
    "plan_partial_replay",
]
