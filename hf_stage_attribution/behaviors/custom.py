"""User-defined behaviors: :class:`PerExample` (a per-batch function over examples, splittable) and
:class:`CallableBehavior` (a bare ``f(model) -> Tensor[n]``, evaluated whole), plus :func:`as_behavior`.

Example:
    >>> import torch
    >>> from hf_stage_attribution.behaviors import PerExample, as_behavior
    >>> lin = torch.nn.Linear(2, 1)
    >>> b = PerExample(lambda m, batch: m(torch.tensor(batch)).squeeze(-1), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> torch.allclose(torch.cat([b.select([0])(lin), b.select([1, 2])(lin)]), b(lin))
    True
    >>> as_behavior(b) is b
    True
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BehaviorError, StageAttributionError, UnsafeInputError
from .base import Behavior, ExampleBehavior, check_values, eval_mode, one_line
from .data import ExampleData
from .registry import register

__all__ = ["PerExample", "CallableBehavior", "as_behavior", "as_behavior_set", "callable_path", "import_callable"]


def callable_path(fn: Any) -> str:
    """``"module:qualname"`` of an importable function, else a BehaviorError (lambdas, closures)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise BehaviorError(
            f"The function {fn!r} is not importable by name (a lambda, a closure or defined in __main__), so the "
            "behavior cannot be written to a spec; define it at module level in an importable module."
        )
    return f"{module}:{qualname}"


def import_callable(
    path: str, trust_code: bool, *, what: str = "behavior function", source: str = "The behavior spec"
) -> Callable[..., Any]:
    """Import ``"module:qualname"``; only with ``trust_code=True`` since it runs the module's code (``what`` and
    ``source`` name the function and where it was named, in the errors)."""
    if not trust_code:
        raise UnsafeInputError(
            f"{source} names the function {path!r}; importing it runs code. Pass trust_code=True "
            "(CLI: --trust-code) if you trust it."
        )
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise BehaviorError(f"The {what} must look like 'package.module:function'; got {path!r}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # not on the path, or the module's own code raised: one line, its error as the cause
        raise _import_error(exc, module_name, path, what) from exc
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise BehaviorError(f"Cannot import the {what} {path!r}: {exc}.") from None
    if not callable(obj):
        raise BehaviorError(f"The {what} {path!r} is a {type(obj).__name__}, not a callable.")
    return obj


def _import_error(exc: Exception, module_name: str, path: str, what: str) -> BehaviorError:
    """The one-line error for a module that is not on the path, needs a missing module, or raised on import."""
    if isinstance(exc, ModuleNotFoundError):
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            return BehaviorError(
                f"Cannot import the {what} {path!r}: no module named {missing!r} on the Python path. The module must "
                "be importable: install it, or add the folder that holds it to PYTHONPATH (e.g. PYTHONPATH=DIR "
                "hf-stage-attribution ...); a spec file's folder is not searched."
            )
        return BehaviorError(
            f"Cannot import the {what} {path!r}: importing {module_name!r} needs the module {missing!r}, which is not "
            "installed; install it in this environment."
        )
    return BehaviorError(
        f"Cannot import the {what} {path!r}: importing the module {module_name!r} raised "
        f"{type(exc).__name__}: {one_line(exc)}."
    )


class _UserRuntimeError(BehaviorError, RuntimeError):
    """A user function's RuntimeError, wrapped: still a RuntimeError, so callers that fall back on one (the linear
    estimators leave forward-mode AD for double backward when an operation has no forward-mode rule) keep working."""


class _UserNotImplementedError(BehaviorError, NotImplementedError):
    """A user function's NotImplementedError, wrapped (see :class:`_UserRuntimeError`)."""


def call_user_function(behavior: Behavior, fn: Callable[..., Any], *args: Any, where: str = "") -> Any:
    """``fn(*args)``; an exception raised in the user's function is re-raised as a one-line BehaviorError naming the
    behavior (and ``where``, e.g. the examples), with the original exception as ``__cause__`` (a RuntimeError or
    NotImplementedError stays one too). The package's own errors and out-of-memory errors pass through unchanged."""
    try:
        return fn(*args)
    except (StageAttributionError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        wrapper = (
            _UserNotImplementedError
            if isinstance(exc, NotImplementedError)
            else _UserRuntimeError
            if isinstance(exc, RuntimeError)
            else BehaviorError
        )
        raise wrapper(
            f"{behavior.where()}: its function {name!r} raised {type(exc).__name__}: {one_line(exc)}{where}. Fix the "
            "function (in Python, the original exception is this error's __cause__)."
        ) from exc


_DATA_KEYS = ("name", "kind", "data", "select", "indices", "batch_size")


@register
class PerExample(ExampleBehavior):
    """Wraps ``fn(model, batch) -> Tensor[len(batch)]`` over examples (a list, or a ``datasets.Dataset`` whose
    batches arrive as dicts of columns, ``dataset[i:j]``); splittable across processes.

    The registry kind is ``custom``; a spec ``{"kind": "custom", "function": "pkg.mod:fn", "data": ...}`` builds
    it (``trust_code=True`` required), and without ``data`` gives a :class:`CallableBehavior` of ``fn(model)``.

    Example:
        >>> import torch
        >>> b = PerExample(lambda m, batch: m(torch.tensor(batch)).sum(-1), [[0.0, 1.0]] * 5, batch_size=2)
        >>> b(torch.nn.Linear(2, 2)).shape
        torch.Size([5])
    """

    kind: ClassVar[str] = "custom"
    _spec_fields: ClassVar[tuple[str, ...]] = ("unit", "description")
    _spec_special: ClassVar[tuple[str, ...]] = ("function",)

    def __init__(
        self,
        fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        examples: Any,
        batch_size: int = 32,
        *,
        name: str | None = None,
        unit: str = "behavior units",
        description: str = "",
    ) -> None:
        if not callable(fn):
            raise BehaviorError(f"PerExample needs a callable fn(model, batch); got a {type(fn).__name__}.")
        self.fn = fn
        super().__init__(examples, name=name or getattr(fn, "__name__", None), batch_size=batch_size)
        self.unit = unit
        self.description = description or f"{self.name}: user-defined per-example values (higher = more of it)."

    def _rows(self, start: int, stop: int) -> Any:
        return self.data.batch(start, stop)

    def _batch_values(self, model: torch.nn.Module, rows: Any, positions: range) -> torch.Tensor:
        where = f" on examples {positions.start}-{positions.stop - 1}"
        return call_user_function(self, self.fn, model, rows, where=where)

    def _spec_values(self) -> dict[str, Any]:
        return {"function": callable_path(self.fn)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, base_dir: str | Path | None = None, trust_code: bool = False):
        if "function" not in spec:
            raise BehaviorError("A 'custom' behavior spec needs 'function': 'package.module:function'.")
        fn = import_callable(spec["function"], trust_code)
        if "data" not in spec:
            extra = sorted(set(spec) - {"name", "kind", "function", "unit", "description"})
            if extra:
                raise BehaviorError(f"A 'custom' spec without 'data' takes no {extra}; remove them or add 'data'.")
            return CallableBehavior(
                fn,
                name=spec.get("name"),
                unit=spec.get("unit", "behavior units"),
                description=spec.get("description", ""),
            )
        unknown = sorted(set(spec) - {*_DATA_KEYS, "function", "unit", "description"})
        if unknown:
            raise BehaviorError(f"A 'custom' behavior spec has unknown keys {unknown}.")
        data = ExampleData.from_spec(spec, base_dir=Path(base_dir) if base_dir is not None else None)
        return cls(
            fn,
            data,
            spec.get("batch_size", 32),
            name=spec.get("name"),
            unit=spec.get("unit", "behavior units"),
            description=spec.get("description", ""),
        )


class CallableBehavior(Behavior):
    """A bare ``f(model) -> Tensor[n]``: evaluated whole (not splittable); its length is known after the first
    evaluation (or from ``num_examples``).

    Example:
        >>> import torch
        >>> b = CallableBehavior(lambda m: m.weight.sum(0), name="w")
        >>> b(torch.nn.Linear(3, 2)).shape, len(b)
        (torch.Size([3]), 3)
    """

    kind: ClassVar[str] = "custom"
    splittable: ClassVar[bool] = False

    def __init__(
        self,
        fn: Callable[[torch.nn.Module], torch.Tensor],
        *,
        name: str | None = None,
        unit: str = "behavior units",
        description: str = "",
        num_examples: int | None = None,
    ) -> None:
        if not callable(fn):
            raise BehaviorError(f"A behavior must be a Behavior or a callable f(model); got a {type(fn).__name__}.")
        super().__init__(name or getattr(fn, "__name__", None) or "custom")
        if self.name == "<lambda>":
            self.name = "custom"
        self.fn = fn
        self.unit = unit
        self.description = description or f"{self.name}: user-defined values (higher = more of it)."
        self._n = num_examples

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        with eval_mode(model):
            raw = call_user_function(self, self.fn, model)
        n = self._n if self._n is not None else (raw.numel() if isinstance(raw, torch.Tensor) else -1)
        values = check_values(raw, n, self.name)
        self._n = values.shape[0]
        return values

    def __len__(self) -> int:
        if self._n is None:
            raise BehaviorError(
                f"The length of the bare callable behavior {self.name!r} is known only after it was evaluated once; "
                "call it on the model first, pass num_examples=, or wrap it with behaviors.PerExample."
            )
        return self._n

    def select(self, indices: Sequence[int]) -> Behavior:
        raise BehaviorError(
            f"The bare callable behavior {self.name!r} cannot be split into examples; wrap it as "
            "behaviors.PerExample(fn(model, batch), examples) to split it across processes."
        )

    def to_spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "function": callable_path(self.fn),
            "unit": self.unit,
            "description": self.description,
        }


def as_behavior(obj: Any, name: str | None = None) -> Behavior:
    """``obj`` if it is a Behavior (renamed when ``name`` is given), else a :class:`CallableBehavior` of it."""
    if isinstance(obj, Behavior):
        if name is not None and obj.name != name:
            obj = copy.copy(obj)  # a renamed view; the caller's object keeps its name
            obj.name = name
        return obj
    return CallableBehavior(obj, name=name)


def as_behavior_set(behaviors: Mapping[str, Any]) -> dict[str, Behavior]:
    """``{name: Behavior}`` from ``{name: Behavior | callable}``; an empty set raises BehaviorError."""
    if not isinstance(behaviors, Mapping):
        raise BehaviorError(f"Behaviors must be given as a dict {{name: behavior}}; got a {type(behaviors).__name__}.")
    if not behaviors:
        raise BehaviorError("The behavior set is empty; pass at least one {name: behavior}.")
    return {str(name): as_behavior(b, name=str(name)) for name, b in behaviors.items()}
