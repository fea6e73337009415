"""The read side of one recorded stage: its ``stage.json``, its delta (dense or LoRA factors) and segments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompleteStageError, LedgerFormatError
from .format import validate_stage
from .storage import open_safetensors, read_json, safe_join


class _TensorFile:
    """A memory-mapped safetensors file opened on first use."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._handle = None

    @property
    def handle(self):
        if self._handle is None and self.path is not None:
            self._handle = open_safetensors(self.path)
        return self._handle

    def keys(self) -> list[str]:
        return list(self.handle.keys()) if self.path is not None else []

    def get(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


def _unflatten_batches(tensors: dict[str, torch.Tensor], layout: str) -> list[Any]:
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, field = key.partition("/")
        grouped.setdefault(int(index), {})[field] = value
    batches: list[Any] = []
    for index in sorted(grouped):
        fields = grouped[index]
        if layout == "tensor":
            batches.append(fields["_"])
        elif layout == "tuple":
            batches.append(tuple(fields[str(j)] for j in range(len(fields))))
        else:
            batches.append(dict(fields))
    return batches


class Segment:
    """Curvature material of one part of a stage (ESTIMATORS.md §4a).

    Attributes: ``index``, ``step_start``, ``step_end`` (exclusive), ``mid_step``, ``learning_rates``.
    """

    def __init__(self, stage: Stage, info: dict) -> None:
        self.stage = stage
        self.info = info
        self.index = int(info["index"])
        self.step_start = int(info["step_start"])
        self.step_end = int(info["step_end"])
        self.mid_step = int(info["mid_step"])
        self.dir = safe_join(stage.dir, info["dir"])

    @property
    def learning_rates(self) -> list[list[float]]:
        return self.stage.learning_rates[self.step_start : self.step_end]

    def _load(self, filename: str) -> dict[str, torch.Tensor]:
        path = self.dir / filename
        if not path.exists():
            return {}
        handle = open_safetensors(path)
        return {k: handle.get_tensor(k) for k in handle.keys()}

    def params_delta(self) -> dict[str, torch.Tensor]:
        """θ_mid − θ_stage_start for the tensors the stage trains (base names, float32; LoRA merged)."""
        return self._load("params_delta.safetensors")

    def second_moments(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """``{"exp_avg_sq": {name: T}, "step": {name: T}}`` at the midpoint, or None (non-Adam optimizers)."""
        flat = self._load("second_moments.safetensors")
        if not flat:
            return None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            kind, _, name = key.partition("/")
            out.setdefault(kind, {})[name] = value
        return out

    def examples(self) -> list[Any]:
        """The captured training batches (as given to ``step(batch)`` or seen by the model's forward)."""
        return _unflatten_batches(self._load("examples.safetensors"), self.info.get("batch_layout", "dict"))

    @property
    def num_examples(self) -> int:
        return int(self.info.get("num_examples", 0))


class Stage:
    """One complete stage of a ledger. See docs/internals.md for every attribute.

    Example:
        >>> # ledger = StageLedger.load("ledger"); stage = ledger.stages[0]
        >>> # stage.name, stage.kind, stage.num_steps, stage.learning_rates[0], stage.delta()
    """

    def __init__(self, ledger_dir: Path, entry: dict, shapes: dict[str, tuple[int, ...]]) -> None:
        self.entry = entry
        self.index = int(entry["index"])
        self.name: str = entry["name"]
        self.dir = safe_join(ledger_dir, entry["dir"])
        if not self.dir.is_dir():
            raise IncompleteStageError(
                f"Stage {self.name!r} is listed in {ledger_dir / 'ledger.json'} but its directory {self.dir} "
                "is missing."
            )
        self.info: dict = validate_stage(
            self.dir / "stage.json", read_json(self.dir / "stage.json", "stage file"), self.name
        )
        self._shapes = shapes
        self._dense = _TensorFile(
            safe_join(self.dir, self.info["delta_file"]) if self.info.get("delta_file") else None
        )
        self._lora = _TensorFile(safe_join(self.dir, self.info["lora_file"]) if self.info.get("lora_file") else None)
        self.loss_fn: Callable | tuple | None = None  # in-memory only; set by the recorder of this process
        self.segments = [Segment(self, seg) for seg in self.info.get("segments", [])]
        self._names_cache: set[str] | None = None

    # --- metadata --------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def num_steps(self) -> int:
        return int(self.info["num_steps"])

    @property
    def optimizer(self) -> dict | None:
        return self.info.get("optimizer")

    @property
    def learning_rates(self) -> list[list[float]]:
        return self.info.get("learning_rates", [])

    @property
    def trainable_parameters(self) -> list[str]:
        return self.info.get("trainable_parameters", [])

    @property
    def optimizer_state_policy(self) -> str:
        return self.info.get("optimizer_state_policy", "fresh")

    @property
    def lora(self) -> dict | None:
        return self.info.get("lora")

    @property
    def curvature_loss(self) -> dict | None:
        return self.info.get("curvature_loss")

    @property
    def replay_dir(self) -> Path | None:
        path = self.dir / "replay"
        return path if path.is_dir() else None

    @property
    def start_hash(self) -> str:
        return self.entry["start_hash"]

    @property
    def end_hash(self) -> str:
        return self.entry["end_hash"]

    @property
    def end_digests(self) -> dict[str, str]:
        return self.info.get("end_digests", {})

    def __repr__(self) -> str:
        return f"Stage(index={self.index}, name={self.name!r}, kind={self.kind!r}, num_steps={self.num_steps})"

    # --- tensors ---------------------------------------------------------------------------------------

    def optimizer_state_at_start(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """The optimizer state this stage continued from (``{state key: {name: tensor}}``), or None."""
        rel = self.info.get("optimizer_state_file")
        if not rel:
            return None
        handle = open_safetensors(safe_join(self.dir, rel))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key in handle.keys():
            kind, _, name = key.partition("/")
            out.setdefault(kind, {})[name] = handle.get_tensor(key)
        return out

    def _lora_modules(self) -> dict[str, dict]:
        return (self.lora or {}).get("modules", {})

    def _delta_name_set(self) -> set[str]:
        if self._names_cache is None:
            self._names_cache = set(self.delta_names())
        return self._names_cache

    def delta_names(self) -> list[str]:
        """Base names of the tensors this stage changed (dense deltas and LoRA-targeted weights)."""
        names = set(self._dense.keys()) | set(self._lora_modules())
        return [n for n in self._shapes if n in names]

    def _lora_delta(self, name: str, spec: dict) -> torch.Tensor:
        def product(a_key: str, b_key: str) -> torch.Tensor:
            a = self._lora.get(f"{name}::{a_key}").to(torch.float32)
            b = self._lora.get(f"{name}::{b_key}").to(torch.float32)
            out = b @ a
            if spec.get("layer_type") == "embedding" or spec.get("fan_in_fan_out"):
                out = out.T
            return out * float(spec["scaling"])

        delta = product("A", "B")
        if f"{name}::A0" in set(self._lora.keys()):
            delta = delta - product("A0", "B0")
        return delta.contiguous()

    def delta_tensor(self, name: str) -> torch.Tensor:
        """Dense float32 Δ_k for one base parameter (zeros if the stage did not change it)."""
        if name not in self._shapes:
            raise LedgerFormatError(f"Stage {self.name!r}: no parameter {name!r} in this ledger's model.")
        out: torch.Tensor | None = None
        if self._dense.path is not None and name in set(self._dense.keys()):
            out = self._dense.get(name).to(torch.float32)
        spec = self._lora_modules().get(name)
        if spec is not None:
            lora = self._lora_delta(name, spec)
            out = lora if out is None else out + lora
        if out is None:
            return torch.zeros(self._shapes[name], dtype=torch.float32)
        if tuple(out.shape) != tuple(self._shapes[name]):
            raise LedgerFormatError(
                f"Stage {self.name!r}: the delta of {name!r} has shape {tuple(out.shape)}, expected "
                f"{tuple(self._shapes[name])} (from ledger.json). The stage files are inconsistent."
            )
        return out

    def iter_delta(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, dense float32 Δ)`` for every tensor the stage changed, one at a time."""
        for name in self.delta_names():
            yield name, self.delta_tensor(name)

    def delta(self) -> dict[str, torch.Tensor]:
        """All of Δ_k at once (dense, LoRA expanded); prefer :meth:`iter_delta` for large models."""
        return dict(self.iter_delta())
