"""Block Lanczos with full reorthogonalisation, in float64, for a symmetric operator given by its products.

The basis starts from a block of vectors (the perturbation, the optimizer's first-moment difference, the forcing
from frozen tensors: whatever is non-zero) and grows by one operator product per basis vector; every new vector
is orthogonalised twice against the whole basis (classical Gram–Schmidt, repeated: "twice is enough"). The
projected operator ``H = Qᵀ A Q`` is then exact for the basis, and its eigenpairs are the Ritz pairs. An invariant
subspace (e.g. ``A = 0``) stops the growth early: no product is spent on a direction that adds nothing.

Example:
    >>> import torch
    >>> a = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    >>> q, h, products = block_lanczos(lambda v: a @ v, [torch.ones(4, dtype=torch.float64)], max_size=8)
    >>> q.shape[1], products, sorted(round(float(x), 6) for x in torch.linalg.eigvalsh(h))
    (3, 3, [0.0, 1.0, 3.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .scratch import CHUNK, VectorStore


def _orthogonalise(w: torch.Tensor, basis: VectorStore) -> torch.Tensor:
    """``w`` minus its components along the rows of ``basis``, twice (classical Gram–Schmidt, repeated), in place
    on ``w`` (float64): the inner products and the update stream over the basis in coordinate chunks, so the working
    memory is ``w`` itself whatever the basis size and wherever it lives."""
    for _ in range(2):
        basis.subtract(w, basis.dots(w))  # classical Gram–Schmidt: all coefficients from the same w
    return w


def basis_bytes(n: int, max_size: int, *, where: str = "ram") -> int:
    """Peak RAM bytes of :func:`block_lanczos` on ``n`` coordinates: four float64 working vectors, plus the float64
    basis itself when it is kept in RAM (``where="ram"``) or one streamed chunk of it when it is on disk."""
    work = 8 * n * 4
    if where == "ram":
        return work + 8 * n * max_size
    return work + 8 * max_size * min(n, CHUNK)


def block_lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    starts: Sequence[torch.Tensor],
    max_size: int,
    *,
    shift: torch.Tensor | None = None,
    rtol: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An orthonormal basis ``Q`` (``n×r``, ``r ≤ max_size``) of the block Krylov space of ``apply`` from ``starts``,
    the projected operator ``H = Qᵀ A Q`` (``r×r``, symmetrised) and the number of products spent (``= r``).

    The basis is kept in RAM: :func:`lanczos_into` with a :class:`~.scratch.VectorStore` is the same algorithm with
    the basis wherever the store keeps it (on disk for large models).
    """
    n = starts[0].numel() if starts else 0
    store = VectorStore(n, max(max_size, len(starts), 1), where="ram")
    h, products = lanczos_into(store, apply, starts, max_size, shift=shift, rtol=rtol)
    r = store.count
    q = store._ram[:r].T if r else torch.zeros(n, 0, dtype=torch.float64)
    return q, h, products


def lanczos_into(
    store: VectorStore,
    apply: Callable[[torch.Tensor], torch.Tensor],
    starts: Sequence[torch.Tensor],
    max_size: int,
    *,
    shift: torch.Tensor | None = None,
    rtol: float = 1e-10,
    consume_starts: bool = False,
) -> tuple[torch.Tensor, int]:
    """Block Lanczos writing the orthonormal basis into ``store`` (its rows ``0..r−1``); returns the projected
    operator ``H = Qᵀ A Q`` (``r×r``, symmetrised) and the number of products spent (``= r``).

    ``shift``: a diagonal ``D`` (vector) added to ``A`` when *growing* the space (``A q + D q``), not in ``H``: the
    space is then a Krylov space of ``A + D`` (e.g. curvature plus a non-uniform coupled decay) while ``H`` stays the
    projection of ``A`` alone. A start vector, or a new direction, is dropped when less than ``rtol`` of its norm
    survives orthogonalisation; a new direction is also dropped when its norm is below ``rtol`` times the largest
    direction norm seen (breakdown).

    Memory: a few float64 working vectors besides the store (:func:`basis_bytes`); products are not kept: ``H`` is
    filled as each image ``A q_j`` is formed (``H_ij = q_i · A q_j`` for the vectors present then, the rest by
    symmetry). Inner products accumulate in float64 per coordinate chunk; nothing of the basis is stacked.
    ``consume_starts``: ``starts`` is a list emptied as its vectors enter the basis, so that a caller holding no
    other reference to them frees each start before the first product.
    """
    limit = max(max_size, len(starts))

    def add(w: torch.Tensor) -> None:
        w.div_(w.norm())
        store.write(store.count, w)

    pending = starts if consume_starts else list(starts)
    while pending:
        s = pending.pop(0)
        norm = float(s.norm())
        if norm == 0.0 or not torch.isfinite(s).all():
            continue
        w = _orthogonalise(s.to(torch.float64, copy=True), store)
        if float(w.norm()) > rtol * norm and store.count < limit:
            add(w)
        del w, s
    if store.count == 0:
        return torch.zeros(0, 0, dtype=torch.float64), 0
    entries: dict[tuple[int, int], float] = {}
    products = 0
    scale = 0.0
    q = torch.empty(store.n, dtype=torch.float64)
    while products < store.count:
        j = products
        store.read(j, out=q)
        w = apply(q).to(torch.float64)
        products += 1
        for i, value in enumerate(store.dots(w).tolist()):
            entries[(i, j)] = value
        if shift is not None:
            w.addcmul_(shift, q)
        norm = float(w.norm())
        scale = max(scale, norm)
        if store.count < max_size and norm > 0.0:
            w = _orthogonalise(w, store)
            if float(w.norm()) > rtol * max(scale, norm):
                add(w)
        del w
    r = store.count
    h = torch.zeros(r, r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            if (i, j) in entries:
                h[i, j] = entries[(i, j)]
            elif (j, i) in entries:
                h[i, j] = entries[(j, i)]
    return 0.5 * (h + h.T), products


def lanczos_rows(
    store: VectorStore,
    apply_row: Callable[[int, int], None],
    fills: Sequence[Callable[[int], None]],
    max_size: int,
    *,
    shift: Callable[[int, int], torch.Tensor] | None = None,
    rtol: float = 1e-10,
) -> tuple[torch.Tensor, int]:
    """:func:`lanczos_into` with every model-sized vector in ``store``: the basis in its rows ``0..r−1`` and the
    vector being formed in the *working row* just past them (``store`` needs one row of capacity more than the
    basis). Nothing model-sized is held in RAM here, whether the store is in RAM or on disk.

    ``fills``: per start vector, ``fill(row)`` writes it into row ``row``; ``apply_row(j, row)`` writes ``A q_j`` into
    row ``row``; ``shift(lo, hi)``: the diagonal ``D`` at coordinates ``lo..hi`` (see :func:`lanczos_into`).
    Same algorithm and results as :func:`lanczos_into` up to rounding (norms and inner products accumulate per chunk).
    """
    limit = min(max(max_size, len(fills)), store.capacity - 1)

    def orthogonalise(row: int, dots: torch.Tensor | None = None) -> float:
        """Two Gram–Schmidt passes on ``row`` (``dots``: its ``Qᵀ q`` when already known); its norm after them. Each
        subtraction also returns what the next step needs (the second pass's dots, the norm) from the same read of
        the basis: three passes over it instead of five, the same numbers."""
        dots = store.row_dots(row) if dots is None else dots
        return store.row_subtract(row, store.row_subtract(row, dots, then="dots"), then="norm")

    def accept(row: int, norm: float) -> None:
        store.row_divide(row, norm)
        store.count += 1

    for fill in fills:
        row = store.count
        fill(row)
        norm = store.row_norm(row)
        if norm == 0.0 or not math.isfinite(norm):
            continue
        left = orthogonalise(row)
        if left > rtol * norm and store.count < limit:
            accept(row, left)
    if store.count == 0:
        return torch.zeros(0, 0, dtype=torch.float64), 0
    entries: dict[tuple[int, int], float] = {}
    products = 0
    scale = 0.0
    while products < store.count:
        j, row = products, store.count
        apply_row(j, row)
        products += 1
        dots = store.row_dots(row)
        for i, value in enumerate(dots.tolist()):
            entries[(i, j)] = value
        if shift is not None:
            store.row_add_product(row, j, shift)
        norm = store.row_norm(row)
        scale = max(scale, norm)
        if store.count < max_size and norm > 0.0:
            left = orthogonalise(row, dots if shift is None else None)  # unshifted: the dots just taken are its first
            if left > rtol * max(scale, norm):
                accept(row, left)
    r = store.count
    h = torch.zeros(r, r, dtype=torch.float64)
    for (i, j), value in entries.items():
        h[i, j] = value
        if (j, i) not in entries:
            h[j, i] = value
    return 0.5 * (h + h.T), products
