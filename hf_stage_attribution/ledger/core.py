"""``LedgerCore``: reading, checking and extending a ledger on disk (what the recorder, the writer and the checkpoint
importer need); :class:`~hf_stage_attribution.ledger.ledger.StageLedger` adds the entry points that create stages."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .._internal.hashing import combine_digests, tensor_digest
from .._internal.params import base_parameters, iter_merged_state, lora_layers
from .._internal.precision import HALF_DTYPES, exact_cast, storage_dtype
from ..errors import LedgerError, LedgerFormatError, LedgerMismatchError, ModelMismatchError, StageAttributionError
from .format import BASE_FORMAT_VERSION, FORMAT_NAME, validate_ledger
from .stage import Stage
from .state import LazyState
from .storage import (
    LOCK_NAME,
    DirectoryLock,
    atomic_write_json,
    ensure_inside,
    file_sha256,
    io_errors,
    open_safetensors,
    read_json,
    safe_join,
    write_safetensors_stream,
)

LEDGER_FILE = "ledger.json"
START_FILE = "start.safetensors"
STAGES_DIR = "stages"
# What the package writes at the top of a ledger directory (``embeddings/`` is the behaviors' embedding cache)
LEDGER_ENTRIES = (LEDGER_FILE, START_FILE, STAGES_DIR, "embeddings", LOCK_NAME)
# How the recorder and the writer name stage folders (``storage.stage_dir_name``): ``NNN-<slug>`` once committed,
# ``.partial-NNN-<slug>`` while being written; and the temporary files of atomic writes at the top
# (``.<name>.<mkstemp>.tmp``)
_STAGE_DIR = re.compile(r"^\d{3,}-[A-Za-z0-9._-]+$")
_PARTIAL_DIR = re.compile(r"^\.partial-\d{3,}-[A-Za-z0-9._-]+$")
_TEMP_FILE = re.compile(r"^\.(?:ledger\.json|start\.safetensors|ledger\.lock)\.[A-Za-z0-9_]+\.tmp$")
_FRAMEWORKS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "huggingface_hub")


def framework_versions() -> dict[str, str]:
    """Versions of this library and the frameworks it records from (without importing them); read once per
    process (the package metadata scan costs tens of milliseconds)."""
    return dict(_framework_versions())


@functools.lru_cache(maxsize=1)
def _framework_versions() -> dict[str, str]:
    out = {}
    for dist in ("hf-stage-attribution", *_FRAMEWORKS):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class LedgerCore:
    """The read side of a ledger and the checks that guard appending to it.

    Most users want :class:`~hf_stage_attribution.ledger.ledger.StageLedger`, which adds ``record_stage`` and
    ``from_checkpoints``; every ``StageLedger`` is a ``LedgerCore``.

    Example:
        >>> import tempfile
        >>> core = LedgerCore(tempfile.mkdtemp())
        >>> (core.exists, len(core))
        (False, 0)
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._loss_fns: dict[str, Callable | tuple] = {}
        self._manifest: dict | None = None
        self.stages: list[Stage] = []
        if (self.dir / LEDGER_FILE).exists():
            self._reload()
        elif self.dir.exists() and not self.dir.is_dir():
            raise LedgerError(f"Expected a ledger directory at {self.dir}, found a file.")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LedgerCore:
        """Open an existing ledger; error if ``directory`` holds none."""
        path = Path(directory)
        if not (path / LEDGER_FILE).exists():
            raise LedgerError(
                f"Expected a ledger at {path} (a directory with {LEDGER_FILE}), found "
                f"{'no such directory' if not path.exists() else 'no ' + LEDGER_FILE}. Record a stage with "
                "StageRecorder / StageLedger.record_stage, or import checkpoints, to create one."
            )
        return cls(path)

    # --- manifest --------------------------------------------------------------------------------------

    def _reload(self) -> None:
        path = ensure_inside(self.dir, self.dir / LEDGER_FILE)
        manifest = validate_ledger(path, read_json(path, "ledger file"))
        self._check_layout()
        shapes = {name: tuple(shape) for name, shape in manifest["model"]["parameters"]}
        _check_start_file(safe_join(self.dir, manifest["start"]["file"]), shapes)
        stages = [Stage(self.dir, entry, shapes) for entry in manifest["stages"]]
        for stage in stages:
            stage.loss_fn = self._loss_fns.get(stage.name)
        self._manifest, self._shapes, self.stages = manifest, shapes, stages

    def refresh(self) -> bool:
        """Re-read ``ledger.json``: the stages recorded now, not when this object was made (by another
        ``StageLedger`` object, a ``StageRecorder`` or another process); returns whether they changed.

        Example:
            >>> import tempfile
            >>> LedgerCore(tempfile.mkdtemp()).refresh()  # nothing recorded there, before or now
            False
        """
        before = self.fingerprint if self.exists else None
        if (self.dir / LEDGER_FILE).exists():
            self._reload()
        return (self.fingerprint if self.exists else None) != before

    @property
    def exists(self) -> bool:
        return self._manifest is not None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            raise LedgerError(f"The ledger at {self.dir} has no stages yet (no {LEDGER_FILE}).")
        return self._manifest

    @property
    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.manifest["model"]["parameters"]]

    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        self.manifest  # noqa: B018  (raises a clear error on an empty ledger)
        return dict(self._shapes)

    @property
    def fingerprint(self) -> str:
        """Changes whenever a stage is added or removed (the last stage's chain hash)."""
        if self.stages:
            return self.stages[-1].entry["chain_hash"]
        return self.manifest["start"]["state_hash"]

    @property
    def final_hash(self) -> str | None:
        if self._manifest is None:
            return None
        return self.stages[-1].end_hash if self.stages else self.manifest["start"]["state_hash"]

    @property
    def final_digests(self) -> dict[str, str]:
        return self.stages[-1].end_digests if self.stages else self.manifest["start"].get("digests", {})

    @property
    def embeddings_dir(self) -> Path:
        path = self.dir / "embeddings"
        if path.is_symlink() or path.exists():
            ensure_inside(self.dir, path)
        return path

    def _check_layout(self) -> None:
        """Refuse a ledger whose fixed sub-paths (``stages/``, ``embeddings/``, the lock) are links leaving it."""
        for name in ("stages", "embeddings", LOCK_NAME, START_FILE):
            path = self.dir / name
            if path.is_symlink() or path.exists():
                ensure_inside(self.dir, path)

    def stage(self, key: int | str) -> Stage:
        """A stage by index or name."""
        for stage in self.stages:
            if stage.index == key or stage.name == key:
                return stage
        known = ", ".join(f"{s.index}:{s.name}" for s in self.stages) or "none"
        raise LedgerError(f"No stage {key!r} in the ledger at {self.dir}. Stages: {known}.")

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"StageLedger({str(self.dir)!r}, stages={[s.name for s in self.stages]})"

    # --- states ----------------------------------------------------------------------------------------

    def initial_state(self) -> LazyState:
        """θ_0 as float32 tensors, read lazily (memory-mapped) from ``start.safetensors`` (where a half-precision
        model's weights are stored in their own dtype)."""
        start = self.manifest["start"]
        handle = open_safetensors(safe_join(self.dir, start["file"]))
        return LazyState(self.parameter_names, lambda name: handle.get_tensor(name).to(torch.float32))

    def state_at(self, k: int) -> LazyState:
        """θ_k = θ_0 + Σ_{j≤k} Δ_j, computed per tensor on access (``k = -1`` is θ_0)."""
        if not -1 <= k < len(self.stages):
            raise LedgerError(
                f"Stage index {k} out of range: the ledger has {len(self.stages)} stages "
                f"(use -1..{len(self.stages) - 1})."
            )
        initial = self.initial_state()
        stages = self.stages[: k + 1]

        def get(name: str) -> torch.Tensor:
            value = initial[name].clone()
            for stage in stages:
                if name in stage._delta_name_set():
                    value += stage.delta_tensor(name)
            return value

        return LazyState(self.parameter_names, get)

    def final_state(self) -> LazyState:
        return self.state_at(len(self.stages) - 1)

    def check_model(self, model: torch.nn.Module, rtol: float = 1e-4, atol: float = 1e-6) -> frozenset[str]:
        """Raise :class:`ModelMismatchError` naming the first tensor where ``model`` is not θ_K; else return the names
        of the tensors that are θ_K's exactly (their digest is the recorded one; the others are within tolerance).

        A half-precision tensor (bf16/fp16) is compared within one rounding step of its dtype (``rtol`` =
        ``torch.finfo(dtype).eps``): a bf16 LoRA model merged with ``merge_and_unload()`` rounds the float32 adapter's
        ΔW into bf16, 2.3e-4 from the recorded θ_K on a tiny GPT-2, which is no extra training."""

        names = set(self.parameter_names)
        expected = self.final_digests
        final = None
        seen = set()
        exact = set()
        dtypes = {name: param.dtype for name, param in base_parameters(model).items()}
        for name, value in iter_merged_state(model):
            if name not in names:
                raise ModelMismatchError(
                    f"The model has a parameter {name!r} that the ledger at {self.dir} does not know. "
                    "Is this the model the ledger was recorded for?"
                )
            seen.add(name)
            if tuple(value.shape) != self._shapes[name]:
                raise ModelMismatchError(
                    f"Parameter {name!r} has shape {tuple(value.shape)} in the model but {self._shapes[name]} in the "
                    f"ledger at {self.dir}."
                )

            if expected.get(name) == tensor_digest(value):
                exact.add(name)
                continue
            final = final or self.final_state()
            ref = final[name]
            half = dtypes.get(name) in HALF_DTYPES  # within one rounding step of that dtype
            tolerance = max(rtol, torch.finfo(dtypes[name]).eps) if half else rtol
            if not torch.allclose(value, ref, rtol=tolerance, atol=atol):
                diff = (value - ref).abs().max().item()
                rounding = ", more than one rounding step of its half-precision dtype" if half else ""
                raise ModelMismatchError(
                    f"The model does not match the ledger's final state at tensor {name!r} (max abs difference "
                    f"{diff:.3g}{rounding}). Pass the final model of the recorded pipeline, or record the extra "
                    "training as a stage."
                )
        missing = names - seen
        if missing:
            raise ModelMismatchError(
                f"The model lacks {len(missing)} parameter(s) the ledger records, e.g. {sorted(missing)[0]!r}."
            )
        return frozenset(exact)

    # --- writing (used by the recorder) ----------------------------------------------------------------

    def _initialize(self, model: torch.nn.Module, model_class: str | None = None) -> None:
        """Create ``ledger.json`` and ``start.safetensors`` (θ_0) from ``model``, streaming tensor by tensor; refuses,
        before writing anything, a directory holding ledger files without ``ledger.json``."""

        self.check_not_unindexed("nothing was written")
        self.dir.mkdir(parents=True, exist_ok=True)
        params = base_parameters(model)
        lora = lora_layers(model)
        # a half-precision weight is stored in its own dtype (exact: the ledger reads θ_0 back as float32 either
        # way; a bf16 SmolLM2-135M's θ_0 is 0.27 GB instead of 0.54); one under a LoRA adapter merged, in float32
        specs = [
            (name, torch.float32 if name in lora else storage_dtype(p.dtype), tuple(p.shape))
            for name, p in params.items()
        ]
        dtypes = {name: dtype for name, dtype, _ in specs}
        digests: dict[str, str] = {}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:

            for name, value in iter_merged_state(model):
                digests[name] = tensor_digest(value)
                yield name, exact_cast(value, dtypes[name], name)

        sha = write_safetensors_stream(self.dir / START_FILE, specs, stream(), {"format": FORMAT_NAME})
        manifest = {
            "format": FORMAT_NAME,
            "format_version": BASE_FORMAT_VERSION,
            "created_with": framework_versions(),
            "created_at": utc_now(),
            "model": {
                "class": model_class or type(model).__name__,
                "parameters": [[name, list(shape)] for name, _, shape in specs],
            },
            "start": {"file": START_FILE, "sha256": sha, "state_hash": combine_digests(digests), "digests": digests},
            "stages": [],
        }
        atomic_write_json(self.dir / LEDGER_FILE, manifest)
        self._reload()

    def _check_same_model(self, model: torch.nn.Module) -> None:

        params = base_parameters(model)
        shapes = self._shapes
        for name, param in params.items():
            if name not in shapes:
                raise LedgerMismatchError(
                    f"{self.dir / LEDGER_FILE} was recorded for another model: it has no parameter {name!r}. "
                    "Use a new ledger directory for a different model."
                )
            if tuple(param.shape) != shapes[name]:
                raise LedgerMismatchError(
                    f"{self.dir / LEDGER_FILE} was recorded for another model: {name!r} has shape {shapes[name]} "
                    "there "
                    f"but {tuple(param.shape)} here. Use a new ledger directory (or import resized checkpoints)."
                )
        missing = set(shapes) - set(params)
        if missing:
            raise LedgerMismatchError(
                f"{self.dir / LEDGER_FILE} was recorded for another model: this one lacks {sorted(missing)[0]!r}."
            )

    def _append_stage(
        self, stage_dir_name: str, name: str, kind: str, start_hash: str, end_hash: str, files: dict[str, str]
    ) -> Stage:
        manifest = self.manifest
        prev_chain = self.fingerprint
        chain = hashlib.sha256(
            "\n".join(
                [prev_chain, name, kind, start_hash, end_hash, *[f"{k}={files[k]}" for k in sorted(files)]]
            ).encode()
        ).hexdigest()
        entry = {
            "index": len(manifest["stages"]),
            "name": name,
            "kind": kind,
            "dir": f"stages/{stage_dir_name}",
            "start_hash": start_hash,
            "end_hash": end_hash,
            "chain_hash": chain,
            "files": files,
        }
        try:  # the checks every reader makes, before the index lists the stage: a stage that fails them made the
            Stage(self.dir, entry, self._shapes)  # whole ledger unreadable, earlier stages included
        except StageAttributionError as exc:
            raise type(exc)(
                f"{exc} Stage {name!r} was not added to {self.dir / LEDGER_FILE} (the ledger is as before); its "
                f"folder {entry['dir']} is left as an incomplete stage: `hf-stage-attribution inspect {self.dir} "
                "--remove-incomplete` removes it. Please report this: the recorder wrote a stage it cannot read."
            ) from exc
        new_manifest = dict(manifest, stages=[*manifest["stages"], entry])
        atomic_write_json(self.dir / LEDGER_FILE, new_manifest)
        self._reload()
        return self.stages[-1]

    # --- maintenance -----------------------------------------------------------------------------------

    def incomplete_stages(self) -> list[Path]:
        """Stage directories left by an interrupted recording: folders of ``stages/`` named as the package names
        them (``.partial-NNN-<name>``, or ``NNN-<name>`` holding a ``stage.json``) that ``ledger.json`` does not
        list, and links (never followed). Anything else in ``stages/`` is not the package's and is left alone; with
        no ``ledger.json`` nothing can be told apart from a recorded stage, so none is reported."""
        stages_dir = self.dir / STAGES_DIR
        if not stages_dir.is_dir() or not (self.dir / LEDGER_FILE).exists():
            return []
        ensure_inside(self.dir, stages_dir)
        listed = {Path(entry["dir"]).name for entry in (self._manifest or {}).get("stages", [])}
        return sorted(p for p in stages_dir.iterdir() if p.name not in listed and _written_stage_or_link(p))

    def leftover_files(self) -> list[Path]:
        """Temporary files of writes that a killed process never finished (``.ledger.json.<random>.tmp``, ...), and
        a ``start.safetensors`` of this package that no ``ledger.json`` lists while ``stages/`` is empty (the writer
        died while creating the ledger)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if is_temp_file(p.name) and not p.is_dir()]
        if self._interrupted_creation(self.unindexed_content()):
            found.append(self.dir / START_FILE)
        return sorted(found)

    def unindexed_content(self) -> list[Path]:
        """What a directory without ``ledger.json`` holds that belongs in a ledger (``start.safetensors``, the
        entries of ``stages/``); empty when ``ledger.json`` exists or there is nothing of the kind."""
        if (self.dir / LEDGER_FILE).exists() or not self.dir.is_dir():
            return []
        found = []
        start, stages_dir = self.dir / START_FILE, self.dir / STAGES_DIR
        if start.is_symlink() or start.exists():
            found.append(start)
        if stages_dir.is_dir() and not stages_dir.is_symlink():
            found.extend(sorted(stages_dir.iterdir()))
        elif stages_dir.is_symlink() or stages_dir.exists():
            found.append(stages_dir)
        return found

    def _interrupted_creation(self, unindexed: list[Path]) -> bool:
        """Whether ``unindexed`` (:meth:`unindexed_content`) is only a ``start.safetensors`` this package wrote: a
        ledger whose creation was interrupted before its ``ledger.json``, which ``--remove-incomplete`` may remove."""
        return unindexed == [self.dir / START_FILE] and _is_ledger_start(unindexed[0])

    def check_not_unindexed(self, consequence: str) -> None:
        """Raise :class:`LedgerError` when the directory holds ledger files but no ``ledger.json`` (a ledger whose
        index was lost, or another project's folder): writing a new index or removing "incomplete" stages there
        would replace θ_0 or delete recorded stages. A lone ``start.safetensors`` of this package (a ledger whose
        creation was interrupted) is pointed to ``--remove-incomplete``."""
        found = self.unindexed_content()
        if not found:
            return
        shown = ", ".join(str(p.relative_to(self.dir)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        interrupted = self._interrupted_creation(found)
        fix = (
            f"remove the leftover with `hf-stage-attribution inspect {self.dir} --remove-incomplete` if a recording "
            "was interrupted while creating this ledger, "
            if interrupted
            else ""
        )
        raise LedgerError(
            f"Expected a new ledger directory or one with its index {LEDGER_FILE}, found {shown} in {self.dir} but no "
            f"{LEDGER_FILE}: the ledger index is missing (or the folder is not a ledger); {consequence}. Restore "
            f"{LEDGER_FILE} from a backup, {fix}or use a new directory."
        )

    def remove_incomplete(self) -> list[Path]:
        """Delete incomplete stage directories and leftover temporary files; return what was removed.

        Only what the package itself writes is removed (see :meth:`incomplete_stages` and :meth:`leftover_files`);
        a directory holding ledger files but no ``ledger.json`` is refused (:class:`LedgerError`), as nothing there
        can be told apart from a recorded stage. Takes the ledger's lock, so it refuses
        (:class:`~hf_stage_attribution.errors.LedgerLockedError`) while another process records, whose work in
        progress would otherwise be deleted. Links are removed, never followed.
        """
        self._check_removable()
        removed = []
        with DirectoryLock(self.dir, "removing incomplete stages"):
            self._check_removable()
            if (self.dir / LEDGER_FILE).exists():
                self._reload()  # what is listed now, not when this object was made
            for path in [*self.incomplete_stages(), *self.leftover_files()]:
                with io_errors(path):
                    if path.is_symlink() or not path.is_dir():
                        path.unlink()
                    else:
                        shutil.rmtree(path)
                removed.append(path)
        return removed

    def _check_removable(self) -> None:
        found = self.unindexed_content()
        if found and not self._interrupted_creation(found):
            self.check_not_unindexed("nothing was removed")

    def verify(self) -> int:
        """Re-hash θ_0's file and every stage file against ``ledger.json`` (slow on large ledgers); return how many
        files were checked, or raise :class:`LedgerFormatError` naming the first that does not match."""

        start = self.manifest["start"]
        checked = 0
        if start.get("sha256"):
            path = safe_join(self.dir, start["file"])
            if not path.exists() or file_sha256(path) != start["sha256"]:
                raise LedgerFormatError(
                    f"{path} does not match the hash recorded in {self.dir / LEDGER_FILE}: θ_0 (the parameters every "
                    "stage starts from) was modified or corrupted after it was recorded."
                )
            checked += 1
        for stage in self.stages:
            path = stage.changed_file()
            if path is not None:
                raise LedgerFormatError(
                    f"{path} does not match the hash recorded in {self.dir / LEDGER_FILE}: the stage "
                    f"{stage.name!r} was modified or corrupted after it was recorded."
                )
            checked += len(stage.recorded_files())
        return checked

    def _remember_loss_fn(self, name: str, loss_fn: Callable | tuple | None) -> None:
        if loss_fn is not None:
            self._loss_fns[name] = loss_fn
            for stage in self.stages:
                if stage.name == name:
                    stage.loss_fn = loss_fn


def _check_start_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """θ_0's file must hold exactly the ledger's parameters, as floats of the recorded shapes (header only)."""
    handle = open_safetensors(path)
    found = {}
    for key in handle.keys():
        found[key] = handle.info(key)
    for name, shape in shapes.items():
        if name not in found:
            raise LedgerFormatError(
                f"{path}: expected the initial value of {name!r} (listed in {LEDGER_FILE}), found none. The file "
                "does not belong to this ledger or is corrupt."
            )
        dtype, found_shape = found[name]
        if found_shape != shape or dtype not in ("F64", "F32", "F16", "BF16"):
            raise LedgerFormatError(
                f"{path}: expected {name!r} as a float tensor of shape {shape} (from {LEDGER_FILE}), found {dtype} "
                f"{found_shape}. The file does not belong to this ledger or is corrupt."
            )


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temporary file the package's atomic writes leave at the top of a ledger when killed.

    Example:
        >>> is_temp_file(".ledger.json.k2x_9a1b.tmp"), is_temp_file("notes.tmp")
        (True, False)
    """
    return bool(_TEMP_FILE.match(name))


def _written_stage_or_link(path: Path) -> bool:
    """A folder of ``stages/`` as the package names it (``.partial-NNN-<name>``, or ``NNN-<name>`` with its
    ``stage.json``), or a link (removing a link loses nothing; its target is never followed)."""
    if path.is_symlink():
        return True
    if not path.is_dir():
        return False
    if _PARTIAL_DIR.match(path.name):
        return True
    return bool(_STAGE_DIR.match(path.name)) and (path / "stage.json").is_file()


def _is_ledger_start(path: Path) -> bool:
    """Whether ``path`` is a ``start.safetensors`` this package wrote (a regular file whose header says so)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open_safetensors(path) as handle:
            return handle.metadata().get("format") == FORMAT_NAME
    except (StageAttributionError, OSError):
        return False


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
