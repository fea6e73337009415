"""A half-precision weight's Δ kept in its own dtype, with the few entries that dtype would round kept apart.

A stage that trains bf16 (or fp16) weights moves each from one bf16 value to another. The difference of the two is
exact in float32, and in bf16 too for nearly every entry (two values within a factor of 2 of each other subtract
exactly; SmolLM2-135M, 3 SFT steps: all but 8,846 of 134.5M entries). Ledger format 3 stores such a Δ as the bf16
tensor in ``delta.safetensors`` and the rounded entries as a sparse float32 residual in
``delta_residual.safetensors`` (``NAME::index``: int64 flat positions, ``NAME::value``: their float32 Δ): half the
size of a float32 Δ, and read back bit for bit. A tensor where more than :data:`MAX_RESIDUAL_FRACTION` of the entries
would round is stored in float32 as before.

Example:
    >>> import torch
    >>> start = torch.tensor([1.0, 0.5, 3e-3, -2e-5], dtype=torch.bfloat16)
    >>> end = torch.tensor([1.0078125, 0.5, -1e-3, 4e-5], dtype=torch.bfloat16)
    >>> delta = end.float() - start.float()
    >>> half, index, value = split_delta(delta, torch.bfloat16, max_fraction=0.5)
    >>> half.dtype, index.tolist()  # the entry crossing zero does not subtract exactly in bf16
    (torch.bfloat16, [2])
    >>> torch.equal(join_delta(half, index, value), delta)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LedgerFormatError

#: above this share of rounded entries a half-precision Δ is stored in float32: 2 + 12 / 8 = 3.5 bytes an entry
MAX_RESIDUAL_FRACTION = 1 / 8
RESIDUAL_FILE = "delta_residual.safetensors"


def split_delta(
    delta: torch.Tensor, dtype: torch.dtype, max_fraction: float = MAX_RESIDUAL_FRACTION
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Δ in dtype, flat positions it rounds, their float32 values)``, or None when more than ``max_fraction`` of
    the entries round (store the float32 Δ then)."""
    flat = delta.detach().reshape(-1).to(torch.float32)
    half = flat.to(dtype)
    rounded = half.to(torch.float32) != flat  # NaN too: it is kept in the residual, bit for bit
    count = int(rounded.sum())
    if count > max_fraction * flat.numel():
        return None
    index = rounded.nonzero().reshape(-1)
    return half.reshape(delta.shape), index, flat[index].clone()


def residual_keys(name: str) -> tuple[str, str]:
    """The residual file's keys of parameter ``name``: its flat positions and their float32 values."""
    return f"{name}::index", f"{name}::value"


def store_half(
    name: str,
    delta: torch.Tensor,
    dtype: torch.dtype,
    stored: dict[str, torch.dtype],
    residual: dict[str, torch.Tensor],
) -> None:
    """Where :func:`split_delta` allows it, mark ``name``'s Δ to be stored in ``dtype`` (``stored``) and put the
    entries ``dtype`` rounds in ``residual`` (the writers' pre-pass: the recorder, the checkpoint importer)."""
    split = split_delta(delta, dtype)
    if split is None:
        return
    stored[name] = dtype
    if split[1].numel():
        index_key, value_key = residual_keys(name)
        residual[index_key], residual[value_key] = split[1], split[2]


def join_delta(half: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The float32 Δ: ``half`` in float32 with the residual's entries put back."""
    out = half.to(torch.float32, copy=True)
    out.view(-1)[index] = value
    return out


def residual_checker(shapes: dict[str, tuple[int, ...]]) -> Callable[[Path, dict], None]:
    """A header check for ``delta_residual.safetensors``: ``NAME::index`` (I64) and ``NAME::value`` (F32) pairs of one
    length, no longer than the parameter, for parameters of the ledger's model."""

    def check(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        lengths: dict[str, dict[str, int]] = {}
        for key, (dtype, shape) in header.items():
            name, sep, part = key.rpartition("::")
            want = {"index": "I64", "value": "F32"}.get(part)
            if not sep or name not in shapes or want is None or dtype != want or len(shape) != 1:
                raise _bad(path, "NAME::index (I64) and NAME::value (F32) vectors for parameters of the model", key)
            lengths.setdefault(name, {})[part] = shape[0]
        for name, parts in lengths.items():
            numel = int(torch.Size(shapes[name]).numel())
            if len(parts) != 2 or parts["index"] != parts["value"] or parts["index"] > numel:
                raise _bad(path, f"an index and a value vector of one length (at most {numel})", name)

    return check


def check_positions(path: Path | None, name: str, index: torch.Tensor, numel: int) -> None:
    """The residual's positions must lie inside the parameter (the header cannot say it)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise _bad(path, f"positions in [0, {numel})", f"{name}::index")


def _bad(path: Path | None, expected: str, key: str) -> LedgerFormatError:
    return LedgerFormatError(
        f"{path}: expected {expected}, found {key!r}. The file does not belong to this ledger or is corrupt; restore "
        "it or re-record the stage."
    )
