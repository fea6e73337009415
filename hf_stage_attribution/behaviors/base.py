"""The Behavior interface (docs/internals.md) and the machinery shared by example-based behaviors.

A behavior maps a model to a float tensor of per-example values ``f_i(θ)``; ``f(θ) = mean_i f_i(θ)``.
Values are differentiable w.r.t. the model's parameters (the linear estimators backpropagate through them),
computed with the model in eval mode (dropout off; the caller's train/eval flags are restored afterwards).

Example:
    >>> import torch
    >>> from hf_stage_attribution.behaviors import PerExample
    >>> model = torch.nn.Linear(3, 2)
    >>> b = PerExample(lambda m, batch: m(torch.tensor(batch)).sum(-1), [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> b(model).shape, len(b.select([1]))
    (torch.Size([2]), 1)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._internal.notices import notice
from ..errors import BehaviorError, did_you_mean
from .data import ExampleData, jsonable

__all__ = [
    "Behavior", "ExampleBehavior", "eval_mode", "check_values", "model_device", "one_line", "record_truncation",
]  # fmt: skip

_truncation_logs: list[list[tuple[int, int, int, str]]] = []


def record_truncation(truncated: int, total: int, length: int, limit_source: str) -> None:
    """Tell the behavior being evaluated (if any) that ``truncated`` of ``total`` texts were cut to ``length`` tokens
    (``limit_source`` says whose limit that is); the behavior says so once (see :meth:`ExampleBehavior.truncation`)."""
    if _truncation_logs:
        _truncation_logs[-1].append((truncated, total, length, limit_source))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), cut to ``limit`` characters (for wrapping a library's
    or a user function's multi-line message into a BehaviorError)."""
    text = " ".join(str(exc).split()) or repr(exc)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_values(values: Any, expected: int, who: str) -> torch.Tensor:
    """``values`` as a 1-D float tensor of length ``expected`` with finite entries, else a BehaviorError."""
    if not isinstance(values, torch.Tensor):
        raise BehaviorError(f"Behavior {who!r} returned a {type(values).__name__}; expected a torch.Tensor.")
    values = values.reshape(-1) if values.dim() > 1 and values.numel() == expected else values
    if values.dim() != 1 or values.shape[0] != expected:
        raise BehaviorError(
            f"Behavior {who!r} returned shape {tuple(values.shape)}; expected one value per example ({expected},)."
        )
    if not values.is_floating_point():
        values = values.float()
    if not bool(torch.isfinite(values.detach()).all()):
        bad = (~torch.isfinite(values.detach())).nonzero().reshape(-1)[:5].tolist()
        raise BehaviorError(
            f"Behavior {who!r} returned non-finite values at examples {bad}; check the model and the data "
            "(for importance-weighted behaviors, use weighting='self-normalised' or stay closer to the final model)."
        )
    return values


class Behavior(ABC):
    """A per-example scalar behavior ``f_i(θ)`` of a model.

    Subclasses set ``kind`` (registry name), ``unit`` (what one unit of the value means) and ``description``
    (with the sign convention, e.g. "higher = more toxic"). ``splittable`` says whether ``select`` works (a bare
    callable cannot be split across processes).

    Example:
        >>> import torch
        >>> from hf_stage_attribution.behaviors import as_behavior
        >>> b = as_behavior(lambda m: m.weight.sum(0), name="column-sums")
        >>> b(torch.nn.Linear(2, 3)).shape
        torch.Size([2])
    """

    kind: ClassVar[str] = "behavior"
    splittable: ClassVar[bool] = True
    unit: str = "behavior units"
    description: str = ""

    #: Where the behavior's spec is (``"spec file 'b.yaml', line 3"``) when it was loaded from one; errors say it.
    spec_origin: str | None = None

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind

    def where(self) -> str:
        """``Behavior 'name' (kind, spec file …, line …)``: how error messages name this behavior."""
        origin = f", {self.spec_origin}" if self.spec_origin else ""
        return f"Behavior {self.name!r} ({self.kind}{origin})"

    def located(self, exc: BehaviorError) -> BehaviorError:
        """``exc`` (same class) naming this behavior and its spec, unless its message already names them."""
        message = str(exc)
        if repr(self.name) in message and (not self.spec_origin or self.spec_origin in message):
            return exc
        new = type(exc)(f"{self.where()}: {message}")
        new.__dict__.update(exc.__dict__)
        return new

    @abstractmethod
    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """Per-example values, a float tensor of shape ``[len(self)]``."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abstractmethod
    def select(self, indices: Sequence[int]) -> Behavior:
        """The behavior on the examples at ``indices`` (positions in this behavior), in that order."""

    def prepare(self, model: torch.nn.Module) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Once, with the final model, before any evaluation (e.g. sample generations). A no-op by default."""

    @property
    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` must run before the behavior can be evaluated."""
        return False

    def needs_prepare_for(self, model: torch.nn.Module) -> bool:
        """Whether :meth:`prepare` must run before attributing ``model`` (the final model): not prepared yet, or
        prepared on a model with other weights (a behavior that keeps what it computed on the final model)."""
        return self.needs_prepare

    @abstractmethod
    def to_spec(self) -> dict[str, Any]:
        """A JSON-safe dict that :func:`hf_stage_attribution.behaviors.from_spec` turns back into the behavior."""

    def __bool__(self) -> bool:  # truthiness must not depend on __len__ (a bare callable has no length yet)
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


def needs_preparing(behavior: Any, model: torch.nn.Module) -> bool:
    """Whether ``behavior`` must be prepared before attributing ``model``, the final model
    (:meth:`Behavior.needs_prepare_for`; ``needs_prepare`` for an object that only has that).

    Example:
        >>> from hf_stage_attribution.behaviors import as_behavior
        >>> needs_preparing(as_behavior(lambda m: m.weight.sum(), name="f"), torch.nn.Linear(2, 1))
        False
    """
    check = getattr(behavior, "needs_prepare_for", None)
    return bool(check(model)) if callable(check) else bool(getattr(behavior, "needs_prepare", False))


class ExampleBehavior(Behavior):
    """A behavior over a set of examples, evaluated batch by batch; the base of every built-in kind.

    Subclasses implement ``_batch_values(model, rows, positions)`` → ``Tensor[len(rows)]`` (``positions`` are
    the rows' positions in this behavior, to index per-example state kept in ``self._state``), and list their
    JSON-safe constructor arguments in ``_spec_fields``.

    Example:
        >>> import torch
        >>> class FirstLogit(ExampleBehavior):
        ...     kind = "first-logit"
        ...     def _batch_values(self, model, rows, positions):
        ...         return model(torch.tensor(rows))[:, 0]
        >>> FirstLogit([[1.0, 2.0], [3.0, 4.0]])(torch.nn.Linear(2, 2)).shape
        torch.Size([2])
    """

    _spec_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, examples: Any, *, name: str | None = None, batch_size: int = 32) -> None:
        super().__init__(name)
        self.data = ExampleData.from_any(examples)
        if len(self.data) == 0:
            raise BehaviorError(f"Behavior {self.name!r} ({self.kind}) got no examples; pass at least one example.")
        if int(batch_size) < 1:
            raise BehaviorError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self._state: dict[str, list[Any]] = {}  # per-example state aligned with self.data (e.g. samples)
        self._truncation_said: set[tuple[int, int, int]] = set()  # shared with select() copies: said once

    @contextlib.contextmanager
    def truncation(self) -> Iterator[None]:
        """Texts encoded inside that were longer than the tokenizer's limit (or ``max_length``) are counted; on exit,
        a notice says how many were truncated and to what length, once per behavior (and its selections) and count.
        """
        _truncation_logs.append([])
        try:
            yield
            log = _truncation_logs[-1]
        finally:
            _truncation_logs.pop()
        by_source: dict[str, list[tuple[int, int, int, str]]] = {}
        for entry in log:
            by_source.setdefault(entry[3], []).append(entry)
        said = getattr(self, "_truncation_said", None)
        for source, entries in by_source.items():
            truncated = sum(entry[0] for entry in entries)
            if not truncated or said is None:
                continue
            total, length = sum(entry[1] for entry in entries), next(e[2] for e in entries if e[0])
            key = (truncated, total, length)
            if key in said:
                continue
            said.add(key)
            notice(
                f"{self.where()}: {truncated} of {total} texts it encoded were longer than {length} tokens "
                f"({source}) and were truncated to {length}; its values score the truncated texts. Set `max_length` "
                "(up to the model's limit) or shorten the texts to score them whole.",
                routine=False,
            )

    def __len__(self) -> int:
        return len(self.data)

    @abstractmethod
    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        """Values for ``rows`` (the examples at ``positions``)."""

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.needs_prepare:
            raise BehaviorError(
                f"Behavior {self.name!r} ({self.kind}) was not prepared; call behavior.prepare(final_model) once "
                "with the final model before evaluating it."
            )
        if len(self) == 0:  # an empty share of a split (more processes than examples)
            return torch.zeros(0, device=model_device(model))
        chunks = []
        with eval_mode(model), self.truncation():
            for start in range(0, len(self), self.batch_size):
                stop = min(start + self.batch_size, len(self))
                try:
                    values = self._batch_values(model, self._rows(start, stop), range(start, stop))
                except BehaviorError as exc:
                    located = self.located(exc)
                    if located is exc:
                        raise
                    raise located from exc
                chunks.append(check_values(values, stop - start, self.name))
        return torch.cat(chunks)

    def _rows(self, start: int, stop: int) -> list[Any]:
        return self.data.rows(start, stop)

    def select(self, indices: Sequence[int]) -> ExampleBehavior:
        idx = [int(i) for i in indices]
        new = copy.copy(self)
        new.data = self.data.select(idx)
        new._state = {key: [values[i] for i in idx] for key, values in self._state.items()}
        return new

    def _spec_values(self) -> dict[str, Any]:
        """Extra JSON-safe spec entries (tokenizer/model paths, scorer); overridden by subclasses."""
        return {}

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "kind": self.kind, **self.data.to_spec()}
        spec["batch_size"] = self.batch_size
        for field in self._spec_fields:
            spec[field] = jsonable(getattr(self, field))
        spec.update(self._spec_values())
        return spec

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        """Constructor arguments for the non-plain spec entries (tokenizer/model paths, scorer)."""
        return {}

    _spec_special: ClassVar[tuple[str, ...]] = ()  # spec keys handled by _spec_kwargs

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, base_dir: str | Path | None = None, trust_code: bool = False):
        """Build the behavior from a spec dict (see :meth:`to_spec`); relative paths resolve against base_dir."""
        allowed = {"name", "kind", "data", "select", "indices", "batch_size", *cls._spec_fields, *cls._spec_special}
        unknown = sorted(set(spec) - allowed)
        name = spec.get("name") or cls.kind
        if unknown:
            hints = "".join(f" {k!r}:{did_you_mean(k, sorted(allowed))}" for k in unknown if did_you_mean(k, allowed))
            raise BehaviorError(
                f"Behavior {name!r} ({cls.kind}): unknown spec keys {unknown}.{hints} Allowed keys: {sorted(allowed)}."
            )
        base = Path(base_dir) if base_dir is not None else None
        data = ExampleData.from_spec(spec, base_dir=base)
        _check_named_fields(cls, spec, data, name)
        kwargs = {k: spec[k] for k in cls._spec_fields if k in spec}
        kwargs.update(cls._spec_kwargs(spec, base, trust_code))
        return cls(data, name=spec.get("name"), batch_size=spec.get("batch_size", 32), **kwargs)


def _check_named_fields(cls: type, spec: dict[str, Any], data: ExampleData, name: str) -> None:
    """Every field a spec renames (``*_key: column`` other than the default) must be a field of the examples: a typo
    fails here, naming the behavior, rather than at evaluation time."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    named = {
        k: spec[k]
        for k in cls._spec_fields
        if k.endswith("_key") and isinstance(spec.get(k), str) and spec[k] != defaults.get(k)
    }  # a field left at its default may be unused in the behavior's mode (e.g. text_key without a tokenizer)
    if not named or len(data) == 0:
        return
    if data.is_dataset:
        fields = list(data.items.column_names)
    else:
        first = data.rows(0, 1)[0]
        if not isinstance(first, dict):
            return
        fields = list(first)
    for key, column in named.items():
        if column not in fields:
            raise BehaviorError(
                f"Behavior {name!r} ({cls.kind}): {key} {column!r} is not a field of its examples (fields: "
                f"{', '.join(map(str, fields))}).{did_you_mean(column, [str(f) for f in fields])} Fix {key} in the "
                "spec or rename the field in the data."
            )
