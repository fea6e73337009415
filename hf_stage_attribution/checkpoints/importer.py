"""``StageLedger.from_checkpoints``: a ledger from published checkpoints (Hub revisions or repos, local folders,
Trainer ``checkpoint-*`` folders, PEFT adapters), streamed tensor by tensor.

``boundaries`` is an ordered list; the first is the start θ_0 and each later one ends the stage named by it::

    [{"model": "org/base"},                                       # θ_0 (Hub repo, default revision "main")
     {"model": "org/base", "revision": "sft-v1", "name": "sft", "kind": "sft",
      "optimizer": {"type": "AdamW", "weight_decay": 0.01, "lr": 2e-5, "lr_scheduler_type": "linear",
                    "warmup_steps": 100, "num_steps": 3000}},     # optimizer info is optional
     {"model": "runs/dpo", "checkpoints": "all", "name": "dpo", "kind": "dpo"},  # a Trainer output directory
     {"model": "org/lora-adapter", "name": "lora"}]              # a PEFT adapter repo: a LoRA stage

What the ledger records (read by reports and model cards):

- ``stage.json["source"]``: ``{"type": "checkpoints", "model", "revision", "commit", "subfolder", "location",
  "format", "files", "trainer", "resized", "estimator_availability"}``; the ledger's
  ``ledger.json["model"]["source"]`` holds the start's provenance and a summary of ``estimator_availability``.
- ``estimator_availability`` = ``{"available": [...], "unavailable": {name: why}, "reason": "..."}``: without
  optimizer information on the later stages only ``delta-*`` (and ``lora-exact`` for a terminal adapter) apply;
  with it, ``aa-*`` too. Imported stages never hold curvature material. A stage whose optimizer is unknown is
  written with ``optimizer = None`` and ``num_steps = 0`` (``source["num_steps"]`` keeps the real count when known).
- Resized vocabularies: the ledger's parameter space takes the largest shape; earlier states are zero-padded, the
  resizing stage's delta covers the overlap and holds the added rows in full (``source["resized"]`` and notes).
  Only the input/output embeddings may grow, and only where config.json's ``vocab_size`` grew too (when both
  configs give it); any other shape change is another architecture, refused with the tensors and config fields.
- Quantized checkpoints (a ``quantization_config`` in config.json, float8 or integer weights, quantization scales)
  are refused: their tensors are codes and scales, not weights. Dequantize and save them in float32/bf16 first.
- Adapters: an adapter boundary is applied to the last full boundary before it. Right after a full boundary its
  stage is the adapter's delta. Right after another adapter it must be a later version of that adapter on the same
  base (``checkpoint-<step>`` folders of one Trainer run, revisions of one Hub repo, or adapter configs naming the
  same ``base_model_name_or_path``/``revision``): it then replaces that adapter, and its stage is the difference
  of the two (factors ``A``/``B`` minus ``A0``/``B0``); where the base cannot be decided the import is refused. An
  adapter trained on an earlier adapter merged into the model is imported by giving that merged model as the
  boundary before it.

Nothing is left behind on failure: the ledger is written in a temporary sibling directory and renamed at the end.

Example (with Hub repositories; local ``save_pretrained`` directories work the same way)::

    from hf_stage_attribution import StageLedger
    ledger = StageLedger.from_checkpoints(
        [{"model": "org/m", "revision": "base"}, {"model": "org/m", "revision": "sft", "name": "sft"}], "ledger")
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointImportError, LedgerLockedError, StageAttributionError, UnsafeCheckpointError
from ..ledger.core import LEDGER_ENTRIES, LEDGER_FILE, STAGES_DIR, LedgerCore, is_temp_file
from ..ledger.optimizer_info import STATE_KEYS
from ..ledger.residual import store_half
from ..ledger.storage import DirectoryLock
from ..ledger.writer import LedgerWriter, digest
from .hub import locate
from .plan import ImportPlan, StagePlan, build_plan
from .spec import Boundary, parse_boundaries
from .tensors import load_weights_only, pad_to

__all__ = ["import_checkpoints"]


def _check_output(out: Path, overwrite: bool, inputs: Sequence[tuple[Path, str]] = ()) -> None:
    """Refuse, before any work, an output that is a file, holds an input of the import, is a non-empty folder other
    than a ledger, or is a ledger without ``overwrite`` (``--overwrite`` replaces a ledger and nothing else)."""
    target = out.resolve()
    for path, label in inputs:
        if path == target or target in path.parents:
            raise CheckpointImportError(
                f"Expected an output directory apart from the checkpoints being imported, found {out}, which "
                f"{'is' if path == target else 'contains'} the input {label} ({path}). Choose another directory "
                "for the ledger."
            )
    if out.is_symlink() and not out.exists():
        raise CheckpointImportError(
            f"Expected a new or empty output directory, found {out}, a link to a missing path. Remove the link or "
            "choose another directory."
        )
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise CheckpointImportError(
            f"Expected a new or empty output directory, found {out}, which is a file; --overwrite only replaces a "
            "ledger. Choose a directory path for the ledger."
        )
    problem = _not_a_ledger(out)
    if problem:
        raise CheckpointImportError(
            f"Expected a new or empty output directory (or an existing ledger, with overwrite=True / --overwrite), "
            f"found {out}, which {problem}. Nothing was changed: --overwrite only replaces a ledger; choose another "
            "directory."
        )
    if not overwrite:
        raise CheckpointImportError(
            f"Expected a new or empty output directory, found an existing ledger at {out}. Choose another directory "
            "or pass overwrite=True (--overwrite) to replace it."
        )
    _check_not_recording(out)


def _check_not_recording(ledger_dir: Path) -> None:
    """Refuse to replace a ledger that another process is recording into (it holds the ledger's lock)."""
    lock = DirectoryLock(ledger_dir, "checking that no process records into it before replacing it")
    try:
        lock.acquire()
    except LedgerLockedError as exc:
        raise CheckpointImportError(
            f"Expected a ledger that --overwrite may replace, found one that another process is recording into "
            f"({str(exc).splitlines()[0][:200]}). Nothing was changed: wait for the recording to end, or choose "
            "another output directory."
        ) from exc
    lock.release()


def _not_a_ledger(directory: Path) -> str | None:
    """Why ``directory`` is not a ledger that ``overwrite`` may replace (None when it is one): it must hold a
    ``ledger.json`` that loads, and nothing at its top or in ``stages/`` that the package does not write."""
    names = sorted(p.name for p in directory.iterdir())
    if LEDGER_FILE not in names:
        return f"holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} but no {LEDGER_FILE} (not a ledger)"
    foreign = [n for n in names if n not in LEDGER_ENTRIES and not is_temp_file(n)]
    if foreign:
        return f"holds a ledger and other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    try:
        ledger = LedgerCore.load(directory)
    except (StageAttributionError, OSError) as exc:
        return f"holds a {LEDGER_FILE} that does not load ({str(exc).splitlines()[0][:200]})"
    known = {Path(stage.entry["dir"]).name for stage in ledger.stages} | {p.name for p in ledger.incomplete_stages()}
    stages_dir = directory / STAGES_DIR
    extra = sorted(p.name for p in stages_dir.iterdir()) if stages_dir.is_dir() and not stages_dir.is_symlink() else []
    extra = [n for n in extra if n not in known]
    if extra:
        return f"holds a ledger whose {STAGES_DIR}/ also holds {', '.join(extra[:3])}, which the package did not write"
    return None


def _local_inputs(boundaries: Sequence[Boundary], cache_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The local folders the import reads (boundary folders, their subfolders, the Hub cache given)."""
    found = []
    for boundary in boundaries:
        path = Path(boundary.model).expanduser()
        label = f"of boundary {boundary.index} ({boundary.name!r})"
        if path.exists():
            found.append((path.resolve(), label))
            if boundary.subfolder:
                found.append(((path / boundary.subfolder).resolve(), label))
    if cache_dir is not None:
        found.append((Path(cache_dir).expanduser().resolve(), "Hub cache (cache_dir)"))
    return found


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite and out.is_dir() and not out.is_symlink() and _not_a_ledger(out) is None:
            _check_not_recording(out)
            old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise CheckpointImportError(
                f"{out} appeared or changed while importing (it is not a ledger that overwrite may replace); the "
                "import was not published and nothing was changed. Choose another output directory."
            )
    os.replace(tmp, out)


def _progress(total: int, enabled: bool, desc: str):

    return tqdm(total=total, disable=not enabled, desc=desc, unit="tensor", leave=False)


def _optimizer_state(stage: StagePlan, shapes: dict[str, tuple[int, ...]]):
    """``(specs, stream)`` of the optimizer state the stage continued from (``optimizer.pt``, weights only)."""
    info = stage.info
    if not stage.location.allow_pickle:  # state_file is only set with permission; checked again where it is read
        raise UnsafeCheckpointError(f"Refused to unpickle {info.state_file}: pass allow_pickle=True to read it.")
    data = load_weights_only(info.state_file, "optimizer state")
    state = data.get("state", {}) if isinstance(data, dict) else {}
    items: list[tuple[str, str, Any]] = []
    for index, name in enumerate(info.state_names or []):
        entry = state.get(index) or {}
        for key in STATE_KEYS:
            value = entry.get(key)
            if isinstance(value, torch.Tensor):
                items.append((f"{key}/{name}", name, value))
    specs = [(key, () if t.dim() == 0 else shapes[name]) for key, name, t in items]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for key, name, value in items:
            value = value.to(torch.float32, copy=True)
            yield key, value if value.dim() == 0 else pad_to(value, shapes[name])

    return specs, stream()


def _source(stage: StagePlan) -> dict:
    source = {"type": "checkpoints", **stage.location.source, "estimator_availability": stage.availability}
    if stage.info.trainer:
        source["trainer"] = stage.info.trainer
    if stage.resized:
        source["resized"] = stage.resized
    if stage.info.optimizer is None and stage.info.num_steps:
        source["num_steps"] = stage.info.num_steps
    if stage.info.missing:
        source["optimizer_unknown_because"] = stage.info.missing
    return source


def _write_full(writer: LedgerWriter, plan: ImportPlan, stage: StagePlan, prev, digests, progress: bool) -> dict:
    names, shapes = plan.names, plan.shapes
    end: dict[str, str] = {}
    changed: list[str] = []
    dtypes: dict[str, torch.dtype] = {}  # half-precision checkpoints: their Δ in that dtype, plus a residual
    residual: dict[str, torch.Tensor] = {}
    with _progress(len(names), progress, f"{stage.name}: hashing") as bar:
        for name in names:
            value = stage.state.get(name, writable=False)
            end[name] = digest(value)
            if end[name] != digests[name]:
                changed.append(name)
                dtype = stage.state.stored_dtype(name)
                if dtype != torch.float32 and prev.stored_dtype(name) == dtype:
                    store_half(name, value - prev.get(name, writable=False), dtype, dtypes, residual)
            del value
            bar.update()

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        with _progress(len(changed), progress, f"{stage.name}: deltas") as bar:
            for name in changed:
                value = stage.state.get(name)
                value.sub_(prev.get(name, writable=False))
                bar.update()
                yield name, value

    state = _optimizer_state(stage, shapes) if stage.info.state_file is not None else None
    groups = (stage.info.optimizer or {}).get("param_groups", [])
    trainable = sorted({n for g in groups for n in g.get("params", [])} | set(changed)) if groups else changed
    writer.append_stage(
        stage.name, stage.kind, [(n, shapes[n]) for n in changed], deltas(), end_digests=end,
        learning_rates=stage.info.learning_rates if stage.info.optimizer else [], optimizer=stage.info.optimizer,
        trainable_parameters=trainable, optimizer_state_policy=stage.info.optimizer_state_policy,
        optimizer_state=state, notes=stage.notes, source=_source(stage), delta_dtypes=dtypes, delta_residual=residual,
    )  # fmt: skip
    return {n: end[n] for n in changed}


def _dense_delta(stage: StagePlan, prev: Any, name: str) -> torch.Tensor:
    """The dense part of an adapter stage's delta of ``name``: the change the stored factors do not hold."""
    factors = stage.factors.factors
    if f"{name}::A0" in factors:  # both adapters' LoRA parts are in the factors: compare what lies under them
        value = stage.state.get(name, lora=False)
        value.sub_(prev.get(name, writable=False, lora=False))
        return value
    value = stage.state.get(name, lora=f"{name}::A" not in factors)
    value.sub_(prev.get(name, writable=False))
    return value


def _write_adapter(writer: LedgerWriter, plan: ImportPlan, stage: StagePlan, prev) -> dict:
    factors, shapes = stage.factors, plan.shapes
    changed = sorted({*factors.modules, *factors.dense})
    end = {n: digest(stage.state.get(n, writable=False)) for n in changed}

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in factors.dense:
            yield name, _dense_delta(stage, prev, name)

    lora = {"modules": factors.modules, "dense_modules": [], "config": stage.adapter.config}
    writer.append_stage(
        stage.name, stage.kind, [(n, shapes[n]) for n in factors.dense], deltas(), end_digests=end,
        learning_rates=stage.info.learning_rates if stage.info.optimizer else [], optimizer=stage.info.optimizer,
        trainable_parameters=changed, optimizer_state_policy=stage.info.optimizer_state_policy,
        lora=lora, lora_tensors=factors.factors, notes=stage.notes, source=_source(stage),
    )  # fmt: skip
    return end


def _ledger_source(plan: ImportPlan) -> dict:
    by_stage = {s.name: s.availability["available"] for s in plan.stages}
    common = [e for e in plan.stages[0].availability["available"] if all(e in v for v in by_stage.values())]
    reasons = "; ".join(f"{s.name}: {s.availability['reason']}" for s in plan.stages)
    return {
        "type": "checkpoints",
        "start": {**plan.start.source, "name": plan.start.boundary.name},
        "notes": plan.notes,
        "estimator_availability": {"every_stage": common, "by_stage": by_stage, "reason": reasons},
    }


def _write(plan: ImportPlan, directory: Path, progress: bool) -> None:
    writer = LedgerWriter(directory)
    names, shapes = plan.names, plan.shapes
    with _progress(len(names), progress, "start: writing θ_0") as bar:

        def start() -> Iterator[tuple[str, torch.Tensor]]:
            for name in names:
                bar.update()
                yield name, plan.start_state.get(name, writable=False)

        writer.initialize(
            [(n, shapes[n]) for n in names],
            start(),
            model_class=plan.model_class,
            source=_ledger_source(plan),
            dtypes={n: plan.start_state.stored_dtype(n) for n in names},
        )
    digests = dict(writer.ledger.final_digests)
    prev = plan.start_state
    for stage in plan.stages:
        if stage.adapter is not None:
            digests.update(_write_adapter(writer, plan, stage, prev))
        else:
            digests.update(_write_full(writer, plan, stage, prev, digests, progress))
        prev = stage.state


def import_checkpoints(
    boundaries: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LedgerCore:
    """Build a ledger at ``output_dir`` from stage boundaries (see the module docstring) and return it.

    Args:
        boundaries: the ordered boundary dicts (the first is θ_0).
        output_dir: a new (or empty) directory; ``overwrite=True`` replaces an existing ledger (and nothing else:
            a file, a folder holding other files or any input of the import is refused) once the import succeeded.
        allow_pickle: accept ``pytorch_model.bin`` weights and read Trainer checkpoints' ``optimizer.pt`` /
            ``scheduler.pt``, all with ``torch.load(weights_only=True)`` only (without it those are not opened).
        cache_dir, local_files_only, token: passed to huggingface_hub (``local_files_only`` defaults to
            ``HF_HUB_OFFLINE``); a token is used for downloads and never stored.
        progress: show tqdm progress bars.

    Raises:
        CheckpointImportError (and its subclasses CheckpointNotFoundError, CheckpointMismatchError,
        UnsafeCheckpointError), with nothing written at ``output_dir``.
    """
    parsed = parse_boundaries(boundaries)
    out = Path(output_dir).expanduser()
    _check_output(out, overwrite, _local_inputs(parsed, cache_dir))
    hub = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    locations = [locate(b, allow_pickle=allow_pickle, **hub) for b in parsed]
    plan = build_plan(locations)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the ledger's mode
        _write(plan, tmp, progress)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LedgerCore.load(out)
