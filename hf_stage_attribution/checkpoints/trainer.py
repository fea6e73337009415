"""How a stage was trained, from what checkpoints publish: the spec's ``optimizer``, ``trainer_state.json``
(``log_history`` learning rates), and ``optimizer.pt``/``scheduler.pt``. Those two are pickles: they are read only
with ``allow_pickle=True`` (CLI ``--allow-pickle``, the permission pickle weights need) and then with
``torch.load(weights_only=True)``; without it they are not opened, a warning says what is lost (the optimizer
type and param groups must then come from the boundary's ``optimizer``; a continued stage has no starting
optimizer state). ``training_args.bin`` is a pickle of arbitrary objects and is never read.

Learning rates: the Trainer logs the rate *applied* at each logged step. When every step of the stage is logged
(``logging_steps = 1``) those are the rates; otherwise they are computed from the schedule the spec names
(``lr_scheduler_type`` + warmup, checked against every logged value), and without a known schedule they stay
unknown (a warning says so) and the stage has no optimizer information: only ``delta-*`` estimators apply.

Example, with two located Trainer checkpoints (see :func:`~.checkpoints.hub.locate`)::

    info = training_info(location, previous_location, ledger_names)
    info.optimizer, info.learning_rates[:2], info.optimizer_state_policy, info.missing
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointImportError
from .hub import CheckpointLocation
from .model import split_no_decay, trainer_groups
from .tensors import load_weights_only

_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_DECOUPLED_TYPES = ("AdamW", "Lion", "LAMB", "Adafactor")
_HYPER_KEYS = ("weight_decay", "betas", "eps", "momentum", "dampening", "nesterov", "alpha", "centered", "amsgrad",
               "maximize", "decoupled_weight_decay")  # fmt: skip


@dataclass
class TrainingInfo:
    """What is known of how one stage was trained (``optimizer`` is None when unknown; ``missing`` says why)."""

    optimizer: dict | None = None
    learning_rates: list[list[float]] = field(default_factory=list)
    num_steps: int | None = None
    optimizer_state_policy: str = "unknown"
    state_file: Path | None = None
    state_names: list[str] | None = None
    trainer: dict | None = None
    notes: list[str] = field(default_factory=list)
    missing: str | None = None


def read_trainer_state(directory: Path) -> dict | None:
    path = directory / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointImportError(f"Could not read {path}: {exc}.") from exc
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointImportError(
            f"Expected {path} to hold a Trainer state with an integer `global_step`, found {str(state)[:80]!r}."
        )
    return state


def logged_rates(state: dict, start: int, end: int) -> dict[int, float]:
    """``{step: applied learning rate}`` for the logged steps in ``(start, end]``."""
    out = {}
    for entry in state.get("log_history") or []:
        step, lr = entry.get("step"), entry.get("learning_rate")
        if isinstance(step, int) and isinstance(lr, (int, float)) and start < step <= end:
            out[step] = float(lr)
    return out


def same_run(previous: dict | None, state: dict) -> bool:
    """True when ``previous`` is an earlier checkpoint of the run that produced ``state`` (its logs are a prefix)."""
    if previous is None or previous["global_step"] >= state["global_step"]:
        return False
    p = previous["global_step"]
    mine = [e for e in state.get("log_history") or [] if isinstance(e.get("step"), int) and e["step"] <= p]
    return mine == list(previous.get("log_history") or []) and bool(mine or p == 0)


def schedule_rates(spec: dict, base_lr: float, total: int) -> list[float]:
    """Per-step applied rates ``1..total`` of a transformers schedule (``get_scheduler``) peaking at ``base_lr``."""
    from transformers import get_scheduler

    warmup = spec.get("warmup_steps", 0) or 0
    if spec.get("warmup_ratio") is not None or (isinstance(warmup, float) and 0 < warmup < 1):
        warmup = math.ceil(float(spec.get("warmup_ratio") or warmup) * total)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    try:
        sched = get_scheduler(
            spec["lr_scheduler_type"], opt, num_warmup_steps=int(warmup), num_training_steps=total,
            scheduler_specific_kwargs=spec.get("scheduler_kwargs") or {},
        )  # fmt: skip
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointImportError(
            f"Could not build the learning-rate schedule {spec['lr_scheduler_type']!r}: {exc}. Use a transformers "
            "scheduler name (linear, cosine, constant_with_warmup, ...) or list `learning_rates` per step."
        ) from exc
    out = []
    for _ in range(total):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


def infer_type(group: dict) -> str | None:
    """torch's optimizer class from the keys of a saved param group (None when ambiguous)."""
    keys = set(group)
    if {"betas", "amsgrad", "decoupled_weight_decay"} <= keys and "momentum_decay" not in keys:
        return "AdamW" if group["decoupled_weight_decay"] else "Adam"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "SGD"
    if {"alpha", "centered", "momentum"} <= keys:
        return "RMSprop"
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def _saved_groups(directory: Path, allow_pickle: bool, label: str) -> tuple[list[dict] | None, list[float] | None]:
    groups = base_lrs = None
    pickles = [name for name in ("optimizer.pt", "scheduler.pt") if (directory / name).is_file()]
    if pickles and not allow_pickle:
        warnings.warn(
            f"{label}: {' and '.join(pickles)} were not read: they are pickles, and unpickling needs "
            "allow_pickle=True (CLI: --allow-pickle; they are then read with torch.load(weights_only=True)). "
            "Without them the optimizer type and param groups come from the boundary's `optimizer` (give `type`), "
            "and a continued stage has no starting optimizer state.",
            stacklevel=5,
        )
        return None, None
    if (directory / "optimizer.pt").is_file():
        data = load_weights_only(directory / "optimizer.pt", "optimizer state")
        if isinstance(data, dict) and isinstance(data.get("param_groups"), list):
            groups = data["param_groups"]
    if (directory / "scheduler.pt").is_file():
        data = load_weights_only(directory / "scheduler.pt", "scheduler state")
        if isinstance(data, dict) and isinstance(data.get("base_lrs"), list):
            base_lrs = [float(x) for x in data["base_lrs"]]
    return groups, base_lrs


class _Builder:
    """Assembles a :class:`TrainingInfo` step by step (kept small: each method answers one question)."""

    def __init__(self, loc: CheckpointLocation, prev: CheckpointLocation | None, names: list[str], dense: list[str]):
        self.loc, self.prev, self.names, self.dense = loc, prev, names, dense
        self.spec = dict(loc.boundary.optimizer)
        self.label = loc.boundary.label()
        self.info = TrainingInfo()
        self.state = read_trainer_state(loc.directory)
        prev_state = read_trainer_state(prev.directory) if prev is not None else None
        siblings = (
            prev is not None
            and prev.directory.parent == loc.directory.parent
            and all(_CHECKPOINT.match(d.name) for d in (prev.directory, loc.directory))
        )
        self.start = 0
        if self.state and prev_state and (same_run(prev_state, self.state) or siblings):
            self.start = prev_state["global_step"] if prev_state["global_step"] < self.state["global_step"] else 0
        self.groups, self.base_lrs = (
            (None, None) if loc.is_adapter else _saved_groups(loc.directory, loc.allow_pickle, self.label)
        )
        if not loc.allow_pickle and any((loc.directory / n).is_file() for n in ("optimizer.pt", "scheduler.pt")):
            self.info.notes.append("optimizer.pt/scheduler.pt were not read (pickles; allow_pickle=True reads them).")
        if (loc.directory / "training_args.bin").exists():
            self.info.notes.append(
                "training_args.bin was not read (it is a pickle); optimizer type and schedule come from "
                "optimizer.pt/scheduler.pt (weights only, with allow_pickle=True), trainer_state.json and the spec."
            )

    def steps(self) -> int | None:
        if self.state is not None:
            return self.state["global_step"] - self.start
        return self.spec.get("num_steps")

    def rates(self) -> list[float] | None:
        spec, n = self.spec, self.steps()
        if spec.get("learning_rates") is not None:
            self.info.notes.append("Learning rates per step as given in the spec.")
            return spec["learning_rates"]
        logged = logged_rates(self.state, self.start, self.state["global_step"]) if self.state else {}
        if self.state is not None and n and len(logged) == n:
            self.info.notes.append(f"Learning rates from trainer_state.json log_history (steps {self.start + 1}..).")
            return [logged[s] for s in range(self.start + 1, self.start + n + 1)]
        if spec.get("lr_scheduler_type") and n:
            return self._scheduled(n, logged)
        if self.state is not None and n:
            every = self.state.get("logging_steps")
            warnings.warn(
                f"{self.label}: trainer_state.json logs the learning rate at {len(logged)} of the stage's {n} steps "
                f"(logging_steps={every}), which hides the per-step rates. Give `lr_scheduler_type` (and warmup) "
                "in the boundary's `optimizer` to interpolate them; until then only delta-* estimators apply.",
                stacklevel=4,
            )
            self.info.missing = f"per-step learning rates unknown (logging_steps={every} and no schedule type given)"
        else:
            self.info.missing = "no learning rates: give `learning_rates`, or `lr_scheduler_type` with `num_steps`"
        return None

    def _scheduled(self, n: int, logged: dict[int, float]) -> list[float]:
        spec = self.spec
        base = spec.get("lr", spec.get("learning_rate"))
        if base is None and self.base_lrs:
            base = self.base_lrs[0]
        if base is None and self.groups:
            base = self.groups[0].get("initial_lr")
        if base is None:
            raise CheckpointImportError(f"{self.label}: `lr_scheduler_type` needs the peak rate: give `lr`.")
        total = int(spec.get("num_training_steps") or (self.state or {}).get("max_steps") or self.start + n)
        full = schedule_rates(spec, float(base), max(total, self.start + n))
        for step, value in logged.items():
            if abs(full[step - 1] - value) > 1e-6 * max(abs(value), 1e-12) + 1e-12:
                raise CheckpointImportError(
                    f"{self.label}: the {spec['lr_scheduler_type']!r} schedule gives {full[step - 1]:.6g} at step "
                    f"{step}, but log_history recorded {value:.6g}. Fix the schedule in the spec (type, warmup, "
                    "num_training_steps) or list `learning_rates`."
                )
        self.info.notes.append(
            f"Learning rates computed from the {spec['lr_scheduler_type']!r} schedule (peak {base}, {total} steps); "
            f"checked against {len(logged)} logged value(s)."
        )
        return full[self.start : self.start + n]

    def param_groups(self) -> list[dict] | None:
        spec, names = self.spec, (self.dense if self.loc.is_adapter else self.names)
        hyper = {k: _json_safe(spec[k]) for k in _HYPER_KEYS if k in spec}
        if self.groups:
            mapped = trainer_groups(self.loc.config, [len(g.get("params", [])) for g in self.groups], self.names)
            if mapped is None:
                self.info.missing = (
                    f"optimizer.pt holds {len(self.groups)} param group(s) that could not be mapped to parameter "
                    "names (the model class could not be built from config.json, or the groups are not the "
                    "Trainer's decay/no-decay split)"
                )
                return None
            self.info.state_names = [n for group in mapped for n in group]
            return [
                {**{k: _json_safe(v) for k, v in g.items() if k != "params"}, **hyper, "params": group}
                for g, group in zip(self.groups, mapped)
            ]
        decay = float(spec.get("weight_decay", 0.0) or 0.0)
        if decay and spec.get("no_decay") is not None:
            with_decay, without = split_no_decay(names, spec["no_decay"], self.loc.config, self.label)
            return [{**hyper, "params": with_decay}, {**hyper, "weight_decay": 0.0, "params": without}]
        if decay:
            self.info.notes.append("Weight decay applied to every tensor (give `no_decay` patterns to exclude some).")
        return [{**hyper, "params": list(names)}]

    def build(self) -> TrainingInfo:
        info, spec = self.info, self.spec
        rows = self.rates()
        groups = self.param_groups() if rows is not None else None
        opt_type = spec.get("type") or (infer_type(self.groups[0]) if self.groups else None)
        if rows is not None and groups is not None and opt_type is None:
            info.missing = "optimizer type unknown: give `type` in the boundary's `optimizer`"
        if self.state is not None:
            info.trainer = {
                "global_step": self.state["global_step"],
                "start_step": self.start,
                "logging_steps": self.state.get("logging_steps"),
                "max_steps": self.state.get("max_steps"),
            }
        info.num_steps = len(rows) if rows is not None else self.steps()
        if info.missing is None and rows is not None and groups is not None:
            info.optimizer = self._describe(opt_type, groups, spec)
            info.learning_rates = self._per_group(rows, groups)
        self._policy()
        return info

    def _describe(self, opt_type: str, groups: list[dict], spec: dict) -> dict:
        decoupled = spec.get("decoupled_weight_decay")
        if decoupled is None:
            decoupled = bool(groups[0].get("decoupled_weight_decay")) or opt_type.startswith(_DECOUPLED_TYPES)
        inferred = "type" not in spec and bool(self.groups)
        if inferred:
            self.info.notes.append(f"Optimizer type {opt_type} inferred from optimizer.pt's param-group keys.")
        return {"type": opt_type, "module": None, "decoupled_weight_decay": bool(decoupled),
                "param_groups": groups, "source": "optimizer.pt+spec" if self.groups else "spec"}  # fmt: skip

    def _per_group(self, rows: list, groups: list[dict]) -> list[list[float]]:
        if rows and isinstance(rows[0], list):
            if any(len(r) != len(groups) for r in rows):
                raise CheckpointImportError(f"{self.label}: `learning_rates` rows need {len(groups)} values each.")
            return [[float(x) for x in r] for r in rows]
        bases = self.base_lrs or [g.get("initial_lr") for g in self.groups or []] or [None]
        ratios = [1.0] * len(groups)
        if len(bases) == len(groups) and all(isinstance(b, (int, float)) for b in bases) and bases[0]:
            ratios = [float(b) / float(bases[0]) for b in bases]
        return [[float(r) * ratio for ratio in ratios] for r in rows]

    def _policy(self) -> None:
        info = self.info
        if self.start > 0:
            info.optimizer_state_policy = "continued"
            prev_opt = self.prev.directory / "optimizer.pt" if self.prev is not None else None
            readable = prev_opt is not None and prev_opt.is_file() and self.prev.allow_pickle
            if readable and info.state_names is not None:
                info.state_file = prev_opt
            else:
                info.notes.append("Continued the optimizer of the previous checkpoint, whose state is not available.")
        elif self.state is not None:
            info.optimizer_state_policy = "fresh"
        elif spec_policy := self.spec.get("optimizer_state_policy"):
            info.optimizer_state_policy = spec_policy
        elif info.optimizer is not None:
            info.optimizer_state_policy = "fresh"
            info.notes.append("Assumed the stage started a fresh optimizer (its own training run).")


def training_info(
    loc: CheckpointLocation, prev: CheckpointLocation | None, names: list[str], dense: list[str] | None = None
) -> TrainingInfo:
    """Optimizer, per-step learning rates and optimizer-state policy of the stage that ends at ``loc``.

    ``names`` are the ledger's parameter names; ``dense`` the tensors an adapter stage trains fully.
    """
    if loc.boundary.optimizer.get("optimizer_state_policy") not in (None, "fresh", "unknown"):
        raise CheckpointImportError(
            f"{loc.boundary.label()}: `optimizer_state_policy` can be 'fresh' or 'unknown' in a spec; 'continued' is "
            "only known from Trainer checkpoints of one run."
        )
    return _Builder(loc, prev, names, dense or []).build()
