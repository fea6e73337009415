"""``LedgerWriter``: write a ledger from tensors rather than from a live model (checkpoint imports, conversions).

θ_0 is written from a stream of ``(name, tensor)``; each stage from a stream of dense deltas (and/or LoRA factors)
plus its metadata. The files, hashes and atomicity are the recorder's: a stage is written under
``stages/.partial-<index>-<name>/``, renamed into place, and only then listed in ``ledger.json``. Tensors are
consumed one at a time, so memory stays at about one tensor whatever the model's size.

Example:
    >>> import tempfile, torch
    >>> from hf_stage_attribution.ledger.writer import LedgerWriter, digest
    >>> writer = LedgerWriter(tempfile.mkdtemp())
    >>> writer.initialize([("w", (2,))], iter([("w", torch.zeros(2))]), model_class="Toy")
    >>> stage = writer.append_stage(
    ...     "s1", "imported", [("w", (2,))], iter([("w", torch.ones(2))]), end_digests={"w": digest(torch.ones(2))}
    ... )
    >>> stage.delta_tensor("w").tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .._internal.hashing import combine_digests, tensor_digest
from .._internal.precision import exact_cast, storage_dtype
from ..errors import LedgerError
from .core import LEDGER_FILE, START_FILE, LedgerCore, framework_versions, utc_now
from .format import BASE_FORMAT_VERSION, FORMAT_NAME, FORMAT_VERSION, STAGE_KEYS, STAGE_KINDS, check_name
from .residual import RESIDUAL_FILE
from .stage import Stage
from .storage import (
    DirectoryLock,
    atomic_write_json,
    stage_dir_name,
    write_safetensors,
    write_safetensors_stream,
)

TensorSpecs = list[tuple[str, tuple[int, ...]]]


def digest(tensor: torch.Tensor) -> str:
    """The per-tensor digest the ledger stores (``_hashing.tensor_digest``), hashing the buffer without a copy."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    if t.numel() == 0 or t.dtype != torch.float32:
        return tensor_digest(t)
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()[:32]


class LedgerWriter:
    """Write θ_0 and stages into a ledger directory from tensors.

    Args:
        directory: the ledger directory (created if needed; :meth:`initialize` refuses one that holds a ledger).

    Example:
        >>> import tempfile, torch
        >>> w = LedgerWriter(tempfile.mkdtemp())
        >>> w.initialize([("b", (1,))], iter([("b", torch.tensor([2.0]))]), model_class="Toy")
        >>> w.ledger.parameter_names
        ['b']
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.ledger = LedgerCore(self.dir)

    # --- θ_0 -------------------------------------------------------------------------------------------

    def initialize(
        self,
        specs: TensorSpecs,
        tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        model_class: str,
        source: dict | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        """Write ``start.safetensors`` and ``ledger.json`` from ``tensors``, yielded in ``specs`` order.

        θ_0 is stored as float32, except the tensors ``dtypes`` names as bf16/fp16 (their values must be of that dtype,
        e.g. a bf16 checkpoint's weights): those are stored in their own dtype, exactly and at half the size."""
        if (self.dir / LEDGER_FILE).exists():
            raise LedgerError(
                f"Expected an empty directory for a new ledger at {self.dir}, found an existing {LEDGER_FILE}. "
                "Choose a new directory."
            )
        self.ledger.check_not_unindexed("nothing was written")  # θ_0 or stages of a ledger whose index was lost
        names = [name for name, _ in specs]
        if len(set(names)) != len(names):
            raise LedgerError(f"Parameter names must be unique; got duplicates in {names[:5]}...")
        self.dir.mkdir(parents=True, exist_ok=True)
        digests: dict[str, str] = {}

        stored = {name: storage_dtype((dtypes or {}).get(name, torch.float32)) for name, _ in specs}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, value in tensors:
                value = value.to(torch.float32)
                digests[name] = digest(value)
                yield name, exact_cast(value, stored[name], name)

        with DirectoryLock(self.dir, "writing a ledger from tensors"):
            sha = write_safetensors_stream(
                self.dir / START_FILE,
                [(name, stored[name], tuple(shape)) for name, shape in specs],
                stream(),
                {"format": FORMAT_NAME},
            )
            model: dict[str, Any] = {"class": model_class, "parameters": [[n, list(s)] for n, s in specs]}
            if source is not None:
                model["source"] = source
            manifest = {
                "format": FORMAT_NAME,
                "format_version": BASE_FORMAT_VERSION,
                "created_with": framework_versions(),
                "created_at": utc_now(),
                "model": model,
                "start": {
                    "file": START_FILE,
                    "sha256": sha,
                    "state_hash": combine_digests(digests),
                    "digests": digests,
                },
                "stages": [],
            }
            atomic_write_json(self.dir / LEDGER_FILE, manifest)
            self.ledger._reload()

    # --- stages ----------------------------------------------------------------------------------------

    def append_stage(
        self,
        name: str,
        kind: str,
        delta_specs: TensorSpecs,
        deltas: Iterable[tuple[str, torch.Tensor]],
        *,
        end_digests: dict[str, str],
        learning_rates: list[list[float]] | None = None,
        optimizer: dict | None = None,
        trainable_parameters: list[str] | None = None,
        optimizer_state_policy: str = "unknown",
        optimizer_state: tuple[TensorSpecs, Iterable[tuple[str, torch.Tensor]]] | None = None,
        lora: dict | None = None,
        lora_tensors: dict[str, torch.Tensor] | None = None,
        notes: list[str] | None = None,
        source: dict | None = None,
        metadata: dict | None = None,
        delta_dtypes: Mapping[str, torch.dtype] | None = None,
        delta_residual: Mapping[str, torch.Tensor] | None = None,
    ) -> Stage:
        """Append one complete stage.

        Args:
            name, kind: the stage's unique name and its kind (one of ``format.STAGE_KINDS``).
            delta_specs, deltas: ``(name, shape)`` of every changed tensor and a stream yielding their dense Δ in
                that order (written in float32 whatever the input dtype, unless ``delta_dtypes`` says otherwise).
            end_digests: per-tensor digests of the stage's end state for the tensors it changed (the others keep
                the previous stage's digests).
            learning_rates: the rate applied at each optimizer step, per param group (``[]``: unknown/none).
            optimizer: the ``stage.json`` optimizer description (``None`` when unknown).
            optimizer_state: ``(specs, stream)`` of ``"<state key>/<name>"`` tensors the stage continued from.
            lora, lora_tensors: the ``lora`` description and its ``"<name>::A"`` / ``"<name>::B"`` factors.
            notes, source, metadata: JSON-safe extras (``metadata`` keys must be ``stage.json`` keys).
            delta_dtypes, delta_residual: a half-precision dtype to store some Δs in, and the entries that dtype
                rounds as ``"<name>::index"``/``"<name>::value"`` tensors (``ledger.residual.split_delta``; format 3).
        """
        ledger = self.ledger
        ledger.manifest  # noqa: B018  (a clear error before initialize())
        check_name(Path("stage name"), name)
        if any(s.name == name for s in ledger.stages):
            raise LedgerError(f"The ledger at {self.dir} already has a stage named {name!r}; names are unique.")
        if kind not in STAGE_KINDS:
            raise LedgerError(f"Expected a stage kind in {', '.join(STAGE_KINDS)}, got {kind!r}.")
        learning_rates = list(learning_rates or [])
        self._check_stage_inputs(delta_specs, end_digests, learning_rates, optimizer, lora, lora_tensors, metadata)
        index = len(ledger.stages)
        partial = self.dir / "stages" / stage_dir_name(index, name, partial=True)
        with DirectoryLock(self.dir, f"writing stage {name!r} from tensors"):
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            try:
                return self._write_stage(
                    partial, index, name, kind, delta_specs, deltas, end_digests, learning_rates, optimizer,
                    trainable_parameters, optimizer_state_policy, optimizer_state, lora, lora_tensors, notes, source,
                    metadata, dict(delta_dtypes or {}), dict(delta_residual or {}),
                )  # fmt: skip
            except BaseException:
                with contextlib.suppress(OSError):
                    shutil.rmtree(partial)
                raise

    def _check_stage_inputs(self, delta_specs, end_digests, learning_rates, optimizer, lora, lora_tensors, metadata):
        shapes = self.ledger.parameter_shapes
        for tensor_name, shape in delta_specs:
            if tensor_name not in shapes:
                raise LedgerError(f"Delta for {tensor_name!r}, which is not a parameter of this ledger's model.")
            if tuple(shape) != shapes[tensor_name]:
                raise LedgerError(
                    f"Delta of {tensor_name!r} announced with shape {tuple(shape)}; the ledger has "
                    f"{shapes[tensor_name]}."
                )
        unknown = sorted(set(end_digests) - set(shapes))
        if unknown:
            raise LedgerError(f"End digests name tensors the ledger does not have, e.g. {unknown[0]!r}.")
        groups = len((optimizer or {}).get("param_groups", [])) if optimizer else None
        for row in learning_rates:
            if not isinstance(row, list) or (groups is not None and len(row) != groups):
                raise LedgerError(
                    f"Expected one learning rate per param group ({groups}) at every step, found {row!r}."
                )
        modules = (lora or {}).get("modules", {})
        for tensor_name in modules:
            if tensor_name not in shapes:
                raise LedgerError(f"LoRA factors for {tensor_name!r}, which is not a parameter of this ledger.")
            for key in ("A", "B"):
                if f"{tensor_name}::{key}" not in (lora_tensors or {}):
                    raise LedgerError(f"LoRA module {tensor_name!r} lacks its factor '{tensor_name}::{key}'.")
        bad = sorted(set(metadata or {}) - STAGE_KEYS)
        if bad:
            raise LedgerError(f"Stage metadata keys must be stage.json keys; unknown: {', '.join(bad)}.")

    def _write_stage(
        self, partial, index, name, kind, delta_specs, deltas, end_digests, learning_rates, optimizer,
        trainable_parameters, optimizer_state_policy, optimizer_state, lora, lora_tensors, notes, source, metadata,
        delta_dtypes, delta_residual,
    ) -> Stage:  # fmt: skip
        ledger = self.ledger
        files: dict[str, str] = {}
        started = utc_now()
        stored = {n: storage_dtype(delta_dtypes.get(n, torch.float32)) for n, _ in delta_specs}
        if delta_specs:
            files["delta.safetensors"] = write_safetensors_stream(
                partial / "delta.safetensors",
                [(n, stored[n], tuple(s)) for n, s in delta_specs],
                ((n, value.to(stored[n])) for n, value in deltas),
            )
        if delta_residual:
            files[RESIDUAL_FILE] = write_safetensors(partial / RESIDUAL_FILE, dict(delta_residual))
        if lora_tensors:
            files["lora.safetensors"] = write_safetensors(
                partial / "lora.safetensors", {k: v.to(torch.float32) for k, v in lora_tensors.items()}
            )
        if optimizer_state is not None and optimizer_state[0]:
            specs, stream = optimizer_state
            files["optimizer_state.safetensors"] = write_safetensors_stream(
                partial / "optimizer_state.safetensors", [(n, torch.float32, tuple(s)) for n, s in specs], stream
            )
        start_hash = ledger.final_hash
        full_digests = {**ledger.final_digests, **end_digests}
        end_hash = combine_digests(full_digests)
        changed = sorted({n for n, _ in delta_specs} | set((lora or {}).get("modules", {})))
        info = {
            "format_version": FORMAT_VERSION if delta_residual else BASE_FORMAT_VERSION,
            "index": index,
            "name": name,
            "kind": kind,
            "optimizer": optimizer,
            "learning_rates": learning_rates,
            "num_steps": len(learning_rates),
            "trainable_parameters": sorted(trainable_parameters) if trainable_parameters is not None else changed,
            "delta_file": "delta.safetensors" if "delta.safetensors" in files else None,
            **({"delta_residual_file": RESIDUAL_FILE} if delta_residual else {}),
            "lora_file": "lora.safetensors" if "lora.safetensors" in files else None,
            "lora": lora,
            "optimizer_state_policy": optimizer_state_policy,
            "optimizer_state_file": (
                "optimizer_state.safetensors" if "optimizer_state.safetensors" in files else None
            ),
            "start_hash": start_hash,
            "end_hash": end_hash,
            "end_digests": full_digests,
            "segments": [],
            "started_at": started,
            "finished_at": utc_now(),
            "notes": list(notes or []),
            **({"source": source} if source is not None else {}),
            **(metadata or {}),
        }
        files["stage.json"] = atomic_write_json(partial / "stage.json", info)
        final = self.dir / "stages" / stage_dir_name(index, name)
        if final.exists():
            raise LedgerError(f"Cannot write stage {name!r}: {final} already exists. Use a new ledger directory.")
        os.replace(partial, final)
        return ledger._append_stage(final.name, name, kind, start_hash, end_hash, files)
