"""Digests of tensors and states, shared by the ledger and the parameter helpers, and cheap checksums of values."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable

import numpy as np
import torch


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of the contiguous CPU tensor ``t`` as a uint8 array sharing its memory (any dtype, bfloat16
    included): what a file write, a hash or a ``pread`` into ``t`` takes, without a copy. ``t`` must already be
    contiguous and on the CPU (a copy made here would be filled instead of ``t``)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of a tensor (made contiguous on the CPU first): :func:`byte_view`, so no copy
    where the tensor already is one (files, hashes and ``bytes(...)`` all take it). A ``bytes`` copy per tensor was,
    beside the tensor itself, the largest allocation of every ledger write and digest (SmolLM2-135M's embedding:
    113 MB).

    Example:
        >>> bytes(tensor_bytes(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))).hex()
        '803f00c0'
    """
    return byte_view(tensor.detach().to("cpu").contiguous())


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (first 32 hex digits) of a tensor's float32 values and shape."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(byte_view(t))
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


def file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """A file's size, modification time in ns and inode (``None`` for a missing file or not a file): what keys the
    in-process memos of files already hashed or read; writing a file again, replacing or removing it changes it.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/f"
        >>> file_identity(path) is None
        True
        >>> _ = open(path, "w").write("x")
        >>> file_identity(path)[0]
        1
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def files_identity(paths: Iterable[str | os.PathLike]) -> tuple:
    """Each file as its resolved path and :func:`file_identity`, sorted: equal as long as none of the files is written
    again, replaced or removed (the key of the in-process memos of replay files, reference folders and the weights
    beside a card).

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/f"
        >>> _ = open(path, "w").write("x")
        >>> before = files_identity([path])
        >>> before == files_identity([path])
        True
        >>> _ = open(path, "w").write("xy")
        >>> before == files_identity([path])
        False
    """
    return tuple(sorted((os.path.realpath(p), file_identity(p)) for p in paths))


_CHUNK = 1 << 14  # elements per chunk of the checksum: 128 kB of float64 weights and temporary, whatever the size
_CHECKSUM_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def weighted_checksum(t: torch.Tensor) -> float:
    """``Σ_i w_i · t_i`` in float64 with fixed pseudo-random weights ``w_i ∈ [1, 2)``, one chunk at a time: a cheap
    fingerprint of a tensor's values (0.14 s for 134M parameters), not a cryptographic one. A plain sum would miss
    shifts whose entries sum to zero (the change of a classifier's bias under softmax cross-entropy does);
    ``sum(dtype=torch.float64)`` would also materialise a float64 copy of the whole tensor.

    Example:
        >>> t = torch.tensor([1.0, -1.0, 0.5])
        >>> weighted_checksum(t) == weighted_checksum(t.clone()), weighted_checksum(t) == weighted_checksum(t.flip(0))
        (True, False)
    """
    weights = _CHECKSUM_WEIGHTS.get(t.device)
    if weights is None:
        weights = torch.rand(_CHUNK, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1.0
        weights = _CHECKSUM_WEIGHTS.setdefault(t.device, weights.to(t.device))
    flat, total = t.detach().reshape(-1), 0.0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        total += float(torch.dot(chunk.to(torch.float64), weights[: chunk.numel()]))
    return total


def values_checksum(model: torch.nn.Module) -> tuple:
    """The shape and :func:`weighted_checksum` of each floating-point parameter and buffer of ``model``, in order:
    equal for models holding the same values (a float32 copy of bf16 weights included), whichever objects hold them.

    Example:
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> values_checksum(a) == values_checksum(b), values_checksum(a) == values_checksum(torch.nn.Linear(2, 1))
        (True, False)
    """
    with torch.no_grad():
        return tuple(
            (tuple(t.shape), weighted_checksum(t))
            for t in [*model.parameters(), *model.buffers()]
            if t.is_floating_point()
        )
