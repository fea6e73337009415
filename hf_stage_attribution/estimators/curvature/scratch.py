"""A store of model-sized float64 vectors (the Krylov basis), in RAM when small and on disk otherwise.

The curvature propagation keeps a Krylov basis of ``krylov_size`` (+3) vectors over every coordinate the later
stages train: on a model of ``n`` parameters that is ``8·n·r`` bytes, many times the model's own float32 bytes.
:class:`VectorStore` keeps those rows in a file under a private temporary directory (deleted on :meth:`close`, on
exit of its ``with`` block and on an exception) and does every whole-basis operation — inner products, linear
combinations, weighted Gram matrices — in coordinate chunks read with plain ``pread``/``pwrite`` (no memory map, so
no page of the file counts in the process's resident memory): only O(1) model-sized vectors live in RAM. Rows are
float64 on disk too, so a disk-backed basis gives the same numbers as one in RAM.

When the basis fits in :data:`RAM_BASIS_BYTES` (tiny models: tests, the digits pipelines) the rows stay in one
RAM tensor and the same operations run on it (no disk traffic, no speed cost). ``HF_STAGE_ATTRIBUTION_CURVATURE_
SCRATCH`` forces ``ram`` or ``disk``; ``HF_STAGE_ATTRIBUTION_SCRATCH_DIR`` chooses where the file goes (default: the
system's temporary directory).

Example:
    >>> import torch
    >>> with VectorStore(5, 3, where="disk") as store:
    ...     store.write(0, torch.ones(5, dtype=torch.float64))
    ...     store.write(1, torch.arange(5, dtype=torch.float64))
    ...     store.dots(torch.ones(5, dtype=torch.float64)).tolist()
    [5.0, 10.0]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import numpy as np
import torch

from ...errors import EstimatorMemoryError

#: Largest basis (bytes) kept in RAM by default: below it the disk round trips would cost time for no real saving.
RAM_BASIS_BYTES = 64 * 2**20
#: Coordinates per chunk of the streamed operations (512 KiB of float64 per row read).
CHUNK = 2**16
SCRATCH_ENV = "HF_STAGE_ATTRIBUTION_CURVATURE_SCRATCH"
SCRATCH_DIR_ENV = "HF_STAGE_ATTRIBUTION_SCRATCH_DIR"
_ITEM = 8  # float64


def scratch_mode(n: int, rows: int) -> str:
    """``"ram"`` or ``"disk"``: where a basis of ``rows`` vectors over ``n`` coordinates is kept.

    Example:
        >>> scratch_mode(1000, 12), scratch_mode(10**8, 12)
        ('ram', 'disk')
    """
    forced = os.environ.get(SCRATCH_ENV, "").strip().lower()
    if forced in ("ram", "disk"):
        return forced
    if forced not in ("", "auto"):
        raise EstimatorMemoryError(f"{SCRATCH_ENV} must be 'ram', 'disk' or 'auto', got {forced!r}.")
    return "ram" if _ITEM * n * rows <= RAM_BASIS_BYTES else "disk"


def scratch_dir() -> str:
    """The directory under which disk-backed bases are written."""
    return os.environ.get(SCRATCH_DIR_ENV) or tempfile.gettempdir()


def scratch_free_bytes() -> int:
    """Free bytes on the scratch directory's file system."""
    return shutil.disk_usage(scratch_dir()).free


class VectorStore:
    """Up to ``capacity`` float64 rows of ``n`` coordinates, appended with :meth:`write`; ``where`` is ``"ram"``,
    ``"disk"`` or ``None`` (:func:`scratch_mode` decides). Use as a context manager (or call :meth:`close`)."""

    def __init__(self, n: int, capacity: int, *, where: str | None = None, chunk: int | None = None) -> None:
        self.n, self.capacity, self.count = int(n), int(capacity), 0
        self.where = where or scratch_mode(self.n, self.capacity)
        self.chunk = max(1, int(CHUNK if chunk is None else chunk))
        self._ram: torch.Tensor | None = None
        self._dir: str | None = None
        self._fd: int | None = None
        if self.where == "ram":
            self._ram = torch.empty(self.capacity, self.n, dtype=torch.float64)
        elif self.where == "disk":
            self._dir = tempfile.mkdtemp(prefix="hfsa-krylov-", dir=scratch_dir())
            self._fd = os.open(os.path.join(self._dir, "basis.f64"), os.O_RDWR | os.O_CREAT, 0o600)
        else:
            raise ValueError(f"`where` must be 'ram' or 'disk', got {self.where!r}.")

    # --- lifetime -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the rows (delete the scratch file and its directory)."""
        self._ram = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- rows -----------------------------------------------------------------------------------------------------

    def write(self, i: int, vector: torch.Tensor) -> None:
        """Store ``vector`` (any float dtype, ``n`` values) as row ``i`` (``i ≤ count``)."""
        if i > self.count or i >= self.capacity:
            raise IndexError(f"row {i} out of order (count {self.count}, capacity {self.capacity})")
        flat = vector.detach().reshape(-1)
        if self._ram is not None:
            self._ram[i].copy_(flat)
        else:
            for lo, hi in self._ranges():
                part = np.ascontiguousarray(flat[lo:hi].to(torch.float64).numpy())
                os.pwrite(self._fd, part.data, (i * self.n + lo) * _ITEM)
        self.count = max(self.count, i + 1)

    def read(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``i`` as a float64 tensor (written into ``out`` when given; a view of the RAM rows otherwise)."""
        if self._ram is not None:
            return self._ram[i] if out is None else out.copy_(self._ram[i])
        out = torch.empty(self.n, dtype=torch.float64) if out is None else out
        for lo, hi in self._ranges():
            out[lo:hi] = self._block(lo, hi, i, i + 1)[0]
        return out

    def _ranges(self) -> Iterator[tuple[int, int]]:
        for lo in range(0, self.n, self.chunk):
            yield lo, min(self.n, lo + self.chunk)

    def _block(self, lo: int, hi: int, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Rows ``first..last`` (default: all written) at coordinates ``lo..hi``, as a ``rows × (hi−lo)`` tensor."""
        last = self.count if last is None else last
        if self._ram is not None:
            return self._ram[first:last, lo:hi]
        block = np.empty((last - first, hi - lo), dtype=np.float64)
        for r in range(first, last):
            view = memoryview(block[r - first])
            got = os.preadv(self._fd, [view], (r * self.n + lo) * _ITEM)
            if got != (hi - lo) * _ITEM:
                raise OSError(f"short read from the Krylov scratch file ({got} of {(hi - lo) * _ITEM} bytes)")
        return torch.from_numpy(block)

    # --- streamed linear algebra ----------------------------------------------------------------------------------

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """``Qᵀ w`` over the rows written (float64, one value per row)."""
        out = torch.zeros(self.count, dtype=torch.float64)
        if self.count == 0:
            return out
        if self._ram is not None:
            return self._ram[: self.count] @ w.to(torch.float64)
        for lo, hi in self._ranges():
            out += self._block(lo, hi) @ w[lo:hi].to(torch.float64)
        return out

    def subtract(self, w: torch.Tensor, coefficients: torch.Tensor) -> None:
        """``w −= Q c`` in place (``w`` float64)."""
        if self.count == 0:
            return
        c = coefficients.to(torch.float64)
        if self._ram is not None:
            w.sub_(c @ self._ram[: self.count])
            return
        for lo, hi in self._ranges():
            w[lo:hi] -= c @ self._block(lo, hi)

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Q C`` for a ``rows × m`` coefficient matrix: ``m`` float64 vectors of ``n`` values (``n × m``)."""
        c = coefficients.to(torch.float64)
        squeeze = c.dim() == 1
        c = c[:, None] if squeeze else c
        if self._ram is not None:
            out = self._ram[: self.count].T @ c
        else:
            out = torch.empty(self.n, c.shape[1], dtype=torch.float64)
            for lo, hi in self._ranges():
                torch.matmul(self._block(lo, hi).T, c, out=out[lo:hi])
        return out[:, 0] if squeeze else out

    def gram(self, weights: Sequence[Callable[[int, int], np.ndarray]]) -> list[np.ndarray]:
        """``Qᵀ diag(d) Q`` for each per-coordinate weight ``d``, given as ``d(lo, hi)`` (its values at coordinates
        ``lo..hi``), in one pass over the rows."""
        r = self.count
        out = [np.zeros((r, r)) for _ in weights]
        for lo, hi in self._ranges():
            block = self._block(lo, hi).numpy()
            for k, d in enumerate(weights):
                out[k] += (block * d(lo, hi)) @ block.T
        return out


__all__ = ["CHUNK", "RAM_BASIS_BYTES", "VectorStore", "scratch_free_bytes", "scratch_mode"]
