"""Reading safetensors files one tensor at a time with plain reads, not a memory map.

``safetensors.safe_open`` memory-maps the whole file; every page a read touches then stays in the process's
resident set for as long as the handle is open, so streaming K stage deltas or embeddings through an attribution
would show up as K × the model in RSS. :class:`TensorFileReader` parses and validates the header once and reads
each tensor with ``os.pread`` into a fresh tensor: only the tensors the caller holds are resident.

Example:
    >>> import tempfile, torch
    >>> from hf_stage_attribution.ledger.storage import write_safetensors
    >>> path = tempfile.mkdtemp() + "/t.safetensors"
    >>> _ = write_safetensors(path, {"w": torch.ones(2, 3)})
    >>> TensorFileReader(path).get_tensor("w").shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import LedgerFormatError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # as safetensors itself


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TensorFileReader:
    """``keys()``, ``get_tensor(name)`` and ``metadata()`` of a safetensors file, without a memory map."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise self._corrupt("shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", prefix)
                if length > MAX_HEADER_BYTES or 8 + length > size:
                    raise self._corrupt(f"header length {length} does not fit in a file of {size} bytes")
                raw = fh.read(length)
        except FileNotFoundError as exc:
            raise LedgerFormatError(f"Expected the tensor file {self.path}, found no such file.") from exc
        except OSError as exc:
            raise LedgerFormatError(f"Could not read the tensor file {self.path}: {exc}.") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._corrupt(f"its header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        self._metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        data_size = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, data_size)

    def _corrupt(self, why: str) -> LedgerFormatError:
        return LedgerFormatError(
            f"The tensor file {self.path} is not a valid safetensors file ({why}). It may be truncated or corrupt; "
            "re-record the stage or restore the file."
        )

    def _check_entry(self, name: str, entry: object, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise self._corrupt(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self._corrupt(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise self._corrupt(f"tensor {name!r} has invalid data offsets {offsets!r}")
        dtype = _DTYPES[entry["dtype"]]
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise self._corrupt(f"tensor {name!r} spans bytes {begin}..{end} of {data_size}, expected {nbytes} bytes")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype string, shape)`` of a tensor, from the header alone."""
        dtype, shape, _, _ = self._entries[name]
        return next(k for k, v in _DTYPES.items() if v == dtype), shape

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(name)
        dtype, shape, begin, end = self._entries[name]
        buffer = bytearray(end - begin)
        if buffer:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view, done = memoryview(buffer), 0
                while done < len(buffer):
                    got = os.preadv(fd, [view[done:]], self._data_start + begin + done)
                    if got <= 0:
                        raise self._corrupt(f"tensor {name!r} is cut short")
                    done += got
            finally:
                os.close(fd)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if buffer else torch.empty(shape, dtype=dtype)

    def __enter__(self) -> TensorFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
