"""The read side of one recorded stage: its ``stage.json``, its delta (dense or LoRA factors) and segments."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompleteStageError, LedgerFormatError
from .format import validate_stage
from .residual import check_positions, join_delta, residual_checker, residual_keys
from .segments import COL, ROW, lr_mass_fraction, unfactor_moment
from .state import LazyState
from .storage import ensure_inside, file_sha256, open_safetensors, read_json, safe_join

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class _TensorFile:
    """A memory-mapped safetensors file opened on first use; ``check(path, {key: (dtype, shape)})`` vets its header."""

    def __init__(self, path: Path | None, root: Path | None = None, check: Callable | None = None) -> None:
        self.path = path
        self.root = root
        self.check = check
        self._handle = None
        self._keys: list[str] = []
        self._key_set: set[str] = set()

    @property
    def handle(self):
        if self._handle is None and self.path is not None:
            if self.root is not None:
                ensure_inside(self.root, self.path)
            handle = open_safetensors(self.path)
            keys = list(handle.keys())
            if self.check is not None:
                header = {}
                for key in keys:
                    header[key] = handle.info(key)
                self.check(self.path, header)
            self._handle, self._keys, self._key_set = handle, keys, set(keys)
        return self._handle

    def keys(self) -> list[str]:
        if self.path is None:
            return []
        self.handle  # noqa: B018  (opens and vets the file)
        return list(self._keys)

    def get(self, key: str) -> torch.Tensor:
        if self.path is None:
            raise LedgerFormatError(f"Expected a tensor file holding {key!r}, but the stage names none.")
        handle = self.handle
        if key not in self._key_set:
            raise LedgerFormatError(f"{self.path}: expected a tensor {key!r}, found none (keys: {self._keys[:5]}...).")
        try:
            return handle.get_tensor(key)
        except Exception as exc:  # safetensors' own error type for a bad buffer
            raise LedgerFormatError(
                f"{self.path}: could not read tensor {key!r} ({exc}); the file is corrupt."
            ) from exc


def _header_error(path: Path, expected: str, key: str, found: object) -> LedgerFormatError:
    return LedgerFormatError(
        f"{path}: expected {expected}, found {key!r} = {found}. The file does not belong to this ledger or is "
        "corrupt; restore it or re-record the stage."
    )


def parameter_checker(shapes: dict[str, tuple[int, ...]], key_to_name: Callable[[str], str] = lambda k: k) -> Callable:
    """A header check: every key names a parameter of the ledger's model, in a float dtype, with its shape."""

    def check(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        for key, (dtype, shape) in header.items():
            name = key_to_name(key)
            if name not in shapes:
                raise _header_error(path, "only parameters of the ledger's model", key, "an unknown name")
            if dtype not in _FLOAT_DTYPES:
                raise _header_error(path, "floating-point tensors", key, dtype)
            if shape != tuple(shapes[name]):
                raise _header_error(path, f"shape {tuple(shapes[name])} (from ledger.json)", key, shape)

    return check


def _check_prefixed(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Optimizer-state files: keys ``<state key>/<parameter name>``, floating-point values."""
    for key, (dtype, _shape) in header.items():
        kind, sep, name = key.partition("/")
        if not sep or not kind or not name:
            raise _header_error(path, "keys of the form '<state key>/<parameter name>'", key, "a malformed key")
        if dtype not in _FLOAT_DTYPES:
            raise _header_error(path, "floating-point optimizer state", key, dtype)


def _load_checked(tensor_file: _TensorFile) -> dict[str, torch.Tensor]:
    return {k: tensor_file.get(k) for k in tensor_file.keys()}


def _check_examples(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    for key in header:
        index, sep, field = key.partition("/")
        if not sep or not index.isdigit() or not field:
            raise _header_error(path, "example keys of the form '<batch index>/<field>'", key, "a malformed key")


def _unflatten_batches(path: Path, tensors: dict[str, torch.Tensor], layout: str) -> list[Any]:
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, field = key.partition("/")
        grouped.setdefault(int(index), {})[field] = value
    batches: list[Any] = []
    for index in sorted(grouped):
        fields = grouped[index]
        if layout == "tensor":
            if set(fields) != {"_"}:
                raise _header_error(path, "one field '_' per batch (batch_layout 'tensor')", index, sorted(fields))
            batches.append(fields["_"])
        elif layout == "tuple":
            if set(fields) != {str(j) for j in range(len(fields))}:
                raise _header_error(path, "fields 0..n-1 per batch (batch_layout 'tuple')", index, sorted(fields))
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
        self.dir = safe_join(stage.dir, info["dir"], stage.root)

    @property
    def learning_rates(self) -> list[list[float]]:
        return self.stage.learning_rates[self.step_start : self.step_end]

    def _load(self, filename: str, check: Callable) -> dict[str, torch.Tensor]:
        path = self.dir / filename
        if not path.exists() and not path.is_symlink():
            return {}
        return _load_checked(_TensorFile(path, self.stage.root, check))

    @property
    def material(self) -> dict[str, str]:
        """How θ_mid and the second moments are stored: ``{"params": "snapshot" | "interpolated", "moments":
        "full" | "factored"}`` (format-1 ledgers: snapshots and full moments)."""
        return {"params": self.info.get("params", "snapshot"), "moments": self.info.get("moments", "full")}

    def params_delta(self) -> Mapping[str, torch.Tensor]:
        """θ_mid − θ_stage_start for the tensors the stage trains (base names, float32; LoRA merged).

        Compact material (``params == "interpolated"``) stores no snapshot: θ_mid − θ_start is the stage's Δ
        scaled by the share of the learning-rate mass applied up to the midpoint (:func:`lr_mass_fraction`).
        """
        if self.material["params"] == "interpolated":
            fraction = lr_mass_fraction(self.stage.learning_rates, self.mid_step)
            stage = self.stage
            return LazyState(stage.delta_names(), lambda name: stage.delta_tensor(name) * fraction)
        return self._load("params_delta.safetensors", parameter_checker(self.stage._shapes))

    def second_moments(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """``{"exp_avg_sq": {name: T}, "step": {name: T}}`` at the midpoint, or None (non-Adam optimizers).

        Factored moments (compact material) are expanded to full tensors (:func:`unfactor_moment`)."""
        flat = self._load("second_moments.safetensors", _check_prefixed)
        if not flat:
            return None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            if key.endswith(COL):
                continue
            if key.endswith(ROW):
                base = key[: -len(ROW)]
                kind, _, name = base.partition("/")
                col = flat.get(base + COL)
                shape = self.stage._shapes.get(name)  # a base parameter; LoRA factors ("<name>::A") are matrices
                if shape is None and col is not None:
                    shape = (value.numel(), col.numel())
                if col is None or shape[0] != value.numel() or math.prod(shape[1:]) != col.numel():
                    raise LedgerFormatError(
                        f"{self.dir / 'second_moments.safetensors'}: the factored moment {base!r} does not match the "
                        f"parameter's shape {shape} (or lacks its column means). Re-record the stage."
                    )
                out.setdefault(kind, {})[name] = unfactor_moment(value, col, shape)
                continue
            kind, _, name = key.partition("/")
            out.setdefault(kind, {})[name] = value
        return out

    def examples(self) -> list[Any]:
        """The captured training batches (as given to ``step(batch)`` or seen by the model's forward)."""
        layout = self.info.get("batch_layout", "dict")
        return _unflatten_batches(
            self.dir / "examples.safetensors", self._load("examples.safetensors", _check_examples), layout
        )

    @property
    def num_examples(self) -> int:
        return int(self.info.get("num_examples", 0))


class EarlyCheckpoint:
    """The factual state a few steps into a stage, saved by ``record_stage(..., early_checkpoint=f)`` (opt-in).

    Attributes: ``steps`` (optimizer steps taken when it was saved), ``fraction`` (the ``f`` asked for).
    """

    def __init__(self, stage: Stage, info: dict) -> None:
        self.stage = stage
        self.steps = int(info["steps"])
        self.fraction = info.get("fraction")
        parts = ("params_delta", "optimizer_state")
        self._files = {key: safe_join(stage.dir, info[f"{key}_file"], stage.root) for key in parts}

    def params_delta(self) -> Mapping[str, torch.Tensor]:
        """θ_m − θ_stage_start of the tensors the stage trains (base names, float32; LoRA merged), read from the
        memory-mapped file one tensor per access."""
        tensors = _TensorFile(self._files["params_delta"], self.stage.root, parameter_checker(self.stage._shapes))
        return LazyState(tensors.keys(), tensors.get)

    def optimizer_state(self) -> Mapping[str, dict[str, Any]]:
        """``{name: {state key: tensor}}`` after ``steps`` steps (``"step"`` a float; LoRA factors as
        ``"<base>::A"``/``"<base>::B"``), the form a step-limited replay returns its optimizer state in; one
        parameter's entries read per access."""
        tensors = _TensorFile(self._files["optimizer_state"], self.stage.root, _check_prefixed)
        keys: dict[str, list[tuple[str, str]]] = {}
        for key in tensors.keys():
            kind, _, name = key.partition("/")
            keys.setdefault(name, []).append((kind, key))

        def entry(name: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for kind, key in keys[name]:
                value = tensors.get(key)
                out[kind] = float(value) if kind == "step" and value.dim() == 0 else value
            return out

        return LazyState(list(keys), entry)

    def __repr__(self) -> str:
        return f"EarlyCheckpoint(stage={self.stage.name!r}, steps={self.steps})"


class Stage:
    """One complete stage of a ledger. See docs/internals.md for every attribute.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model, directory = torch.nn.Linear(2, 1), tempfile.mkdtemp()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with StageLedger(directory).record_stage("sft", model=model, optimizer=opt) as rec:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> stage = StageLedger.load(directory).stages[0]
        >>> stage.name, stage.num_steps, stage.learning_rates[0], sorted(stage.delta())
        ('sft', 3, [0.1], ['bias', 'weight'])
        >>> [round(v, 4) for v in stage.delta()["bias"].tolist()]  # three steps of lr·1 downhill
        [-0.3]
    """

    def __init__(self, ledger_dir: Path, entry: dict, shapes: dict[str, tuple[int, ...]]) -> None:
        self.entry = entry
        self.index = int(entry["index"])
        self.name: str = entry["name"]
        self.root = Path(ledger_dir).resolve()
        self.dir = safe_join(ledger_dir, entry["dir"])
        if not self.dir.is_dir():
            raise IncompleteStageError(
                f"Stage {self.name!r} is listed in {ledger_dir / 'ledger.json'} but its directory {self.dir} "
                "is missing."
            )
        stage_json = ensure_inside(self.root, self.dir / "stage.json")
        self.info: dict = validate_stage(stage_json, read_json(stage_json, "stage file"), self.name)
        self._shapes = shapes
        self._dense = _TensorFile(
            safe_join(self.dir, self.info["delta_file"], self.root) if self.info.get("delta_file") else None,
            self.root,
            parameter_checker(shapes),
        )
        self._lora = _TensorFile(
            safe_join(self.dir, self.info["lora_file"], self.root) if self.info.get("lora_file") else None,
            self.root,
            self._check_lora_header,
        )
        residual = self.info.get("delta_residual_file")  # format 3: half-precision Δs' rounded entries
        self._residual = _TensorFile(
            safe_join(self.dir, residual, self.root) if residual else None, self.root, residual_checker(shapes)
        )
        self.loss_fn: Callable | tuple | None = None  # in-memory only; set by the recorder of this process
        self.segments = [Segment(self, seg) for seg in self.info.get("segments", [])]
        early = self.info.get("early_checkpoint")
        #: the factual state a few steps in (opt-in at recording; None when not recorded)
        self.early_checkpoint: EarlyCheckpoint | None = EarlyCheckpoint(self, early) if early else None
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
        """The learning rates at every recorded optimizer step (skipped steps included; see ``skipped_steps``)."""
        return self.info.get("learning_rates", [])

    @property
    def skipped_steps(self) -> list[int]:
        """Steps (0-based, of this stage) whose update the optimizer skipped (mixed-precision overflow): their
        learning rates are recorded but were never applied. Absent from older ledgers: every step was applied."""
        return sorted(int(t) for t in self.info.get("skipped_steps", []))

    def applied_learning_rates(self, start: int = 0, end: int | None = None) -> list[list[float]]:
        """The learning rates of the steps in ``[start, end)`` that were applied (skipped steps left out)."""
        skipped = set(self.skipped_steps)
        end = len(self.learning_rates) if end is None else end
        return [row for t, row in enumerate(self.learning_rates[start:end], start) if t not in skipped]

    def applied_steps_before(self, step: int) -> int:
        """How many of the steps before ``step`` were applied (the optimizer's own step count at ``step``)."""
        return step - sum(1 for t in self.skipped_steps if t < step)

    @property
    def trainable_parameters(self) -> list[str]:
        return self.info.get("trainable_parameters", [])

    @property
    def changed_without_grad(self) -> list[str]:
        """Parameters in ``trainable_parameters`` that changed during the stage without ``requires_grad`` (edited in
        place by the training code, not by the optimizer); empty for ledgers written before the list existed."""
        return self.info.get("changed_without_grad", [])

    @property
    def unstepped_parameters(self) -> list[str]:
        """Parameters in ``trainable_parameters`` that the optimizer never stepped in this stage (no gradient at any
        optimizer step, so torch skipped them: no update, no weight decay); the propagation leaves them as they
        are. Empty for ledgers written before the list existed, and where the recorder saw no gradients at all."""
        return self.info.get("unstepped_parameters", [])

    @property
    def optimizer_state_policy(self) -> str:
        return self.info.get("optimizer_state_policy", "fresh")

    @property
    def lora(self) -> dict | None:
        return self.info.get("lora")

    @property
    def curvature_loss(self) -> dict | None:
        return self.info.get("curvature_loss")

    def recorded_files(self, under: str = "") -> list[tuple[Path, str]]:
        """``(path, sha256)`` of each file ``ledger.json`` lists for this stage (those whose path relative to the
        stage folder starts with ``under``, e.g. ``"replay/"``), each path kept inside the ledger."""
        files = self.entry.get("files", {})
        return [
            (safe_join(self.dir, rel, self.root), digest) for rel, digest in files.items() if rel.startswith(under)
        ]

    def changed_file(self, under: str = "") -> Path | None:
        """The first of :meth:`recorded_files` that is missing or no longer hashes as recorded; None when all match
        (what ``StageLedger.verify()`` checks for every stage, and replay for its replay files)."""
        for path, digest in self.recorded_files(under):
            if not path.is_file() or file_sha256(path) != digest:
                return path
        return None

    @property
    def imported_from(self) -> str | None:
        """Where an imported stage's end checkpoint came from (``repo@revision``, a repo id or a folder, as its
        ``source`` names it); None for a stage the recorder saw train (no replay data or curvature material can
        exist for an imported one: what to do instead differs)."""
        source = self.info.get("source") or {}
        if source.get("type") != "checkpoints":
            return None
        model, revision = str(source.get("model", "?")), source.get("revision")
        return f"{model}@{revision}" if revision else model

    @property
    def replay_dir(self) -> Path | None:
        path = self.dir / "replay"
        return ensure_inside(self.root, path) if path.is_dir() else None

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
        flat = _load_checked(_TensorFile(safe_join(self.dir, rel, self.root), self.root, _check_prefixed))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            kind, _, name = key.partition("/")
            out.setdefault(kind, {})[name] = value
        return out

    def _check_lora_header(self, path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        modules = self._lora_modules()
        for key, (dtype, shape) in header.items():
            base, sep, part = key.partition("::")
            if not sep or part not in ("A", "B", "A0", "B0") or base not in modules or base not in self._shapes:
                raise _header_error(path, "LoRA factors '<LoRA-targeted parameter>::A|B|A0|B0'", key, "an unknown key")
            if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                raise _header_error(path, "2-d floating-point LoRA factors", key, f"{dtype} {shape}")

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
            if b.shape[1] != a.shape[0]:
                raise LedgerFormatError(
                    f"{self._lora.path}: LoRA factors of {name!r} do not chain: B is {tuple(b.shape)}, A is "
                    f"{tuple(a.shape)}. The stage files are inconsistent."
                )
            out = b @ a
            if spec.get("layer_type") == "embedding" or spec.get("fan_in_fan_out"):
                out = out.T
            if tuple(out.shape) != tuple(self._shapes[name]):
                raise LedgerFormatError(
                    f"{self._lora.path}: LoRA factors of {name!r} give a delta of shape {tuple(out.shape)}, expected "
                    f"{tuple(self._shapes[name])} (from ledger.json). The stage files are inconsistent."
                )
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
            out = self._dense.get(name)
            index_key, value_key = residual_keys(name)
            if self._residual.path is not None and index_key in set(self._residual.keys()):
                index = self._residual.get(index_key)
                check_positions(self._residual.path, name, index, out.numel())
                out = join_delta(out, index, self._residual.get(value_key))
            out = out.to(torch.float32)
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
