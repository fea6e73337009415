"""Temporarily giving a live model other (base-space) parameter values, and restoring them exactly."""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator, Mapping

import torch

from .params import base_parameters, lora_layers


@contextlib.contextmanager
def swapped_parameters(model: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Set the model's *effective* (merged) parameters to ``values`` (base names) inside the block.

    For a LoRA-wrapped weight the base weight is set to ``value − ΔW_adapter`` so that the merged weight is
    ``value``. Originals are kept (one copy of the touched tensors) and restored bit for bit on exit, even if
    the block raises. Tensors are read from ``values`` one at a time (a lazy ledger state works).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> with swapped_parameters(m, {"weight": torch.zeros(1, 1)}):
        ...     float(m.weight.detach())
        0.0
    """
    params = base_parameters(model)
    lora = lora_layers(model)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in values:
                param = params[name]
                target = values[name].to(param.device, torch.float32)
                if name in lora:
                    target = target - lora[name].delta().to(param.device)
                saved[name] = param.detach().clone()
                param.copy_(target.to(param.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)


#: what ``accelerate``'s ``Accelerator.prepare_model`` leaves on the model it prepared: the original forward (beside
#: the mixed-precision ``forward`` wrapper it installs as an instance attribute) and the flag that makes any later
#: ``prepare_model`` (the next Trainer's) return the model as it is, without its own autocast wrapper
_ACCELERATE_ORIGINAL, _ACCELERATE_PREPARED = "_original_forward", "_is_accelerate_prepared"


def has_accelerate_wrapper(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself carries accelerate's mixed-precision ``forward`` wrapper or its "prepared" flag."""
    return _ACCELERATE_ORIGINAL in module.__dict__ or _ACCELERATE_PREPARED in module.__dict__


def has_autocast_wrapper(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself carries accelerate's mixed-precision ``forward`` wrapper (installed only when mixed
    precision ran: a float32 Trainer leaves the "prepared" flag alone)."""
    return _ACCELERATE_ORIGINAL in module.__dict__


def drop_accelerate_wrapper(module: torch.nn.Module) -> bool:
    """Undo, on ``module`` itself (in place, not its children), what ``Accelerator.prepare_model`` left on it.

    The effect of ``accelerate.utils.extract_model_from_parallel(module, keep_fp32_wrapper=False)``: the
    autocast ``forward`` wrapper goes and the forward it replaced comes back (the class's own ``forward`` when
    that is what it wrapped; any other callable, e.g. a hook's, is put back as the instance's ``forward``). The
    "prepared" flag goes too, so that a later Trainer prepares the module again (and autocasts it as its own
    arguments say). Returns whether anything was removed.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1); m._original_forward = m.forward; m.forward = lambda x: x
        >>> m._is_accelerate_prepared = True
        >>> drop_accelerate_wrapper(m), "forward" in m.__dict__, hasattr(m, "_is_accelerate_prepared")
        (True, False, False)
    """
    state = module.__dict__
    changed = state.pop(_ACCELERATE_PREPARED, None) is not None
    if _ACCELERATE_ORIGINAL not in state:
        return changed
    original = state.pop(_ACCELERATE_ORIGINAL)
    own = getattr(type(module), "forward", None)
    if isinstance(original, types.MethodType) and original.__func__ is own:
        state.pop("forward", None)  # the class's forward, bound to this object (a shallow copy binds to itself)
    else:
        state["forward"] = original
    return True


def drop_accelerate_wrappers(model: object) -> None:
    """:func:`drop_accelerate_wrapper` on ``model`` and every submodule, in place (a no-op for a non-module)."""
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            drop_accelerate_wrapper(module)


def add_autocast_wrapper(module: torch.nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Put on ``module`` (in place) the mixed-precision ``forward`` wrapper accelerate's ``prepare_model`` installs:
    the forward under ``torch.autocast(device_type, dtype)``, float32 outputs, the original kept beside it and the
    module marked prepared (:func:`drop_accelerate_wrapper` takes it off again)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = module.forward
    func = getattr(forward, "__func__", None)
    autocast = torch.autocast(device_type=device_type, dtype=dtype)(func if func is not None else forward)
    wrapped = convert_outputs_to_fp32(autocast)
    module.__dict__[_ACCELERATE_ORIGINAL] = forward
    module.__dict__["forward"] = types.MethodType(wrapped, module) if func is not None else wrapped
    module.__dict__[_ACCELERATE_PREPARED] = True


def without_accelerate_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself, or, where accelerate's mixed-precision wrapper is still on it (the object a
    ``Trainer(bf16=True)`` trained), a shallow copy without the wrapper that shares every submodule, parameter,
    buffer and hook with ``model``: it runs the same weights in the precision the caller asks for (no leftover
    autocast), and ``model`` is not changed.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1); m._original_forward = m.forward; m.forward = lambda x: x
        >>> v = without_accelerate_wrapper(m)
        >>> v is m, v.weight is m.weight, "forward" in m.__dict__, "forward" in v.__dict__
        (False, True, True, False)
    """
    if not has_accelerate_wrapper(model):
        return model
    view = copy.copy(model)  # own __dict__; the _parameters/_modules/_buffers dicts are the model's
    drop_accelerate_wrapper(view)
    return view


def drop_forward_wrappers(model: torch.nn.Module) -> torch.nn.Module:
    """Remove instance-level ``forward`` wrappers that Trainer/Accelerate leave on a trained model.

    They are closures over the model's *original* forward: after ``copy.deepcopy`` the copy would still run the
    original's parameters. Removing them restores each class's own ``forward``. Accelerate's "prepared" flag goes
    as well (:func:`drop_accelerate_wrapper`): with it a Trainer given the copy (a replay) would skip its own
    mixed-precision setup and train without the autocast the recorded run had. Returns the model.
    """
    drop_accelerate_wrappers(model)
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


def clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that really runs its own parameters (see :func:`drop_forward_wrappers`).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1); c = clean_copy(m)
        >>> c.weight is m.weight
        False
    """

    return drop_forward_wrappers(copy.deepcopy(model))


@contextlib.contextmanager
def attention_switched(model: torch.nn.Module, implementation: str) -> Iterator[bool]:
    """Run ``model`` with attention implementation ``implementation`` (``config._attn_implementation``: ``eager``,
    ``sdpa``, ...) inside the block and give it back its own on exit; yields whether the model runs ``implementation``
    (False where it cannot switch, or has no attention implementation to switch).

    Example:
        >>> import torch
        >>> with attention_switched(torch.nn.Linear(1, 1), "eager") as switched:
        ...     switched
        False
    """
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    current = getattr(config, "_attn_implementation", None)
    if not isinstance(current, str) or current == implementation:
        yield current == implementation
        return
    switched = False
    if callable(setter):
        with contextlib.suppress(Exception):  # an unknown or unavailable implementation: the model keeps its own
            setter(implementation)
            switched = getattr(config, "_attn_implementation", None) == implementation
    try:
        yield switched
    finally:
        if switched:
            with contextlib.suppress(Exception):
                setter(current)
