"""Results kept for one attribution only: a replay is user code (stage functions, reference models, reward functions)
whose behaviour can change between calls with the same objects, so what a replay computed — its embeddings, a given
reference model's verified hash — is served again only inside one :func:`reusing_replays` block
(``StageAttributor.attribute`` opens one) and dropped when the outermost block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: the kept results (partial and strided replay's embeddings, verified reference models) registered with
#: :func:`kept_replays`
_KEPT: list[dict[str, Any]] = []
_REUSING = [0]  # how many :func:`reusing_replays` blocks are open


def kept_replays(memo: dict[str, Any]) -> dict[str, Any]:
    """Register a memo of replay results: it is used only inside :func:`reusing_replays` and emptied when the
    outermost block ends."""
    _KEPT.append(memo)
    return memo


def reusing() -> bool:
    """Whether a :func:`reusing_replays` block is open (a replaying estimator then keeps and serves its result)."""
    return _REUSING[0] > 0


@contextmanager
def reusing_replays() -> Iterator[None]:
    """Inside this block a replaying estimator (``partial-replay``, ``strided-replay``) keeps its last result and
    serves it again for the same ledger, budget and inputs — the linear and finite-difference read-outs of one
    attribution replay once (``StageAttributor.attribute`` opens one). Outside it every call replays: a stage function
    is user code whose behaviour can change between calls with the same object (a data-order seed read from a config
    the user fixed: a result kept across calls was served again, partial replay 0.137 off on a largest effect of
    1.83, strided replay +0.956 where a fresh run gives −0.474). The kept results (and their scratch files) are
    dropped when the outermost block ends.

    Example:
        >>> with reusing_replays():
        ...     reusing()
        True
        >>> reusing()
        False
    """
    _REUSING[0] += 1
    try:
        yield
    finally:
        _REUSING[0] -= 1
        if not _REUSING[0]:
            for memo in _KEPT:
                memo.clear()
