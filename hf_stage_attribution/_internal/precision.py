"""Models whose weights are half precision (``bfloat16``/``float16``): the attributor works on a float32 copy.

Most Hugging Face fine-tuning loads a model with ``torch_dtype=torch.bfloat16``. Evaluating a behavior on bf16
weights rounds every activation to 8 bits of mantissa, so the difference of two evaluations — a finite-difference
estimate, replay's ``f(θ_K) − f(θ̃_K)`` — is mostly rounding noise for a small effect (SmolLM2-135M, one SFT stage:
``delta-fd`` −0.122 in bf16 against −0.042 on the same weights in float32, the linear read-out −0.041). The ledger's
states are float32 and hold bf16 values exactly, so the attributor evaluates on a float32 copy of the model
(:func:`float32_working_model`), while replays still train in the dtypes the model was trained in
(:func:`to_training_dtypes`, used by ``estimators.replay.working_copy``): a stage that trained bf16 weights loses the
updates that bf16 rounding loses, and a float32 replay would not.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    >>> half_precision_dtype(model)
    torch.bfloat16
    >>> work = float32_working_model(model)
    >>> work.weight.dtype, torch.equal(work.weight.to(torch.bfloat16), model.weight)
    (torch.float32, True)
    >>> to_training_dtypes(work, work) and work.weight.dtype
    torch.bfloat16
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model_state import clean_copy
from .params import normalize_name

HALF_DTYPES = (torch.bfloat16, torch.float16)
#: the attribute of a float32 working model that keeps each floating tensor's dtype (by base name)
TRAINING_DTYPES = "_hsa_training_dtypes"


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value known to be a tensor of ``dtype`` is stored in exactly: its own for bf16/fp16, else float32.

    Example:
        >>> storage_dtype(torch.bfloat16), storage_dtype(torch.float64)
        (torch.bfloat16, torch.float32)
    """
    return dtype if dtype in HALF_DTYPES else torch.float32


def exact_cast(value: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``value`` in ``dtype``, refusing a cast that would round (a stored θ_0 must read back bit for bit).

    Example:
        >>> exact_cast(torch.tensor([0.5, 2.0]), torch.bfloat16, "w").dtype
        torch.bfloat16
        >>> exact_cast(torch.tensor([1 / 3]), torch.bfloat16, "w")
        Traceback (most recent call last):
        ...
        ValueError: 'w' holds values that torch.bfloat16 would round (expected values of that dtype)
    """
    if value.dtype == dtype:
        return value
    out = value.to(dtype)
    if not torch.equal(out.to(value.dtype), value):
        raise ValueError(f"{name!r} holds values that {dtype} would round (expected values of that dtype)")
    return out


def half_precision_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The half-precision dtype of the model's floating parameters (the first by name where several), else None."""
    for _, param in model.named_parameters():
        if param.dtype in HALF_DTYPES:
            return param.dtype
    return None


def _floating(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor, bool]]:
    """``(base name, owner module, attribute, tensor, is_parameter)`` of every floating parameter and buffer."""
    for module_name, module in model.named_modules():
        for kind, tensors in ((True, module._parameters), (False, module._buffers)):
            for attr, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                base = normalize_name(f"{module_name}.{attr}" if module_name else attr)
                if base is not None:
                    yield base, module, attr, tensor, kind


def _cast(model: torch.nn.Module, dtype_of) -> bool:
    changed = False
    with torch.no_grad():
        for base, module, attr, tensor, is_param in _floating(model):
            dtype = dtype_of(base, tensor)
            if dtype is None or tensor.dtype == dtype:
                continue
            if is_param:
                tensor.data = tensor.data.to(dtype)  # the Parameter object stays (tied weights stay tied)
            else:
                module._buffers[attr] = tensor.to(dtype)
            changed = True
    return changed


def half_precision_note(dtype: torch.dtype) -> str:
    """What training half-precision weights means for replay and the estimates (a stage note and a warning)."""
    name = str(dtype).replace("torch.", "")
    return (
        f"The stage trains {name} weights: the ledger stores them exactly (in {name}, float32 where that rounds), "
        f"the attributor evaluates a float32 copy of the model, and replay re-runs the stage in {name}, whose "
        "rounding differs from run to run (a replay with nothing removed lands within about one rounding step of θ_K, "
        "not on it). For exact replay train float32 weights (with autocast for speed)."
    )


def half_weight_dtypes(model: object) -> list[str]:
    """The half-precision dtypes of ``model``'s parameters by name (``["bfloat16"]``), sorted; ``[]`` for a float32
    model or an object without parameters — ``stage.json["training_precision"]["weights"]``.

    Example:
        >>> half_weight_dtypes(torch.nn.Linear(2, 1).to(torch.bfloat16)), half_weight_dtypes(torch.nn.Linear(2, 1))
        (['bfloat16'], [])
    """
    parameters = getattr(model, "parameters", None)
    dtypes = {p.dtype for p in parameters()} if callable(parameters) else set()
    return sorted(str(d).replace("torch.", "") for d in dtypes if d in HALF_DTYPES)


def precision_description(record: object) -> str | None:
    """What a stage's ``training_precision`` (stage.json) says in words — its mixed precision (``"bf16 mixed
    precision"``) or else its half-precision weights (``"bfloat16 weights"``) — or None where it is not such a record.

    Example:
        >>> precision_description({"mixed": "bf16", "weights": ["bfloat16"]})
        'bf16 mixed precision'
        >>> precision_description({"weights": ["float16"]})
        'float16 weights'
        >>> precision_description(None) is None
        True
    """
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("mixed"), str):
        return f"{record['mixed']} mixed precision"
    weights = record.get("weights")
    if isinstance(weights, list) and weights and all(isinstance(w, str) for w in weights):
        return f"{', '.join(weights)} weights"
    return None


def float32_working_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every floating parameter and buffer in float32 (exact: bf16 and fp16 values are
    float32 values), remembering each one's dtype for :func:`to_training_dtypes`."""
    dtypes = {base: tensor.dtype for base, _, _, tensor, _ in _floating(model)}
    work = clean_copy(model)
    _cast(work, lambda base, tensor: torch.float32)
    setattr(work, TRAINING_DTYPES, dtypes)
    return work


def to_training_dtypes(model: torch.nn.Module, source: torch.nn.Module) -> bool:
    """Cast ``model``'s floating tensors back to the dtypes ``source`` (a :func:`float32_working_model`, or a copy of
    one) remembers; False (nothing done) when ``source`` remembers none."""
    dtypes = getattr(source, TRAINING_DTYPES, None)
    if not dtypes:
        return False
    return _cast(model, lambda base, tensor: dtypes.get(base))


def subtract_(param: torch.Tensor, step: torch.Tensor) -> None:
    """``param −= step`` in place. A half-precision ``param`` is rounded once (the difference is taken in float64):
    casting ``step`` to bf16 first and subtracting in bf16 rounds twice, so ``θ_K − Δ_K`` missed ``θ_{K−1}`` in
    2.2 % of a bf16 model's entries. Other dtypes subtract ``step`` cast to theirs, as before.

    Example:
        >>> prev = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
        >>> final = torch.tensor([1.0078125, 2.984375], dtype=torch.bfloat16)
        >>> x = final.clone(); subtract_(x, final.double() - prev.double()); torch.equal(x, prev)
        True
    """
    if param.dtype in HALF_DTYPES:
        param.copy_((param.double() - step.to(device=param.device, dtype=torch.float64)).to(param.dtype))
    else:
        param.sub_(step.to(device=param.device, dtype=param.dtype))


def to_float32(model: torch.nn.Module) -> None:
    """Every floating parameter and buffer of ``model`` in float32 (exact for half-precision values)."""
    _cast(model, lambda base, tensor: torch.float32)


__all__ = [
    "HALF_DTYPES",
    "float32_working_model",
    "half_precision_dtype",
    "half_precision_note",
    "subtract_",
    "to_float32",
    "to_training_dtypes",
]
