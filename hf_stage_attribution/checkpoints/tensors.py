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


class FullState(CheckpointState):
    """A full checkpoint; tensors smaller than the ledger's shape (before a vocabulary resize) are zero-padded."""

    def __init__(self, reader: TensorReader, keys: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.reader, self.keys, self.shapes = reader, keys, shapes

    def get(self, name: str, writable: bool = True) -> torch.Tensor:
        return pad_to(self.reader.get(self.keys[name], copy=writable), self.shapes[name])


class AdapterState(CheckpointState):
    """A PEFT adapter on top of the previous boundary's state: ``base + scaling·B@A``; modules_to_save replace."""

    def __init__(self, base: CheckpointState, adapter: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        self.base, self.adapter, self.shapes = base, adapter, shapes

    def get(self, name: str, writable: bool = True) -> torch.Tensor:
        if name in self.adapter.replaced:
            return pad_to(self.adapter.reader.get(self.adapter.replaced[name], copy=writable), self.shapes[name])
        if name not in self.adapter.modules:
            return self.base.get(name, writable)
        value = self.base.get(name)
        value += self.adapter.delta(name)
        return value


def growth(name: str, before: tuple[int, ...], after: tuple[int, ...], label: str) -> int | None:
    """The one dimension along which a tensor grew between boundaries (None if unchanged); else a clear error."""
    if before == after:
        return None
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(before) != len(after) or len(changed) != 1 or after[changed[0]] < before[changed[0]]:
        raise CheckpointMismatchError(
            f"{label}: tensor {name!r} has shape {after}, the previous boundary {before}. Only growth along one "
            "dimension (a resized vocabulary) can be imported; anything else is a different architecture. Import "
            "checkpoints of one model, in training order."
        )
    return changed[0]
