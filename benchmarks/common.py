"""Shared helpers of the benchmarks: settings, timing, memory read-outs, machine description.

Example:
    >>> from benchmarks.common import Settings, median_spread
    >>> Settings.make(quick=True).quick
    True
    >>> median_spread([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0, 'n': 3}
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


#: the sections of ``benchmarks/run.py``, in the order it runs them (a full run runs them all)
SECTIONS = ("fidelity", "overhead", "memory", "distributed", "interventions", "partial-replay")


@dataclass
class Settings:
    """Sizes of every figure; ``quick`` runs in minutes, the full run in under 30 minutes on 2 CPU cores."""

    quick: bool
    digits_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    digits_steps_scale: float = 1.0
    lm_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lm_size: str = "tiny"
    toxicity_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    toxicity_size: str = "small"
    timing_min_seconds: float = 1.0  # each timing repeated until this long (once when a single run is longer)
    eps: float = 1e-3
    sweep_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    overhead_reps: int = 4
    overhead_model: dict[str, int] = field(default_factory=lambda: {"n_embd": 128, "n_layer": 4, "steps": 150})
    memory_model: dict[str, int] = field(
        default_factory=lambda: {"n_embd": 640, "n_layer": 10, "n_head": 10, "vocab": 8192, "positions": 128}
    )
    memory_ks: list[int] = field(default_factory=lambda: [2, 4, 8])
    memory_steps: int = 2
    distributed_seed: int = 0

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True, digits_seeds=[0, 1], digits_steps_scale=0.5, sweep_scales=[0.5, 1.0], lm_seeds=[0],
            toxicity_seeds=[0],
            timing_min_seconds=0.5, overhead_reps=3, overhead_model={"n_embd": 64, "n_layer": 2, "steps": 30},
            memory_model={"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab": 2048, "positions": 64},
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def by_pipeline(runs: list[Any]) -> dict[str, list[Any]]:
    """Per-seed runs grouped by their ``"pipeline"``, in first-seen order."""
    groups: dict[str, list[Any]] = {}
    for run in runs:
        groups.setdefault(run["pipeline"], []).append(run)
    return groups


def import_script(module_name: str, path: Path) -> Any:
    """A recipe file imported by path under ``module_name`` (recipes are scripts, not a package); imported once."""
    import importlib.util

    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def repeated(fn: Callable[[], Any], min_seconds: float = 0.5, max_reps: int = 25) -> tuple[Any, float]:
    """``(first result, median seconds)`` of ``fn`` run until ``min_seconds`` have passed (at least once, at most
    ``max_reps`` times): millisecond timings get many repetitions, second-long ones a single run."""
    result, first = timed(fn)
    times, total = [first], first
    while total < min_seconds and len(times) < max_reps:
        _, seconds = timed(fn)
        times.append(seconds)
        total += seconds
    return result, statistics.median(times)


def median_spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of ``values`` (the spread reported beside every repeated timing)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# --- memory read-outs (Linux /proc) ---------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """The ``Vm*``/``Rss*`` fields of ``/proc/self/status`` in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset the peak-RSS counter (``VmHWM``) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """A thread that samples ``RssAnon``/``RssFile`` every ``interval`` seconds and keeps their peaks.

    ``VmHWM`` gives the exact peak of the total; the sampler splits it into anonymous memory (tensors) and
    file-backed pages (memory-mapped safetensors), at the sampling resolution. With ``files_under``, every
    ``smaps_every`` samples it also reads ``/proc/self/smaps`` and keeps, per file under that directory, the largest
    resident size seen (``file_peaks``) and the largest total over those files at one time (``files_total_peak``).
    """

    def __init__(self, interval: float = 0.005, files_under: str | Path | None = None, smaps_every: int = 10) -> None:
        self.interval = interval
        self.peaks: dict[str, int] = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.files_under = str(files_under) if files_under is not None else None
        self.smaps_every = smaps_every
        self.file_peaks: dict[str, int] = {}
        self.files_total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        count = 0
        while not self._stop.is_set():
            status = proc_status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status.get(key, 0))
            if self.files_under is not None and count % self.smaps_every == 0:
                self._sample_files()
            count += 1
            self._stop.wait(self.interval)

    def _sample_files(self) -> None:
        resident: dict[str, int] = {}
        current = None
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/smaps").read_text().splitlines():
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss", "Pss")):
                    current = head[5] if len(head) == 6 and head[5].startswith(self.files_under) else None
                elif current is not None and line.startswith("Rss:"):
                    resident[current] = resident.get(current, 0) + int(line.split()[1]) * 1024
        for path, size in resident.items():
            self.file_peaks[path] = max(self.file_peaks.get(path, 0), size)
        self.files_total_peak = max(self.files_total_peak, sum(resident.values()))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self.files_under is not None:
            self._sample_files()


def param_bytes(model: Any) -> int:
    """Bytes of the model's parameters (tied parameters counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- environment --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def machine() -> dict[str, Any]:
    """What the figures were measured on (printed at the top of BENCHMARKS.md)."""
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hf_stage_attribution"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    packages = ("torch", "transformers", "trl", "peft", "accelerate", "safetensors", "datasets")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "load_average_start": list(os.getloadavg()),
        "git_commit": commit.stdout.strip() or "unknown",
        "package_files_modified": len(status.stdout.splitlines()),
    }


def child_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: the repository importable, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update({"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"})
    return env


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library progress bars, warnings and printed training logs while a figure is measured."""
    import logging
    import warnings

    os.environ.update({"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"})
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def run_child(args: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python args...`` from the repository root with :func:`child_env` (plus ``env``); raise with its output
    on failure."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**child_env(), **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark child {args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
