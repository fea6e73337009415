"""Temporarily giving a live model other (base-space) parameter values, and restoring them exactly."""

from __future__ import annotations

import contextlib
import copy
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


def drop_forward_wrappers(model: torch.nn.Module) -> torch.nn.Module:
    """Remove instance-level ``forward`` wrappers that Trainer/Accelerate leave on a trained model.

    They are closures over the model's *original* forward: after ``copy.deepcopy`` the copy would still run the
    original's parameters. Removing them restores each class's own ``forward``. Returns the model.
    """
    for module in model.modules():
        for attr in ("forward", "_original_forward"):
            module.__dict__.pop(attr, None)
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
