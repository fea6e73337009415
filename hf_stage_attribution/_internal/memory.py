"""How much memory this process may still use, and turning allocation failures into one-line errors.

Example:
    >>> available_memory_bytes() > 0
    True
    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
from collections.abc import Iterator
from pathlib import Path

_OOM_MARKERS = ("can't allocate memory", "out of memory", "cannot allocate memory", "std::bad_alloc")


_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
_LIBC: ctypes.CDLL | None | bool = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


#: the fixed mmap threshold of :func:`release_freed_memory`: ``parameter bytes / 512`` of the model being attributed
#: (:func:`size_heap_for`), within these bounds. Measured on SmolLM2-135M (538 MB; the recipe's ``validate``, back to
#: back, 2 threads; BENCHMARKS.md §9): 128 KiB 149.8 s (84.8 s of CPU in the kernel: every buffer above the threshold
#: is a fresh ``mmap`` whose pages fault in zeroed), peak RSS rise 2.90 GB, max RSS 3.96 GB; 1 MiB 119.8 s (48.4 s),
#: 2.64 GB, 4.07 GB (a third run 126.4 s, 3.02 GB, 4.08 GB: the rise varies by run); 32 MiB (one run) 121.4 s,
#: 2.78 GB, 4.22 GB. Models up to 64 MB keep 128 KiB, the threshold the
#: memory bounds of the test suite were measured with (a 3.7M GPT-2 at 4 MiB: aa-ggn 2.3× faster, but a rise of 3.74×
#: the parameter bytes against 2.2×, past issue 16's bound of 3).
MMAP_THRESHOLD_MIN, MMAP_THRESHOLD_MAX = 128 << 10, 1 << 20
_THRESHOLD = [MMAP_THRESHOLD_MIN]


def mmap_threshold_for(parameter_bytes: int) -> int:
    """The mmap threshold for a model of ``parameter_bytes`` (see :data:`MMAP_THRESHOLD_MIN`).

    Example:
        >>> mmap_threshold_for(14_800_000), mmap_threshold_for(538_000_000), mmap_threshold_for(28_000_000_000)
        (131072, 1048576, 1048576)
    """
    return max(MMAP_THRESHOLD_MIN, min(MMAP_THRESHOLD_MAX, int(parameter_bytes) // 512))


def size_heap_for(parameter_bytes: int) -> int:
    """Set the threshold every later :func:`release_freed_memory` of this process fixes to the one for a model of
    ``parameter_bytes`` (the attributor does it for the model it attributes); returns it."""
    _THRESHOLD[0] = mmap_threshold_for(parameter_bytes)
    return _THRESHOLD[0]


def release_freed_memory(threshold: int | None = None, collect: bool = True) -> bool:
    """Make glibc hand freed buffers back to the system instead of keeping them in its heap.

    Attribution allocates and frees model-sized buffers one after another (a stage's embedding, a JVP's activations);
    with glibc's default *dynamic* mmap threshold those buffers move into the heap after the first free and stay in
    the process's resident set, so the peak RSS of later phases adds up (measured on SmolLM2-135M: the aa-linear
    read-out of one behavior rose 3.97× the parameter bytes and kept 3.13× after returning; with buffers above
    ``threshold`` bytes allocated by ``mmap``, 2.99× and 0.02×). Fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``,
    process-wide; default: the one :func:`size_heap_for` set, 128 KiB unless a larger model is attributed) and trims
    the heap now; ``HF_STAGE_ATTRIBUTION_KEEP_MALLOC=1`` opts out. Returns whether it
    applied (False off glibc).

    First it runs Python's cyclic garbage collector: what an estimator leaves behind in reference cycles (a finished
    ``Trainer`` with its optimizer's moments and a DPO reference model, a PEFT wrapper) is otherwise freed only at
    Python's next full collection, so on SmolLM2-135M each later phase of ``validate`` started 4–6× the parameter
    bytes above the first one's floor. ``collect=False`` skips it where what was freed had no cycles (a curvature
    product's buffers): a full collection walks every object alive, 0.2 s a time once transformers is imported,
    which made ``aa-ggn`` 5–26× slower on the benchmark pipelines when it ran once per curvature segment.
    """
    if collect:
        gc.collect()
    if os.environ.get("HF_STAGE_ATTRIBUTION_KEEP_MALLOC"):
        return False
    lib = _libc()
    if lib is None:
        return False
    lib.mallopt(_M_MMAP_THRESHOLD, int(_THRESHOLD[0] if threshold is None else threshold))
    lib.mallopt(_M_TRIM_THRESHOLD, 0)  # free() then returns the heap's free top at once (beyond glibc's top pad)
    return trim_heap()


def trim_heap() -> bool:
    """Hand the free pages inside glibc's heap back to the system (``malloc_trim(0)``), without a garbage collection:
    cheap enough (well under a millisecond once transformers is loaded) to run after every curvature product.

    Allocations below the mmap threshold (a row's activations, its forward-mode tangents, autograd's bookkeeping) come
    from the heap; after a product frees them, the pages stay resident unless trimmed, and the next product's
    allocations do not all fit in the holes, so the resident set creeps up product after product (GPT-2 3.7M,
    ``aa-ggn``: peak RSS rise 3.24× the parameter bytes without a trim per product, 2.91× with one). Returns whether
    it ran (False off glibc or with ``HF_STAGE_ATTRIBUTION_KEEP_MALLOC=1``).

    Example:
        >>> isinstance(trim_heap(), bool)
        True
    """
    if os.environ.get("HF_STAGE_ATTRIBUTION_KEEP_MALLOC"):
        return False
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


_FREEZE_DEPTH = [0]  # open uses of collections_of_new_objects


@contextlib.contextmanager
def collections_of_new_objects() -> Iterator[None]:
    """Inside, a full collection (:func:`release_freed_memory`'s, a ``Trainer``'s) scans only the objects made since
    entry: the ones alive on entry (the loaded libraries, millions of objects after ``import transformers``; the
    caller's model and data) go to the permanent generation (``gc.freeze``). The replay estimators free each trained
    model copy with such a collection; scanning every object took 0.1–0.5 s a time after the Trainer/TRL imports
    (digits-hf: 90 % of replay's and of partial replay's time), scanning the new ones takes milliseconds. What is
    collected is the same: the garbage made inside (a trained copy, a finished ``Trainer``); cyclic garbage among the
    objects alive on entry waits for Python's next collection after exit. On exit the new objects are collected once
    and everything is unfrozen. A nested use (or one inside :func:`~..integrations.replay.frozen_gc`) leaves the
    freeze to the outermost one. Automatic collection is left as it is.

    Example:
        >>> import gc
        >>> with collections_of_new_objects():
        ...     gc.get_freeze_count() > 0
        True
        >>> gc.get_freeze_count()
        0
    """
    # gc.get_freeze_count() walks the frozen objects (tens of ms after the Trainer imports): asked only when no
    # use of this function is open, i.e. when nothing is frozen unless a caller froze objects itself
    outer = _FREEZE_DEPTH[0] > 0 or gc.get_freeze_count() > 0
    if not outer:
        gc.freeze()
    _FREEZE_DEPTH[0] += 1
    try:
        yield
    finally:
        _FREEZE_DEPTH[0] -= 1
        gc.collect()
        if not outer:
            gc.unfreeze()


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """Memory this process can still allocate without swapping or being killed: the smaller of the kernel's
    ``MemAvailable`` and the room under a cgroup limit. ``HF_STAGE_ATTRIBUTION_MEMORY_BYTES`` overrides it (tests,
    or a budget smaller than the machine's)."""
    override = os.environ.get("HF_STAGE_ATTRIBUTION_MEMORY_BYTES")
    if override:
        return int(float(override))
    found = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    if not found:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return 1 << 62
    return min(found)


def is_out_of_memory(exc: BaseException) -> bool:
    """``MemoryError``, or a ``RuntimeError`` of an allocator that ran out (torch's ``can't allocate memory``)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def out_of_memory_message(exc: BaseException) -> str:
    """One line for an allocation failure: what ran out, and settings that need less.

    Example:
        >>> out_of_memory_message(MemoryError()).split(" (")[0]
        'Ran out of memory'
    """
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return (
        f"Ran out of memory ({detail}; {human_bytes(available_memory_bytes())} available now). Use settings that "
        "need less: --estimator aa-fd (no Krylov basis), --curvature-preset cheap, fewer or smaller behaviors, "
        "or --no-diagnostics."
    )


def human_bytes(n: float) -> str:
    """``1.2 GB`` style (powers of 1000).

    Example:
        >>> human_bytes(1_250_000_000)
        '1.2 GB'
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
