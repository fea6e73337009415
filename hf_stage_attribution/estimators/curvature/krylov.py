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
    if not basis:
        return w
    q = torch.stack(basis, dim=1)
    for _ in range(2):
        w = w - q @ (q.T @ w)
    return w


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
    """
    basis: list[torch.Tensor] = []
    for s in starts:
        s = s.to(torch.float64)
        norm = float(s.norm())
        if norm == 0.0 or not torch.isfinite(s).all():
            continue
        w = _orthogonalise(s, basis)
        if float(w.norm()) > rtol * norm:
            basis.append(w / w.norm())
    if not basis:
        n = starts[0].numel() if starts else 0
        return torch.zeros(n, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64), 0
    images: list[torch.Tensor] = []
    scale = 0.0
    while len(images) < len(basis):
        q = basis[len(images)]
        w = apply(q).to(torch.float64)
        images.append(w)
        if shift is not None:
            w = w + shift * q
        norm = float(w.norm())
        scale = max(scale, norm)
        if len(basis) < max_size and norm > 0.0:
            w = _orthogonalise(w, basis)
            if float(w.norm()) > rtol * max(scale, norm):
                basis.append(w / w.norm())
    q = torch.stack(basis, dim=1)
    h = q.T @ torch.stack(images, dim=1)
    return q, 0.5 * (h + h.T), len(images)
