"""Curvature-aware propagation of a perturbation through one later stage (``aa-ggn``, ``aa-hvp``; ESTIMATORS.md §4a).

:func:`propagate` carries a perturbation ``x`` of the start of stage ``j`` (and, for a stage that continued its
optimizer, the difference ``b`` of the optimizer's first moment) to the end of stage ``j``. Per recorded segment:

1. **Curvature.** ``C̄`` is the Gauss–Newton matrix (``mode="ggn"``) or Hessian (``"hvp"``) of the stage's loss on
   the segment's captured examples at its midpoint ``θ_mid = θ_{j−1} + segment.params_delta()``, used only through
   products (:mod:`.curvature_products`).
2. **Symmetrised coordinates.** ``u = x/s``, ``b' = s·b`` with ``s² = P·ᾱ_g``: ``P = 1/(√v̂+ε)`` the optimizer's
   preconditioner frozen at the midpoint (``1`` for SGD), ``ᾱ_g`` the param group's mean learning rate in the
   segment relative to the reference group (the largest one). Tensors the stage does not train (frozen, LoRA-targeted
   base weights, groups at zero learning rate) keep ``s = 0``: their perturbation stays constant and acts as a
   *forcing* ``f = s·C̄ x_frozen`` on the trained ones.
3. **Krylov basis.** Block Lanczos of ``K = S C̄ S`` from ``[u, b', f]`` (``krylov_size`` products, float64, full
   reorthogonalisation); Ritz pairs ``(Θ, V)``; negative Ritz values (Hessian; rounding for Gauss–Newton) are set
   to zero and counted.
4. **Recurrence.** The stage's own optimizer recurrence (:mod:`.curvature_recurrence`; momentum, dampening,
   nesterov, coupled/decoupled decay, Adam's ``β1`` and bias correction) runs at every recorded ``η_t`` of the
   segment on the Ritz coordinates with gradient difference ``Θ y (+ λ y + f)``. A Ritz mode whose recurrence grows
   is *unstable*: it is damped to zero and counted in ``info``.
5. **Exact where curvature is absent.** The result is ``R_0(x, b) + V·(Y_C − Y_0)``: ``R_0`` is the curvature-free
   recurrence of :func:`~.propagation.run_recurrence` applied to every coordinate (exactly ``D_j``), ``Y_C`` and
   ``Y_0`` the projected runs with and without curvature. With one param group (or groups sharing every scalar) this
   is the plain Lanczos approximation ``V·Y_C``; with ``C̄ = 0`` it is ``R_0`` exactly, for every family.

**Several param groups** with different hyperparameters (e.g. Hugging Face's decay/no-decay groups): the basis is
shared, each group's per-step scalars act through the projected group masks ``E_g = Vᵀ diag(1_g) V`` (Galerkin),
learning-rate ratios are folded into ``s``, and only the curvature *correction* is projected (step 5), so the
curvature-free part stays exact. Stability of a mode is judged with the scalars of the group that holds most of it.
A coupled decay that differs between coordinates (``λ_c s²``: Adam/RMSprop with coupled decay, or groups with
different decay) is added to ``K`` when the Krylov space is *grown* (not in the Ritz values), so the space follows
the operator that actually drives the recurrence; with a basis as large as the model everything is exact.

Cost: per segment ``≤ krylov_size`` products on the captured sample (+1 when frozen tensors are perturbed),
whatever the number of steps. On small models each product reuses the batch's autograd graph, built once per
segment; on larger ones the graphs are rebuilt per product and freed after each batch. Cheaper settings:
``max_segments`` (use fewer of the recorded segments), ``sample_size``, a smaller ``krylov_size``.

Memory (issue 16): the Krylov basis lives in a :class:`~.scratch.VectorStore` (in RAM when small, else a float64
scratch file streamed in coordinate chunks), the start vectors are freed as they enter it, each product is written
into one reused buffer, and the curvature-free recurrence runs a tensor at a time; :func:`curvature_memory_problem`
refuses up front, in one line, when the RAM or the scratch disk needed is not there.

Differences from ESTIMATORS.md §4a worth knowing: the Krylov space starts from the perturbation itself (the block
``[u, b', f]``), so nothing of ``v`` lies outside it; the "outside component follows ``D_j``" rule is realised by the
exact ``R_0`` in step 5. The Gauss–Newton/Hessian products run with the model in ``eval()`` mode (no dropout) so that
the operator is deterministic and symmetric.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> v = ledger.stages[0].delta()  # {name: tensor}: the first stage's delta, carried through stage 1
    >>> out, info = propagate(v, ledger, stage_index=1, mode="ggn", model=model)
    >>> sorted(out) == sorted(v), info["curvature_products"] > 0
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..._internal.memory import available_memory_bytes, human_bytes, release_freed_memory
from ...errors import EstimatorMemoryError, MissingCurvatureError, UnsupportedOptimizerError, unknown_name
from ...ledger.core import LedgerCore
from ...ledger.stage import Stage
from ..propagation.rules import recorded_family, run_recurrence
from .krylov import lanczos_rows
from .layout import SegmentLayout
from .products import CurvatureOperator, LossSpec, _rows, resolve_loss
from .scratch import (
    CHUNK,
    SCRATCH_DIR_ENV,
    TensorFile,
    VectorStore,
    carried_mode,
    scratch_dir,
    scratch_free_bytes,
    scratch_mode,
)

MODES = ("ggn", "hvp")
PAIRED_BATCH_LOSSES = ("dpo",)  # losses whose batches must not be concatenated (chosen/rejected halves)

#: Named settings of the curvature-aware propagation: ``curvature_options={"preset": name}`` (CLI
#: ``--curvature-preset``); explicit options override the preset's. ``default``: every recorded segment and a Krylov
#: basis of 12 per segment. ``cheap``: one segment per later stage (the recorded one at its middle) and 8 Krylov
#: vectors, ESTIMATORS.md §5's "cheap configuration": 8 products per later stage instead of 36 with the recorder's 3
#: segments, for later stages too short (a few hundred steps) for the default to be cheap next to replay. Both use
#: every example captured for the segment (the recorder's ``curvature_examples``); ``sample_size`` caps it.
CURVATURE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"krylov_size": 12, "max_segments": None, "sample_size": None},
    "cheap": {"krylov_size": 8, "max_segments": 1, "sample_size": None},
}


def curvature_settings(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with its ``preset`` (default: ``"default"``) expanded; explicit entries win.

    Example:
        >>> curvature_settings({"preset": "cheap", "krylov_size": 6})["krylov_size"], curvature_settings({})["preset"]
        (6, 'default')
    """
    options = dict(options or {})
    name = options.pop("preset", None) or "default"
    if name not in CURVATURE_PRESETS:
        raise unknown_name("curvature preset", str(name), tuple(CURVATURE_PRESETS))
    return {"preset": name, **CURVATURE_PRESETS[name], **options}


#: Model-sized float64 vectors' worth of RAM the curvature propagation needs besides the Krylov basis and the carried
#: vectors, calibrated on the GPT-2 case of ``benchmarks/estimator_memory.py`` (4.2M parameters; basis, perturbation,
#: first moment and preconditioner on disk): one curvature product's working set (θ_mid, the float32 tangent, the
#: product's activations and gradients) and the estimator's rows around the propagation. Measured peak RSS rise:
#: 5.9× the float32 parameter bytes for aa-ggn, 10.4× for aa-hvp (≈ 3 and 5 float64 vectors).
WORKING_VECTORS = 5
#: Model-sized float64 vectors carried through the propagation (perturbation, first-moment difference,
#: preconditioner): in RAM on small models, in scratch files (:class:`~.scratch.TensorFile`) on large ones.
CARRIED_VECTORS = 3


def _basis_rows(krylov_size: int) -> int:
    """Rows of the Krylov store (an upper bound): the basis (up to ``krylov_size + 3`` with the start block) and the
    Lanczos working row."""
    return krylov_size + 3


def curvature_peak_bytes(n: int, krylov_size: int, *, where: str | None = None) -> int:
    """Estimated peak RAM of the curvature propagation over ``n`` coordinates: :data:`WORKING_VECTORS` float64
    vectors, the :data:`CARRIED_VECTORS` when they are kept in RAM (:func:`~.scratch.carried_mode`), plus the Krylov
    basis (``krylov_size + 3`` float64 rows) when it is kept in RAM (``where``, default
    :func:`~.scratch.scratch_mode`'s choice); on disk only one streamed chunk of it is in RAM.

    Example:
        >>> curvature_peak_bytes(1000, 12)
        184000
    """
    rows = _basis_rows(krylov_size)
    where = where or scratch_mode(n, rows)
    basis = 8 * n * rows if where == "ram" else 8 * rows * min(n, CHUNK)
    carried = CARRIED_VECTORS if carried_mode(n) == "ram" else 0
    return basis + 8 * n * (WORKING_VECTORS + carried)


def curvature_scratch_bytes(n: int, krylov_size: int, *, where: str | None = None) -> int:
    """Scratch disk the curvature propagation writes over ``n`` coordinates: the float64 Krylov basis when it is on
    disk (``0`` when it is kept in RAM); when the carried vectors are on disk, those and the model's own values while
    a checkpoint is substituted in place (float64); and a Hessian product's tangent, staged once per product in the
    parameters' dtype (counted at 4 bytes per coordinate). With the carried vectors on disk, the symmetrising scale
    ``s`` is kept there too (:meth:`~.layout.SegmentLayout.scale_part`): one more float64 vector."""
    rows = _basis_rows(krylov_size)
    basis = 8 * n * rows if (where or scratch_mode(n, rows)) == "disk" else 0
    return basis + (8 * n * (CARRIED_VECTORS + 2) if carried_mode(n) == "disk" else 0) + 4 * n


#: Bytes per parameter that the curvature operator's cached forward graphs (``cache_graphs``) held on top of the rest
#: (measured: GPT-2, 4.2M parameters, 8 captured sequences of 16 tokens: peak 107× vs 53× the float32 parameter
#: bytes without the cache). The cache only saves time: it is used when it fits twice over.
GRAPH_CACHE_BYTES_PER_PARAMETER = 220
#: Largest graph cache (estimated bytes) kept: the cache is about 55× the float32 parameter bytes, far above the
#: bound of issue 16 (peak RSS rise ≤ 3× parameter bytes), so it is only worth its speed on small models (tests, the
#: digits pipelines), where its absolute size is negligible.
GRAPH_CACHE_MAX_BYTES = 128 * 2**20
#: Rows per chunk of a product without cached graphs (built-in token losses; same product up to float summation
#: order): the activations and the Hessian product's graph are a row's, not the sample's (GPT-2 4.2M, 8 sequences of
#: 16 tokens: 1.3× and 1.1× the float32 parameter bytes for the whole sample).
PRODUCT_ROWS = 1


def graph_cache_fits(layout: Any, krylov_size: int) -> bool:
    """Whether the curvature operator may keep its forward graphs between products (faster): only when the cache is
    small in absolute terms (:data:`GRAPH_CACHE_MAX_BYTES`) and fits twice over in the memory free."""
    n = sum(math.prod(layout.shapes[name]) for name in layout.active_names)
    cache = GRAPH_CACHE_BYTES_PER_PARAMETER * n
    need = curvature_peak_bytes(n, krylov_size) + cache
    return cache <= GRAPH_CACHE_MAX_BYTES and 2 * need <= available_memory_bytes()


def curvature_coordinates(ledger: LedgerCore, first: int) -> int:
    """How many coordinates the curvature propagation of stage ``first`` onwards carries (the parameters any of
    those stages changed)."""
    names: set[str] = set()
    for stage in ledger.stages[first:]:
        names |= set(stage.delta_names())
    shapes = ledger.parameter_shapes
    return sum(math.prod(shapes[name]) for name in names if name in shapes)


def curvature_basis_on_disk(ledger: LedgerCore, first: int, krylov_size: int) -> int | None:
    """Bytes of the Krylov basis of stage ``first`` onwards when it goes to scratch disk (too large to keep in RAM
    by default, :func:`~.scratch.scratch_mode`), else None."""
    n = curvature_coordinates(ledger, first)
    rows = _basis_rows(krylov_size)
    return 8 * n * rows if scratch_mode(n, rows) == "disk" else None


def curvature_memory_problem(ledger: LedgerCore, first: int, krylov_size: int) -> str | None:
    """``None`` when the curvature propagation of stage ``first`` onwards fits in the memory available now (and its
    Krylov basis, when it goes to disk, in the scratch directory's free space), else a one-line explanation naming a
    setting that fits."""
    n = curvature_coordinates(ledger, first)
    need, available = curvature_peak_bytes(n, krylov_size), available_memory_bytes()
    disk = curvature_scratch_bytes(n, krylov_size)
    free = scratch_free_bytes() if disk else 0
    if need <= available and disk <= free:
        return None
    cheap = CURVATURE_PRESETS["cheap"]["krylov_size"]
    fits = max((k for k in range(1, krylov_size) if _fits(n, k, available)), default=0)
    if fits >= cheap:
        fix = f"use --curvature-preset cheap or curvature_options={{'krylov_size': {fits}}}"
    elif fits >= 1:
        fix = f"use curvature_options={{'krylov_size': {fits}}} (CLI: --krylov-size {fits}) or --estimator aa-fd"
    else:
        fix = "use --estimator aa-fd (no Krylov basis: about one model copy)"
    if need > available:
        where = "in RAM" if scratch_mode(n, krylov_size + 3) == "ram" else f"in RAM (basis on disk, {scratch_dir()})"
        what = f"about {human_bytes(need)} {where} (Krylov basis of {krylov_size} float64 vectors over {n:,} "
        what += f"coordinates, {WORKING_VECTORS} working vectors) but {human_bytes(available)} is available"
    else:
        what = f"{human_bytes(disk)} of scratch disk for its Krylov basis of {krylov_size} float64 vectors over "
        what += f"{n:,} coordinates but {scratch_dir()} has {human_bytes(free)} free ({SCRATCH_DIR_ENV} moves it)"
    return f"the curvature propagation needs {what}: {fix}"


def _fits(n: int, krylov_size: int, available: int) -> bool:
    disk = curvature_scratch_bytes(n, krylov_size)
    return curvature_peak_bytes(n, krylov_size) <= available and (not disk or disk <= scratch_free_bytes())


def check_curvature_memory(ledger: LedgerCore, first: int, krylov_size: int, estimator: str) -> None:
    """Raise :class:`EstimatorMemoryError` (one line, naming a setting that fits) before any curvature work that
    would not fit in memory."""
    problem = curvature_memory_problem(ledger, first, krylov_size)
    if problem is not None:
        raise EstimatorMemoryError(f"{estimator}: {problem}.")


def _missing_segments(stage: Stage) -> MissingCurvatureError:
    return MissingCurvatureError(
        f"Stage {stage.name!r} (index {stage.index}) holds no curvature segments, which aa-ggn/aa-hvp need. Record "
        "it with curvature material: `curvature_segments=3` (the default) and a loss — StageRecorder(...) for the "
        "Trainer, or ledger.record_stage(name, ..., loss_fn=(forward, loss), num_steps=N) with rec.step(batch) "
        "for custom loops — or use a curvature-free estimator (aa-fd)."
    )


def _segment_ranges(stage: Stage, max_segments: int | None = None) -> list[tuple[Any, int, int]]:
    """Segments with the step ranges they govern: contiguous, from step 0 to ``num_steps``. With ``max_segments``
    only that many recorded segments are used (the ones at the centres of equal parts of the list)."""
    segs = sorted(stage.segments, key=lambda s: s.step_start)
    if max_segments is not None and 0 < max_segments < len(segs):
        segs = [segs[int((i + 0.5) * len(segs) / max_segments)] for i in range(max_segments)]
    out = []
    for i, seg in enumerate(segs):
        start = 0 if i == 0 else segs[i].step_start
        end = stage.num_steps if i == len(segs) - 1 else segs[i + 1].step_start
        out.append((seg, start, end))
    return out


def _carrier(ledger: LedgerCore, stage: Stage, v: Mapping[str, torch.Tensor]) -> Any:
    """The mapping type that keeps the carried vectors of ``stage``: ``dict`` (RAM), or :class:`~.scratch.TensorFile`
    when a float64 vector over the tensors involved is large (:func:`~.scratch.carried_mode`)."""
    shapes = ledger.parameter_shapes
    names = set(v) | set(stage.trainable_parameters)
    n = sum(math.prod(shapes[k]) if k in shapes else int(v[k].numel()) for k in names if k in shapes or k in v)
    return dict if carried_mode(n) == "ram" else TensorFile


def _carry(v: Mapping[str, torch.Tensor] | None, make: Any, consume: bool) -> Any:
    """``v`` as float64 CPU tensors in a new mapping of type ``make`` (a dict shares tensors that are already float64
    on the CPU). ``consume``: the caller gives ``v`` up: a dict is emptied as its tensors are moved (none is then
    kept twice), a :class:`~.scratch.TensorFile` is taken over as it is."""
    if v is None:
        return None
    if consume and isinstance(v, make) and make is TensorFile:
        return v
    out = make()
    for k in list(v):
        out[k] = v[k].detach().to("cpu", torch.float64)
        if consume and isinstance(v, dict):
            del v[k]
    return out


def propagate(
    v: Mapping[str, torch.Tensor],
    ledger: LedgerCore,
    stage_index: int,
    mode: str = "ggn",
    loss_fns: Mapping[str, LossSpec] | None = None,
    krylov_size: int = 12,
    *,
    model: torch.nn.Module | None = None,
    initial_buffer: Mapping[str, torch.Tensor] | None = None,
    curvature_scale: float = 1.0,
    sample_size: int | None = None,
    chunk_rows: int = 512,
    max_segments: int | None = None,
    allow_identity_propagation: bool = False,
    start_step: int = 0,
    consume: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Carry ``v`` (a perturbation of the start of stage ``stage_index``) through that stage with curvature.

    Args:
        v: ``{base name: tensor}``; names absent are zero.
        ledger: a :class:`~hf_stage_attribution.ledger.ledger.StageLedger`.
        stage_index: index of the later stage in ``ledger.stages``.
        mode: ``"ggn"`` (Gauss–Newton, PSD) or ``"hvp"`` (Hessian, negative Ritz values treated as zero).
        loss_fns: ``{stage name: (forward, loss) or f(model, batch)}`` overriding the stage's recorded loss.
        krylov_size: Krylov basis size per segment (8–20 is typical).
        model: the model architecture (any parameter values; the ledger's are substituted). Needed for curvature.
        initial_buffer: difference of the optimizer's first moment entering the stage (continued stages only).
        curvature_scale: multiplies ``C̄`` (``0`` gives exactly the curvature-free ``D_j`` propagation).
        sample_size: use at most this many captured examples per segment (default: all).
        max_segments: use at most this many of the recorded segments (cheaper; each governs a longer range).
        allow_identity_propagation: pass ``v`` unchanged through a stage whose optimizer is unknown (else refuse).
        start_step: carry ``v`` only through the steps ``start_step..num_steps`` (partial replay ran the first ones);
            ``initial_buffer`` is then the first-moment difference at that step, whatever the stage's policy.
        consume: the caller gives up ``v`` and ``initial_buffer``: dicts are emptied as their tensors are taken over
            (so that none is held twice), a :class:`~.scratch.TensorFile` returned by an earlier call is reused.

    Returns:
        ``(out, info)``: the propagated perturbation (float64, names of ``v`` plus the tensors curvature moved; a
        dict, or on large models a :class:`~.scratch.TensorFile` mapping that reads each tensor from disk) and
        diagnostics: ``curvature_products``, ``example_products``, ``unstable_modes``, ``negative_modes``,
        ``segments`` (per segment: steps, basis size, Ritz values...), ``approximations``, ``buffer`` (first-moment
        difference leaving the stage, or None).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    stage = ledger.stages[stage_index]
    make = _carrier(ledger, stage, v)
    x = _carry(v, make, consume)
    info: dict[str, Any] = {"mode": mode, "stage": stage.name, "curvature_products": 0, "example_products": 0,
                            "unstable_modes": 0, "negative_modes": 0, "segments": [], "approximations": [],
                            "buffer": None}  # fmt: skip
    if stage.num_steps == 0:
        return x, info
    family = recorded_family(stage.optimizer)
    if family is None:
        kind = (stage.optimizer or {}).get("type")
        if allow_identity_propagation:
            info["approximations"] = [f"stage {stage.name!r}: optimizer {kind!r} unknown; passed with D = 1"]
            return x, info
        raise UnsupportedOptimizerError(
            f"Stage {stage.name!r} (index {stage.index}) was trained with "
            f"{'an unrecorded optimizer' if kind is None else repr(kind)}, whose update rule the propagation does not "
            "know. Record the stage with a torch SGD/Adam/AdamW/RMSprop/Adagrad optimizer, or use an estimator "
            "that does not propagate (delta-linear, delta-fd)."
        )
    continued = stage.optimizer_state_policy == "continued"
    buf = _carry(initial_buffer, make, consume) if continued or start_step else None
    if (continued or start_step) and buf is None:
        buf = make()
    curved = curvature_scale != 0.0 and family not in ("frozen", "lion")
    if not stage.segments:
        if curved:
            raise _missing_segments(stage)
        layout = SegmentLayout.whole_stage(stage, family, continued)
        layout.carried = make
        x, buf = layout.curvature_free(x, buf, in_place=True)
        info["buffer"] = buf
        return x, info
    if curved and model is None:
        raise MissingCurvatureError(
            f"Stage {stage.name!r}: curvature products need the model's architecture; pass `model=` (e.g. the final "
            "model: its parameter values are replaced by the ledger's)."
        )
    loss = resolve_loss(stage, loss_fns, mode, ledger=ledger, model=model) if curved else None
    if (stage.curvature_loss or {}).get("type") in PAIRED_BATCH_LOSSES:
        chunk_rows = 1  # each captured batch holds its own chosen/rejected halves: never concatenate batches
    theta_start = ledger.state_at(stage_index - 1) if curved else None
    for seg, start, end in _segment_ranges(stage, max_segments):
        if end <= start_step:
            continue
        start = max(start, start_step)
        layout = SegmentLayout(stage, seg, family, start, end, continued, buffer_fresh=(start == 0 and not continued))
        layout.carried = make
        record = {"segment": seg.index, "steps": [start, end], "mid_step": seg.mid_step, "basis_size": 0,
                  "products": 0, "ritz_values": [], "unstable_modes": 0, "negative_modes": 0}  # fmt: skip
        info["segments"].append(record)
        if not (curved and layout.active_names):
            x, buf = layout.curvature_free(x, buf, in_place=True)
            continue
        # the correction's coefficients first, from the segment's start (x, buf); then R_0 in place, then the
        # correction V·(Y_C − Y_0) added a chunk at a time from the basis (still in its store)
        try:
            with VectorStore(layout.size, max(krylov_size, 3) + 1) as store:
                coefficients = _curvature_correction(layout, store, x, buf, model, theta_start, seg, loss, mode,
                                                     krylov_size, curvature_scale, sample_size, chunk_rows,
                                                     record)  # fmt: skip
                # the products' freed buffers back to the system before R_0 (freed by reference counting: no
                # collection, which would walk every live object once per segment)
                release_freed_memory(collect=False)
                x, buf = layout.curvature_free(x, buf, in_place=True)
                buf = layout.add_correction_streamed(x, buf, store, coefficients)
        except (MemoryError, RuntimeError, OSError) as exc:
            if not _out_of_memory(exc):
                raise
            raise _memory_error(mode, layout.size, krylov_size, exc) from None
        for key in ("unstable_modes", "negative_modes"):
            info[key] += record[key]
        info["curvature_products"] += record["products"]
        info["example_products"] += record["products"] * record["sample_size"]
    info["buffer"] = buf
    info["approximations"] = _approximations(stage, family, curved, info)
    return x, info


_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "no space left on device")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of RAM (or of scratch disk for the Krylov basis)."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)


def _memory_error(mode: str, n: int, krylov_size: int, exc: BaseException) -> EstimatorMemoryError:
    """The one-line error that replaces an allocation failure inside the curvature propagation."""
    cheap = CURVATURE_PRESETS["cheap"]["krylov_size"]
    smaller = "--curvature-preset cheap" if krylov_size > cheap else f"--krylov-size {max(1, krylov_size // 2)}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return EstimatorMemoryError(
        f"aa-{mode}: the curvature propagation ran out of memory over {n:,} coordinates with krylov_size="
        f"{krylov_size} ({first}); use {smaller} or --estimator aa-fd."
    )


def _curvature_correction(layout: SegmentLayout, store: VectorStore, x0: Mapping, b0: Mapping | None,
                          model: torch.nn.Module, theta_start: Mapping[str, torch.Tensor], seg: Any, loss: LossSpec,
                          mode: str, krylov_size: int, curvature_scale: float, sample_size: int | None,
                          chunk_rows: int, record: dict) -> torch.Tensor:  # fmt: skip
    """The coefficients ``C`` (``rows × 2``) of the correction ``V·(Y_C − Y_0) = Q·C`` for the position and the
    (scaled) first moment, ``Q`` the Krylov basis left in ``store`` (which needs a row more than the basis: the
    Lanczos working vector lives there too).

    Memory: every model-sized float64 vector (start vectors, the vector being orthogonalised, each product) is a
    row of ``store``, handed to and from the curvature operator a tensor at a time; ``s`` is computed per tensor
    (:meth:`~.layout.SegmentLayout.scale_part`). What stays in RAM is the operator's own working set."""
    delta_mid = seg.params_delta()
    state = _MidState(theta_start, delta_mid)
    batches = _take(seg.examples(), sample_size)
    if not batches:
        raise MissingCurvatureError(
            f"Stage {layout.stage.name!r}, segment {seg.index}: no captured examples. Record the stage with "
            "rec.step(batch) (custom loops) or through StageRecorder so that curvature material is kept."
        )
    cache = graph_cache_fits(layout, krylov_size)
    op = CurvatureOperator(
        model, state, batches, loss, mode, chunk_rows=chunk_rows, cache_graphs=cache,
        in_place=layout.carried is TensorFile,  # large models: θ_mid in the model's own parameters, restored after
        product_rows=None if cache else PRODUCT_ROWS,  # without cached graphs: a chunk's activations at a time
    )  # fmt: skip
    try:
        return _correction_with(op, layout, store, x0, b0, mode, krylov_size, curvature_scale, record)
    finally:
        op.release()  # the model's own parameter values back, whatever happened


def _correction_with(op: CurvatureOperator, layout: SegmentLayout, store: VectorStore, x0: Mapping,
                     b0: Mapping | None, mode: str, krylov_size: int, curvature_scale: float,
                     record: dict) -> torch.Tensor:  # fmt: skip
    """:func:`_curvature_correction` once its operator is built."""
    record["sample_size"] = op.sample_rows
    names, offsets = layout.active_names, layout.offsets
    bounds = [offsets[n] for n in names]

    def part(d: Mapping | None, n: str) -> torch.Tensor:
        a, b = offsets[n]
        t = None if d is None else d.get(n)
        return torch.zeros(b - a, dtype=torch.float64) if t is None else t.reshape(-1).to(torch.float64)

    def u0(n: str) -> torch.Tensor:
        return part(x0, n) / layout.scale_part(n)

    def b0s(n: str) -> torch.Tensor:
        return part(b0, n) * layout.scale_part(n)

    def fill_with(values: Any) -> Any:
        def fill(row: int) -> None:
            for n in names:
                store.write_range(row, offsets[n][0], values(n))

        return fill

    fills = [fill_with(u0)] if b0 is None else [fill_with(u0), fill_with(b0s)]  # no b0: no start vector for it
    forcing = None
    frozen = {}
    for k in list(x0):
        if k not in layout.active_set:
            t = x0[k]
            if bool(t.abs().sum() > 0):
                frozen[k] = t
    if frozen:  # kept in RAM: only LoRA-style stages with perturbed frozen tensors have a forcing
        image = op.apply(frozen, names)
        del frozen
        forcing = torch.cat([image.pop(n).reshape(-1).to(torch.float64) * layout.scale_part(n) for n in names])
        forcing.mul_(curvature_scale)
        fills.append(lambda row, f=forcing: store.write_range(row, 0, f))

    # the pieces handed to and from the products live in buffers reused piece after piece (a running sum in the
    # store's working slot 0, a piece of v in slot 1, s in `scales`): each is used up before the next is asked for
    # (apply_parts' contract), and a fresh 512 KiB piece each time was a fresh mmap below glibc's threshold whose
    # pages all faulted in (5.1M page faults, half the CPU time of aa-ggn on a 3.7M-parameter model)
    scales = torch.empty(CHUNK, dtype=torch.float64)

    def running(row: int, lo: int, hi: int) -> torch.Tensor:  # a copy (a RAM row gives a view)
        t = store.read_range(row, lo, hi, slot=0)
        return t.clone() if store.where == "ram" else t

    def source(j: int, i: int, lo: int, hi: int) -> torch.Tensor:
        t = store.read_range(j, bounds[i][0] + lo, bounds[i][0] + hi, slot=1)
        s = layout.scale_part(names[i], lo, hi, out=scales[: hi - lo])
        return t * s if store.where == "ram" else t.mul_(s)  # a RAM row's view is not to be changed

    def apply_row(j: int, row: int) -> None:
        try:
            op.apply_parts(
                names, layout.shapes,
                source=lambda i, lo, hi: source(j, i, lo, hi),
                write=lambda i, lo, t: store.write_range(row, bounds[i][0] + lo, t),
                read=lambda i, lo, hi: running(row, bounds[i][0] + lo, bounds[i][0] + hi),
                finish=lambda i, lo, t: t.mul_(layout.scale_part(names[i], lo, lo + len(t), out=scales[: len(t)]))
                .mul_(curvature_scale),
            )  # fmt: skip
        finally:
            store.release_buffers()  # nothing of the store's held across the products of the next basis vector

    h, _ = lanczos_rows(store, apply_row, fills, krylov_size, shift=layout.decay_shift())
    del fills
    record["products"] = op.products
    record["basis_size"] = store.count
    record["scratch"] = store.where
    op.release()  # the substituted parameters, batches and any cached graphs: not needed past the products
    if store.count == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    theta, w = torch.linalg.eigh(h)
    record["ritz_values"] = [float(t) for t in theta]
    negative = theta < -1e-12 * max(1.0, float(theta.abs().max()))
    record["negative_modes"] = int(negative.sum()) if mode == "hvp" else 0
    theta = theta.clamp_min(0.0).numpy()
    # Ritz coordinates V·y with V = Q·w: inner products against the stored rows, then rotated (no n×r matrix)
    yx = (w.T @ store.dots_parts((offsets[n][0], u0(n)) for n in names)).numpy()
    yb = (w.T @ store.dots_parts((offsets[n][0], b0s(n)) for n in names)).numpy() if b0 is not None else None
    yb = np.zeros_like(yx) if yb is None else yb
    yf = (w.T @ store.dots(forcing)).numpy() if forcing is not None else np.zeros_like(yx)
    del forcing
    proj = layout.projection_streamed(store, w.numpy())
    yc_x, yc_b, y0_x, y0_b, bad = proj.solve(theta, yx, yb, yf)
    record["unstable_modes"] = int(bad.sum())
    return w @ torch.from_numpy(np.stack([yc_x - y0_x, yc_b - y0_b], axis=1))


class _MidState(Mapping):
    """θ_mid = θ_stage_start + segment delta, per tensor on access."""

    def __init__(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        self.start, self.delta = start, delta

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.start[name]
        return value + self.delta[name].to(value.dtype) if name in self.delta else value

    def __iter__(self):
        return iter(self.start)

    def __len__(self) -> int:
        return len(self.start)


def _take(batches: list[Any], limit: int | None) -> list[Any]:
    if limit is None:
        return batches

    out, n = [], 0
    for b in batches:
        if n >= limit:
            break
        out.append(b)
        n += _rows(b)
    return out


def _approximations(stage: Stage, family: str, curved: bool, info: dict) -> list[str]:
    out = []
    if curved:
        out.append(f"stage {stage.name!r}: curvature ({info['mode']}) frozen at each segment's midpoint, "
                   "estimated on the captured sample")  # fmt: skip
    if family in ("adam", "adamw", "rmsprop", "adagrad"):
        out.append(f"stage {stage.name!r}: {family} preconditioner frozen at each segment's midpoint")
    if family == "lion":
        out.append(f"stage {stage.name!r}: Lion's sign update has no first-order response; only its decay is applied")
    groups = (stage.optimizer or {}).get("param_groups", [])
    if any(g.get("lora_params") for g in groups):
        out.append(f"stage {stage.name!r}: the LoRA adapter's response to the perturbation is not modelled "
                   "(its base weights are frozen; only fully trained tensors respond to curvature)")  # fmt: skip
    if info["unstable_modes"]:
        out.append(f"stage {stage.name!r}: {info['unstable_modes']} unstable Ritz mode(s) damped to zero")
    clipping = (getattr(stage, "info", None) or {}).get("gradient_clipping") or {}
    if curved and clipping.get("enabled"):
        out.append(clipping_note(stage.name, clipping.get("max_grad_norm")))
    return out


def clipping_note(stage_name: str, max_grad_norm: Any) -> str:
    """The approximation note for a later stage that clipped its gradients, carried with curvature.

    Example:
        >>> clipping_note("sft", 1.0).split(";")[0]
        "stage 'sft': gradient clipping was enabled (max_grad_norm=1.0)"
    """
    return (
        f"stage {stage_name!r}: gradient clipping was enabled (max_grad_norm={max_grad_norm}); the curvature carry "
        "does not model its rescaling of the gradient (the ledger keeps no per-step gradient norms), so on steps "
        "where clipping was active the carried re-learning response of that stage is larger than the one training "
        "applied"
    )


__all__ = ["CURVATURE_PRESETS", "MODES", "curvature_settings", "propagate", "run_recurrence"]
