"""``lora-exact``: the effect of a terminal, unmerged LoRA stage, ``f(with adapter) − f(adapter disabled)``.

For the last stage no replay is needed (ESTIMATORS.md §2), and when that stage is a LoRA adapter still attached to
the model, disabling it restores ``θ_{K−1}`` exactly: this is the definition, at the cost of two forward passes.
PEFT's ``disable_adapter()`` also switches off ``modules_to_save`` copies; a base parameter the stage trained directly
(e.g. ``bias="all"``) is not switched off, so such a stage is refused.

Example:
    >>> from hf_stage_attribution import estimators
    >>> "lora-exact" in estimators.names()
    True

With a ledger whose last stage is a LoRA adapter still attached to ``peft_model``::

    r = estimators.get("lora-exact").estimate(ledger, peft_model, behavior)
    r.per_example["lora"]  # f(with adapter) − f(adapter disabled), per example
"""

from __future__ import annotations

import torch

from .._internal.params import base_parameters, is_peft_model, lora_layers
from ..errors import EstimatorError
from ..ledger.stage import Stage
from .base import (
    COMMON_OPTIONS,
    EstimateResult,
    Estimator,
    check_inputs,
    eval_mode,
    evaluate,
    register,
    resolve_stages,
)


def _directly_trained(model: torch.nn.Module, stage: Stage) -> list[str]:
    """Base names the stage changed outside the adapter and outside ``modules_to_save`` copies."""

    lora = stage.lora or {}
    adapter_names = set(lora.get("modules", {})) | set(lora.get("dense_modules", []))
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = base_parameters(model)
    out = []
    for name in stage.delta_names():
        if name in adapter_names or name not in params:
            continue
        if "modules_to_save." not in f".{by_id.get(id(params[name]), '')}":
            out.append(name)
    return out


def _check_adapter_is_stage(model: torch.nn.Module, stage: Stage) -> None:
    """Disabling the adapter must undo exactly the stage's delta (not also an initial non-zero adapter)."""

    for name, info in lora_layers(model).items():
        recorded = stage.delta_tensor(name)
        if not torch.allclose(info.delta(), recorded, rtol=1e-4, atol=1e-6):
            raise EstimatorError(
                f"The adapter on {name!r} does not equal the delta stage {stage.name!r} recorded there (the adapter "
                "was not zero when the stage started, e.g. init_lora_weights=False, or it changed afterwards), so "
                "disabling it would remove more than the stage. Use `aa-fd` for this stage."
            )


@register
class LoraExact(Estimator):
    """Exact effect of the last stage when it is a LoRA adapter still attached (unmerged) to the final model.

    ``stages=None`` means the last stage; asking for any other stage raises :class:`EstimatorError`.
    Options: ``check_model``, ``prepare_behavior``.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("lora-exact").name
        'lora-exact'
    """

    name = "lora-exact"
    options = COMMON_OPTIONS
    description = "f(with adapter) − f(adapter disabled) for a terminal, unmerged LoRA stage (exact)."

    def estimate(self, ledger, model, behavior, stages=None, **options):

        last = ledger.stages[-1]
        chosen = [last] if stages is None else resolve_stages(ledger, stages)
        others = [s.name for s in chosen if s.index != last.index]
        if others:
            raise EstimatorError(
                f"`lora-exact` only applies to the last stage ({last.name!r}), got {others}. Use `aa-fd`, `aa-ggn` "
                "or `replay` for earlier stages."
            )
        lora = last.lora or {}
        if not (lora.get("modules") or lora.get("dense_modules")):
            raise EstimatorError(
                f"`lora-exact` needs the last stage to be a LoRA stage; {last.name!r} (kind {last.kind!r}) has no "
                "LoRA adapter. Use `aa-fd` (exact for the last stage up to the ledger's float32 delta) instead."
            )
        if not is_peft_model(model) or not lora_layers(model):
            raise EstimatorError(
                f"`lora-exact` needs the final model as a PeftModel with the adapter of {last.name!r} attached and "
                f"unmerged; got {type(model).__name__} without active LoRA layers. Pass the PeftModel (not "
                "merge_and_unload()'s result), or use `aa-fd`."
            )
        direct = _directly_trained(model, last)
        if direct:
            raise EstimatorError(
                f"Stage {last.name!r} also trained {len(direct)} base parameter(s) directly (e.g. {direct[0]!r}), "
                "which disabling the adapter does not undo. Use `aa-fd` for this stage."
            )
        _check_adapter_is_stage(model, last)
        check_inputs(ledger, model, behavior, options)
        with eval_mode(model):
            with_adapter = evaluate(behavior, model, "evaluated on the final model (adapter enabled)")
            with model.disable_adapter():
                without = evaluate(behavior, model, f"evaluated with the adapter of stage {last.name!r} disabled")
        return EstimateResult(self.name, {last.name: with_adapter - without}, {"calls": {"forward": 2}}, [])
