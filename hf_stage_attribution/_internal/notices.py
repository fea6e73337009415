"""One-line notices the library writes for a person on stderr (not data, not warnings): the projected size of a
stage before recording, the estimator ``auto`` chose and why.

A script that records or attributes sees them; the CLI's quiet console holds back the routine ones (``--verbose``
shows them) through :func:`held_back`.

Example:
    >>> import io, contextlib
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     notice("stage 'sft': projected ledger growth 1.2 MB")
    ...     with held_back() as held:
    ...         notice("not shown", routine=True)
    ...         notice("shown", routine=False)
    >>> err.getvalue().splitlines()
    ["[hf-stage-attribution] stage 'sft': projected ledger growth 1.2 MB", '[hf-stage-attribution] shown']
    >>> held
    ['not shown']
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

PREFIX = "[hf-stage-attribution] "
_held: list[list[str]] = []


def notice(message: str, *, routine: bool = True) -> None:
    """Write ``message`` on stderr, or keep it back inside :func:`held_back` when it is ``routine``."""
    if routine and _held:
        _held[-1].append(message)
        return
    sys.stderr.write(PREFIX + message + "\n")


@contextlib.contextmanager
def held_back() -> Iterator[list[str]]:
    """Inside the block, routine notices are collected (the yielded list) instead of written."""
    _held.append([])
    try:
        yield _held[-1]
    finally:
        _held.pop()
