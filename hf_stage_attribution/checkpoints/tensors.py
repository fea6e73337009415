"""Reading checkpoint tensors one at a time: safetensors (single or sharded), pickles only as weights.

Each tensor is read through its own short-lived ``safetensors.safe_open`` handle, so the memory-mapped pages of a
file are released after every tensor: peak memory stays near the size of the tensors in hand, however large the
checkpoint (a handle kept open would let the mapped pages of the whole file accumulate in the process's RSS).

Example:
    >>> import tempfile, torch, pathlib
    >>> from safetensors.torch import save_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"w": torch.ones(2, dtype=torch.float16)}, str(path))
    >>> reader = TensorReader([path])
    >>> reader.names(), reader.shape("w"), reader.get("w").dtype
    (['w'], (2,), torch.float32)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointImportError, CheckpointMismatchError, UnsafeCheckpointError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_HALF_BY_NAME = {"F16": torch.float16, "BF16": torch.bfloat16}


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint file") -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped where the format allows); anything else refused."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"Refused to load the {what} {path}: it is a pickle that holds more than plain tensors and containers "
            f"({reason[:200]}). Only torch.load(weights_only=True) is allowed; remove the file or convert the "
            "checkpoint to safetensors if you trust its source."
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointImportError(f"Could not read the {what} {path}: {exc}") from exc


class TensorReader:
    """The tensors of one checkpoint's weight files; ``get`` returns one float32 tensor in memory of its own.

    Args:
        files: safetensors files (one, or the shards of an index), or pickle files when ``pickled``.
        pickled: read ``files`` with :func:`load_weights_only` (kept memory-mapped while the reader lives).
    """

    def __init__(self, files: list[Path], pickled: bool = False) -> None:
        self.files = [Path(f) for f in files]
        self.pickled = pickled
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._loaded: dict[Path, dict] = {}
        for path in self.files:
            for key, info in self._index(path).items():
                if key in self._where:
                    raise CheckpointImportError(f"Tensor {key!r} appears in both {self._where[key]} and {path}.")
                self._where[key], self._info[key] = path, info

    def _index(self, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        if self.pickled:
            data = load_weights_only(path, "weights file")
            if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
                data = data["state_dict"]
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                raise CheckpointImportError(f"Expected {path} to hold a state dict of tensors, found {type(data)}.")
            self._loaded[path] = data
            return {k: (_TORCH_TO_ST.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in data.items()}

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                out = {}
                for key in handle.keys():
                    view = handle.get_slice(key)
                    out[key] = (view.get_dtype(), tuple(view.get_shape()))
                return out
        except FileNotFoundError as exc:
            raise CheckpointImportError(f"Expected the weights file {path}, found no such file.") from exc
        except Exception as exc:  # safetensors' own error type for a bad header
            raise CheckpointImportError(f"{path} is not a valid safetensors file ({exc}).") from exc

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> str:
        return self._info[name][0]

    def is_float(self, name: str) -> bool:
        return self._info[name][0] in FLOAT_DTYPES

    def nbytes(self, name: str) -> int:
        size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}.get(self.dtype(name), 2)
        count = 1
        for d in self.shape(name):
            count *= d
        return size * count

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """The tensor as float32. ``copy=True``: in memory of its own (writable); ``copy=False``: possibly a read-only
        view of the memory-mapped file (no copy for float32), whose pages are released when the tensor is freed.
        """
        path = self._where[name]
        if self.pickled:
            return self._loaded[path][name].to(torch.float32, copy=copy)

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).to(torch.float32, copy=copy)


def pad_to(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` placed at the start of a zero tensor of ``shape`` (resized vocabularies: rows appended)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = torch.zeros(shape, dtype=tensor.dtype)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


class CheckpointState:
    """θ at one boundary in the ledger's parameter space: ``get(name)`` → float32 tensor of the ledger's shape."""

    def get(self, name: str, writable: bool = True) -> torch.Tensor:  # pragma: no cover - interface
        """``writable=False`` allows a read-only view of a memory-mapped file (do not modify it in place)."""
        raise NotImplementedError

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype ``name``'s values have exactly (``get`` returns them as float32): float32 unless stated."""
        return torch.float32


class FullState(CheckpointState):
    """A full checkpoint; tensors smaller than the ledger's shape (before a vocabulary resize) are zero-padded."""

    def __init__(self, reader: TensorReader, keys: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.reader, self.keys, self.shapes = reader, keys, shapes

    def get(self, name: str, writable: bool = True) -> torch.Tensor:
        return pad_to(self.reader.get(self.keys[name], copy=writable), self.shapes[name])

    def stored_dtype(self, name: str) -> torch.dtype:
        """A bf16/fp16 checkpoint tensor's own dtype (its zero padding is exact there too), else float32."""
        return _HALF_BY_NAME.get(self.reader.dtype(self.keys[name]), torch.float32)


class AdapterState(CheckpointState):
    """A PEFT adapter on its base's state: ``base + scaling·B@A``; modules_to_save replace the base tensor, and a
    base layer saved beside LoRA factors (an embedding's, PEFT's ``save_embedding_layers``) replaces it under them.
    """

    def __init__(self, base: CheckpointState, adapter: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        self.base, self.adapter, self.shapes = base, adapter, shapes

    def get(self, name: str, writable: bool = True, lora: bool = True) -> torch.Tensor:
        """``lora=False``: the value under the LoRA delta (the replaced or base tensor), as a dense delta needs."""
        factored = lora and name in self.adapter.modules
        if name in self.adapter.replaced:
            key = self.adapter.replaced[name]
            value = pad_to(self.adapter.reader.get(key, copy=writable or factored), self.shapes[name])
        elif not factored:
            return self.base.get(name, writable)
        else:
            value = self.base.get(name)
        if factored:
            value += self.adapter.delta(name)
        return value


_EMBEDDING_MODULES = {"wte", "embed_tokens", "word_embeddings", "embed_in", "embed_out", "lm_head", "shared",
                      "tok_embeddings", "output"}  # fmt: skip


def _is_embedding(name: str, embeddings: set[str] | None) -> bool:
    if embeddings is not None:
        return name in embeddings
    parts = name.split(".")  # no buildable config: judged by the module's name
    return len(parts) >= 2 and parts[-2] in _EMBEDDING_MODULES


def growth(
    changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    embeddings: set[str] | None,
    vocab: tuple[int | None, int | None],
    config_changes: list[str],
    label: str,
) -> dict[str, int]:
    """``{name: dimension it grew along}`` for the tensors whose shape ``changed`` (``(before, after)``) since the
    previous boundary, when that is a resized vocabulary: only input/output ``embeddings`` (their parameter names;
    None: judged by name) grow, along one dimension, and the configs' ``vocab_size`` (``vocab``: before, after)
    grew too where both are known. Anything else is a different architecture: a clear error naming the tensors and
    the ``config_changes`` (``"field: before -> after"``).
    """
    dims: dict[str, int] = {}
    bad: list[str] = []
    for name, (before, after) in changed.items():
        diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        if len(before) == len(after) and len(diff) == 1 and after[diff[0]] > before[diff[0]]:
            dims[name] = diff[0]
        if name not in dims or not _is_embedding(name, embeddings):
            bad.append(f"{name} {list(before)} -> {list(after)}")
    old, new = vocab
    vocab_grew = old is None or new is None or new > old
    if not bad and vocab_grew:
        return dims
    found = f"{len(bad)} tensor(s) of another shape ({'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''})"
    if not bad:
        grown = ", ".join(sorted(dims)[:4])
        found = f"embeddings that grew ({grown}) while config.json's vocab_size did not ({old} -> {new})"
    fields = f"; config.json fields that differ: {', '.join(config_changes[:6])}" if config_changes else ""
    raise CheckpointMismatchError(
        f"{label}: expected the architecture of the previous boundary, where only a resized vocabulary (the "
        f"input/output embeddings growing with config.json's vocab_size) may change shapes; found {found}{fields}. "
        "Import checkpoints of one model, in training order."
    )
