"""Whether a replayed Trainer stage runs the recorded optimizer and learning-rate schedule.

A Trainer replay rebuilds its optimizer and schedule from the recorded ``TrainingArguments``. A stage trained with an
optimizer or scheduler given to the Trainer (``Trainer(optimizers=(optimizer, scheduler))``,
``Trainer(optimizer_cls_and_kwargs=...)``), or whose learning rates a callback changed, would replay with the
arguments' defaults instead — silently: an SGD stage replayed as AdamW misses θ_K by about its own update, and every
estimate checked against that replay is checked against a wrong answer. The recorder notes such a stage
(:func:`given_optimizer_reason`, ``stage.json`` ``trainer.optimizer_given``; ``estimators.replay.replay_data_problem``
then refuses it up front), and every Trainer replay checks what it runs against what the ledger recorded
(:func:`recipe_check_callback`): the optimizer's class and hyperparameters before the first step, the applied learning
rates at every step. A difference stops the replay with a :class:`~hf_stage_attribution.errors.ReplayError`.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ReplayError
from ..ledger.optimizer_info import applied_learning_rates, describe_optimizer

#: param-group entries that choose a kernel or bookkeeping, not the update rule's numbers; ``lr`` is checked per step
_NOT_COMPARED = frozenset(
    {"params", "lora_params", "num_unnamed_params", "lr", "initial_lr", "foreach", "differentiable", "capturable"}
)


def given_optimizer_reason(init_optimizer: Any, init_scheduler: Any, trainer: Any) -> str | None:
    """What the user gave the Trainer instead of letting it build the optimizer and schedule from its arguments, as
    a phrase (``None`` when it built both itself).

    ``init_optimizer``/``init_scheduler`` are what the Trainer held when it was created (``on_init_end``).

    Example:
        >>> from types import SimpleNamespace
        >>> given_optimizer_reason(object(), None, None)
        'an optimizer given as Trainer(optimizers=(optimizer, ...))'
        >>> given_optimizer_reason(None, None, SimpleNamespace(optimizer_cls_and_kwargs=None)) is None
        True
    """
    given = []
    if init_optimizer is not None:
        given.append("an optimizer given as Trainer(optimizers=(optimizer, ...))")
    if init_scheduler is not None:
        given.append("a learning-rate scheduler given as Trainer(optimizers=(..., scheduler))")
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        given.append("an optimizer given as Trainer(optimizer_cls_and_kwargs=...)")
    return " and ".join(given) or None


def optimizer_difference(recorded: dict | None, optimizer: Any) -> str | None:
    """How ``optimizer`` differs from the recorded description (``stage.json["optimizer"]``): its class, number of
    param groups, or a hyperparameter of a group (``lr`` is compared per step elsewhere); ``None`` when it matches or
    nothing was recorded.

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> rec = {"type": "SGD", "param_groups": [{"lr": 0.1, "momentum": 0.9}]}
        >>> optimizer_difference(rec, torch.optim.SGD(p, lr=0.1, momentum=0.9)) is None
        True
        >>> optimizer_difference(rec, torch.optim.AdamW(p, lr=0.1))
        'the optimizer is AdamW, recorded SGD'
        >>> optimizer_difference(rec, torch.optim.SGD(p, lr=0.1, momentum=0.5))
        'param group 0 has momentum=0.5, recorded 0.9'
    """
    if not isinstance(recorded, dict) or not recorded.get("type"):
        return None
    described = describe_optimizer(optimizer, {})  # the replay's optimizer in the form the recorder stored
    if described["type"] != recorded["type"]:
        return f"the optimizer is {described['type']}, recorded {recorded['type']}"
    groups, have_groups = recorded.get("param_groups") or [], described["param_groups"]
    if len(groups) != len(have_groups):
        return f"the optimizer has {len(have_groups)} param group(s), recorded {len(groups)}"
    for k, (want, group) in enumerate(zip(groups, have_groups)):
        for key in sorted((set(want) & set(group)) - _NOT_COMPARED):
            unset = key == "fused" and not group[key] and not want[key]  # fused=None and False: the same kernel
            if group[key] != want[key] and not unset:
                return f"param group {k} has {key}={group[key]!r}, recorded {want[key]!r}"
    return None


def learning_rate_difference(recorded: list[float], applied: list[float]) -> bool:
    """Whether the applied learning rates differ from the recorded ones (beyond float rounding).

    Example:
        >>> learning_rate_difference([0.1, 0.1], [0.1, 0.1]), learning_rate_difference([0.1], [0.05])
        (False, True)
    """
    if len(recorded) != len(applied):
        return True
    return any(not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(recorded, applied))


def recipe_check_callback(stage: Any, start: int) -> Any:
    """A ``TrainerCallback`` that stops a replay of ``stage`` with a :class:`ReplayError` where the replay's optimizer
    is not the recorded one (class, param groups, hyperparameters; checked at ``on_train_begin``) or its applied
    learning rates are not the recorded ones (checked at every optimizer step; ``start`` is the stage's first global
    step in its run)."""
    from transformers import TrainerCallback

    recorded_rates = list(getattr(stage, "learning_rates", None) or [])
    name = getattr(stage, "name", "?")
    advice = (
        "A Trainer replay rebuilds the optimizer and schedule from the recorded TrainingArguments, so it cannot "
        "train this stage as recorded (an optimizer or scheduler given to the Trainer, or a callback that changes "
        f"learning rates). Pass stage_fns={{{name!r}: fn}} with fn training the stage as it was (the same optimizer "
        "and schedule), or use an estimator that does not replay (aa-fd, aa-ggn, delta-fd)."
    )

    class _RecipeCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            problem = optimizer_difference(getattr(stage, "optimizer", None), optimizer) if optimizer else None
            if problem:
                raise ReplayError(f"Replay of stage {name!r} does not run the recorded optimizer: {problem}. {advice}")
            return control

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            t = int(state.global_step) - int(start)
            if optimizer is not None and t >= len(recorded_rates) > 0:  # a replay must stop where the stage did
                raise ReplayError(
                    f"Replay of stage {name!r} runs optimizer step {t}, but the stage took {len(recorded_rates)} "
                    "step(s): its replay data say it ran longer than it did (a ledger recorded before a stage that "
                    "stopped early was replayed up to its steps). Replay it with replay_trainer_stage(..., "
                    f"max_steps={len(recorded_rates)}), or pass stage_fns={{{name!r}: fn}}."
                )
            if optimizer is None or not 0 <= t < len(recorded_rates):
                return control
            applied = applied_learning_rates(optimizer)
            if learning_rate_difference([float(x) for x in recorded_rates[t]], applied):
                raise ReplayError(
                    f"Replay of stage {name!r} does not apply the recorded learning rates: at step {t} it applies "
                    f"{applied}, the stage applied {recorded_rates[t]}. {advice}"
                )
            return control

    return _RecipeCheck()
