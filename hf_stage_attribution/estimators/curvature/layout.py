"""The coordinates of one segment of a later stage: param groups, preconditioner, symmetrising scale, projections.

A :class:`SegmentLayout` knows, for the steps ``[start, end)`` governed by one curvature segment, which tensors
the stage trains with which group's hyperparameters and learning rates, the frozen preconditioner ``P`` at the
segment's midpoint, and the scale ``s = √(P·ᾱ_g)`` of the symmetrised coordinates (see ``curvature.py``). It runs
the curvature-free recurrence ``R_0`` on every tensor (:func:`~.propagation.run_recurrence`, i.e. exactly ``D_j``)
and builds the Galerkin projections that the curvature correction runs in.

Used by :func:`.curvature.propagation.propagate` (runnable example there), e.g.::

    layout = SegmentLayout(stage, stage.segments[0], "sgd", 0, 50, continued=False, buffer_fresh=True)
    x, buf = layout.curvature_free({"weight": delta}, None)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import MissingCurvatureError
from ...ledger.stage import Stage
from ..propagation.rules import PRECONDITIONED_FAMILIES, preconditioner, run_recurrence, second_moment_key
from .recurrence import (
    CURVATURE_FAMILIES,
    GroupCoefficients,
    _same,
    group_coefficients,
    independent_modes,
    run_projected,
    unstable_modes,
)
from .scratch import PIECE, TensorFile, pieces


@dataclass
class _Group:
    index: int
    group: dict
    names: list[str]
    lrs: list[float]
    alpha: float = 0.0
    active: bool = False


class SegmentLayout:
    """Param groups, preconditioner and flat coordinates of the steps ``[start, end)`` of ``stage``."""

    def __init__(
        self, stage: Stage, seg: Any, family: str, start: int, end: int, continued: bool, buffer_fresh: bool
    ) -> None:
        self.stage, self.family, self.start, self.end = stage, family, start, end
        self.buffer_fresh = buffer_fresh
        applied = getattr(stage, "applied_learning_rates", None)  # skipped (overflow) steps did not move θ
        self.step0 = self._initial_step(stage, continued) + (stage.applied_steps_before(start) if applied else start)
        opt = stage.optimizer or {}
        lrs = applied(start, end) if applied else stage.learning_rates[start:end]
        # tensors the optimizer never stepped in this stage (grad None throughout) are left as they are
        trainable = set(stage.trainable_parameters) - set(getattr(stage, "unstepped_parameters", ()))
        self.groups = [
            _Group(i, g, [n for n in g.get("params", []) if n in trainable], [float(row[i]) for row in lrs])
            for i, g in enumerate(opt.get("param_groups", []))
        ]
        means = [float(np.mean(g.lrs)) if g.lrs else 0.0 for g in self.groups]
        curved = family in CURVATURE_FAMILIES
        sized = [(len(g.names), m) for g, m in zip(self.groups, means) if m > 0 and g.names]
        ref = max(sized)[1] if sized else 1.0
        for g, m in zip(self.groups, means):
            g.alpha, g.active = m / ref, curved and m > 0 and bool(g.names)
        self.seg = seg
        self._precond: dict[str, torch.Tensor] | None = None
        self.active_names = [n for g in self.groups if g.active for n in g.names]
        self.active_set = set(self.active_names)
        shapes = stage._shapes if hasattr(stage, "_shapes") else {}
        self.shapes = {n: tuple(shapes[n]) for n in self.active_names}
        self.offsets, total = {}, 0
        for n in self.active_names:
            size = int(np.prod(self.shapes[n])) if self.shapes[n] else 1
            self.offsets[n] = (total, total + size)
            total += size
        self.size = total
        # the active param group of each tensor (per coordinate: :meth:`group_range`, :attr:`group_index`)
        self._index_dtype = np.int16 if len(self.groups) < 2**15 else np.int64
        self._group_of = {n: k for k, g in enumerate(x for x in self.groups if x.active) for n in g.names}
        self._scale: torch.Tensor | None = None
        self._scales: TensorFile | None = None  # s per tensor on disk, when the preconditioner is (_scale_file)
        self._alpha = {n: g.alpha for g in self.groups if g.active for n in g.names}
        self._starts = np.array([self.offsets[n][0] for n in self.active_names], dtype=np.int64)
        self.carried = dict  # the mapping type that keeps carried vectors (a TensorFile on large models)

    @property
    def scale(self) -> torch.Tensor:
        """``s = √(P·ᾱ_g)`` over the active coordinates (flat, float64)."""
        if self._scale is None:
            scale = torch.zeros(self.size, dtype=torch.float64)
            for g in (x for x in self.groups if x.active):
                for n in g.names:
                    a, b = self.offsets[n]
                    p = self.precond.get(n)
                    p = p.reshape(-1) if p is not None else torch.ones(b - a, dtype=torch.float64)
                    self._s_of(n, p, out=scale[a:b])
            self._scale = scale
        return self._scale

    @property
    def group_index(self) -> np.ndarray:
        """The active param group of each coordinate (flat; built on each access: :meth:`group_range` gives a part)."""
        return self.group_range(0, self.size)

    def group_range(self, lo: int, hi: int) -> np.ndarray:
        """The active param group of the coordinates ``lo..hi`` (``hi`` clipped to the size)."""
        hi = min(hi, self.size)
        out = np.empty(max(0, hi - lo), dtype=self._index_dtype)
        for n in self._names_in(lo, hi):
            a, b = self.offsets[n]
            out[max(lo, a) - lo : min(hi, b) - lo] = self._group_of[n]
        return out

    def scale_part(
        self, name: str, lo: int = 0, hi: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Coordinates ``lo..hi`` (within the tensor; default: all) of ``s`` on the active tensor ``name`` (flat,
        float64): the same values as :attr:`scale` there, computed on demand (no model-sized vector is kept);
        written into ``out`` (float64, ``hi − lo`` values) when given, so that a caller asking piece after piece
        reuses one buffer instead of allocating each piece afresh."""
        a, b = self.offsets[name]
        hi = b - a if hi is None else hi
        precond = self.precond
        if name not in precond:
            p = torch.ones(hi - lo, dtype=torch.float64)
        elif hasattr(precond, "read_flat"):  # a TensorFile: read only the part asked for, of s itself
            return self._scale_file().read_flat(name, lo, hi, out=out)
        else:
            p = precond[name].reshape(-1)[lo:hi]
        return self._s_of(name, p, out)

    def _s_of(self, name: str, p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``√(p·ᾱ)`` for values ``p`` of the preconditioner on tensor ``name`` (into ``out`` when given): the one
        place ``s`` is computed, whether whole (:attr:`scale`), on demand (:meth:`scale_part`) or once into a file."""
        return (p * self._alpha[name]).sqrt() if out is None else torch.mul(p, self._alpha[name], out=out).sqrt_()

    def _scale_file(self) -> TensorFile:
        """``s`` of every preconditioned tensor in a scratch file, computed once (a piece at a time) from the
        preconditioner's file (large models): the curvature products read ``s`` twice per product, and computing it
        again each time (a multiply and a square root per coordinate) cost 3 s of a 69 s ``aa-ggn`` run on a
        3.7M-parameter model. The same values as computing them on demand."""
        if self._scales is None:
            scales = TensorFile(prefix="hfsa-scale-")
            for n in self.active_names:
                if n not in self.precond:
                    continue
                a, b = self.offsets[n]
                scales.reserve(n, (b - a,))
                for lo, hi in pieces(b - a):
                    scales.write_flat(n, lo, self._s_of(n, self.precond.read_flat(n, lo, hi)))
            self._scales = scales
        return self._scales

    def range_values(self, lo: int, hi: int, part: Any) -> torch.Tensor:
        """The flat coordinates ``lo..hi`` of a per-tensor quantity ``part(name, lo, hi)`` (float64), over the tensors
        that meet the range (``hi`` clipped to the size)."""
        hi = min(hi, self.size)
        pieces = []
        for n in self._names_in(lo, hi):
            a, b = self.offsets[n]
            pieces.append(part(n, max(lo, a) - a, min(hi, b) - a))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)

    def _names_in(self, lo: int, hi: int) -> list[str]:
        starts = self._starts
        first = max(0, int(np.searchsorted(starts, lo, side="right")) - 1)
        out = []
        for n in self.active_names[first:]:
            a, b = self.offsets[n]
            if a >= hi:
                break
            if b > lo:
                out.append(n)
        return out

    def decay_shift(self) -> Any:
        """The coupled decay ``λ_c s²`` as a function of a coordinate range ``(lo, hi) -> float64 values`` (the
        ``shift`` of :func:`~.krylov.lanczos_rows`), or None when it is the same everywhere: :attr:`decay_diagonal`
        without a model-sized vector (checked and evaluated a tensor or a range at a time)."""
        active = [g for g in self.groups if g.active]
        lam = {n: _coupled_decay(self.family, g.group) for g in active for n in g.names}
        if not lam or all(v == 0.0 for v in lam.values()):
            return None

        def part(n: str, lo: int, hi: int) -> torch.Tensor:
            return lam[n] * self.scale_part(n, lo, hi) ** 2

        first = None
        for n in self.active_names:
            d = part(n, 0, self.offsets[n][1] - self.offsets[n][0])
            if d.numel() == 0:
                continue
            first = d[0] if first is None else first
            if not bool((d == first).all()):
                return lambda lo, hi: self.range_values(lo, hi, part)
        return None

    @property
    def decay_diagonal(self) -> torch.Tensor | None:
        """The coupled decay ``λ_c s²`` per active coordinate, or None when it is the same everywhere."""
        lam = torch.tensor(
            [_coupled_decay(self.family, g.group) for g in self.groups if g.active], dtype=torch.float64
        )
        if lam.numel() == 0:
            return None
        diag = lam[torch.from_numpy(self.group_index).long()] * self.scale**2
        return None if bool((diag == diag[0]).all()) else diag

    @property
    def precond(self) -> dict[str, torch.Tensor]:
        """The preconditioner ``1/(√v̂+ε)`` per tensor at the segment's midpoint (empty for SGD), read on first use."""
        if self._precond is None:
            self._precond = self._preconditioners(self.seg) if self.family in PRECONDITIONED_FAMILIES else {}
        return self._precond

    @classmethod
    def whole_stage(cls, stage: Stage, family: str, continued: bool) -> SegmentLayout:
        """A layout for all steps of a stage without curvature segments (curvature-free propagation only)."""
        return cls(stage, None, family, 0, stage.num_steps, continued, buffer_fresh=not continued)

    @staticmethod
    def _initial_step(stage: Stage, continued: bool) -> int:
        if not continued:
            return 0
        state = stage.optimizer_state_at_start() or {}
        steps = state.get("step") or {}
        return int(max((float(t) for t in steps.values()), default=0.0))

    def _preconditioners(self, seg: Any) -> dict[str, torch.Tensor]:
        if seg is None:
            raise MissingCurvatureError(
                f"Stage {self.stage.name!r} ({self.family}) needs the optimizer's second moments to propagate its "
                "coupled weight decay or momentum, and holds no curvature segments. Record it with "
                "`curvature_segments=3` (the default) and a loss, or use allow_identity_propagation."
            )
        moments = seg.second_moments() or {}
        key = second_moment_key(self.family, moments)
        out = self.carried()
        for g in self.groups:
            for n in g.names:
                if key is None or n not in moments[key]:
                    raise MissingCurvatureError(
                        f"Stage {self.stage.name!r}, segment {seg.index}: the {self.family} optimizer's second moment "
                        f"for {n!r} was not recorded at the midpoint, and the propagation needs its preconditioner. "
                        "Re-record the stage (the recorder keeps exp_avg_sq / square_avg at each segment midpoint)."
                    )
                step = moments.get("step", {}).get(n)
                step = float(step) if step is not None else float(self.step0 + 1)
                out[n] = preconditioner(self.family, g.group, moments[key].pop(n), step)  # each moment freed once used
        return out

    # --- curvature-free recurrence --------------------------------------------------------------------------------

    def curvature_free(self, x: dict[str, torch.Tensor], buf: dict[str, torch.Tensor] | None, *,
                       in_place: bool = False):  # fmt: skip
        """``R_0``: every tensor through the recurrence without curvature (``D_j`` on the steps of this layout).

        The curvature-free recurrence is elementwise (per-group scalars, a per-coordinate preconditioner), so it runs
        one tensor at a time: the result is the group-wide run's, and the working memory is one tensor, not a
        float64 copy of the whole group. Whether the preconditioner enters is decided per group, as before.
        ``in_place``: write the results into the mappings ``x`` and ``buf`` themselves (dicts or
        :class:`~.scratch.TensorFile`; a missing ``buf`` is made with :attr:`carried`) instead of new dicts."""
        x = x if in_place else dict(x)
        new_buf = None if buf is None else (buf if in_place else dict(buf))
        for g in self.groups:
            names = [n for n in g.names if n in x or (buf is not None and n in buf)]
            if not names:
                continue
            use_p = self._needs_precond(g, None if buf is None else _pieces(buf, names))
            zero = torch.zeros((), dtype=torch.float64)
            for n in names:
                shape = self._shape(n, _like(x, n) if n in x else _like(buf, n))
                size = int(np.prod(shape)) if shape else 1
                if in_place and size > PIECE and isinstance(x, TensorFile):
                    new_buf = self._free_chunked(g, n, shape, size, x, buf, new_buf, use_p)
                    continue

                def flat(d: dict, n=n, shape=shape, zero=zero) -> torch.Tensor:
                    return d.get(n, zero).to(torch.float64).expand(shape).reshape(-1)

                b0 = None if buf is None else flat(buf)
                p = self.precond[n].reshape(-1) if use_p else 1.0
                x1, b1 = run_recurrence(g.lrs, g.group, self.family, 0.0, flat(x), b0, p, self.step0)
                x[n] = _owned(x1, size, shape)
                if b1 is not None:
                    new_buf = (self.carried() if in_place else {}) if new_buf is None else new_buf
                    new_buf[n] = _owned(b1, size, shape)
                del b0, x1, b1
        return x, new_buf

    def _free_chunked(self, g: _Group, n: str, shape: tuple[int, ...], size: int, x: Any, buf: Any, new_buf: Any,
                      use_p: bool) -> Any:  # fmt: skip
        r""":meth:`curvature_free` of one large tensor kept in :class:`~.scratch.TensorFile`\ s, :data:`PIECE`
        coordinates at a time (the recurrence is elementwise: the same numbers), read and written in place; returns
        the buffer mapping (made with :attr:`carried` when the run creates it)."""
        x.reserve(n, shape)
        for lo, hi in pieces(size):
            b0 = None if buf is None else _read(buf, n, lo, hi)
            p = self.precond.read_flat(n, lo, hi) if use_p and hasattr(self.precond, "read_flat") else (
                self.precond[n].reshape(-1)[lo:hi] if use_p else 1.0)  # fmt: skip
            x1, b1 = run_recurrence(g.lrs, g.group, self.family, 0.0, _read(x, n, lo, hi), b0, p, self.step0)
            x.write_flat(n, lo, _owned(x1, hi - lo, (hi - lo,)))
            if b1 is not None:
                new_buf = self.carried() if new_buf is None else new_buf
                new_buf.reserve(n, shape)
                new_buf.write_flat(n, lo, _owned(b1, hi - lo, (hi - lo,)))
            del b0, p, x1, b1
        return new_buf

    def _needs_precond(self, g: _Group, b0: Iterable[torch.Tensor] | None) -> bool:
        """Whether ``P`` changes the curvature-free run: coupled decay under a preconditioner, or an Adam
        first-moment difference (RMSprop's buffer already holds ``P·g``) in the group's tensors ``b0``."""
        if self.family not in PRECONDITIONED_FAMILIES:
            return False
        coupled = self.family in ("adam", "rmsprop", "adagrad") and float(g.group.get("weight_decay") or 0.0) != 0.0
        moment = self.family in ("adam", "adamw") and b0 is not None and any(bool(t.abs().sum() > 0) for t in b0)
        return coupled or moment

    def _shape(self, name: str, like: torch.Tensor) -> tuple[int, ...]:
        shapes = getattr(self.stage, "_shapes", {})
        return tuple(shapes.get(name, like.shape))

    # --- flat coordinates -----------------------------------------------------------------------------------------

    def flat(self, d: dict[str, torch.Tensor] | None) -> torch.Tensor:
        parts = []
        for n, (a, b) in self.offsets.items():
            t = None if d is None else d.get(n)
            parts.append(torch.zeros(b - a, dtype=torch.float64) if t is None else t.reshape(-1).to(torch.float64))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def unflat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[a:b].reshape(self.shapes[n]) for n, (a, b) in self.offsets.items()}

    def add_correction(self, x: dict, buf: dict | None, dx: torch.Tensor, db: torch.Tensor):
        """``x += s·dx`` and ``buf += db/s`` on the active tensors (new tensors, one at a time: no flat temporary)."""
        x = dict(x)
        scale = self.scale
        has_buffer = buf is not None or bool(db.abs().sum() > 0)
        buf = None if not has_buffer else dict(buf or {})
        for n in self.active_names:
            a, b = self.offsets[n]
            shape = self.shapes[n]
            x[n] = x.get(n, torch.zeros(shape, dtype=torch.float64)) + (dx[a:b] * scale[a:b]).reshape(shape)
            if buf is not None:
                buf[n] = buf.get(n, torch.zeros(shape, dtype=torch.float64)) + (db[a:b] / scale[a:b]).reshape(shape)
        return x, buf

    def add_correction_streamed(self, x: Any, buf: Any, store: Any, coefficients: torch.Tensor) -> Any:
        """:meth:`add_correction` with ``(dx, db) = Q·coefficients`` (``Q`` the rows of a
        :class:`~.scratch.VectorStore`, ``coefficients`` ``rows × 2``) formed a chunk at a time into each tensor, in
        place on the mappings ``x`` and ``buf`` (a missing ``buf`` is made with :attr:`carried` when ``db ≠ 0``):
        no flat ``n × 2`` correction and no model-sized scale. Returns ``buf``."""
        c = coefficients.to(torch.float64)
        if buf is None and bool(c[:, 1].abs().sum() > 0):
            buf = self.carried()
        chunk = store.chunk
        on_disk = isinstance(x, TensorFile) and (buf is None or isinstance(buf, TensorFile))
        for n in self.active_names:
            a, b = self.offsets[n]
            shape = self.shapes[n]
            if on_disk:  # each chunk read, corrected and written back: no float64 copies of a whole tensor
                for d in (x,) if buf is None else (x, buf):
                    d.reserve(n, shape)
                for lo in range(0, b - a, chunk):
                    hi = min(b - a, lo + chunk)
                    both = store.combine_range(c, a + lo, a + hi)
                    s = self.scale_part(n, lo, hi)
                    x.write_flat(n, lo, x.read_flat(n, lo, hi) + both[:, 0] * s)
                    if buf is not None:
                        buf.write_flat(n, lo, buf.read_flat(n, lo, hi) + both[:, 1] / s)
                continue
            xn = x[n].reshape(-1) if n in x else torch.zeros(b - a, dtype=torch.float64)
            bn = None if buf is None else (buf[n].reshape(-1) if n in buf else torch.zeros(b - a, dtype=torch.float64))
            new_x = torch.empty(b - a, dtype=torch.float64)
            new_b = None if bn is None else torch.empty(b - a, dtype=torch.float64)
            for lo in range(0, b - a, chunk):
                hi = min(b - a, lo + chunk)
                both = store.combine_range(c, a + lo, a + hi)
                s = self.scale_part(n, lo, hi)
                new_x[lo:hi] = xn[lo:hi] + both[:, 0] * s
                if new_b is not None:
                    new_b[lo:hi] = bn[lo:hi] + both[:, 1] / s
            del xn, bn
            x[n] = new_x.reshape(shape)
            if new_b is not None:
                buf[n] = new_b.reshape(shape)
            del new_x, new_b
        return buf

    # --- projections ----------------------------------------------------------------------------------------------

    def projection(self, basis: torch.Tensor) -> Projection:
        """Group masks, coupled decay and per-group coefficients in the basis ``V`` (``n×r``)."""
        active = [g for g in self.groups if g.active]
        coefs = [
            group_coefficients(
                self.family, g.group, g.lrs, step0=self.step0, buffer_fresh=self.buffer_fresh, alpha=g.alpha
            )
            for g in active
        ]
        v = basis.numpy()
        index = self.group_index
        masks = [v[index == k].T @ v[index == k] for k in range(len(active))]
        lam = np.array([c.lam_c for c in coefs])[index] * (self.scale.numpy() ** 2)
        decay = float(lam[0]) if lam.size and np.all(lam == lam[0]) else (v.T * lam) @ v
        return Projection(coefs, masks, decay)

    def projection_streamed(self, store: Any, rotation: np.ndarray) -> Projection:
        """:meth:`projection` for the basis ``V = Q·rotation`` with ``Q`` the rows of a
        :class:`~.scratch.VectorStore`: the group masks and the coupled decay are formed as weighted Gram matrices of
        ``Q`` in one streamed pass over coordinate chunks (``Qᵀ diag(d) Q``), then rotated; no ``n×r`` matrix and no
        model-sized weight vector is built."""
        active = [g for g in self.groups if g.active]
        coefs = [
            group_coefficients(
                self.family, g.group, g.lrs, step0=self.step0, buffer_fresh=self.buffer_fresh, alpha=g.alpha
            )
            for g in active
        ]
        lam_g = np.array([c.lam_c for c in coefs])
        index = self.group_range  # per coordinate range: no model-sized index is kept

        def lam(lo: int, hi: int) -> np.ndarray:
            return lam_g[index(lo, hi)] * self.range_values(lo, hi, self.scale_part).numpy() ** 2

        first = float(lam(0, 1)[0]) if lam_g.size and self.size else 0.0
        uniform = all(bool(np.all(lam(lo, lo + store.chunk) == first)) for lo in range(0, self.size, store.chunk))
        weights: list = [(lambda lo, hi, k=k: (index(lo, hi) == k).astype(np.float64)) for k in range(len(active))]
        if not uniform:
            weights.append(lam)
        grams = store.gram(weights)
        masks = [rotation.T @ g @ rotation for g in grams[: len(active)]]
        if uniform:
            decay: float | np.ndarray = first
        else:
            decay = rotation.T @ grams[-1] @ rotation
        return Projection(coefs, masks, decay)


def _like(d: Any, name: str) -> torch.Tensor:
    """``d[name]``, or for a :class:`~.scratch.TensorFile` an empty tensor of its shape (nothing read)."""
    return torch.empty(d.shape_of(name), dtype=torch.float64) if isinstance(d, TensorFile) else d[name]


def _read(d: Any, name: str, lo: int, hi: int) -> torch.Tensor:
    """Flat float64 coordinates ``lo..hi`` of ``d[name]`` (zeros when absent)."""
    if name not in d:
        return torch.zeros(hi - lo, dtype=torch.float64)
    if isinstance(d, TensorFile):
        return d.read_flat(name, lo, hi)
    return d[name].reshape(-1)[lo:hi].to(torch.float64)


def _pieces(d: Any, names: list[str]) -> Iterable[torch.Tensor]:
    """The tensors ``d[n]`` present, a :data:`PIECE` piece at a time when ``d`` is a scratch file."""
    for n in names:
        if n not in d:
            continue
        if not isinstance(d, TensorFile):
            yield d[n]
            continue
        size = int(np.prod(d.shape_of(n))) if d.shape_of(n) else 1
        for lo, hi in pieces(size):
            yield d.read_flat(n, lo, hi)


def _owned(value: Any, size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A recurrence result (tensor or number) as a float64 tensor of ``shape`` that owns its storage."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() == size and t.is_contiguous() and t.dim() > 0:
        return t.reshape(shape)
    return t.expand(size).reshape(shape).clone()


def _coupled_decay(family: str, group: dict) -> float:
    return float(group.get("weight_decay") or 0.0) if family in ("sgd", "adam", "rmsprop", "adagrad") else 0.0


@dataclass
class Projection:
    """The recurrence's ingredients in a Ritz basis: per-group coefficients, group masks ``E_g``, coupled decay."""

    coefs: list[GroupCoefficients]
    masks: list[np.ndarray]
    decay: float | np.ndarray

    def mode_decay(self) -> float | np.ndarray:
        return self.decay if np.isscalar(self.decay) else np.diag(self.decay).copy()

    def unstable(self, theta: np.ndarray) -> np.ndarray:
        """Modes whose recurrence grows, judged with the scalars of the group that holds most of each mode."""
        owner = np.argmax(np.stack([np.diag(m) for m in self.masks]), axis=0)
        decay = self.mode_decay()
        bad = np.zeros(len(theta), dtype=bool)
        for k, co in enumerate(self.coefs):
            sel = owner == k
            if sel.any():
                d = decay if np.isscalar(decay) else decay[sel]
                bad[sel] = unstable_modes(co, theta[sel], d)
        return bad

    def solve(
        self, theta: np.ndarray, x: np.ndarray, b: np.ndarray, forcing: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The segment's run on Ritz coordinates with curvature (unstable modes damped to zero) and without:
        ``(x_C, b_C, x_0, b_0, unstable)``. Modes that do not couple (one group, or groups sharing every scalar,
        and a scalar decay) are run together in one batched pass; otherwise through the Galerkin masks."""
        if np.isscalar(self.decay) and (len(self.coefs) == 1 or all(_same(self.coefs[0], c) for c in self.coefs)):
            return independent_modes(self.coefs[0], theta, float(self.decay), x, b, forcing)
        bad = self.unstable(theta)
        keep = ~bad
        xc, bc = np.zeros_like(x), np.zeros_like(b)
        if keep.any():
            sub = self.restrict(keep)
            xc[keep], bc[keep] = run_projected(sub.coefs, x[keep], b[keep], theta=theta[keep], masks=sub.masks,
                                               decay=sub.decay, forcing=forcing[keep])  # fmt: skip
        x0, b0 = run_projected(self.coefs, x, b, masks=self.masks, decay=self.decay)
        return xc, bc, x0, b0, bad

    def restrict(self, keep: np.ndarray) -> Projection:
        masks = [m[np.ix_(keep, keep)] for m in self.masks]
        decay = self.decay if np.isscalar(self.decay) else self.decay[np.ix_(keep, keep)]
        return Projection(self.coefs, masks, decay)
