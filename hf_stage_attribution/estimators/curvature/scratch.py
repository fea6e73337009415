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

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..._internal.hashing import byte_view
from ...errors import EstimatorMemoryError

#: Largest basis (bytes) kept in RAM by default: below it the disk round trips would cost time for no real saving.
RAM_BASIS_BYTES = 64 * 2**20
#: Coordinates per chunk of the streamed operations (512 KiB of float64 per row read).
CHUNK = 2**16
#: Coordinates per piece when one model-sized tensor is processed elementwise a piece at a time (2 MiB of float64):
#: the curvature-free run of a tensor kept on disk (the curvature products read tangents and add into their float64
#: sums in :data:`CHUNK` pieces instead: fewer float64 temporaries at once on top of a product's working set).
PIECE = 2**18


def pieces(size: int, step: int = PIECE) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` ranges covering ``0..size`` in pieces of at most ``step`` coordinates.

    Example:
        >>> list(pieces(5, 2))
        [(0, 2), (2, 4), (4, 5)]
    """
    for lo in range(0, size, step):
        yield lo, min(size, lo + step)


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


#: Largest carried vector (bytes of one float64 model-sized vector) kept in RAM by default; above it the perturbation,
#: the first-moment difference and the preconditioner the curvature propagation carries live in :class:`TensorFile`s.
CARRIED_RAM_BYTES = 8 * 2**20


def carried_mode(n: int) -> str:
    """``"ram"`` or ``"disk"``: where the curvature propagation keeps its carried float64 vectors over ``n``
    coordinates (``HF_STAGE_ATTRIBUTION_CURVATURE_SCRATCH`` forces either, as for the basis).

    Example:
        >>> carried_mode(1000), carried_mode(10**8)
        ('ram', 'disk')
    """
    forced = os.environ.get(SCRATCH_ENV, "").strip().lower()
    if forced in ("ram", "disk"):
        return forced
    scratch_mode(1, 1)  # validates the variable
    return "ram" if _ITEM * n <= CARRIED_RAM_BYTES else "disk"


def scratch_dir() -> str:
    """The directory under which disk-backed bases are written."""
    return os.environ.get(SCRATCH_DIR_ENV) or tempfile.gettempdir()


def scratch_free_bytes() -> int:
    """Free bytes on the scratch directory's file system."""
    return shutil.disk_usage(scratch_dir()).free


def open_unlinked(prefix: str, suffix: str = ".bin", directory: str | os.PathLike | None = None) -> int:
    """A read-write descriptor of a new file in ``directory`` (default :func:`scratch_dir`), unlinked as soon as it is
    open: its blocks go back to the file system when the descriptor is closed — also by a process killed for memory,
    where no cleanup runs."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=str(directory or scratch_dir()))
    os.unlink(path)
    return fd


def read_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the C-contiguous array ``out`` from ``fd`` at byte ``offset`` (``pread``, repeated while a read returns
    fewer bytes than asked); :class:`OSError` where the file ends first."""
    view, done = memoryview(out).cast("B"), 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read from a scratch file ({done} of {view.nbytes} bytes)")
        done += got


def write_from(fd: int, data: np.ndarray, offset: int) -> None:
    """Write the C-contiguous array ``data`` to ``fd`` at byte ``offset`` (``pwrite``, repeated while a write takes
    fewer bytes than given, e.g. above 2 GiB on Linux)."""
    view, done = memoryview(data).cast("B"), 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


def _scoped_buffers(method: Callable) -> Callable:
    """Let ``method`` (one streamed operation of :class:`VectorStore`) reuse its chunk buffers across its chunks and
    free them when it returns: one allocation per operation instead of one per chunk (with the heap's mmap threshold
    fixed low each was a fresh mmap whose pages all faulted on first touch — 14.3M page faults, half the time of an
    ``aa-ggn`` run on a 3.7M-parameter model), and no buffer kept across the curvature products (where the peak is)."""

    @functools.wraps(method)
    def scoped(self: VectorStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self.release_buffers()

    return scoped


class VectorStore:
    """Up to ``capacity`` float64 rows of ``n`` coordinates, appended with :meth:`write`; ``where`` is ``"ram"``,
    ``"disk"`` or ``None`` (:func:`scratch_mode` decides). Use as a context manager (or call :meth:`close`)."""

    def __init__(self, n: int, capacity: int, *, where: str | None = None, chunk: int | None = None) -> None:
        self.n, self.capacity, self.count = int(n), int(capacity), 0
        self.where = where or scratch_mode(self.n, self.capacity)
        self.chunk = max(1, int(CHUNK if chunk is None else chunk))
        self._ram: torch.Tensor | None = None
        self._fd: int | None = None
        self._buffer: np.ndarray | None = None  # the disk rows' block buffer, reused (see _block)
        self._work: np.ndarray | None = None  # two working row ranges, reused (read_range's slots)
        if self.where == "ram":
            self._ram = torch.empty(self.capacity, self.n, dtype=torch.float64)
        elif self.where == "disk":
            # unlinked as soon as it is open: the rows vanish with the process, even one killed for memory
            self._fd = open_unlinked("hfsa-krylov-", ".f64")
        else:
            raise ValueError(f"`where` must be 'ram' or 'disk', got {self.where!r}.")

    # --- lifetime -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the rows (the scratch file, unlinked since it was opened, goes with its descriptor)."""
        self._ram = self._buffer = self._work = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 - contextlib may be gone at interpreter exit too
            self.close()
        except Exception:  # noqa: BLE001, S110 - a store alive at interpreter exit: the os module may be gone already
            pass

    def release_buffers(self) -> None:
        """Drop the reused chunk buffers (:meth:`read_range`'s working slots, the block buffer) until they are next
        needed: a caller that read through the slots between streamed operations frees them when it is done."""
        self._buffer = self._work = None

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
                write_from(self._fd, part, (i * self.n + lo) * _ITEM)
        self.count = max(self.count, i + 1)

    @_scoped_buffers
    def read(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``i`` as a float64 tensor (written into ``out`` when given; a view of the RAM rows otherwise)."""
        if self._ram is not None:
            return self._ram[i] if out is None else out.copy_(self._ram[i])
        out = torch.empty(self.n, dtype=torch.float64) if out is None else out
        for lo, hi in self._ranges():
            out[lo:hi] = self._block(lo, hi, i, i + 1)[0]
        return out

    def _ranges(self) -> Iterator[tuple[int, int]]:
        return pieces(self.n, self.chunk)

    def _block(self, lo: int, hi: int, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Rows ``first..last`` (default: all written) at coordinates ``lo..hi``, as a ``rows × (hi−lo)`` tensor: for
        disk rows a view of a buffer the next call overwrites (use it before asking for another block)."""
        last = self.count if last is None else last
        if self._ram is not None:
            return self._ram[first:last, lo:hi]
        rows, width = last - first, hi - lo
        if self._buffer is None or self._buffer.size < rows * width:
            # one buffer for the blocks of one operation (see _scoped_buffers)
            self._buffer = np.empty(max(rows, 1) * max(width, self.chunk), dtype=np.float64)
        block = self._buffer[: rows * width].reshape(rows, width)
        for r in range(first, last):
            read_into(self._fd, block[r - first], (r * self.n + lo) * _ITEM)
        return torch.from_numpy(block)

    # --- one row as a working vector (streamed: no model-sized vector in RAM) ---------------------------------------

    def read_range(self, i: int, lo: int, hi: int, slot: int | None = None) -> torch.Tensor:
        """Row ``i`` at coordinates ``lo..hi`` (float64; a view of the RAM rows, else a new tensor, or with ``slot``
        0 or 1 a view of that reused working buffer, overwritten by the next read into the same slot)."""
        if self._ram is not None:
            return self._ram[i, lo:hi]
        if slot is None:
            out = np.empty(hi - lo, dtype=np.float64)
        else:
            if self._work is None or self._work.shape[1] < hi - lo:
                self._work = np.empty((2, max(hi - lo, self.chunk)), dtype=np.float64)
            out = self._work[slot, : hi - lo]
        read_into(self._fd, out, (i * self.n + lo) * _ITEM)
        return torch.from_numpy(out)

    def write_range(self, i: int, lo: int, values: torch.Tensor) -> None:
        """Write ``values`` (float64) at coordinates ``lo..lo+len`` of row ``i`` (``i < capacity``; any row, the
        rows past ``count`` serve as working vectors and do not count as written)."""
        if i >= self.capacity:
            raise IndexError(f"row {i} out of range (capacity {self.capacity})")
        flat = values.detach().reshape(-1)
        if self._ram is not None:
            self._ram[i, lo : lo + flat.numel()].copy_(flat)
            return
        part = np.ascontiguousarray(flat.to(torch.float64).numpy())
        write_from(self._fd, part, (i * self.n + lo) * _ITEM)

    @_scoped_buffers
    def row_dots(self, i: int) -> torch.Tensor:
        """``Qᵀ q_i`` over the rows written (``i`` a working row past them)."""
        out = torch.zeros(self.count, dtype=torch.float64)
        if self.count == 0:
            return out
        if self._ram is not None:
            return self._ram[: self.count] @ self._ram[i]
        for lo, hi in self._ranges():
            out += self._block(lo, hi) @ self.read_range(i, lo, hi, slot=0)
        return out

    @_scoped_buffers
    def row_subtract(self, i: int, coefficients: torch.Tensor, then: str | None = None) -> torch.Tensor | float | None:
        """``q_i −= Q c`` in place (``i`` a working row). ``then="dots"`` returns :meth:`row_dots` of the result and
        ``then="norm"`` its :meth:`row_norm`, computed in the same pass over the rows (on disk each chunk of ``Q`` is
        read once for both), with the same values and summation order as the separate call: Gram–Schmidt's second
        pass reads the basis half as often."""
        if then not in (None, "dots", "norm"):
            raise ValueError(f"`then` must be None, 'dots' or 'norm', got {then!r}.")
        c = coefficients.to(torch.float64)
        if self.count == 0 or self._ram is not None:
            if self.count and self._ram is not None:
                self._ram[i].sub_(c @ self._ram[: self.count])
            return None if then is None else self.row_dots(i) if then == "dots" else self.row_norm(i)
        dots, total = torch.zeros(self.count, dtype=torch.float64), 0.0
        for lo, hi in self._ranges():
            w = self.read_range(i, lo, hi, slot=0)
            block = self._block(lo, hi)
            w.addmv_(block.T, c, alpha=-1.0)  # in place: no temporary per chunk
            self.write_range(i, lo, w)
            if then == "dots":
                dots += block @ w
            elif then == "norm":
                total += float(w @ w)
        return None if then is None else dots if then == "dots" else float(np.sqrt(total))

    @_scoped_buffers
    def row_norm(self, i: int) -> float:
        """The Euclidean norm of row ``i``."""
        if self._ram is not None:
            return float(self._ram[i].norm())
        total = 0.0
        for lo, hi in self._ranges():
            w = self.read_range(i, lo, hi, slot=0)
            total += float(w @ w)
        return float(np.sqrt(total))

    @_scoped_buffers
    def row_divide(self, i: int, divisor: float) -> None:
        """``q_i /= divisor`` in place."""
        if self._ram is not None:
            self._ram[i].div_(divisor)
            return
        for lo, hi in self._ranges():
            self.write_range(i, lo, self.read_range(i, lo, hi, slot=0).div_(divisor))

    @_scoped_buffers
    def row_add_product(self, i: int, j: int, weight: Callable[[int, int], torch.Tensor]) -> None:
        """``q_i += d ⊙ q_j`` in place, ``d`` given per coordinate range as ``weight(lo, hi)`` (float64)."""
        for lo, hi in self._ranges():
            w = self.read_range(i, lo, hi, slot=0)
            w.addcmul_(weight(lo, hi), self.read_range(j, lo, hi, slot=1))
            if self._ram is None:
                self.write_range(i, lo, w)

    @_scoped_buffers
    def combine_range(self, coefficients: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Coordinates ``lo..hi`` of ``Q C`` (a ``(hi−lo) × m`` float64 tensor), in streamed chunks."""
        c = coefficients.to(torch.float64)
        out = torch.empty(hi - lo, c.shape[1], dtype=torch.float64)
        for a in range(lo, hi, self.chunk):
            b = min(hi, a + self.chunk)
            torch.matmul(self._block(a, b).T, c, out=out[a - lo : b - lo])
        return out

    @_scoped_buffers
    def dots_parts(self, parts: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``Qᵀ w`` for ``w`` given in pieces ``(lo, values)`` that cover the coordinates (zero elsewhere)."""
        out = torch.zeros(self.count, dtype=torch.float64)
        if self.count == 0:
            return out
        for lo, values in parts:
            values = values.reshape(-1).to(torch.float64)
            for a in range(0, values.numel(), self.chunk):
                b = min(values.numel(), a + self.chunk)
                out += self._block(lo + a, lo + b) @ values[a:b]
        return out

    # --- streamed linear algebra ----------------------------------------------------------------------------------

    @_scoped_buffers
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

    @_scoped_buffers
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

    @_scoped_buffers
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

    @_scoped_buffers
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


class TensorFile(Mapping):
    """``{name: tensor}`` of one dtype (default float64) kept in a scratch file (``pread``/``pwrite``, no memory map)
    instead of RAM: the carried perturbation, first-moment difference and preconditioner of the curvature propagation
    on large models, the model's own values while a checkpoint is substituted, a Hessian product's tangent.

    Reading a name returns a new tensor of the file's dtype (the caller's to keep or drop); assigning a name writes it,
    cast to that dtype (a name's size is fixed by its first assignment). The file is unlinked as soon as it is open,
    so it disappears with the object (:meth:`close`, or garbage collection) whatever happens.

    Example:
        >>> t = TensorFile()
        >>> t["w"] = torch.ones(2, 3)
        >>> t["w"].dtype, t["w"].shape, list(t)
        (torch.float64, torch.Size([2, 3]), ['w'])
        >>> TensorFile({"b": torch.arange(3.0)}, dtype=torch.bfloat16).read_flat("b", 1, 3)
        tensor([1., 2.], dtype=torch.bfloat16)
    """

    def __init__(
        self, items: Mapping[str, torch.Tensor] | None = None, *, dtype: torch.dtype = torch.float64,
        prefix: str = "hfsa-carried-",
    ) -> None:  # fmt: skip
        self._index: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._end = 0
        self.dtype = dtype
        self._item = torch.empty(0, dtype=dtype).element_size()
        handle = open_unlinked(prefix, ".bin")
        self._fd: int | None = handle
        for name, value in (items or {}).items():
            self[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, shape = self._index[name]
        out = torch.empty(int(np.prod(shape)) if shape else 1, dtype=self.dtype)
        read_into(self._fd, byte_view(out), offset)
        return out.reshape(shape)

    def read_flat(self, name: str, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat coordinates ``lo..hi`` of ``name`` (a new tensor, or read into the contiguous ``out`` of the file's
        dtype and ``hi − lo`` values): a part of it without reading it all."""
        offset, _ = self._index[name]
        out = torch.empty(max(0, hi - lo), dtype=self.dtype) if out is None else out
        read_into(self._fd, byte_view(out), offset + lo * self._item)
        return out

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` (without reading it)."""
        return self._index[name][1]

    def reserve(self, name: str, shape: tuple[int, ...]) -> None:
        """Make room for ``name`` (zeros) if it is absent, to be filled with :meth:`write_flat`."""
        if name in self._index:
            return
        nbytes = (int(np.prod(shape)) if shape else 1) * self._item
        self._index[name] = (self._end, tuple(shape))
        self._end += nbytes
        os.ftruncate(self._fd, max(os.fstat(self._fd).st_size, self._end))

    def write_flat(self, name: str, lo: int, values: torch.Tensor) -> None:
        r"""Write flat coordinates ``lo..lo+len`` of ``name`` (present, or :meth:`reserve`\ d)."""
        offset, shape = self._index[name]
        flat = values.detach().to("cpu", self.dtype).reshape(-1).contiguous()
        if lo + flat.numel() > (int(np.prod(shape)) if shape else 1):
            raise ValueError(f"{name!r}: coordinates {lo}..{lo + flat.numel()} past its size")
        write_from(self._fd, byte_view(flat), offset + lo * self._item)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        flat = value.detach().to("cpu", self.dtype).reshape(-1).contiguous()
        shape = tuple(value.shape)
        if name in self._index:
            offset, old = self._index[name]
            if int(np.prod(old)) != flat.numel():
                raise ValueError(f"{name!r}: {flat.numel()} values, the file holds {int(np.prod(old))}")
        else:
            offset, self._end = self._end, self._end + flat.numel() * self._item
        self._index[name] = (offset, shape)
        write_from(self._fd, byte_view(flat), offset)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def close(self) -> None:
        """Free the file (the mapping is unusable after)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:  # noqa: SIM105 - contextlib may be gone at interpreter exit too
            self.close()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit the os module may be gone already
            pass

    def __reduce__(self) -> tuple:
        return (dict, (dict(self.items()),))  # pickled (torch.save, copy) as the plain dict it stands for


__all__ = [
    "CARRIED_RAM_BYTES", "CHUNK", "PIECE", "RAM_BASIS_BYTES", "TensorFile", "VectorStore", "carried_mode", "pieces",
    "scratch_free_bytes", "scratch_mode",
]  # fmt: skip
