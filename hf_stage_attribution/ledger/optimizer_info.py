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


def gradients_synced(optimizer: Any) -> bool:
    """Whether the optimizer step just taken applied an update: False on the micro-batches of gradient accumulation
    that accelerate's ``AcceleratedOptimizer`` turns into a no-op (its ``gradient_state.sync_gradients`` is False
    inside ``accelerator.accumulate`` until the last micro-batch); True for any other optimizer.

    Example:
        >>> gradients_synced(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
        True
    """
    return bool(getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", True))


def step_marks(optimizer: Any, params: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """What the optimizer's state says, now, about the steps each named parameter has taken: its ``step`` counter
    (Adam & co., Adagrad), ``None`` for a state without one (SGD's momentum buffer); a parameter without state is
    left out. torch optimizers create or advance a parameter's state only when it has a gradient at a step, so
    comparing two marks (:func:`stepped_since`) tells which parameters were stepped in between."""
    state = unwrap_optimizer(optimizer).state
    marks: dict[str, float | None] = {}
    for name, p in params.items():
        entry = state.get(p) if isinstance(state, Mapping) else None
        if not entry:
            continue
        step = entry.get("step") if isinstance(entry, Mapping) else None
        marks[name] = (
            float(step) if isinstance(step, (torch.Tensor, int, float)) and not isinstance(step, bool) else None
        )
    return marks


def stepped_since(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> set[str]:
    """The parameters the optimizer stepped between two :func:`step_marks`: a ``step`` counter that advanced, or a
    state that appeared. A state without a counter that existed before tells nothing (not listed).

    Example:
        >>> sorted(stepped_since({"a": 4.0, "b": 4.0, "m": None}, {"a": 10.0, "b": 4.0, "m": None, "c": None}))
        ['a', 'c']
    """

    def advanced(name: str, mark: float | None) -> bool:
        if name not in before:
            return True  # a state the optimizer created: it stepped this parameter
        return mark is not None and before[name] is not None and mark > before[name]

    return {name for name, mark in after.items() if advanced(name, mark)}


def ownership_problem(optimizer: Any, model: torch.nn.Module) -> str | None:
    """Why ``optimizer`` cannot be the optimizer that trains ``model`` (None when it can): none of the model's
    trainable parameters is in its param groups, or its groups hold tensors that are not the model's parameters.
    Optimizers that step copies of the parameters (DeepSpeed's flat partitions: not a ``torch.optim.Optimizer``)
    and sharded models (FSDP) are not checked.

    Example:
        >>> model, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> ownership_problem(torch.optim.SGD(model.parameters(), lr=0.1), model) is None
        True
        >>> ownership_problem(torch.optim.SGD(other.parameters(), lr=0.1), model)[:46]
        'none of its 2 tensors is a parameter of the mo'
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, torch.optim.Optimizer):
        return None
    if any("FullyShardedDataParallel" in type(m).__name__ or "FSDP" in type(m).__name__ for m in model.modules()):
        return None
    own = {id(p) for p in model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    tensors = [p for group in opt.param_groups for p in group["params"]]
    foreign = [p for p in tensors if id(p) not in own]
    if trainable and not any(id(p) in trainable for p in tensors):
        if len(foreign) == len(tensors):
            return (
                f"none of its {len(tensors)} tensors is a parameter of the model (shapes "
                f"{_shapes(foreign)}): it is another model's optimizer"
            )
        return "it holds only parameters of the model that do not require gradients, none of its trainable ones"
    if foreign:
        return (
            f"{len(foreign)} of its {len(tensors)} tensors are not parameters of the model (shapes "
            f"{_shapes(foreign)}): the ledger records the model's parameters only"
        )
    return None


def _shapes(tensors: list[torch.Tensor]) -> str:
    shown = ", ".join(str(tuple(t.shape)) for t in tensors[:3])
    return shown + (", ..." if len(tensors) > 3 else "")


def describe_scheduler(scheduler: Any) -> dict | None:
    """The JSON-safe description stored in ``stage.json["scheduler"]``: its type and module, and the scalars (and
    short lists of scalars) of its ``state_dict()`` at the start of the stage (``last_epoch``, ``base_lrs``, ...).
    accelerate's ``AcceleratedScheduler`` is unwrapped.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> d = describe_scheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=3))
        >>> d["type"], d["state_at_start"]["step_size"], d["state_at_start"]["last_epoch"]
        ('StepLR', 3, 0)
    """
    if scheduler is None:
        return None
    seen = 0
    while type(scheduler).__name__ == "AcceleratedScheduler" and hasattr(scheduler, "scheduler") and seen < 8:
        scheduler, seen = scheduler.scheduler, seen + 1
    description: dict[str, Any] = {"type": type(scheduler).__name__, "module": type(scheduler).__module__}
    state_dict = getattr(scheduler, "state_dict", None)
    try:
        state = state_dict() if callable(state_dict) else None
    except Exception:  # a third-party scheduler whose state_dict fails: its type is still worth keeping
        state = None
    if isinstance(state, Mapping):
        description["state_at_start"] = {
            str(k): _json_safe(v) for k, v in state.items() if _is_scalar(v) or _is_short_scalar_list(v)
        }
    return description


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (bool, int, float, str)) or value is None


def _is_short_scalar_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) <= 64 and all(_is_scalar(v) for v in value)


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
