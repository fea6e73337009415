"""What the recorder keeps of an optimizer: its type, per-group hyperparameters and (where needed) its state."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# Optimizers whose weight decay is decoupled from the gradient (θ ← θ − η λ θ applied directly).
_DECOUPLED = ("AdamW", "Lion", "AdamW8bit", "PagedAdamW", "AdamWScheduleFree", "LAMB", "Adafactor")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg", "sum", "step")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or similar) wrappers."""
    seen = 0
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if hasattr(optimizer, "optimizer") and type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def decoupled_weight_decay(optimizer: torch.optim.Optimizer) -> bool | None:
    """True for decoupled decay (AdamW & co.), False for coupled (SGD, Adam, RMSprop...), None if unknown."""
    name = type(optimizer).__name__
    if any(name.startswith(prefix) or name.endswith(prefix) for prefix in _DECOUPLED):
        return True
    if name in ("Adam", "NAdam", "RAdam"):
        return bool(optimizer.param_groups[0].get("decoupled_weight_decay", False))
    if name in ("SGD", "RMSprop", "Adagrad", "Adamax", "ASGD", "Rprop", "Adadelta"):
        return False
    return None


def describe_optimizer(optimizer: Any, names_by_id: dict[int, str]) -> dict:
    """The JSON-safe description stored in ``stage.json["optimizer"]``.

    ``names_by_id`` maps ``id(parameter)`` to its ledger name: a base name, or ``<base weight>::A`` / ``::B``
    for LoRA factors (listed under the group's ``lora_params``).
    """
    opt = unwrap_optimizer(optimizer)
    groups = []
    for group in opt.param_groups:
        entry = {k: _json_safe(v) for k, v in group.items() if k != "params"}
        names = [names_by_id.get(id(p)) for p in group["params"]]
        entry["params"] = [n for n in names if n is not None and "::" not in n]
        lora = [n for n in names if n is not None and "::" in n]
        if lora:
            entry["lora_params"] = lora
        entry["num_unnamed_params"] = sum(1 for n in names if n is None)
        groups.append(entry)
    return {
        "type": type(opt).__name__,
        "module": type(opt).__module__,
        "decoupled_weight_decay": decoupled_weight_decay(opt),
        "param_groups": groups,
    }


def applied_learning_rates(optimizer: Any) -> list[float]:
    """The learning rate of every param group as the optimizer holds it now."""
    return [float(g["lr"]) for g in unwrap_optimizer(optimizer).param_groups]


def _stepped(state: Mapping[str, Any]) -> bool:
    """Whether one parameter's optimizer state comes from steps already taken: a ``step`` counter above 0, or (for
    optimizers that keep none, SGD's ``momentum_buffer``) any state at all. State an optimizer builds when it is
    constructed (torch ``Adagrad``: ``sum`` = ``initial_accumulator_value``, ``step`` = 0) is a fresh optimizer's."""
    if "step" not in state:
        return len(state) > 0
    step = state["step"]
    return float(step) > 0 if isinstance(step, (torch.Tensor, int, float)) else True


def has_state(optimizer: Any) -> bool:
    """Whether ``optimizer`` holds state from optimizer steps already taken (a stage that starts with it continues
    that state); a state whose ``step`` is 0 everywhere (built at construction) does not count.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> has_state(torch.optim.Adagrad(model.parameters(), lr=0.1))  # sum = 0, step = 0 from __init__
        False
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> has_state(opt)
        True
    """
    return any(_stepped(s) for s in unwrap_optimizer(optimizer).state.values())


def no_step_taken(state: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """Whether a recorded optimizer state (``{state key: {name: tensor}}``, as ``Stage.optimizer_state_at_start``
    returns it) was taken before any step: it has ``step`` counters and all are 0. Its moments are the
    constructor's (Adagrad's zero ``sum``), not second moments any step measured.

    Example:
        >>> no_step_taken({"sum": {"w": torch.zeros(2)}, "step": {"w": torch.tensor(0.0)}})
        True
        >>> no_step_taken({"exp_avg_sq": {"w": torch.ones(2)}, "step": {"w": torch.tensor(3.0)}}), no_step_taken(None)
        (False, False)
    """
    steps = (state or {}).get("step") or {}
    return bool(steps) and all(float(t) == 0 for t in steps.values())


def optimizer_state_stream(
    optimizer: Any, names_by_id: dict[int, str], keys: tuple[str, ...] = STATE_KEYS
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], Iterator[tuple[str, torch.Tensor]]]:
    """``(specs, stream)`` of the optimizer state for ``write_safetensors_stream``: one float32 CPU tensor at a
    time under ``"<state key>/<name>"`` (scalars as 0-d tensors), so writing it never holds a second full copy."""
    opt = unwrap_optimizer(optimizer)
    entries: list[tuple[str, Any]] = []
    for group in opt.param_groups:
        for p in group["params"]:
            name = names_by_id.get(id(p))
            state = opt.state.get(p, {})
            if name is None or not state:
                continue
            for key in keys:
                value = state.get(key)
                if isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool):
                    entries.append((f"{key}/{name}", value))
    specs = [
        (k, torch.float32, tuple(v.shape) if isinstance(v, torch.Tensor) else ()) for k, v in entries
    ]  # fmt: skip

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for k, v in entries:
            yield k, (v.detach().to("cpu", torch.float32) if isinstance(v, torch.Tensor) else torch.tensor(float(v)))

    return specs, stream()


def optimizer_state_tensors(
    optimizer: Any, names_by_id: dict[int, str], keys: tuple[str, ...] = STATE_KEYS
) -> dict[str, torch.Tensor]:
    """Flat ``{"<state key>/<name>": float32 tensor}`` of the optimizer state (scalars as 0-d tensors)."""
    _, stream = optimizer_state_stream(optimizer, names_by_id, keys)
    return {k: v.clone() for k, v in stream}


#: Families the propagation rules know. ``frozen``: no update; ``sgd``: torch SGD (coupled decay); ``adam``: Adam
#: with coupled decay; ``adamw``: Adam with decoupled decay (torch AdamW, fused/foreach, HF ``adamw_*``, bitsandbytes
#: AdamW); ``lion``: sign updates with decoupled decay; ``rmsprop`` and ``adagrad``: torch, coupled decay.
FAMILIES = ("frozen", "sgd", "adam", "adamw", "lion", "rmsprop", "adagrad")

#: Families whose weight decay enters the gradient (coupled) rather than the parameter (decoupled).
COUPLED_FAMILIES = ("sgd", "adam", "rmsprop", "adagrad")
#: Families whose first-order response is per coordinate because of a second-moment preconditioner.
PRECONDITIONED_FAMILIES = ("adam", "adamw", "rmsprop", "adagrad")

_ALIASES: dict[str, str] = {
    "sgd": "sgd",
    "adam": "adam",
    "rmsprop": "rmsprop",
    "adagrad": "adagrad",
    "frozen": "frozen",
    **{
        name: "adamw"
        for name in (
            "adamw",
            "adamwtorch",
            "adamwtorchfused",
            "adamwhf",
            "adamwapexfused",
            "adamwbnb8bit",
            "adamw8bit",
            "adamw32bit",
            "pagedadamw",
            "pagedadamw8bit",
            "pagedadamw32bit",
            "adamwtorch4bit",
            "adamwtorch8bit",
            "adamwtorchxla",
            "adamwtorchnpufused",
            "anyprecisionadamw",
        )
    },
    **{name: "lion" for name in ("lion", "lion8bit", "lion32bit", "pagedlion", "pagedlion8bit", "pagedlion32bit")},
}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def optimizer_family(opt_type: str, decoupled_weight_decay: bool = False) -> str | None:
    """The family (one of :data:`FAMILIES`) of a recorded optimizer type, or ``None`` when it is unknown.

    ``decoupled_weight_decay=True`` (torch ``Adam(..., decoupled_weight_decay=True)``) turns ``adam`` into ``adamw``.

    Example:
        >>> optimizer_family("PagedAdamW8bit"), optimizer_family("Adam", decoupled_weight_decay=True)
        ('adamw', 'adamw')
    """
    family = _ALIASES.get(_normalise(opt_type))
    if family == "adam" and decoupled_weight_decay:
        return "adamw"
    return family


def recorded_family(optimizer: dict[str, Any] | None) -> str | None:
    """The family of a ledger stage's ``optimizer`` dict (``None`` when absent or unknown)."""
    if not optimizer or not optimizer.get("type"):
        return None
    decoupled = bool(optimizer.get("decoupled_weight_decay")) or any(
        bool(g.get("decoupled_weight_decay")) for g in optimizer.get("param_groups", [])
    )
    return optimizer_family(str(optimizer["type"]), decoupled)
