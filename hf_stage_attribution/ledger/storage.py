"""On-disk primitives of the ledger: atomic writes, streamed safetensors, safe paths and a directory lock.

Nothing here knows about stages or models. Every write goes to a temporary file in the destination
directory and is renamed into place, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .._internal.hashing import combine_digests, tensor_bytes, tensor_digest  # noqa: F401  (re-exported)
from ..errors import LedgerError, LedgerFormatError, LedgerLockedError, UnsafeInputError
from .tensor_reader import TensorFileReader

LOCK_NAME = "ledger.lock"

_DTYPE_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide ledgers from a shared team


def _make_temp(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with ordinary permissions (a :class:`LedgerError` when it cannot be made)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    with contextlib.suppress(OSError):
        os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(path: Path, exc: OSError) -> LedgerError:
    return LedgerError(
        f"Could not write {path}: {exc.strerror or exc}. Check that the directory is writable and the disk has room; "
        "nothing was left half-written."
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; return the sha256 of the bytes."""
    path = Path(path)
    fd, tmp = _make_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(path, exc) from exc
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as indented, key-sorted-as-given JSON atomically; return the file's sha256."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, turning every failure into a :class:`LedgerFormatError` that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LedgerFormatError(f"Expected the {what} at {path}, found no such file.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerFormatError(f"Could not read the {what} {path}: {exc}.") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerFormatError(
            f"The {what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
            "It may be corrupt or truncated; restore it from a copy or re-record the stage."
        ) from exc


def write_safetensors_stream(
    path: str | os.PathLike,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    *,
    durable: bool = True,
) -> str:
    """Write a safetensors file one tensor at a time, atomically; return its sha256.

    ``specs`` announces every tensor (name, dtype, shape) in the order ``tensors`` will yield them, so
    the header can be written first and no more than one tensor is held at a time. ``durable=False`` skips the
    ``fsync`` (scratch files that are deleted, or merged into a durable file, before anything relies on them).
    """
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    sha = hashlib.sha256()
    fd, tmp = _make_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
                fh.write(chunk)
                sha.update(chunk)
            expected = iter(specs)
            for name, tensor in tensors:
                spec = next(expected, None)
                if spec is None or spec[0] != name or tuple(tensor.shape) != tuple(spec[2]):
                    raise LedgerError(
                        f"Internal error writing {path}: tensor {name!r} does not match its announced spec {spec}."
                    )
                data = tensor_bytes(tensor.to(spec[1]))
                fh.write(data)
                sha.update(data)
            if next(expected, None) is not None:
                raise LedgerError(f"Internal error writing {path}: fewer tensors than announced.")
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sha.hexdigest()


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    durable: bool = True,
) -> str:
    """Write a small dict of tensors atomically (float32 kept as is); return the file's sha256."""
    items = [(k, v.detach().to("cpu").contiguous()) for k, v in tensors.items()]
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in items]
    return write_safetensors_stream(path, specs, iter(items), metadata, durable=durable)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_safetensors(path: str | os.PathLike):
    """Open a safetensors file for tensor-by-tensor reads (validated header, plain reads: no memory map, so
    streamed tensors do not accumulate in the resident set); a clear error for a corrupt or truncated file."""

    return TensorFileReader(path)


_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slugify(name: str, max_len: int = 48) -> str:
    """A file-system-safe fragment of a stage name (the name itself is kept verbatim in JSON)."""
    slug = _SLUG.sub("-", name).strip("-.")[:max_len]
    return slug or "stage"


def stage_dir_name(index: int, name: str, partial: bool = False) -> str:
    """The folder of stage ``index`` named ``name`` under ``stages/``: ``NNN-<slug>`` once committed,
    ``.partial-NNN-<slug>`` while it is being written (``core.incomplete_stages`` recognises both).

    Example:
        >>> stage_dir_name(1, "SFT run #2"), stage_dir_name(1, "sft", partial=True)
        ('001-SFT-run-2', '.partial-001-sft')
    """
    return f"{'.partial-' if partial else ''}{index:03d}-{slugify(name)}"


def safe_join(base: str | os.PathLike, relative: str, root: str | os.PathLike | None = None) -> Path:
    """Join ``relative`` under ``base``, refusing absolute paths and ``..``; resolved (symlinks followed), the
    result must stay inside ``root`` (default: ``base``; the ledger directory lets links point across stages)."""
    base_path = Path(base).resolve()
    root_path = Path(root).resolve() if root is not None else base_path
    if not isinstance(relative, str) or not relative or relative.startswith(("/", "\\")) or ":" in relative:
        raise UnsafeInputError(f"Expected a relative path inside {base_path}, got {relative!r}.")
    parts = Path(relative).parts
    if any(p in ("..", "") for p in parts):
        raise UnsafeInputError(f"Expected a path inside {base_path}, got {relative!r} which leaves it.")
    candidate = _resolve(base_path / relative)
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafeInputError(f"The path {relative!r} resolves to {candidate}, outside {root_path} (a symlink?).")
    return candidate


def _resolve(path: Path) -> Path:
    """``path.resolve()``, with a clear error for symlink loops, NUL bytes and over-long names."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UnsafeInputError(f"Cannot resolve the path {str(path)[:300]!r}: {exc}. Refusing it.") from exc


def ensure_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved (symlinks followed), refusing it when it lies outside ``root``.

    For paths the code builds itself (``stage.json``, segment files, ``stages/``); paths read from JSON go
    through :func:`safe_join`.
    """
    root_path = Path(root).resolve()
    candidate = _resolve(Path(path))
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafeInputError(
            f"{path} resolves to {candidate}, outside the ledger directory {root_path} (a symlink planted in the "
            "ledger?). Refusing to read or write it; remove the link or copy the real file into the ledger."
        )
    return candidate


@contextlib.contextmanager
def io_errors(path: str | os.PathLike):
    """Turn an ``OSError`` raised inside the block (read-only directory, full disk) into a :class:`LedgerError`."""
    try:
        yield
    except OSError as exc:
        raise _write_error(Path(getattr(exc, "filename", None) or path), exc) from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """``<directory>/ledger.lock``, held exclusively; a stale lock of a dead process on this host is taken over.

    The lock file is created complete (written to a temporary file, then hard-linked into place, which fails
    if it exists), so a crash never leaves an empty, unreadable lock. Taking over a stale lock happens under an
    ``flock`` on the directory, so two processes that find the same stale lock cannot both take it.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> lock = DirectoryLock(d, "demo"); lock.acquire(); lock.release()
    """

    def __init__(self, directory: str | os.PathLike, purpose: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self.held = False
        self._token = ""

    def acquire(self) -> None:
        for _attempt in range(3):
            if self._create():
                return
            with _directory_guard(self.directory):
                holder = _read_lock(self.path)
                stale = (
                    holder is not None
                    and holder.get("host") == socket.gethostname()
                    and isinstance(holder.get("pid"), int)
                    and not _pid_alive(holder["pid"])
                )
                if stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
            if holder is None and not os.path.lexists(self.path):
                continue  # released between our attempt and the check: try again
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                raise LedgerLockedError(
                    f"Cannot start {self.purpose} in the ledger {self.directory}: this process is already "
                    f"{holder.get('purpose', 'writing it')}; end it first (leave its `with` block, or call its end() "
                    "or abort(); a StageRecorder whose train() raised: call its release()). One process writes one "
                    "stage at a time; the lock is this process's own, do not delete it."
                )
            alive_here = (
                holder is not None
                and holder.get("host") == socket.gethostname()
                and isinstance(holder.get("pid"), int)
                and _pid_alive(holder["pid"])
            )
            what_to_do = (
                f"Process {holder['pid']} on this host is running: if it is a notebook or script whose train() "
                f"raised, call its StageRecorder's release() there (or end that process); do not delete {self.path} "
                "while it runs."
                if alive_here and holder is not None
                else f"If no other process is running, delete {self.path}."
            )
            raise LedgerLockedError(
                f"The ledger {self.directory} is being written by another process ({holder or 'unknown holder'}). "
                "Only one process may record into a ledger at a time: in distributed runs only the main process "
                f"records. {what_to_do}"
            )
        raise LedgerLockedError(f"Could not take the lock {self.path}; delete it if no other process is recording.")

    def _create(self) -> bool:
        self._token = f"{os.getpid()}-{time.time_ns()}"
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "purpose": self.purpose,
            "token": self._token,
        }
        fd, tmp = _make_temp(self.path)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            os.link(tmp, self.path)  # atomic: fails with FileExistsError when the lock is held
        except FileExistsError:
            return False
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            holder = _read_lock(self.path)
            if holder is None or holder.get("token") == self._token:  # never delete a lock another process took
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def _directory_guard(directory: Path):
    """An exclusive ``flock`` on the directory itself (POSIX); a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows)
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_holder(directory: str | os.PathLike) -> dict | None:
    """Who holds ``<directory>/ledger.lock`` (``pid``, ``host``, ``since``, ``purpose``), or None when unlocked.

    A lock left by a dead process on this host is reported too (the next writer takes it over).
    """
    return _read_lock(Path(directory) / LOCK_NAME)


def _read_lock(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "r", encoding="utf-8") as fh:
            data = json.loads(fh.read(4096))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
