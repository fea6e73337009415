"""Replay: the ground truth of ESTIMATORS.md §2, ``τ_k = f(θ_K) − f(θ̃_K^(−k))``.

``θ̃_K^(−k)`` starts stage ``k+1`` from ``θ_{k−1}`` (``ledger.state_at(k−1)``) and re-runs stages ``k+1..K`` with
their recorded recipe. A stage is re-run by ``stage_fns[stage name](model)`` (a callable that trains the given model
in place exactly as that stage did; it may return a new model, e.g. a ``PeftModel`` wrapping it, and may accept a
second argument: a dict with ``"stage"``, ``"removed"`` (the removed stage's index or None) and ``"scale"``), or,
for stages recorded through the Trainer callback with replay data, by
``hf_stage_attribution.integrations.replay.replay_trainer_stage(stage, model)``. A stage that took no optimizer
step (an ``untracked`` edit between runs, an ``imported`` checkpoint difference) and has no stage function is
re-applied as its recorded delta.

**Step-limited form (partial replay, ESTIMATORS.md §4b).** The ``partial-replay`` estimators stop a stage after its
first ``m`` optimizer steps. A stage function supports that when it accepts a keyword argument ``max_steps``
(``fn(model, max_steps=m)`` or ``fn(model, info, max_steps=m)``): with ``max_steps=None`` it trains the whole stage;
with an integer it runs the *full* recipe (same data order, seeds, optimizer, and the learning-rate schedule of the
whole stage — never a shorter ``max_steps``) and stops after ``m`` optimizer steps. It returns ``None``, the trained
model, or a pair ``(model or None, optimizer)`` (or ``(model, {base name: {state key: tensor}})``, e.g. from
``integrations.replay.stop_after_steps_callback``); with the optimizer, the optimizer state at the stop (first and
second moments) enters the propagation of the rest of the stage. Trainer/TRL stages with replay data support the
form through ``replay_trainer_stage(stage, model, max_steps=m)``. **Callback form:** a stage function that takes a
``callbacks`` keyword and hands it to its ``Trainer`` (``fn(model, callbacks=None)``) needs nothing more:
:func:`run_stage` passes ``callbacks=[stop_after_steps_callback(m, optimizer_out=...)]``, which stops the Trainer
after ``m`` optimizer steps without touching its ``max_steps`` and returns the optimizer state at the stop (a
``max_steps`` keyword, when the function has both, wins). :func:`run_stage` runs every form.

**Gradient-reuse form (strided replay, :mod:`.strided_replay`).** A stage function that accepts a keyword argument
``grad_every`` (``fn(model, grad_every=s)``) runs the full recipe but the forward and backward pass only on
optimizer steps ``t`` with ``t % s == 0``; the steps in between re-use that gradient (the optimizer, the schedule,
clipping and the data order run as recorded). ``grad_every=1`` is the stage itself. A stage function that builds a
Trainer gets the form from ``integrations.replay.with_gradient_reuse(TrainerClass, grad_every)``; Trainer/TRL
stages with replay data support it through ``replay_trainer_stage(stage, model, grad_every=s)`` (not GRPO/RLOO,
which generate inside the training step).

**Several processes.** Under torchrun / ``accelerate launch`` the attributor gives each process whole stages to
attribute (:func:`~hf_stage_attribution.attributor.stage_owners`: the replays of one removed stage run in one process,
over every example) and never splits one stage's training between processes: a stage recorded in a world of another
size (typically one process) is re-run as a single-process run inside the process that replays it
(:func:`~hf_stage_attribution.integrations.replay.replay_world`: its Trainer neither wraps the model in DDP nor
splits the data), so 2 processes give the answer of 1; a stage recorded in a world of the current size is re-run
in that world (2 Trainer stages recorded in 2 processes replay to θ_K within 4e-9 there; every process runs such a
replay together, so the attributor splits the examples there, not the stages). A stage recorded in
several processes and replayed in a world of another size trains on other data per step (0.06 from θ_K in one
process): that replay warns, naming the number of processes that replays it as recorded.

Replay works on a copy of the final model (a ``PeftModel`` is unloaded to its base model first). Its memory is one
model copy plus what one training step of a stage needs: a stage's gradients are released when it ends, a
step-limited stage's optimizer moments are handed on without a copy, and each counterfactual model is released
before the next (GPT-2 4.2M: 4.9× the parameter bytes, 0.83 of "one training step + one model copy").
The functions must be deterministic for replay with nothing removed to reproduce ``θ_K``.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> fns = pipe.stage_fns  # {"digits-base": f(model) that trains it again, ...}
    >>> same = replay_model(ledger, model, removed=None, stage_fns=fns)  # nothing removed: θ_K again
    >>> all(torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))
    True
    >>> cf = replay_model(ledger, model, removed=0, stage_fns=fns)  # θ̃_K^(−1)
    >>> from hf_stage_attribution import estimators
    >>> r = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns)
    >>> torch.allclose(r.per_example["digits-base"], (behavior(model) - behavior(cf)).double(), atol=1e-5)
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._internal.memory import collections_of_new_objects, release_freed_memory
from .._internal.model_state import clean_copy
from .._internal.params import base_parameters, is_peft_model, iter_merged_state
from .._internal.precision import TRAINING_DTYPES, to_float32, to_training_dtypes
from ..errors import PartialReplayError, ReplayError
from ..integrations.replay import (
    NO_GRADIENT_REUSE,
    frozen_gc,
    match_recorded_trainables,
    optimizer_state_by_name,
    reference_problem,
    replay_files_problem,
    replay_trainer_stage,
    replay_world,
    reward_problem,
    stop_after_steps_callback,
    trainer_class_problem,
)
from ..integrations.trl import UNKNOWN_OBJECTIVE, stage_objective
from ..ledger.core import LedgerCore
from ..ledger.stage import Stage
from ..ledger.state import LazyState
from .base import (
    COMMON_OPTIONS,
    EstimateResult,
    Estimator,
    check_inputs,
    eval_mode,
    evaluate,
    evaluate_final,
    register,
    resolve_stages,
)

StageFn = Callable[..., Any]


def working_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` to replay on (a ``PeftModel`` is unloaded to its base model, every parameter trainable
    as in the replayed stages). The float32 working model of a half-precision one (``_internal.precision``: what the
    attributor evaluates) gives a copy in the dtypes it was trained in, so the replayed stages train as recorded."""

    work = clean_copy(model)
    if is_peft_model(work):
        work = work.unload()
        for p in work.parameters():
            p.requires_grad_(True)
    to_training_dtypes(work, model)
    return work


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a ``{base name: tensor}`` state into the model's base parameters, tensor by tensor."""

    params = base_parameters(model)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))


def _takes_info(fn: StageFn) -> bool:
    """True when ``fn`` requires a second positional argument (the replay info dict)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) >= 2 or any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)


def _add_delta(model: torch.nn.Module, stage: Stage) -> None:

    params = base_parameters(model)
    with torch.no_grad():
        for name, delta in stage.iter_delta():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype))


@dataclass
class ReplayNeeds:
    """What replay would re-run to remove each stage of a set, and what stops it (:func:`replay_needs`)."""

    #: optimizer steps replay re-runs: for each removed stage ``k``, every step of the trained stages after it
    optimizer_steps: int
    #: the stages it re-runs (trained stages after the first removed one), in ledger order
    stages: list[str]
    #: one sentence per stage it could not re-run (no stage function and no replay data, or an unrebuildable reference)
    problems: list[str]
    #: the stages it would re-run with a given stage function (``stage_fns``; the CLI cannot pass those)
    by_function: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_needs(
    ledger: LedgerCore,
    removed: list[int],
    stage_fns: Mapping[str, StageFn] | None = None,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> ReplayNeeds:
    """The optimizer steps replay re-runs to remove each stage index in ``removed``, the stages it re-runs, and what
    stops it (the same problems :func:`check_replayable` raises with).

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
        >>> pipe = build_digits_pipeline("hf", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
        >>> [s.num_steps for s in pipe.ledger.stages]
        [10, 8, 8]
        >>> needs = replay_needs(pipe.ledger, [0, 1, 2], pipe.stage_fns)  # removing 0 re-runs 8 + 8, removing 1: 8
        >>> needs.optimizer_steps, needs.stages, not needs.problems
        (24, ['digits-patch', 'digits-clean'], True)
        >>> replay_needs(pipe.ledger, [0]).problems[0].split(" (")[0]  # no stage functions, no replay data
        "stage 'digits-patch' has no function in stage_fns and no replay data"
    """
    stage_fns = dict(stage_fns or {})
    first = min(removed) if removed else len(ledger.stages)
    trained = [s for s in ledger.stages[first + 1 :] if s.num_steps and s.learning_rates]
    steps = sum(int(s.num_steps) for k in removed for s in trained if s.index > k)
    problems, by_function = [], []
    for stage in trained:
        if stage.name in stage_fns:
            by_function.append(stage.name)
            continue
        problem = replay_data_problem(stage)  # before "no replay data": recording them would not help then
        if problem:
            problems.append(f"stage {stage.name!r} cannot be replayed {unreplayable_route(stage)}: {problem}")
            continue
        if stage.replay_dir is None:  # a checkpoint holds none: recording is then no remedy
            missing, remedy = (
                ("has no function in stage_fns and no replay data", " or record it with StageRecorder(..., "
                 "save_replay_data=True)") if recording_helps(stage) else
                (f"was imported from checkpoints ({stage.imported_from}) and has no function in stage_fns",
                 ", a function that re-runs its training")
            )  # fmt: skip
            problems.append(
                f"stage {stage.name!r} {missing} (pass stage_fns={{{stage.name!r}: fn}} (CLI: --stage-fn "
                f"{stage.name}=MODULE:FUNCTION){remedy})"
            )
            continue
        problem = trainer_input_problem(stage, ref_models, reward_funcs)
        if problem and not problem.startswith(f"stage {stage.name!r}"):  # a trainer class's clause names none
            problem = f"stage {stage.name!r} cannot be replayed from its replay data: {problem}"
        if problem:
            problems.append(problem)
    return ReplayNeeds(steps, [s.name for s in trained], problems, by_function)


def check_replayable(
    ledger: LedgerCore,
    removed: list[int],
    stage_fns: Mapping[str, StageFn] | None = None,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`ReplayError` naming every stage that replay (removing each stage in ``removed``) could not
    re-run, before any work: no stage function and no replay data, a reference model it cannot rebuild, or reward
    functions that were not given."""
    problems = replay_needs(ledger, removed, stage_fns, ref_models, reward_funcs).problems
    if problems:
        raise ReplayError("Replay cannot re-run every stage it needs: " + "; ".join(problems) + ".")


#: How to give a stage function the step-limited form (the error messages that need one say it).
STEP_LIMITED_HOW = (
    "Give it a keyword argument: fn(model, max_steps=None) that runs the full recipe (same data order, seeds, "
    "optimizer and the learning-rate schedule of the whole stage) and stops after max_steps optimizer steps, "
    "returning the model or (model, optimizer); or, when it trains with a transformers Trainer, "
    "fn(model, callbacks=None) that passes the callbacks on to the Trainer (the package then adds one that stops it)."
)


def _takes_keyword(fn: StageFn, name: str) -> bool:
    """Whether ``fn`` accepts keyword argument ``name`` (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = name in params and params[name].kind in keyword
    return named or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def takes_max_steps(fn: StageFn) -> bool:
    """True when ``fn`` has the step-limited form: it accepts a ``max_steps`` keyword (or ``**kwargs``).

    Example:
        >>> takes_max_steps(lambda model, max_steps=None: None), takes_max_steps(lambda model: None)
        (True, False)
    """
    return _takes_keyword(fn, "max_steps")


def takes_callbacks(fn: StageFn) -> bool:
    """True when ``fn`` accepts a ``callbacks`` keyword: the ``TrainerCallback`` list it hands to its ``Trainer``.

    Example:
        >>> takes_callbacks(lambda model, callbacks=None: None), takes_callbacks(lambda model: None)
        (True, False)
    """
    return _takes_keyword(fn, "callbacks")


def step_limitable(fn: StageFn) -> bool:
    """True when :func:`run_stage` can stop ``fn`` after its first ``m`` optimizer steps: ``fn`` has the
    step-limited form (a ``max_steps`` keyword), or takes Trainer ``callbacks`` (the callback form: ``run_stage``
    hands it :func:`~hf_stage_attribution.integrations.replay.stop_after_steps_callback`).

    Example:
        >>> step_limitable(lambda model, callbacks=None: None), step_limitable(lambda model: None)
        (True, False)
    """
    return takes_max_steps(fn) or takes_callbacks(fn)


def takes_grad_every(fn: StageFn) -> bool:
    """True when ``fn`` has the gradient-reuse form: it accepts a ``grad_every`` keyword (or ``**kwargs``).

    Example:
        >>> takes_grad_every(lambda model, grad_every=1: None), takes_grad_every(lambda model: None)
        (True, False)
    """
    return _takes_keyword(fn, "grad_every")


def no_gradient_reuse_message(stage: Stage, grad_every: int, fn: StageFn) -> str:
    """Why stage function ``fn`` of ``stage`` cannot run strided replay's gradient-reuse form, and how to write it."""
    return (
        f"Strided replay needs stage {stage.index} {stage.name!r} to compute a gradient only every {grad_every} "
        f"optimizer steps, but its stage function {getattr(fn, '__name__', repr(fn))} has no gradient-reuse form. "
        "Give it a keyword argument: fn(model, grad_every=1) that runs the full recipe (same data order, seeds, "
        "optimizer and learning-rate schedule) but runs the forward and backward pass only on optimizer steps "
        "t with t % grad_every == 0 and re-uses that gradient for the steps in between (a Trainer: "
        "hf_stage_attribution.integrations.replay.with_gradient_reuse(TrainerClass, grad_every)); or use "
        "estimator='replay' or 'partial-replay'."
    )


def trainer_input_problem(
    stage: Stage, ref_models: Mapping[str, Any] | None = None, reward_funcs: Mapping[str, Any] | None = None
) -> str | None:
    """What a replay of ``stage`` from its replay data needs besides them and was not given, as a clause (``None``
    when nothing): a trainer class it does not import (:func:`trainer_class_problem`), a reference model or teacher it
    cannot rebuild, or one given in ``ref_models`` that is not the recorded one (:func:`reference_problem`), the
    reward functions of a GRPO/RLOO/OnlineDPO stage (:func:`reward_problem`; ``reward_funcs``), or replay files that
    no longer hash as recorded (:func:`replay_files_problem`)."""
    ref = (ref_models or {}).get(stage.name)
    return (
        trainer_class_problem(stage)
        or reference_problem(stage, ref)
        or reward_problem(stage, (reward_funcs or {}).get(stage.name))
        or replay_files_problem(stage)
    )


def can_replay(
    stage: Stage,
    stage_fns: Mapping[str, StageFn],
    *,
    step_limited: bool = False,
    grad_reuse: bool = False,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> bool:
    """Whether :func:`run_stage` can run ``stage`` (with ``step_limited``: stop it after ``m`` steps too; with
    ``grad_reuse``: compute a gradient only every few optimizer steps, see :mod:`~.strided_replay`), given the
    reference models and reward functions passed for replay (:func:`trainer_input_problem`)."""
    if not (stage.num_steps and stage.learning_rates):
        return True  # re-applied as its recorded delta
    fn = stage_fns.get(stage.name)
    if fn is not None:
        return (step_limitable(fn) or not step_limited) and (takes_grad_every(fn) or not grad_reuse)
    if grad_reuse and (str(stage.kind).lower() in NO_GRADIENT_REUSE or stage_objective(stage) in NO_GRADIENT_REUSE):
        return False
    return stage.replay_dir is not None and stage_replay_problem(stage, ref_models, reward_funcs) is None


def stage_replay_problem(
    stage: Stage, ref_models: Mapping[str, Any] | None = None, reward_funcs: Mapping[str, Any] | None = None
) -> str | None:
    """Why ``stage`` cannot be re-run from its replay data with the given reference models and reward functions, as
    a clause (``None`` when nothing stands in the way): :func:`replay_data_problem`, then — for a stage that holds
    replay data — :func:`trainer_input_problem`. What :func:`can_replay`, ``auto`` and the partial/strided replay
    checks say."""
    problem = replay_data_problem(stage)
    if problem is None and getattr(stage, "replay_dir", None) is not None:
        problem = trainer_input_problem(stage, ref_models, reward_funcs)
    return problem


def replay_inputs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ref_models`` and ``reward_funcs`` among an estimator's ``options`` (what replay would be given).

    Example:
        >>> replay_inputs({"budget": 0.1, "reward_funcs": {"rl": [len]}})
        {'ref_models': None, 'reward_funcs': {'rl': [<built-in function len>]}}
    """
    return {"ref_models": options.get("ref_models"), "reward_funcs": options.get("reward_funcs")}


def replay_inputs_key(inputs: Mapping[str, Any]) -> tuple:
    """A memo key for the ``ref_models`` and ``reward_funcs`` given (object identities by stage name)."""
    return tuple(sorted((key, n, id(v)) for key, by_stage in inputs.items() for n, v in (by_stage or {}).items()))


def unreplayable_route(stage: Stage) -> str:
    """How a stage with a :func:`replay_data_problem` cannot be replayed, for messages: "from its replay data" where
    it holds some, "without a stage function" where it does not (a stage that continued the optimizer state)."""
    return "from its replay data" if getattr(stage, "replay_dir", None) is not None else "without a stage function"


def replay_data_problem(stage: Stage) -> str | None:
    """Why ``stage`` cannot be re-run from its recorded replay data, as a clause; ``None`` when nothing stands in the
    way (whether it holds replay data at all is :attr:`~hf_stage_attribution.ledger.stage.Stage.replay_dir`).

    - It continued the previous stage's optimizer state (inside one run, or a second ``train()`` of one Trainer): the
      state it started from is not its own.
    - Its training dataset was not saved (an iterable or streaming dataset; ``stage.json``'s ``replay.dataset_saved``).
    - It trained with an optimizer or scheduler given to the Trainer (``stage.json`` ``trainer.optimizer_given``):
      a replay's Trainer would build the recorded arguments' defaults instead.
    - Its learning-rate schedule is metric-driven (``reduce_lr_on_plateau``): the rates depend on the recorded run's
      evaluation losses, and the replay data keep no evaluation set (a replay runs no evaluation), so a replayed
      stage would not apply the recorded rates. A stage function that evaluates as the stage did can replay it.
    - It trained with SFT packing or SFT padding-free batches: the replay data hold the dataset as the trainer had
      already packed it, which ``SFTTrainer`` would pack again (and it refuses the recorded collator with
      padding-free batches), so a replay would not train on the recorded batches.
    - It trained a TRL objective this package does not know (``stage.info["trl"]["objective"] == "unknown"``): its
      trainer may need models or reward functions besides the policy that the replay data do not hold.

    Example:
        >>> from types import SimpleNamespace
        >>> stage = SimpleNamespace(name="sft", optimizer_state_policy="fresh",
        ...                         info={"training_arguments": {"lr_scheduler_type": "reduce_lr_on_plateau"}})
        >>> replay_data_problem(stage).split(" (")[0]
        'its learning-rate schedule is metric-driven'
    """
    if stage.optimizer_state_policy == "continued":
        return (
            "it continued the previous stage's optimizer state (stage boundaries inside one run, or a second train() "
            "of the same Trainer): replay the whole run with stage_fns, or record each stage with a new Trainer"
        )
    info = getattr(stage, "info", None) or {}
    replay = info.get("replay")
    if isinstance(replay, dict) and replay.get("dataset_saved") is False:
        return (
            "its training dataset was not saved with its replay data (only a `datasets.Dataset` is saved, not a torch "
            f"dataset or an iterable/streaming one). Pass stage_fns={{{stage.name!r}: fn}} with fn training the stage "
            "on the same data, or use a propagation estimator (aa-ggn, aa-fd)"
        )
    trainer = info.get("trainer")
    given = trainer.get("optimizer_given") if isinstance(trainer, dict) else None
    if given:
        return (
            f"it trained with {given}, which its replay data cannot rebuild (a replay's Trainer builds the optimizer "
            f"and schedule from the recorded TrainingArguments). Pass stage_fns={{{stage.name!r}: fn}} with fn "
            "training the stage with the same optimizer and schedule, or use a propagation estimator (aa-ggn, aa-fd)"
        )
    args = (getattr(stage, "info", None) or {}).get("training_arguments") or {}
    schedule = str(args.get("lr_scheduler_type") or "") if isinstance(args, dict) else ""
    if "plateau" in schedule.lower():
        return (
            f"its learning-rate schedule is metric-driven ({schedule}: each rate depends on the recorded run's "
            "evaluation loss), and the replay data hold no evaluation set, so a replay would not apply the recorded "
            f"learning rates. Pass stage_fns={{{stage.name!r}: fn}} with fn running the stage with its evaluations, "
            "or use a propagation estimator (aa-ggn, aa-fd)"
        )
    sft = isinstance(args, dict) and "packing" in args  # an SFTConfig (or subclass): DPO's padding_free replays
    packed = [k for k in ("packing", "padding_free") if sft and args.get(k)]
    if packed:
        return (
            f"it trained with SFT {' and '.join(f'{k}=True' for k in packed)}: its replay data hold the dataset as "
            "SFTTrainer had already packed it, which a replay would pack again (and SFTTrainer refuses the recorded "
            f"collator with padding-free batches), so a replay would not train on the recorded batches. Pass "
            f"stage_fns={{{stage.name!r}: fn}} with fn running the SFTTrainer on the original dataset, or use a "
            "propagation estimator (aa-ggn, aa-fd)"
        )
    if stage_objective(stage) == UNKNOWN_OBJECTIVE:
        config = ((getattr(stage, "info", None) or {}).get("trl") or {}).get("config_class", "?")
        return (
            f"it trained with the TRL config {config}, whose objective this package does not know: its trainer may "
            "need models or reward functions besides the policy (a reference, a teacher, a judge) that the replay "
            f"data do not hold. Pass stage_fns={{{stage.name!r}: fn}} with fn running the stage's trainer, or use a "
            "propagation estimator (aa-fd)"
        )
    return None


def no_replay_data(stage: Stage) -> str:
    """Why ``stage`` cannot be replayed when no stage function was given and it has no replay data: for a stage
    imported from checkpoints (which hold none), where it came from — recording it is then no remedy."""
    if stage.imported_from is not None:
        return (
            f"it was imported from checkpoints ({stage.imported_from}), which hold no replay data, and no stage "
            "function was given for it"
        )
    return "no stage function was given for it and the ledger holds no replay data for it"


def recording_helps(stage: Stage) -> bool:
    """Whether recording ``stage`` with replay data is a remedy: it has none, and it was recorded (an imported
    stage's training never ran under a recorder)."""
    return stage.replay_dir is None and stage.imported_from is None


def _no_replay_message(stage: Stage) -> str:
    record = ", or record the stage with StageRecorder(..., save_replay_data=True)" if recording_helps(stage) else ""
    return (
        f"Cannot replay stage {stage.index} {stage.name!r}: {no_replay_data(stage)}. Pass stage_fns={{{stage.name!r}: "
        "fn} where fn(model) trains the model in place as that stage did (for partial replay, fn(model, "
        f"max_steps=None) that can stop after max_steps optimizer steps){record}."
    )


def run_stage(
    stage: Stage,
    model: torch.nn.Module,
    stage_fns: Mapping[str, StageFn],
    info: dict,
    max_steps: int | None = None,
    ref_models: Mapping[str, Any] | None = None,
    grad_every: int = 1,
    reward_funcs: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, dict[str, Any]] | None]:
    """Run ``stage`` on ``model`` (in place where possible): the whole stage, or its first ``max_steps`` optimizer
    steps (the step-limited form, see the module docstring). Returns ``(model, optimizer state by base name or
    None)``; the optimizer state is only returned for a step-limited run whose function gives the optimizer.

    ``grad_every=s > 1`` runs the gradient-reuse form (:mod:`~.strided_replay`): a fresh gradient on every ``s``-th
    optimizer step, re-used by the steps in between (stage functions: a ``grad_every`` keyword; replay data:
    :func:`~hf_stage_attribution.integrations.replay.with_gradient_reuse`).

    A stage replayed from its replay data gets ``ref_models[stage name]`` as its reference model (a distillation
    stage: its teacher) and ``reward_funcs[stage name]`` as its reward functions (GRPO/RLOO/OnlineDPO)."""
    fn = stage_fns.get(stage.name)
    if fn is None and not (stage.num_steps and stage.learning_rates):
        _add_delta(model, stage)  # an edit without training (untracked/imported): re-applied as recorded
        return model, None
    if max_steps is not None and fn is not None and not step_limitable(fn):
        raise PartialReplayError(
            f"Partial replay needs to stop stage {stage.index} {stage.name!r} after {max_steps} optimizer step(s), "
            f"but its stage function {getattr(fn, '__name__', repr(fn))} has no step-limited form. "
            + STEP_LIMITED_HOW
            + " Or use estimator='replay' or a budget of 0."
        )
    grad_every = int(grad_every)
    if grad_every > 1 and fn is not None and not takes_grad_every(fn):
        raise PartialReplayError(no_gradient_reuse_message(stage, grad_every, fn))
    if fn is None:
        problem = replay_data_problem(stage)  # first: recording replay data would not help then
        if problem:
            raise ReplayError(
                f"Cannot replay stage {stage.index} {stage.name!r} {unreplayable_route(stage)}: {problem}."
            )
        if stage.replay_dir is None:
            raise ReplayError(_no_replay_message(stage))
        ref = (ref_models or {}).get(stage.name)
        rewards = (reward_funcs or {}).get(stage.name)
        state: dict[str, dict[str, Any]] | None = None if max_steps is None else {}
        model = replay_trainer_stage(
            stage,
            model,
            ref_model=ref,
            reward_funcs=rewards,
            max_steps=max_steps,
            optimizer_out=state,
            grad_every=grad_every,
        )
        drop_gradients(model)
        return model, state
    match_recorded_trainables(model, stage)  # replay_trainer_stage above does the same for replay data
    kwargs: dict[str, Any] = {}
    stopped: dict[str, dict[str, Any]] = {}  # the callback form's optimizer state at the stop
    stop = None
    if max_steps is not None and takes_max_steps(fn):
        kwargs["max_steps"] = int(max_steps)
    elif max_steps is not None:  # the callback form: the Trainer inside fn stops itself, the schedule untouched
        stop = stop_after_steps_callback(int(max_steps), optimizer_out=stopped)
        kwargs["callbacks"] = [stop]
    if grad_every > 1:
        kwargs["grad_every"] = grad_every
    # frozen_gc for speed only: the full collections of a Trainer inside fn scan just the new objects; replay_world:
    # a Trainer built by fn in a multi-process world trains the 1-process recording as one process, not with DDP
    with replay_world(stage, model), frozen_gc():
        result = fn(model, info, **kwargs) if _takes_info(fn) else fn(model, **kwargs)
    if stop is not None and stop.stopped_at is None:
        raise PartialReplayError(
            f"Partial replay asked the stage function {getattr(fn, '__name__', repr(fn))} of stage {stage.index} "
            f"{stage.name!r} to stop after {max_steps} optimizer step(s) through its `callbacks` argument, but the "
            "callback never ran: pass the callbacks on to the Trainer (Trainer(..., callbacks=callbacks)), or give "
            "the function a max_steps keyword that stops it after that many steps of the whole stage's recipe."
        )
    optimizer = None
    if isinstance(result, tuple):
        result, optimizer = (result + (None, None))[:2]
    if optimizer is None and stopped:
        optimizer = stopped
    model = result if isinstance(result, torch.nn.Module) else model
    drop_gradients(model)  # the stage is over: its gradients are a model copy nobody reads
    if max_steps is None or optimizer is None:
        return model, None
    if isinstance(optimizer, Mapping):  # already {base name: {state key: tensor}}
        return model, dict(optimizer)
    return model, optimizer_state_by_name(model, optimizer, copy=False)


def drop_gradients(model: torch.nn.Module) -> None:
    """Release every parameter's ``.grad`` (what ``zero_grad(set_to_none=True)`` does, for any optimizer).

    Example:
        >>> m = torch.nn.Linear(2, 1); m(torch.ones(1, 2)).sum().backward(); drop_gradients(m)
        >>> m.weight.grad is None
        True
    """
    for p in model.parameters():
        p.grad = None


def replay_model(
    ledger: LedgerCore,
    model: torch.nn.Module,
    removed: int | None,
    *,
    stage_fns: Mapping[str, StageFn] | None = None,
    scale: float = 0.0,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The counterfactual final model with stage ``removed`` (index) taken out and later stages re-run.

    The start is ``θ_{k−1} + scale · Δ_k`` (``scale=0``: removal; ``scale=1``: nothing removed). ``removed=None``
    starts from ``θ_0`` and re-runs every stage (replay with nothing removed). ``model`` is not modified.
    """
    stage_fns = dict(stage_fns or {})
    work = working_copy(model)
    if removed is None:
        load_state(work, ledger.initial_state())
        first = 0
    else:
        k = ledger.stage(removed).index
        prev = ledger.state_at(k - 1)
        if scale:
            base, stage = prev, ledger.stages[k]
            prev = LazyState(ledger.parameter_names, lambda n: base[n] + scale * stage.delta_tensor(n))
        load_state(work, prev)
        del prev  # read lazily tensor by tensor; nothing of it is needed while the stages run
        first = k + 1
    for stage in ledger.stages[first:]:
        info = {"stage": stage, "removed": removed, "scale": scale}
        work, _ = run_stage(stage, work, stage_fns, info, ref_models=ref_models, reward_funcs=reward_funcs)
    if getattr(model, TRAINING_DTYPES, None):  # trained in half precision, evaluated like the model it replaces
        to_float32(work)
    return work


def step_costs(ledger: LedgerCore) -> list[float]:
    """The relative cost of one optimizer step of each stage, by which replay work is shared between processes: its
    recorded seconds per step where every stage that trained recorded its wall time (SmolLM2-135M: a DPO step cost
    5.5 × a LoRA SFT step), else 1 per step. A stage without optimizer steps costs nothing (its delta is re-applied).

    Example:
        >>> from types import SimpleNamespace as S
        >>> ledger = S(stages=[S(num_steps=8, info={"wall_time_seconds": 4.0}), S(num_steps=4, info={})])
        >>> step_costs(ledger)
        [1.0, 1.0]
        >>> ledger.stages[1].info["wall_time_seconds"] = 6.0
        >>> step_costs(ledger)
        [0.5, 1.5]
    """
    steps = [int(s.num_steps or 0) for s in ledger.stages]
    seconds = [(s.info or {}).get("wall_time_seconds") for s in ledger.stages]
    timed = all(isinstance(t, int | float) and t > 0 for t, n in zip(seconds, steps) if n)
    return [(float(t) / n if timed else 1.0) if n else 0.0 for t, n in zip(seconds, steps)]


def replay_work(ledger: LedgerCore, index: int) -> float:
    """The recorded cost (:func:`step_costs`) of every optimizer step after stage ``index``: what replay re-runs."""
    costs = step_costs(ledger)
    return sum(int(s.num_steps or 0) * costs[j] for j, s in enumerate(ledger.stages) if j > index)


def replay_gap(ledger: LedgerCore, model: torch.nn.Module, *, stage_fns: Mapping[str, StageFn] | None = None) -> float:
    """Max abs difference between the ledger's ``θ_K`` and replaying every stage from ``θ_0`` (should be ~0)."""

    final = ledger.final_state()
    replayed = replay_model(ledger, model, None, stage_fns=stage_fns)
    return max(float((t - final[n]).abs().max()) for n, t in iter_merged_state(replayed))


def first_order_response(
    ledger: LedgerCore,
    model: torch.nn.Module,
    behavior: Callable[[torch.nn.Module], torch.Tensor],
    k: int | str,
    eps: float = 1e-3,
    *,
    stage_fns: Mapping[str, StageFn] | None = None,
) -> torch.Tensor:
    """``(f(θ_K) − f(replay with stage k scaled to 1 − ε)) / ε`` per example: the exact first-order response of
    real training to stage ``k`` (the ceiling of any first-order estimator). Used by the benchmarks."""
    with eval_mode(model):
        final = evaluate(behavior, model, "evaluated on the final model")
    cf = replay_model(ledger, model, ledger.stage(k).index, stage_fns=stage_fns, scale=1.0 - eps)
    with eval_mode(cf):
        shifted = evaluate(behavior, cf, f"first-order response to stage {ledger.stage(k).name!r}")
    return (final - shifted) / eps


@register
class Replay(Estimator):
    """The ground truth: remove each stage and re-run the later ones (K − 1 partial retrainings).

    Options: ``stage_fns={stage name: fn(model)}`` (see the module docstring), ``ref_models={stage name: model}``
    and ``reward_funcs={stage name: [fn, ...]}`` for stages replayed from replay data, ``check_model``,
    ``prepare_behavior``.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("replay").name
        'replay'
    """

    name = "replay"
    options = COMMON_OPTIONS | {"stage_fns", "ref_models", "reward_funcs"}
    description = "Remove stage k, re-run stages k+1..K with their recorded recipe, evaluate (ground truth)."
    per_stage_work = True
    additive_diagnostics = frozenset({"stages_replayed"})

    def stage_work(self, ledger, index, options):
        return replay_work(ledger, index)

    def estimate(self, ledger, model, behavior, stages=None, **options):
        chosen = resolve_stages(ledger, stages)
        check_inputs(ledger, model, behavior, options)
        stage_fns = options.get("stage_fns") or {}
        inputs = replay_inputs(options)
        check_replayable(ledger, [s.index for s in chosen], stage_fns, **inputs)
        final = evaluate_final(behavior, model)
        per_example: dict[str, torch.Tensor] = {}
        replayed: list[str] = []
        with collections_of_new_objects():  # freeing each counterfactual model scans only what the replays made
            for stage in chosen:
                cf = replay_model(ledger, model, stage.index, stage_fns=stage_fns, **inputs)
                with eval_mode(cf):
                    value = evaluate(behavior, cf, f"evaluated after replay without stage {stage.name!r}")
                per_example[stage.name] = final - value
                replayed.extend(s.name for s in ledger.stages[stage.index + 1 :])
                del cf
                release_freed_memory()  # a trained model is a reference cycle: free it before the next stage's copy
        diagnostics = {"stages_replayed": len(replayed)}
        approximations = [
            f"Stage {s.name!r} took no optimizer steps ({s.kind}): replay re-applies its recorded delta."
            for s in ledger.stages[min((c.index for c in chosen), default=0) + 1 :]
            if not (s.num_steps and s.learning_rates) and s.name not in stage_fns
        ]
        if any(s.optimizer_state_policy == "continued" for s in ledger.stages[1:]):
            approximations.append(
                "Replay of a stage that continued the optimizer state: its stage function decides the state it "
                "starts from (it receives the removed stage's index)."
            )
        return EstimateResult(self.name, per_example, diagnostics, approximations)
