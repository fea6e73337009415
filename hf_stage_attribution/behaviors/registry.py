"""The behavior registry: kind name → Behavior class.

Example:
    >>> from hf_stage_attribution import behaviors
    >>> "classification" in behaviors.names()
    True
"""

from __future__ import annotations

from typing import TypeVar

from ..errors import unknown_name

__all__ = ["register", "get", "names"]

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: register a Behavior class under its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a non-empty string class attribute `kind` to be registered.")
    _REGISTRY[kind] = cls
    return cls


def get(name: str) -> type:
    """The Behavior class registered as ``name``; an unknown name raises UnknownNameError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("behavior kind", name, list(_REGISTRY)) from None


def names() -> list[str]:
    """The registered behavior kinds, sorted."""
    return sorted(_REGISTRY)
