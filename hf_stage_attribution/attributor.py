"""``StageAttributor``: attribute behaviors to training stages on one process or many (Accelerate).

Behavior examples are split across processes (``split_between_processes``), each process runs the estimator on
its share, and per-example effects are gathered back in input order; means are taken over the gathered values,
so 2 processes give the answer of 1. Stage embeddings are computed once, on the main process, cached beside the
ledger, and then streamed tensor by tensor by every process. A replaying estimator (replay, partial and strided
replay), whose cost is the re-run training, splits the *stages* instead (:func:`stage_owners`): each process runs
its stages' replays over every example, so each replay runs once in all, in one process, as it would alone.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from . import estimators
from ._internal.hashing import values_checksum
from ._internal.memory import release_freed_memory, size_heap_for
from ._internal.model_state import attention_switched, swapped_parameters, without_accelerate_wrapper
from ._internal.notices import notice
from ._internal.params import rounded_digests
from ._internal.precision import float32_working_model, half_precision_dtype, precision_description
from ._internal.reuse import reusing_replays
from .behaviors import as_behavior
from .behaviors.base import needs_preparing
from .errors import BehaviorError, ReportError, StageAttributionError, did_you_mean
from .estimators.base import check_finite, eval_mode, evaluate, merge_diagnostics
from .estimators.curvature.config import CurvatureConfig, resolve_curvature
from .estimators.fidelity import fidelity
from .estimators.partial_replay import check_budget
from .estimators.replay import check_replayable, replay_inputs, replay_needs
from .estimators.second_opinion import DEFAULT_SECOND_OPINION, REPLAY, check_second_opinion
from .estimators.selection import PARTIAL_REPLAY_BUDGET, choice_inputs
from .integrations.replay import replays_each_alone
from .ledger import StageLedger
from .report.attribution import AttributionReport
from .report.build import FD_READINGS, ledger_summary, min_resamples, ordered_union

#: how a model with bf16/fp16 weights is evaluated (``StageAttributor(half_precision=...)``)
HALF_PRECISION_MODES = ("float32-copy", "native")

# linear estimator ↔ its finite-difference reading (ESTIMATORS.md §4 "linearisation gap")
_PAIRED = {
    "delta-linear": "delta-fd",
    "delta-fd": "delta-linear",
    "aa-linear": "aa-fd",
    "aa-fd": "aa-linear",
    "aa-ggn": "aa-ggn-fd",
    "aa-ggn-fd": "aa-ggn",
    "aa-hvp": "aa-hvp-fd",
    "aa-hvp-fd": "aa-hvp",
    # the two read-outs of the same memoised partial-replay embeddings: the second costs a read-out, not a replay
    "partial-replay": "partial-replay-linear",
    "partial-replay-linear": "partial-replay",
}


def _state():
    """Accelerate's process state. Without an accelerator, ``cpu=True`` makes a torchrun / ``accelerate launch``
    world of N processes a gloo process group (a plain ``PartialState()`` would see a single process there).

    Accelerate's state is shared by the process: if the caller initialised it first (a plain ``PartialState()``
    on a machine without an accelerator), that single-process state is what the attributor gets. When the
    environment says ``WORLD_SIZE > 1`` but one process is seen, a warning says so: every process would attribute
    every example alone."""
    from accelerate import PartialState

    state = PartialState(cpu=not _has_accelerator())
    world = _env_world_size()
    if world > 1 and state.num_processes == 1:
        warnings.warn(
            f"WORLD_SIZE={world} in the environment, but the attributor sees 1 process (accelerate's state was "
            f"initialised as {state.distributed_type!s} before it, e.g. by a plain PartialState() on a machine "
            "without an accelerator), so each of the launched processes attributes every example alone. "
            "Initialise PartialState(cpu=True) first (or leave it to the attributor), or launch one process.",
            UserWarning,
            stacklevel=3,
        )
    return state


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


class StageAttributor:
    """Estimate how much each recorded stage moved each behavior of the final model.

    Args:
        ledger: a :class:`StageLedger` or its directory.
        model: the final model θ_K (a plain ``nn.Module``, ``PreTrainedModel`` or ``PeftModel``).
        estimator: a registry name (``estimators.names()``); ``"auto"`` picks ``delta-fd`` when a later stage was
            imported from checkpoints without optimizer information, else ``partial-replay`` where every later stage
            can be re-run step by step (replay data or ``stage_fns``), else ``aa-ggn-fd`` where the ledger holds
            curvature material that fits in memory, else ``aa-fd`` (``estimators.selection``; the report says which
            and why).
        stage_fns: ``{stage name: fn(model)}`` that re-train a model in place as that stage did (replay); partial
            replay needs them to stop early: a ``max_steps`` keyword, or a ``callbacks`` keyword handed to their
            ``Trainer`` (``estimators.replay``'s step-limited and callback forms).
        loss_fns: ``{stage name: loss}`` for curvature products of stages recorded in another process.
        diagnostics: also compute f(θ_0) (total change, interaction residual), the paired linear/finite-difference
            estimator (linearisation gap; not with ``attribute(..., validate=True)``, where replay measures the
            estimate's error itself) and the second opinion of the trust verdicts.
        second_opinion: what the trust verdicts check the estimate against (with ``diagnostics=True``): ``"auto"``
            (:func:`estimators.choose_second_opinion`: replay itself for a replaying estimate where every later
            stage can be re-run whole, so the attribution runs as with ``validate=True`` and the verdicts say
            "verified by replay" or how replay disagrees; else task-vector negation), ``"delta-fd"`` (task-vector
            negation: one evaluation per stage, the cheap check, no replay), ``"replay"`` (replay wherever it can
            run, for any estimator), or ``"strided-replay"`` / ``"partial-replay"`` (the other replay family at
            the same budget, where it applies). Replay as the check costs one replay beside the estimate; a replay
            family re-runs every later stage in two branches, about as long or longer (``BENCHMARKS.md`` §8, §9).
        estimator_options: extra keyword arguments for the estimator (e.g. ``allow_identity_propagation=True``, or
            ``budget=0.1`` for partial replay); a name the estimator does not read is refused (``auto`` takes the
            options of every estimator it can pick).
        curvature: settings of the curvature-aware propagation (``aa-ggn``/``aa-hvp``), e.g.
            ``CurvatureConfig.cheap()``; replaces ``estimator_options={"curvature_options": {...}}`` (deprecated).
        ref_models: ``{stage name: reference model}`` for DPO/KTO stages whose reference replay cannot rebuild (a
            separate model that is not at its recorded path any more; for a distillation stage, its teacher); every
            estimator that replays a stage from its replay data uses them (replay, partial and strided replay).
        half_precision: a model with bf16/fp16 weights is evaluated on a float32 copy (``"float32-copy"``, the
            default: bf16 evaluations round every activation, and finite differences of them are noise for small
            effects) or in its own dtype (``"native"``: no copy, for a model whose float32 copy does not fit in
            memory; the report says the estimates carry that noise). Replays train in the model's dtype either way.
        reward_funcs: ``{stage name: reward functions}`` (what the stage's ``GRPOTrainer``/``RLOOTrainer``/
            ``OnlineDPOTrainer`` took as ``reward_funcs``: callables, reward models or their paths): a ledger holds
            no Python functions, so without them a GRPO/RLOO/OnlineDPO stage cannot be replayed from its replay
            data, and ``auto`` does not pick partial replay for a ledger that has one after the first stage.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageAttributor, StageLedger
        >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ledger = StageLedger(tempfile.mkdtemp())
        >>> for name in ("a", "b"):
        ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
        ...         opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> report = StageAttributor(ledger, model, estimator="delta-fd").attribute(
        ...     {"output": lambda m: m(torch.eye(2)).reshape(-1)})
        >>> [row.stage for row in report.rows]
        ['a', 'b']
    """

    def __init__(
        self,
        ledger: StageLedger | str | os.PathLike,
        model: torch.nn.Module,
        estimator: str = "auto",
        stage_fns: Mapping[str, Callable] | None = None,
        *,
        loss_fns: Mapping[str, Any] | None = None,
        diagnostics: bool = True,
        n_resamples: int = 1000,
        seed: int = 0,
        check_model: bool = True,
        show_progress: bool = True,
        estimator_options: Mapping[str, Any] | None = None,
        curvature: CurvatureConfig | None = None,
        ref_models: Mapping[str, Any] | None = None,
        second_opinion: str = "auto",
        reward_funcs: Mapping[str, Any] | None = None,
        half_precision: str = "float32-copy",
    ) -> None:

        self.ledger = ledger if isinstance(ledger, StageLedger) else StageLedger.load(ledger)
        if not self.ledger.stages:
            raise ReportError(f"The ledger at {self.ledger.dir} has no stages to attribute.")
        self.model = model
        self.estimator_name = estimator
        self.estimator = estimators.get(estimator)
        self.stage_fns = dict(stage_fns or {})
        self.loss_fns = dict(loss_fns or {})
        self.diagnostics = diagnostics
        self.second_opinion = check_second_opinion(second_opinion)
        self.n_resamples = _check_int(
            "n_resamples", n_resamples, minimum=min_resamples(0.95), example="n_resamples=1000"
        )
        self.seed = _check_int("seed", seed, minimum=None, example="seed=0")
        self.show_progress = show_progress
        self.estimator_options = dict(estimator_options or {})
        if "budget" in self.estimator_options or "budget_unit" in self.estimator_options:
            # before any work, and also where `auto` picks an estimator without a budget (it would drop it silently)
            check_budget(self.estimator_options.get("budget", 0.0), self.estimator_options.get("budget_unit", "steps"))
        settings = resolve_curvature(curvature, self.estimator_options.pop("curvature_options", None))
        # a misspelt or misplaced option was ignored silently (budgt=0.1 ran at the default budget); the curvature
        # settings are checked by resolve_curvature and go wherever a curvature-aware propagation runs
        estimators.check_options(estimator, self.estimator_options)
        if settings:
            self.estimator_options["curvature_options"] = settings
        self.ref_models = dict(ref_models or {})
        self.reward_funcs = dict(reward_funcs or {})
        self.state = _state()
        if half_precision not in HALF_PRECISION_MODES:
            raise ReportError(
                f"Expected half_precision to be one of {', '.join(map(repr, HALF_PRECISION_MODES))}, got "
                f"{half_precision!r}: 'float32-copy' evaluates a bf16/fp16 model on a float32 copy (exact, one "
                "float32 model of memory more), 'native' in its own dtype (no copy; rounding noise in the estimates)."
            )
        self.half_precision = half_precision
        self.check_model = check_model
        self._check_inputs_against_ledger()
        self._use_model(model)

    def _check_inputs_against_ledger(self) -> None:
        names = [s.name for s in self.ledger.stages]
        _check_stage_names("stage_fns", self.stage_fns, names)
        _check_stage_names("ref_models", self.ref_models, names)
        _check_stage_names("reward_funcs", self.reward_funcs, names)
        _check_stage_names("loss_fns", self.loss_fns, names)

    def _use_model(self, model: torch.nn.Module) -> None:
        """Check ``model`` against the ledger's final state and set up what the attribution evaluates: a view without
        accelerate's autocast wrapper, or a float32 copy of half-precision weights. Remembers a checksum of
        ``model`` so that :meth:`attribute` can tell when its weights changed in place since."""
        #: the tensors check_model found to be θ_K exactly (None: not checked), which _rounded_digests need not hash
        self._exact = self.ledger.check_model(model) if self.check_model else None
        self._user_model = model
        self._checked = (self.ledger.fingerprint, _fingerprint(model))
        self._rounded: dict[str, dict[str, str]] | None = None  # the model's rounded digests (_rounded_digests)
        #: the report's note when the model's weights are half precision (the attribution then runs on a float32 copy)
        self.precision_note = ""
        half = half_precision_dtype(model)
        name = str(half).replace("torch.", "")
        if half is not None and self.half_precision == "native":
            self.precision_note = (
                f"The model's weights are {name} and were evaluated in {name} (half_precision='native', no float32 "
                "copy): finite differences and replay's differences carry its rounding noise, which can swamp small "
                "effects; half_precision='float32-copy' (the default) evaluates them in float32."
            )
        if half is None or self.half_precision == "native":
            # accelerate's autocast wrapper, left on the object a Trainer(bf16=True) trained, would evaluate it under
            # bf16 autocast: evaluate a view without it (same parameters, the user's model unchanged)
            self.model = without_accelerate_wrapper(model)
        else:
            self.model = float32_working_model(model)  # a clean copy: no wrapper
            self.precision_note = (
                f"The model's weights are {name}: the attribution ran on a float32 copy of them (exact: the ledger's "
                f"states are float32), so behaviors were evaluated and finite differences taken in float32 (in {name} "
                f"their rounding noise swamps small effects); replays trained in {name}, as the stages did."
            )
            if self.state.is_main_process:
                notice(
                    f"the model's weights are {name}: attributing on a float32 copy (memory: one float32 model more)",
                    routine=False,
                )

    def _refresh(self) -> None:
        """Before each :meth:`attribute`: the ledger as it is on disk now, and the model checked against it again
        where either changed since the last check. A stage recorded into the same folder after this attributor was
        made (through another ``StageLedger`` object or a ``StageRecorder``), or the model trained further in place,
        was attributed with the old ledger and the old check: a 4-stage ledger read as its first 3, effects of the
        wrong sign, no error."""
        if self.ledger.refresh():  # in place: keeps the loss functions registered in this process
            if self.state.is_main_process:
                notice(
                    f"the ledger at {self.ledger.dir} changed since this attributor was made (now "
                    f"{len(self.ledger.stages)} stages: {', '.join(s.name for s in self.ledger.stages)}): attributing "
                    "it as it is now",
                    routine=False,
                )
            self._check_inputs_against_ledger()
        if self._checked != (self.ledger.fingerprint, _fingerprint(self._user_model)):
            self._use_model(self._user_model)

    # --- public ------------------------------------------------------------------------------------------

    def attribute(
        self,
        behaviors: Mapping[str, Any],
        stages: Sequence[int | str] | int | str | None = None,
        *,
        validate: bool = False,
    ):
        """Attribute every behavior in ``{name: behavior}`` to the stages; returns an :class:`AttributionReport`.

        ``stages`` limits the attribution to those stages (names or indices; one name or index alone is one stage);
        ``None`` attributes every stage.

        ``validate=True`` also runs replay (the ground truth, ESTIMATORS.md §2) and adds fidelity figures; so does
        the default check of a replaying estimate where every later stage can be re-run (``second_opinion``).
        Every behavior gets a trust verdict (:meth:`AttributionReport.trust`): from replay when it ran, else from
        the agreement of the estimator with its linear/finite-difference sibling and with a second opinion, both run
        with ``diagnostics=True``: task-vector negation (``delta-fd``), or the check asked for with
        ``second_opinion`` (:func:`estimators.choose_second_opinion` says which and why). Beside a
        finite-difference estimate the sibling skips the ledger's last stage, where f(θ_K) − f(θ_K − Δ_K) is replay
        itself (``report/trust.py``). The final model is evaluated once for all of them (and for replay and the total
        change): every estimator that reads ``f(θ_K)`` is served the same values.
        """
        self._refresh()
        # forward-mode autodiff (per-example linear effects) has no rule for CPU SDPA kernels: eager attention for
        # the attribution only; the user's model gets its own implementation back afterwards
        # a replay's result serves the other read-out of this attribution, and is dropped with it (user stage functions
        # can change between calls)
        with attention_switched(self.model, "eager"), reusing_replays():
            return self._attribute(behaviors, stages, validate)

    def _attribute(self, behaviors: Mapping[str, Any], stages: Any, validate: bool):
        if not isinstance(behaviors, Mapping):
            raise BehaviorError(
                "Expected behaviors as a {name: behavior} mapping (e.g. {'toxicity': behavior}), found a "
                f"{type(behaviors).__name__}. Name each behavior in a dict; the names label the report's rows."
            )
        if not behaviors:
            raise BehaviorError("No behaviors to attribute: pass a non-empty {name: behavior} mapping.")
        stage_objs = (
            list(self.ledger.stages) if stages is None else [self.ledger.stage(s) for s in _stage_list(stages)]
        )
        counts = Counter(s.index for s in stage_objs)
        repeated = sorted({s.name for s in stage_objs if counts[s.index] > 1})
        if repeated:  # found before the estimation, not when the report is built
            raise ReportError(
                f"Expected each stage once in stages={stages!r}, found {', '.join(map(repr, repeated))} more than "
                "once (by name or by index). Name each stage once."
            )
        prepared = {name: as_behavior(b, name=name) for name, b in behaviors.items()}
        for behavior in prepared.values():
            if needs_preparing(behavior, self.model):  # not prepared yet, or on a model with other weights
                behavior.prepare(self.model)
        stage_names = [s.name for s in stage_objs]
        options = self._options()
        size_heap_for(sum(t.numel() * t.element_size() for t in self.model.parameters()))
        release_freed_memory()  # model-sized buffers come and go: return them to the system, or peaks add up
        if validate or self.estimator_name == "replay":  # before any work: every stage replay needs can be re-run
            check_replayable(
                self.ledger, [s.index for s in stage_objs], self.stage_fns, self.ref_models, self.reward_funcs
            )
        self._announce_choice(options)
        self._precompute(self.estimator, options, stage_names)

        # All behaviors are evaluated together (one concatenated behavior), so each estimator runs once:
        # one set of JVPs / finite differences / replayed pipelines serves every behavior.
        if self.state.num_processes > 1:  # every process must attribute the same thing, or the gathered rows mix
            _check_same_inputs(prepared, stage_names, self.ledger.fingerprint, self.estimator_name, self.state)
        locals_ = {name: self._local(behavior) for name, behavior in prepared.items()}
        # a behavior that cannot be split (a bare f(model)) is evaluated whole in every process: not gathered
        unsplit = {name for name, b in prepared.items() if not getattr(b, "splittable", False)}
        joint = _Joint(locals_, unsplit if self.state.num_processes > 1 else set())
        first = min(s.index for s in stage_objs)
        # a replaying estimator's work is split by stage, over every example, where each replay runs in one process
        # (not where a stage replays as recorded across the processes: every process must then run it together)
        if self.state.num_processes > 1 and replays_each_alone(self.ledger.stages[first + 1 :]):
            joint.whole, joint.stages = _Joint(prepared, set(prepared)), stage_objs
        runs = ["main"]
        resolved = self._resolved_name(options, stage_names)
        second = self._second_opinion(resolved, options, stage_objs, validate) if self.diagnostics else None
        if second == REPLAY:  # replay checks the estimate: the attribution runs as with validate=True
            validate, second = True, None
        # with validate, replay decides every verdict and measures the estimate's error itself: the sibling (a
        # forward-mode pass per example beside a finite-difference estimate) is not run (SmolLM2-135M, validate:
        # 133.2 s -> 124.2 s)
        paired = _PAIRED.get(resolved) if self.diagnostics and not validate else None
        # A finite-difference reading of the ledger's last stage is replay itself: its linear sibling's reading there
        # would only measure the linear read-out's own error, which the verdict does not use (report/trust.py)
        last = self.ledger.stages[-1].name
        paired_stages = [s for s in stage_names if s != last] if resolved in FD_READINGS else stage_names
        paired = paired if paired_stages else None
        runs += [paired] if paired else []
        if second and second not in (resolved, paired):
            runs.append(second)
        runs += ["replay"] if validate else []
        progress = self._progress(len(runs) + int(self.diagnostics), "estimators")
        results = self._run(self.estimator, joint, stage_names, options)
        for note in [self.precision_note, _training_precision_note(self.ledger)]:
            if note:
                for result in results.values():
                    result.approximations = [*result.approximations, note]
        alternates: dict[str, dict] = {}
        for name in runs[1:]:
            if progress is not None:
                progress.update(1)
            try:
                split = self._run_named(name, joint, paired_stages if name == paired else stage_names, options)
            except StageAttributionError:
                if name != DEFAULT_SECOND_OPINION:
                    raise
                continue  # task-vector negation does not apply to this ledger: the verdict goes without it
            alternates[name] = {b: r.per_example for b, r in split.items()}
        totals = self._total_change(joint) if self.diagnostics else {}
        if progress is not None:
            progress.close()
        replay = alternates.pop("replay", {})
        if not replay and _replayed_everything(results):
            # a partial replay whose budget replayed every later stage whole *is* replay (a test pins the equality):
            # its verdict is "verified", not the disagreement of its linear read-out or of task-vector negation
            replay = {name: result.per_example for name, result in results.items()}

        first = next(iter(results.values()))
        fidelity = self._fidelity(results, replay, stage_names) if validate else None
        ledger = ledger_summary(self.ledger)
        if ledger.get("final_digests"):  # a card beside a bfloat16/float16 save of this model can check it too
            ledger["final_digests_rounded"] = self._rounded_digests(ledger["final_digests"])
        if not replay:  # what would settle the verdicts: the card and the CLI say it (report.ledger["replay_needs"])
            needs = replay_needs(
                self.ledger, [s.index for s in stage_objs], self.stage_fns, self.ref_models, self.reward_funcs
            )
            ledger["replay_needs"] = needs.to_dict()
        return AttributionReport.from_estimates(
            results,
            estimator=first.estimator,
            estimator_reason=getattr(first, "reason", "") or "",
            stages=stage_objs,
            behaviors=prepared,
            total_change=totals or None,
            alternates=({**alternates, **({"replay": replay} if replay else {})}) or None,
            fidelity=fidelity,
            replay=replay or None,  # per-stage ground truth shown beside each estimate (ReportRow.replay_effect)
            ledger=ledger,
            n_resamples=self.n_resamples,
            seed=self.seed,
        )

    # --- internals ---------------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        # the model was checked once in __init__ and behaviors are prepared in attribute()
        options = {"check_model": False, "prepare_behavior": False, **self.estimator_options}
        if self.stage_fns:
            options.setdefault("stage_fns", self.stage_fns)
        if self.ref_models:
            options.setdefault("ref_models", self.ref_models)
        if self.reward_funcs:
            options.setdefault("reward_funcs", self.reward_funcs)
        if self.precision_note:  # said in the report: the estimators need not warn about a half-precision model
            options["precision_noted"] = True
        if self.loss_fns:
            options.setdefault("loss_fns", self.loss_fns)
        return options

    def _announce_choice(self, options: Mapping[str, Any]) -> None:
        """``auto``: say on the console which estimator the default rule picked and why, before any work (the reason
        is also in the report's files and the card)."""
        if self.estimator_name != "auto" or not self.state.is_main_process:
            return
        chosen, reason = estimators.choose_estimator(
            self.ledger,
            options.get("loss_fns"),
            options.get("stage_fns"),
            **choice_inputs(options),
        )
        notice(f"estimator auto -> {chosen}: {reason}", routine=False)

    def _second_opinion(
        self, resolved: str, options: Mapping[str, Any], stages: list[Any], validate: bool
    ) -> str | None:
        """The estimator the trust verdict checks ``resolved`` against (:func:`estimators.choose_second_opinion`):
        replay itself for a replaying estimate where every later stage can be re-run (``"replay"``: the attribution
        then runs as with ``validate``), else task-vector negation, or the check asked for. None with ``validate``:
        replay decides every verdict, and the report keeps no other estimator's values beside it (task-vector
        negation was run there until 2026-12-07 and its values were dropped: 0.01–0.34 × replay's time on the
        benchmarks, BENCHMARKS.md §8)."""
        if validate:
            return None
        budget = options.get("budget", PARTIAL_REPLAY_BUDGET)
        name, reason = estimators.choose_second_opinion(
            self.ledger,
            resolved,
            [s.index for s in stages],
            options.get("stage_fns"),
            budget,
            self.second_opinion,
            **replay_inputs(options),
        )
        if (name != DEFAULT_SECOND_OPINION or self.second_opinion != "auto") and self.state.is_main_process:
            # a replaying check costs about one replay: said even where routine notices are held back (the CLI)
            notice(f"trust verdicts: {reason}", routine=name == DEFAULT_SECOND_OPINION)
        return name

    def _rounded_digests(self, recorded: dict[str, str]) -> dict[str, dict[str, str]]:
        """The digests of the user's model rounded to bfloat16 and float16, for the tensors that are the recorded final
        model (``_internal/params.rounded_digests``: a half-precision model's own tensors where ``check_model``
        checked them; at 135M parameters 1.3–1.4 s, so once per checked model)."""
        if self._rounded is None:
            self._rounded = rounded_digests(
                self._user_model, recorded, half_checked=self.check_model, exact=self._exact
            )
        return self._rounded

    def _resolved_name(self, options: Mapping[str, Any], stage_names: list[str]) -> str:
        return getattr(self._resolved(self.estimator, options), "name", self.estimator_name)

    def _resolved(self, estimator: Any, options: Mapping[str, Any]) -> Any:
        """The estimator that runs: ``auto`` resolved as its ``estimate`` resolves it (with ``stage_fns``, the
        replay inputs and the budget), any other estimator itself."""
        resolve = getattr(estimator, "resolve", None)
        if not callable(resolve):
            return estimator
        return resolve(self.ledger, options.get("loss_fns"), options.get("stage_fns"), **choice_inputs(options))

    def _precompute(self, estimator: Any, options: Mapping[str, Any], stage_names: list[str]) -> None:
        """Compute and cache stage embeddings on the main process first; the others then read the cache.

        ``auto`` is resolved here as :meth:`attribute` resolves it (with ``stage_fns``), so only the embeddings of
        the estimator that will run are computed (without them, a replayable ledger with curvature material had
        ``aa-ggn`` embeddings precomputed for a ``partial-replay`` run)."""
        estimator = self._resolved(estimator, options)
        prepare = getattr(estimator, "prepare", None)
        if not callable(prepare):
            return
        if self.state.is_main_process:
            prepare(self.ledger, stages=stage_names, model=self.model, **_embedding_options(options))
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            prepare(self.ledger, stages=stage_names, model=self.model, **_embedding_options(options))

    def _local(self, behavior: Any) -> Any:
        """This process's share of the behavior's examples (None when it has none)."""
        if self.state.num_processes == 1 or not getattr(behavior, "splittable", False):
            return behavior
        indices = list(range(len(behavior)))
        with self.state.split_between_processes(indices) as mine:
            mine = list(mine)
        return behavior.select(mine) if mine else None

    def _run(self, estimator: Any, joint: _Joint, stage_names: list[str], options: Mapping[str, Any]) -> dict:
        """Run ``estimator`` on this process's examples; ``{behavior: result}`` gathered in input order.

        A replaying estimator (:attr:`~.estimators.base.Estimator.per_stage_work`) under several processes runs
        instead on this process's stages (:func:`stage_owners`) and every example: each replay runs in one process,
        as it would alone, and the numbers are those of one process at the same thread count."""
        resolved = self._resolved(estimator, options)
        if joint.whole is not None and getattr(resolved, "per_stage_work", False):
            # shared out over every attributed stage, so that an estimator's two read-outs (the finite-difference
            # estimate and, for the verdict, its linear sibling on fewer stages) give a stage to the same process,
            # which replays it once for both (estimators.reusing_replays)
            work = {s.name: resolved.stage_work(self.ledger, s.index, options) for s in joint.stages}
            owners = stage_owners(work, self.state.num_processes)
            mine = [s for s in stage_names if owners[s] == self.state.process_index]
            result, error = None, None
            if mine:
                try:
                    result = estimator.estimate(self.ledger, self.model, joint.whole, stages=mine, **options)
                except Exception as exc:  # raised in every process (below), not left waiting for this one
                    error = exc
                release_freed_memory()
            merge = getattr(resolved, "merge_diagnostics", merge_diagnostics)
            return _gathered_by_stage(result, error, joint.whole, stage_names, merge, self.state)
        local_result = None
        if joint.parts:
            local_result = estimator.estimate(self.ledger, self.model, joint, stages=stage_names, **options)
            release_freed_memory()
        return _gathered(local_result, joint, stage_names, self.state)

    def _run_named(self, name: str, joint: _Joint, stage_names: list[str], options: Mapping[str, Any]) -> dict:

        estimator = estimators.get(name)
        self._precompute(estimator, options, stage_names)
        return self._run(estimator, joint, stage_names, options)

    def _total_change(self, joint: _Joint) -> dict[str, torch.Tensor]:
        """Per-example f_i(θ_K) − f_i(θ_0) of every behavior, gathered."""

        local: dict[str, list[float]] = {name: [] for name in joint.names}
        if joint.parts:
            final = joint.split(joint.cached_final_values(self.model))
            with torch.no_grad(), eval_mode(self.model), swapped_parameters(self.model, self.ledger.initial_state()):
                initial = joint.evaluate_parts(self.model)
            local.update({name: (final[name] - initial[name].to(torch.float64)).tolist() for name in final})
        return {
            name: torch.tensor(
                values if name in joint.unsplit else _gather_list(values, self.state), dtype=torch.float64
            )
            for name, values in local.items()
        }

    def _fidelity(self, results: Mapping[str, Any], replay: Mapping[str, Any], stage_names: list[str]) -> dict:

        estimates = {(s, b): results[b].per_example[s] for b in results for s in stage_names}
        truth = {(s, b): replay[b][s] for b in replay for s in stage_names}
        last = self.ledger.stages[-1].name
        return fidelity(estimates, truth, terminal_stage=last)

    def _progress(self, total: int, unit: str):
        if not self.show_progress or not self.state.is_main_process or total < 2:
            return None

        return tqdm(total=total, unit=unit, desc="attributing", leave=False)


def _check_int(name: str, value: Any, *, minimum: int | None, example: str) -> int:
    """``value`` as an int, or ReportError naming the argument, what it expected and what it found.

    Example:
        >>> _check_int("seed", 3, minimum=None, example="seed=0")
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ReportError(
            f"Expected {name} to be an integer (e.g. {example}), found {type(value).__name__} {value!r}. Pass a "
            "whole number."
        )
    if minimum is not None and value < minimum:
        raise ReportError(f"Expected {name} to be at least {minimum} (e.g. {example}), found {value}.")
    return int(value)


def _check_stage_names(what: str, given: Mapping[str, Any], stages: list[str]) -> None:
    """ReportError when ``given`` (``stage_fns``, ``ref_models``, ``reward_funcs``, ``loss_fns``) names a stage the
    ledger does not have: a misspelt name would leave the real stage without its function, found only later (or
    never).

    Example:
        >>> _check_stage_names("stage_fns", {"sft": print}, ["pretraining", "sft"])
    """
    unknown = [name for name in given if name not in stages]
    if unknown:
        hint = did_you_mean(str(unknown[0]), stages)
        raise ReportError(
            f"Expected {what} keyed by the ledger's stage names ({', '.join(map(repr, stages))}), found "
            f"{', '.join(map(repr, unknown))}, which the ledger does not have.{hint} Fix the name(s)."
        )


def _stage_list(stages: Any) -> list[int | str]:
    """``stages`` as a list of names/indices: one name or index alone counts as one stage; empty is refused.

    Example:
        >>> _stage_list("sft"), _stage_list(["sft", 2])
        (['sft'], ['sft', 2])
    """
    if isinstance(stages, str | int) and not isinstance(stages, bool):
        return [stages]
    if not isinstance(stages, Sequence | set | frozenset) or isinstance(stages, bytes):
        raise ReportError(
            f"Expected stages to be stage names or indices (a list such as ['sft', 'dpo'], or one name), found "
            f"{type(stages).__name__} {stages!r}."
        )
    if not stages:
        raise ReportError(
            "Expected stages to name at least one stage, found an empty list. Name the stages (e.g. ['sft']), or "
            "pass stages=None to attribute every stage."
        )
    return list(stages)


def _replayed_everything(results: Mapping[str, Any]) -> bool:
    """Whether a partial- or strided-replay result replayed every later stage of every attributed stage whole
    (budget 1): its diagnostics' ``cost_fraction`` (run ÷ replay's steps or passes, 0 when replay runs none) is 1."""
    first = next(iter(results.values()), None)
    diagnostics = getattr(first, "diagnostics", None) or {}
    plan = diagnostics.get("partial_replay") or diagnostics.get("strided_replay") or {}
    return plan.get("cost_fraction") == 1.0


def _embedding_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in options.items()
        if k not in ("stage_fns", "check_model", "prepare_behavior", "ref_models", "reward_funcs", "precision_noted")
    }


def _gather_list(values: list[float], state: Any) -> list[float]:
    if state.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return list(gather_object(list(values)))


class _Joint:
    """Several behaviors evaluated as one: values are concatenated in a fixed order and split back afterwards.

    Each part is checked on its own, so an error names the behavior that produced it.
    """

    name = "behaviors"
    splittable = False

    def __init__(self, locals_: Mapping[str, Any], unsplit: set[str] | None = None) -> None:
        self.names = list(locals_)
        self.unsplit = set(unsplit or ())  # evaluated whole in every process: their values are not gathered
        self.parts = {name: b for name, b in locals_.items() if b is not None}
        self.sizes: dict[str, int] = {}
        self._kept: dict[tuple, torch.Tensor] = {}  # fingerprint of the parameters -> values, oldest first
        #: under several processes: every behavior whole, and the attributed stages, for a replaying estimator's
        #: work split by stage (:meth:`StageAttributor._run`)
        self.whole: _Joint | None = None
        self.stages: list[Any] = []

    def cached_values(self, model: torch.nn.Module, where: str = "evaluated on the final model") -> torch.Tensor:
        """The values of every part at the parameters ``model`` holds now (float64, concatenated), evaluated once per
        distinct parameter state of one ``attribute()`` and served again whenever the model holds the same numbers.

        The key is a weighted float64 checksum of each parameter and buffer tensor, with where it lives (a model
        left shifted, or another model, is evaluated anew). It serves ``f(θ_K)`` to the estimator, its second
        opinions, replay and the total change, and the finite-difference read-outs' shifted states
        (``estimators.base.evaluate_shifted``): every estimate leaves the last stage out as ``θ_K − Δ_K`` with the
        same recorded tensors, so the estimate and its check evaluate that state once between them. Only states the
        plain forward evaluates are asked for (not, say, a model with an adapter disabled). At most
        :data:`KEPT_STATES` states are kept (a few floats per example each)."""
        key = _fingerprint(model)
        values = self._kept.pop(key, None)
        if values is None:
            with eval_mode(model):
                values = evaluate(self, model, where)
        self._kept[key] = values  # most recent last
        while len(self._kept) > KEPT_STATES:
            self._kept.pop(next(iter(self._kept)))
        return values.clone()

    def cached_final_values(self, model: torch.nn.Module) -> torch.Tensor:
        """``f(θ_K)`` of every part (float64, concatenated), kept as :meth:`cached_values` keeps every state
        (``estimators.base.evaluate_final``). ``attribute()`` asks 3 times (the estimator, task-vector negation, the
        total change), 4 with ``validate=True`` (replay)."""
        return self.cached_values(model)

    def evaluate_parts(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:

        out = {}
        for name, behavior in self.parts.items():
            values = behavior(model)
            check_finite(values.detach(), behavior, "while attributing")
            out[name] = values.reshape(-1)
            self.sizes[name] = out[name].numel()
        return out

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        parts = self.evaluate_parts(model)
        return torch.cat([parts[name].to(torch.float64) for name in self.parts])

    def split(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name in self.parts:
            n = self.sizes[name]
            out[name] = values[offset : offset + n]
            offset += n
        return out


#: parameter states whose behavior values one attribution keeps (:meth:`_Joint.cached_values`)
KEPT_STATES = 64


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Which model, where its floating-point tensors live, and their values (:func:`values_checksum`)."""
    places = tuple(t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    return (id(model), places, values_checksum(model))


class _Gathered:
    """An estimator result whose per-example effects cover every process's examples."""

    def __init__(self, template: Any, per_example: dict[str, torch.Tensor]) -> None:
        self.estimator = getattr(template, "estimator", "")
        self.reason = getattr(template, "reason", "")
        self.per_example = per_example
        self.diagnostics = dict(getattr(template, "diagnostics", {}) or {})
        self.approximations = list(getattr(template, "approximations", []) or [])


def _gathered(local_result: Any, joint: _Joint, stage_names: list[str], state: Any) -> dict[str, _Gathered]:
    local: dict[str, dict[str, list[float]]] = {name: {s: [] for s in stage_names} for name in joint.names}
    if local_result is not None:
        for stage in stage_names:
            for name, values in joint.split(local_result.per_example[stage].detach().double().reshape(-1)).items():
                local[name][stage] = values.tolist()
    template = local_result
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [_summary(local_result) if state.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        template = box[0]

    def values(name: str, stage: str) -> list[float]:
        return local[name][stage] if name in joint.unsplit else _gather_list(local[name][stage], state)

    return {
        name: _Gathered(template, {s: torch.tensor(values(name, s), dtype=torch.float64) for s in stage_names})
        for name in joint.names
    }


def stage_owners(work: Mapping[str, float], processes: int) -> dict[str, int]:
    """``{stage name: process index}`` for stages of the given ``work`` (an estimator's ``stage_work``, e.g. the
    recorded seconds of the optimizer steps it re-runs): most work first, each stage to the process with the least
    work so far (the lowest index on ties); a stage's read-out counts as the mean work of a stage, so stages without
    later steps are shared out too. The same answer in every process.

    Example:
        >>> stage_owners({"sft": 27.0, "lora": 22.8, "dpo": 0.0}, 2)
        {'sft': 0, 'lora': 1, 'dpo': 1}
        >>> stage_owners({"a": 1.0, "b": 1.0, "c": 1.0}, 3)
        {'a': 0, 'b': 1, 'c': 2}
    """
    read_out = sum(work.values()) / len(work) if work else 0.0
    load = [0.0] * processes
    owners: dict[str, int] = {}
    for name in sorted(work, key=lambda stage: -work[stage]):  # stable: equal work in the given order
        owner = min(range(processes), key=lambda p: (load[p], p))
        owners[name] = owner
        load[owner] += work[name] + read_out
    return {name: owners[name] for name in work}


def _gathered_by_stage(
    result: Any, error: Exception | None, whole: _Joint, stage_names: list[str], merge: Callable[..., dict], state: Any
) -> dict[str, _Gathered]:
    """Every process's stages (``result``: this process's, over every example) gathered: each stage's effects from
    the process that ran it, the diagnostics merged (``merge``: the estimator's ``merge_diagnostics``), the
    approximations of all in order, without repeats. ``error``: what this process's estimate raised; any process's
    error is raised in every process (its own first), so none waits for a result that will not come."""
    from accelerate.utils import gather_object

    mine: dict[str, dict[str, list[float]]] = {}
    if result is not None:
        for stage, values in result.per_example.items():
            mine[stage] = {n: v.tolist() for n, v in whole.split(values.detach().double().reshape(-1)).items()}
    summary = _summary(result) if result is not None else None
    every = gather_object([{"values": mine, "summary": summary, "error": _sendable(error)}])
    if error is not None:
        raise error
    raised = [payload["error"] for payload in every if payload["error"] is not None]
    if raised:
        raise raised[0]
    values = {stage: part for payload in every for stage, part in payload["values"].items()}
    summaries = [payload["summary"] for payload in every if payload["summary"] is not None]
    template = _Summary(
        summaries[0].estimator,
        summaries[0].reason,
        merge([s.diagnostics for s in summaries], order=stage_names),
        ordered_union([s.approximations for s in summaries]),
    )
    return {
        name: _Gathered(template, {s: torch.tensor(values[s][name], dtype=torch.float64) for s in stage_names})
        for name in whole.names
    }


def _sendable(error: Exception | None) -> Exception | None:
    """``error`` as it can be sent to the other processes (``gather_object`` pickles it): itself, or a
    StageAttributionError with its type and message where it does not pickle.

    Example:
        >>> _sendable(ValueError("bad")).args, type(_sendable(type("Local", (Exception,), {})("x"))).__name__
        (('bad',), 'StageAttributionError')
    """
    if error is None:
        return None
    try:
        pickle.dumps(error)
    except Exception:  # a class defined in a function, an argument that does not pickle
        return StageAttributionError(f"{type(error).__name__} in another process: {error}")
    return error


_PRECISION_NOTE = re.compile(r"The stage trains (?:in (?P<mixed>[^:]+)|(?P<weights>b?float16) weights):")


def _training_precision_note(ledger: Any) -> str | None:
    """Which stages trained in half or mixed precision (their recorded notes say so), for the report: replay re-runs
    them in that precision, so replay-based estimates and replay itself agree with the recorded run only to it."""
    found = {}
    for stage in ledger.stages:
        recorded = precision_description(stage.info.get("training_precision"))
        if recorded:  # stage.json's structured field (both recorders write it)
            found[stage.name] = recorded
            continue
        for note in stage.info.get("notes") or []:  # a ledger recorded before that field: its notes say it
            # a Trainer's mixed precision ("The stage trains in bf16 mixed precision: ...") or half-precision weights
            # (record_stage and the Trainer: "The stage trains bfloat16 weights: ...", _internal/precision.py)
            match = _PRECISION_NOTE.match(note) if isinstance(note, str) else None
            if match:
                found[stage.name] = match.group("mixed") or f"{match.group('weights')} weights"
    if not found:
        return None
    listed = ", ".join(f"{name} ({what})" for name, what in found.items())
    return (
        f"Stages trained in reduced precision: {listed}. Replay re-runs them in that precision (as recorded, "
        "deterministic on CPU; GPU kernels may round differently from run to run), so replay-based estimates and "
        "replay itself reproduce the recorded training only to that precision."
    )


def _input_description(behavior: Any) -> tuple[str, int | None, str | None]:
    """``(type, number of examples, hash of its spec)`` of a behavior, as far as it can tell (None where not)."""
    try:
        size: int | None = len(behavior)
    except Exception:  # a bare callable has no length before it is evaluated
        size = None
    try:
        spec = json.dumps(behavior.to_spec(), sort_keys=True, default=str)
        digest: str | None = hashlib.sha256(spec.encode()).hexdigest()[:16]
    except Exception:  # a behavior built from Python functions has no spec
        digest = None
    return type(behavior).__name__, size, digest


def _check_same_inputs(
    prepared: Mapping[str, Any], stage_names: list[str], ledger_fingerprint: str, estimator: str, state: Any
) -> None:
    """Every process must be given the same behaviors (names, sizes, specs), ledger, stages and estimator; else a
    BehaviorError in every process, naming what differs (the gathered report would mix different inputs)."""
    from accelerate.utils import gather_object

    mine = {
        "behaviors": {name: _input_description(b) for name, b in prepared.items()},
        "ledger": ledger_fingerprint,
        "stages": list(stage_names),
        "estimator": estimator,
    }
    every = gather_object([mine])
    for rank, theirs in enumerate(every):
        if theirs == every[0]:
            continue
        what = [key for key in mine if theirs[key] != every[0][key]]
        detail = ""
        if "behaviors" in what:
            names = sorted(set(theirs["behaviors"]) ^ set(every[0]["behaviors"])) or [
                n for n in theirs["behaviors"] if theirs["behaviors"][n] != every[0]["behaviors"].get(n)
            ]
            detail = (
                f" (behavior(s) {names}: type, number of examples and spec hash {theirs['behaviors'].get(names[0])} "
            )
            detail += f"in process {rank}, {every[0]['behaviors'].get(names[0])} in process 0)"
        raise BehaviorError(
            f"Expected every process to attribute the same inputs, found different {', '.join(what)} in process "
            f"{rank} and process 0{detail}. Give every process the same behavior specs, ledger, stages and estimator "
            "(e.g. the same spec file path on every node)."
        )


class _Summary:
    def __init__(self, estimator: str, reason: str, diagnostics: dict, approximations: list[str]) -> None:
        self.estimator, self.reason, self.diagnostics, self.approximations = (
            estimator,
            reason,
            diagnostics,
            approximations,
        )


def _summary(result: Any) -> _Summary:
    return _Summary(
        getattr(result, "estimator", ""),
        getattr(result, "reason", ""),
        _plain(dict(getattr(result, "diagnostics", {}) or {})),
        list(getattr(result, "approximations", []) or []),
    )


def _plain(value: Any) -> Any:
    """Diagnostics made of plain Python values (broadcast between processes without custom classes)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
