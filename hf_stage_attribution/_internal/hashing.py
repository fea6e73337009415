"""Digests of tensors and states, shared by the ledger and the parameter helpers."""

from __future__ import annotations

import hashlib

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor (contiguous, on CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (first 32 hex digits) of a tensor's float32 values and shape."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def combine_digests(digests: dict[str, str]) -> str:
    """One hash for a whole state from its per-tensor digests (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digests[name].encode())
        h.update(b"\n")
    return h.hexdigest()
