"""Lazy views of parameter states reconstructed from the ledger, one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch


class LazyState(Mapping):
    """A read-only ``{parameter name: float32 tensor}`` mapping whose values are computed on access.

    Example:
        >>> import torch
        >>> state = LazyState(["w"], lambda name: torch.zeros(2))
        >>> state["w"].tolist()
        [0.0, 0.0]
    """

    def __init__(self, names: list[str], getter: Callable[[str], torch.Tensor]) -> None:
        self._names = list(names)
        self._index = set(self._names)
        self._getter = getter

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        return self._getter(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (small models only)."""
        return {name: self._getter(name) for name in self._names}
