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

from collections.abc import Callable, Sequence

import torch


def _orthogonalise(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """``w`` minus its components along ``basis``, twice, one basis vector at a time (in place on ``w``'s copy):
    no ``n × r`` matrix is stacked, so the working memory is one vector whatever the basis size."""
    if not basis:
        return w
    w = w.clone()
    for _ in range(2):
        coefficients = [float(q @ w) for q in basis]  # classical Gram–Schmidt: all coefficients from the same w
        for q, c in zip(basis, coefficients):
            w.add_(q, alpha=-c)
    return w


def basis_bytes(n: int, max_size: int) -> int:
    """Peak bytes of :func:`block_lanczos` on ``n`` coordinates: the float64 basis plus four working vectors."""
    return 8 * n * (max_size + 4)


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

    ``shift``: a diagonal ``D`` (vector) added to ``A`` when *growing* the space (``A q + D q``), not in ``H``: the
    space is then a Krylov space of ``A + D`` (e.g. curvature plus a non-uniform coupled decay) while ``H`` stays the
    projection of ``A`` alone. A start vector, or a new direction, is dropped when less than ``rtol`` of its norm
    survives orthogonalisation; a new direction is also dropped when its norm is below ``rtol`` times the largest
    direction norm seen (breakdown).

    Memory: the basis and a few working vectors (:func:`basis_bytes`); products are not kept: ``H`` is filled as
    each image ``A q_j`` is formed (``H_ij = q_i · A q_j`` for the vectors present then, the rest by symmetry).
    """
    n = starts[0].numel() if starts else 0
    rows = torch.empty(max(max_size, len(starts)), n, dtype=torch.float64)  # the basis, one contiguous row each
    basis: list[torch.Tensor] = []

    def add(w: torch.Tensor) -> None:
        row = rows[len(basis)]
        torch.div(w, w.norm(), out=row)
        basis.append(row)

    for s in starts:
        s = s.to(torch.float64)
        norm = float(s.norm())
        if norm == 0.0 or not torch.isfinite(s).all():
            continue
        w = _orthogonalise(s, basis)
        if float(w.norm()) > rtol * norm:
            add(w)
    if not basis:
        return torch.zeros(n, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64), 0
    entries: dict[tuple[int, int], float] = {}
    products = 0
    scale = 0.0
    while products < len(basis):
        j = products
        q = basis[j]
        w = apply(q).to(torch.float64)
        products += 1
        for i, qi in enumerate(basis):
            entries[(i, j)] = float(qi @ w)
        if shift is not None:
            w = w + shift * q
        norm = float(w.norm())
        scale = max(scale, norm)
        if len(basis) < max_size and norm > 0.0:
            w = _orthogonalise(w, basis)
            if float(w.norm()) > rtol * max(scale, norm):
                add(w)
        del w
    r = len(basis)
    h = torch.zeros(r, r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            if (i, j) in entries:
                h[i, j] = entries[(i, j)]
            elif (j, i) in entries:
                h[i, j] = entries[(j, i)]
    basis.clear()
    return rows[:r].T, 0.5 * (h + h.T), products
