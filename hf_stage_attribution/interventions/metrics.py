"""What an intervention is judged on: the target behavior, utility metrics (accuracy, worst-group accuracy,
any behavior's mean), and the constraint that picks ``α``.

Accuracies are in percent (0–100), so a constraint "average accuracy drops by at most 1 point" is
``Constraint("accuracy", max_drop=1.0)``. A behavior used as a utility contributes its mean over examples.

Example:
    >>> import torch
    >>> acc = Accuracy([{"input": [1.0, 0.0], "label": 0, "group": "a"},
    ...                 {"input": [0.0, 1.0], "label": 1, "group": "b"}], group_key="group")
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2))
    >>> acc(model)["accuracy"], acc(model)["worst_group_accuracy"]
    (100.0, 100.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..behaviors import Classification, as_behavior, from_spec
from ..behaviors.data import ExampleData
from ..behaviors.loading import resolve_path
from ..behaviors.spec import read_spec_file
from ..errors import InterventionError
from ..estimators.base import evaluate

Metric = Callable[[torch.nn.Module], Mapping[str, float]]


class Accuracy:
    """Classification accuracy (percent) of a model on labelled rows; with ``group_key``, per-group accuracy and
    the worst group's accuracy as well.

    Rows are those of :class:`~hf_stage_attribution.behaviors.Classification` (``text`` with a ``tokenizer``, else
    ``input``; ``label``). A row counts as correct when its label's logit beats every other logit.
    Keys returned: ``name`` (mean over rows), and with groups ``worst_group_name`` (the lowest group accuracy) and
    ``"<name>[<group>]"`` per group.

    Example:
        >>> import torch
        >>> rows = [{"input": [1.0], "label": 0}, {"input": [1.0], "label": 1}]
        >>> Accuracy(rows)(torch.nn.Linear(1, 2))["accuracy"]
        50.0
    """

    def __init__(
        self,
        rows: Any,
        *,
        name: str = "accuracy",
        group_key: str | None = None,
        worst_group_name: str | None = None,
        tokenizer: Any = None,
        text_key: str = "text",
        input_key: str = "input",
        label_key: str = "label",
        max_length: int | None = None,
        batch_size: int = 64,
    ) -> None:

        self.name = name
        self.group_key = group_key
        self.worst_group_name = worst_group_name or f"worst_group_{name}"
        self.margins = Classification(
            rows, measure="margin", tokenizer=tokenizer, text_key=text_key, input_key=input_key, label_key=label_key,
            max_length=max_length, name=name, batch_size=batch_size,
        )  # fmt: skip
        self.groups: list[str] | None = None
        if group_key is not None:
            data = self.margins.data.rows()
            missing = [i for i, r in enumerate(data) if not isinstance(r, Mapping) or group_key not in r]
            if missing:
                raise InterventionError(
                    f"Accuracy {name!r}: rows {missing[:5]} have no {group_key!r} field; every row needs its group "
                    "(e.g. 'spurious feature present, label toxic') for worst-group accuracy."
                )
            self.groups = [str(r[group_key]) for r in data]

    def __len__(self) -> int:
        return len(self.margins)

    def correct(self, model: torch.nn.Module) -> torch.Tensor:
        """A boolean tensor: which rows the model classifies correctly."""
        with torch.no_grad():
            return self.margins(model).detach().cpu() > 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        ok = self.correct(model).double()
        out = {self.name: 100.0 * float(ok.mean())}
        if self.groups is not None:
            per_group: dict[str, list[float]] = {}
            for group, value in zip(self.groups, ok.tolist()):
                per_group.setdefault(group, []).append(value)
            accs = {g: 100.0 * sum(v) / len(v) for g, v in sorted(per_group.items())}
            out[self.worst_group_name] = min(accs.values())
            out.update({f"{self.name}[{g}]": a for g, a in accs.items()})
        return out

    def worst_group(self, metrics: Mapping[str, float]) -> str | None:
        """The group with the lowest accuracy in ``metrics`` (as returned by this metric)."""
        prefix = f"{self.name}["
        groups = {k[len(prefix) : -1]: v for k, v in metrics.items() if k.startswith(prefix)}
        return min(groups, key=groups.get) if groups else None


class BehaviorMean:
    """A behavior's mean value over its examples, used as a utility metric (e.g. a mean log-probability).

    Example:
        >>> import torch
        >>> from hf_stage_attribution.behaviors import as_behavior
        >>> BehaviorMean(as_behavior(lambda m: m.weight.reshape(-1), name="w"))(torch.nn.Linear(2, 1, bias=False))
        ... # doctest: +ELLIPSIS
        {'w': ...}
    """

    def __init__(self, behavior: Any, name: str | None = None) -> None:

        self.behavior = as_behavior(behavior, name=name)
        self.name = name or self.behavior.name

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        return {self.name: mean_value(self.behavior, model, self.name)}


def mean_value(behavior: Any, model: torch.nn.Module, name: str) -> float:
    """The mean of a behavior's per-example values on ``model`` (no gradients); errors on non-finite values."""

    return float(evaluate(behavior, model, f"intervention metric {name!r}").mean())


def as_metrics(utilities: Any) -> list[Metric]:
    """Utility metrics from one or a list of :class:`Accuracy` / :class:`BehaviorMean` / behaviors, or a dict
    ``{name: behavior or Accuracy}`` (a behavior, or a callable ``f(model) -> Tensor[n]``, contributes its mean)."""
    if utilities is None:
        return []
    if isinstance(utilities, Mapping):
        return [
            u if isinstance(u, (Accuracy, BehaviorMean)) else BehaviorMean(u, name=str(k))
            for k, u in utilities.items()
        ]
    if not isinstance(utilities, (list, tuple)):
        utilities = [utilities]
    return [u if isinstance(u, (Accuracy, BehaviorMean)) else BehaviorMean(u) for u in utilities]


def evaluate_metrics(model: torch.nn.Module, metrics: list[Metric]) -> dict[str, float]:
    """All utility metrics of ``model`` in one dict; a name produced twice or a non-finite value is an error."""
    out: dict[str, float] = {}
    for metric in metrics:
        for key, value in dict(metric(model)).items():
            if key in out:
                raise InterventionError(f"Two utility metrics both report {key!r}; give them distinct names.")
            if not math.isfinite(float(value)):
                raise InterventionError(f"Utility metric {key!r} is {value}; expected a finite number.")
            out[key] = float(value)
    return out


@dataclass
class Constraint:
    """How much a utility metric may lose: ``max_drop`` below the original model's value (metric units: points for
    accuracies) and/or an absolute ``min_value``. ``higher_is_better=False`` flips both (for losses, perplexity).

    Example:
        >>> c = Constraint("accuracy", max_drop=1.0)
        >>> c.allows({"accuracy": 95.5}, {"accuracy": 96.0}), c.allows({"accuracy": 94.0}, {"accuracy": 96.0})
        (True, False)
    """

    metric: str
    max_drop: float | None = None
    min_value: float | None = None
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.max_drop is None and self.min_value is None:
            raise InterventionError(
                f"Constraint on {self.metric!r} needs `max_drop` (allowed loss vs. the original model) and/or "
                "`min_value`; got neither."
            )
        for field_name in ("max_drop", "min_value"):
            value = getattr(self, field_name)
            if value is not None and not math.isfinite(float(value)):
                raise InterventionError(f"Constraint `{field_name}` must be a finite number, got {value!r}.")
        if self.max_drop is not None and self.max_drop < 0:
            raise InterventionError(f"Constraint `max_drop` must be >= 0 (an allowed loss), got {self.max_drop}.")

    def allows(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
        if self.metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            raise InterventionError(
                f"The constraint names metric {self.metric!r}, which no utility reports. Known metrics: {known}."
            )
        sign = 1.0 if self.higher_is_better else -1.0
        value = sign * metrics[self.metric]
        ok = True
        if self.max_drop is not None:
            ok &= value >= sign * baseline[self.metric] - self.max_drop - 1e-9
        if self.min_value is not None:
            ok &= value >= sign * self.min_value - 1e-9
        return bool(ok)

    def describe(self) -> str:
        word = "drop" if self.higher_is_better else "rise"
        parts = []
        if self.max_drop is not None:
            parts.append(f"{self.metric} {word} ≤ {self.max_drop:g} vs. the original model")
        if self.min_value is not None:
            parts.append(f"{self.metric} {'≥' if self.higher_is_better else '≤'} {self.min_value:g}")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "max_drop": self.max_drop, "min_value": self.min_value,
            "higher_is_better": self.higher_is_better,
        }  # fmt: skip


def load_target(path: str | Path, *, trust_code: bool = False) -> Any:
    """The target behavior from a spec file (one behavior spec, or a list under ``behaviors`` with one entry);
    ``trust_code`` as in :func:`~hf_stage_attribution.behaviors.load_specs`."""

    content = read_spec_file(path)
    items = content.get("behaviors", content) if isinstance(content, Mapping) else content
    if isinstance(items, Mapping):
        return from_spec(dict(items), base_dir=Path(path).parent, trust_code=trust_code)
    if not isinstance(items, list) or len(items) != 1:
        raise InterventionError(
            f"Expected {path} to hold exactly one target behavior spec (a mapping, or a one-item list under "
            f"'behaviors'), found {len(items) if isinstance(items, list) else type(items).__name__}."
        )
    return from_spec(dict(items[0]), base_dir=Path(path).parent, trust_code=trust_code)


def load_utilities(path: str | Path, *, trust_code: bool = False) -> list[Metric]:
    """Utility metrics from a spec file: a list (under ``utilities`` or ``behaviors``) whose items are behavior
    specs (their mean is the metric) or ``{"kind": "accuracy", "data": ..., "group_key": ..., ...}``."""

    content = read_spec_file(path)
    if isinstance(content, Mapping):
        content = content.get("utilities", content.get("behaviors"))
    if not isinstance(content, list) or not content:
        raise InterventionError(
            f"Expected {path} to list utility metrics under 'utilities' (behavior specs or kind 'accuracy'), "
            "found none."
        )
    base = Path(path).parent
    out: list[Metric] = []
    for item in content:
        if not isinstance(item, Mapping) or "kind" not in item:
            raise InterventionError(f"Every utility in {path} needs a 'kind'; got {item!r:.80}.")
        if item["kind"] != "accuracy":
            behavior = from_spec(dict(item), base_dir=base, trust_code=trust_code)
            out.append(BehaviorMean(behavior, name=str(item.get("name") or behavior.name)))
            continue
        spec = {k: v for k, v in item.items() if k != "kind"}
        data = spec.pop("data", None)
        if data is None:
            raise InterventionError(f"Accuracy utility {spec.get('name', 'accuracy')!r} in {path} needs 'data'.")
        if isinstance(data, str):
            data = ExampleData.from_any(data, base_dir=base).rows()
        if spec.get("tokenizer") is not None:
            spec["tokenizer"] = resolve_path(spec["tokenizer"], base)
        out.append(Accuracy(data, **spec))
    return out


__all__ = ["Accuracy", "BehaviorMean", "Constraint", "as_metrics", "evaluate_metrics", "load_target", "load_utilities"]
