"""Curvature material (ESTIMATORS.md §4a): per segment, the midpoint parameters, second moments and examples.

A stage of ``N`` planned steps is cut into ``S`` equal segments. During segment ``i`` the capture keeps up to
``cap`` training examples, taken from evenly spaced steps (no RNG, no change to the data order); at the
segment's midpoint step it writes θ_mid − θ_start and the optimizer's second moments.

Departure from ESTIMATORS.md §4a, which asks for segments of roughly constant learning rate: the segments are
equal step splits, because they are planned before the first step and the schedule is usually not known then (a
custom loop passes no scheduler; a scheduler can depend on run-time values). The propagation still applies every
recorded per-step learning rate inside a segment; only the curvature and the preconditioner are frozen at its
midpoint. More segments (``curvature_segments``) narrow the rate range each one covers. (Listed with the other
departures in ``docs/internals.md``, "Departures from ESTIMATORS.md".)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import LedgerError
from .storage import file_sha256, io_errors, open_safetensors, write_safetensors, write_safetensors_stream


def plan_segments(num_steps: int | None, segments: int) -> list[tuple[int, int, int]]:
    """``[(step_start, step_end, mid_step), ...]`` for ``segments`` equal parts of ``num_steps`` steps."""
    if not num_steps or segments <= 0:
        return []
    segments = min(segments, num_steps)
    bounds = [math.floor(i * num_steps / segments) for i in range(segments + 1)]
    return [(a, b, a + (b - a) // 2) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _flatten(batch: Any) -> tuple[str, dict[str, torch.Tensor]] | None:
    if isinstance(batch, torch.Tensor):
        return "tensor", {"_": batch}
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(x, torch.Tensor) for x in batch):
        return "tuple", {str(j): x for j, x in enumerate(batch)}
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        fields = {str(k): v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return ("dict", fields) if fields else None
    return None


def _num_rows(fields: dict[str, torch.Tensor]) -> int:
    return min((t.shape[0] for t in fields.values() if t.dim() > 0), default=1)


class SegmentCapture:
    """Collects curvature material while a stage runs; see the module docstring."""

    def __init__(self, stage_dir: Path, plan: list[tuple[int, int, int]], cap: int, material: str = "compact") -> None:
        if material not in MATERIALS:
            raise LedgerError(f"Expected curvature_material in {', '.join(MATERIALS)}, got {material!r}.")
        self.stage_dir = stage_dir
        self.plan = plan
        self.cap = cap
        self.material = material
        self.planned = bool(plan)
        self._status = [
            {"mid_written": False, "examples_written": False, "num_examples": 0, "layout": None, "kept": []}
            for _ in plan
        ]
        self._buffer: dict[str, torch.Tensor] = {}
        self._batches = 0
        self._stride: int | None = None
        self._current: int | None = None

    def _segment_of(self, t: int) -> int | None:
        for i, (a, b, _) in enumerate(self.plan):
            if a <= t < b:
                return i
        return None

    def _dir(self, i: int) -> Path:
        path = self.stage_dir / "segments" / str(i)
        with io_errors(path):
            path.mkdir(parents=True, exist_ok=True)
        return path

    def on_step(self, t: int, batches: list[Any], midpoint_state: Callable) -> None:
        i = self._segment_of(t)
        if i is None:
            return
        if self._current != i:
            self._flush()
            self._current, self._buffer, self._batches, self._stride = i, {}, 0, None
        a, b, mid = self.plan[i]
        self._keep(i, t, b - a, batches)
        if t == mid:
            stream, specs, moments = midpoint_state()
            d = self._dir(i)
            if self.material == "full":  # compact: θ_mid is interpolated from the stage's Δ on reading
                write_safetensors_stream(d / "params_delta.safetensors", specs, stream)
            if moments is not None and moments[0]:  # (specs, stream): written one tensor at a time
                if self.material == "compact":
                    moments = factor_moments(*moments)
                write_safetensors_stream(d / "second_moments.safetensors", *moments)
            self._status[i]["mid_written"] = True
        if t == b - 1:
            self._flush()

    def _keep(self, i: int, t: int, length: int, batches: list[Any]) -> None:
        status = self._status[i]
        offset = t - self.plan[i][0]
        for batch in batches:
            flat = _flatten(batch)
            if flat is None or status["num_examples"] >= self.cap:
                continue
            layout, fields = flat
            rows = _num_rows(fields)
            if self._stride is None:
                per_step = max(1, rows * max(1, len(batches)))
                self._stride = max(1, math.ceil(length * per_step / max(1, self.cap)))
                status["stride"] = self._stride
            if offset % self._stride:
                return
            take = min(rows, self.cap - status["num_examples"])
            for key, value in fields.items():
                value = value.detach().to("cpu")
                if value.dim() > 0 and value.shape[0] == rows:
                    value = value[:take]
                self._buffer[f"{self._batches}/{key}"] = value.clone()
            status["layout"] = layout
            status["num_examples"] += take
            status.setdefault("kept", []).append([t, take])  # which step each kept batch came from
            self._batches += 1

    def _flush(self) -> None:
        i = self._current
        if i is None or self._status[i]["examples_written"]:
            return
        if self._buffer:
            write_safetensors(self._dir(i) / "examples.safetensors", self._buffer)
        self._status[i]["examples_written"] = True
        self._buffer = {}

    def state(self) -> list[dict]:
        self._flush_partial()
        return [dict(s, kept=[list(k) for k in s.get("kept", [])]) for s in self._status]

    def _flush_partial(self) -> None:
        """At a checkpoint, persist the examples gathered so far in the current segment."""
        i = self._current
        if i is not None and self._buffer and not self._status[i]["examples_written"]:
            write_safetensors(self._dir(i) / "examples.safetensors", self._buffer)

    def restore(self, status: list[dict], completed: int) -> None:
        """Continue from a checkpoint's :meth:`state` taken after ``completed`` steps."""
        if len(status) == len(self._status):
            self._status = [dict(s, kept=[list(k) for k in s.get("kept", [])]) for s in status]
            self.rewind(completed)

    def rewind(self, completed: int) -> None:
        """Put the capture where it stood after ``completed`` steps: forget midpoints and examples of later steps,
        and reload the examples the segment in progress had kept, so a resumed stage captures what an
        uninterrupted one would."""
        self._current, self._buffer, self._batches, self._stride = None, {}, 0, None
        for i, ((a, b, mid), status) in enumerate(zip(self.plan, self._status)):
            status["mid_written"] = status["mid_written"] and mid < completed
            if b <= completed:
                continue  # finished (and flushed) before that step
            kept = [k for k in status.get("kept", []) if k[0] < completed]
            status.update(kept=kept, num_examples=sum(k[1] for k in kept), examples_written=False)
            if not kept:
                status["layout"] = None
            if a < completed:
                self._current, self._batches, self._stride = i, len(kept), status.get("stride")
                self._buffer = self._reload_examples(i, len(kept)) if kept else {}

    def _reload_examples(self, i: int, batches: int) -> dict[str, torch.Tensor]:
        path = self.stage_dir / "segments" / str(i) / "examples.safetensors"
        handle = open_safetensors(path)
        out = {k: handle.get_tensor(k) for k in handle.keys() if int(k.partition("/")[0]) < batches}
        if len({k.partition("/")[0] for k in out}) != batches:
            raise LedgerError(
                f"Cannot resume: {path} holds fewer than the {batches} example batches the checkpoint recorded. "
                "Record the stage again without resume=True."
            )
        return out

    def finish(self, files: dict[str, str], completed: int | None = None) -> list[dict]:
        """Flush what is pending; return the ``stage.json`` entries of segments whose midpoint was reached.

        ``completed``: the steps the stage actually took. A stage stopped early (an early-stopping callback, a
        ``break`` in the loop) ends before its planned ``num_steps``: a segment whose midpoint was reached keeps its
        material with its end cut to the last step taken, one whose midpoint was not is left out (the plan is
        made before the first step).

        Example:
            >>> import tempfile
            >>> capture = SegmentCapture(Path(tempfile.mkdtemp()), plan_segments(8, 2), cap=4)
            >>> capture._status[1]["mid_written"] = True  # as if step 6 (the second midpoint) had been reached
            >>> [(s["step_start"], s["mid_step"], s["step_end"]) for s in capture.finish({}, completed=7)]
            [(4, 6, 7)]
        """
        self._flush()
        out = []
        for i, ((a, b, mid), status) in enumerate(zip(self.plan, self._status)):
            d = self.stage_dir / "segments" / str(i)
            if not status["mid_written"] or (completed is not None and mid >= completed):
                continue
            if completed is not None:
                b = min(b, completed)
            for path in sorted(d.glob("*.safetensors")):
                files[str(path.relative_to(self.stage_dir))] = file_sha256(path)
            out.append(
                {
                    "index": len(out),
                    "dir": f"segments/{i}",
                    "step_start": a,
                    "step_end": b,
                    "mid_step": mid,
                    "num_examples": status["num_examples"],
                    "batch_layout": status["layout"] or "dict",
                    **MATERIAL_FIELDS[self.material],
                }
            )
        return out


# --- compact curvature material (format version 2) ----------------------------------------------------------------
#: ``full``: θ_mid − θ_start and the second moments as recorded (format 1; 2× the trainable parameters per segment).
#: ``compact``: θ_mid − θ_start interpolated from the stage's Δ by learning-rate mass, second moments of matrices
#: stored as Adafactor-style row and column means (a few kB per segment).
MATERIALS = ("compact", "full")
MATERIAL_FIELDS = {
    "compact": {"params": "interpolated", "moments": "factored"},
    "full": {"params": "snapshot", "moments": "full"},
}
ROW, COL = "::row", "::col"


def _factorable(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and shape[0] > 1 and math.prod(shape[1:]) > 1


def factor_moments(specs: list, stream: Any) -> tuple[list, Any]:
    """``(specs, stream)`` of second moments with each matrix replaced by its row means (``<key>::row``) and column
    means (``<key>::col``, trailing dimensions flattened); vectors and scalars pass through. See
    :func:`unfactor_moment` for the reconstruction.

    Example:
        >>> import torch
        >>> specs, stream = factor_moments([("v/w", torch.float32, (2, 3))], iter([("v/w", torch.ones(2, 3))]))
        >>> [(k, s) for k, _, s in specs], [(k, t.tolist()) for k, t in stream]
        ([('v/w::row', (2,)), ('v/w::col', (3,))], [('v/w::row', [1.0, 1.0]), ('v/w::col', [1.0, 1.0, 1.0])])
    """
    out_specs = []
    for key, dtype, shape in specs:
        if _factorable(shape):
            out_specs += [(key + ROW, dtype, (shape[0],)), (key + COL, dtype, (math.prod(shape[1:]),))]
        else:
            out_specs.append((key, dtype, shape))

    def factored() -> Any:
        for key, value in stream:
            if _factorable(tuple(value.shape)):
                flat = value.to(torch.float32).reshape(value.shape[0], -1)
                yield key + ROW, flat.mean(dim=1)
                yield key + COL, flat.mean(dim=0)
            else:
                yield key, value

    return out_specs, factored()


def unfactor_moment(row: torch.Tensor, col: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The rank-1 estimate ``r cᵀ / mean(r)`` of a non-negative matrix from its row and column means (Adafactor):
    it has exactly the recorded row and column means.

    Example:
        >>> import torch
        >>> v = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
        >>> unfactor_moment(v.mean(1), v.mean(0), (2, 2)).tolist()
        [[1.0, 2.0], [2.0, 4.0]]
    """
    row, col = row.to(torch.float32), col.to(torch.float32)
    total = row.mean()
    if not bool(total > 0):
        return torch.zeros(shape, dtype=torch.float32)
    return (torch.outer(row, col) / total).clamp_min(0.0).reshape(shape)


def lr_mass_fraction(learning_rates: list[list[float]], mid_step: int) -> float:
    """Share of the stage's learning-rate mass applied up to and including step ``mid_step``: the fraction of the
    stage's Δ that stands for θ_mid − θ_start in compact material (exact for SGD at a constant gradient; uniform
    in steps when the rates are unknown or zero).

    Example:
        >>> lr_mass_fraction([[1.0], [1.0], [2.0]], 1)
        0.5
    """
    mass = [sum(row) / len(row) if row else 0.0 for row in learning_rates]
    total = sum(mass)
    if not mass:
        return 0.0
    if total <= 0 or not math.isfinite(total):
        return min(1.0, (mid_step + 1) / len(mass))
    return min(1.0, sum(mass[: mid_step + 1]) / total)
