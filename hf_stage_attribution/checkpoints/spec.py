"""Stage boundaries for :func:`~hf_stage_attribution.checkpoints.importer.import_checkpoints`: parsing and validation.

A boundary is a checkpoint that ends a stage: ``{"model": repo id or local path, "revision": ..., "subfolder": ...,
"name": ..., "kind": ..., "optimizer": {...}}``. The first boundary is the starting point θ_0 (its ``name`` labels
the start); each later one ends the stage of that name, whose delta is the change from the previous boundary's
model to this one's. A local Trainer output directory (``checkpoint-<step>`` folders) expands into one boundary per
checkpoint (``"checkpoints": "all"``, stage names ``<name>@<step>``) or only its last one (``"checkpoints":
"last"``). A PEFT adapter boundary's model is its base plus the adapter: the base is the last full boundary before
it, so successive checkpoints or revisions of one adapter each stand for that base plus their own adapter (see
:mod:`~hf_stage_attribution.checkpoints.importer` for the rule and when it refuses).

Example:
    >>> bs = parse_boundaries([{"model": "org/base"}, {"model": "org/base", "revision": "sft", "kind": "sft"}])
    >>> [(b.name, b.kind) for b in bs]
    [('start', None), ('sft', 'sft')]
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CheckpointImportError
from ..ledger.format import STAGE_KINDS

BOUNDARY_KEYS = ("model", "revision", "subfolder", "name", "kind", "optimizer", "checkpoints")
OPTIMIZER_KEYS = (
    "type", "weight_decay", "betas", "eps", "momentum", "dampening", "nesterov", "alpha", "centered", "amsgrad",
    "maximize", "decoupled_weight_decay", "lr", "learning_rate", "learning_rates", "lr_scheduler_type",
    "warmup_steps", "warmup_ratio", "num_training_steps", "scheduler_kwargs", "num_steps", "no_decay",
    "optimizer_state_policy",
)  # fmt: skip
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "adapter_model.bin",
)  # fmt: skip


@dataclass
class Boundary:
    """One stage boundary (see the module docstring); ``index`` 0 is the start θ_0."""

    model: str
    revision: str | None = None
    subfolder: str | None = None
    name: str = ""
    kind: str | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    def label(self) -> str:
        """How error messages name this boundary."""
        where = self.model + (f"@{self.revision}" if self.revision else "")
        return where + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")


def _fail(position: int, what: str, found: Any, fix: str = "") -> CheckpointImportError:
    return CheckpointImportError(
        f"Stage boundary {position}: expected {what}, found {found!r}.{(' ' + fix) if fix else ''}"
    )


def _optional_str(position: int, entry: Mapping, key: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _fail(position, f"`{key}` to be a non-empty string", value)
    return value


def _check_optimizer(position: int, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(position, "`optimizer` to be a mapping such as {type: AdamW, weight_decay: 0.01}", value)
    unknown = sorted(set(value) - set(OPTIMIZER_KEYS))
    if unknown:
        raise _fail(position, f"`optimizer` keys among {', '.join(OPTIMIZER_KEYS)}", unknown)
    lrs = value.get("learning_rates")
    if lrs is not None and (
        not isinstance(lrs, list)
        or not all(
            isinstance(x, (int, float)) or (isinstance(x, list) and all(isinstance(y, (int, float)) for y in x))
            for x in lrs
        )
    ):
        raise _fail(position, "`optimizer.learning_rates`: a list with one rate (or one list per group) per step", lrs)
    return dict(value)


def trainer_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-<step>`` folders of a Trainer output directory, by step."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return sorted(found)


def _has_weights(directory: Path) -> bool:
    return any((directory / name).exists() for name in _WEIGHT_FILES)


def _expand(position: int, entry: Mapping, name: str, kind: str | None, optimizer: dict) -> list[Boundary] | None:
    """A local Trainer output directory → boundaries for its checkpoints (None if ``entry`` is not one)."""
    mode = entry.get("checkpoints")
    if mode not in (None, "all", "last"):
        raise _fail(position, '`checkpoints` to be "all" or "last" (for a Trainer output directory)', mode)
    path = Path(str(entry["model"])).expanduser()
    if entry.get("subfolder"):
        path = path / str(entry["subfolder"])
    found = trainer_checkpoints(path)
    if not found or (mode is None and _has_weights(path)):
        if mode is not None:
            raise _fail(position, "a Trainer output directory with checkpoint-<step> folders", str(path))
        return None
    if mode == "last":
        found = found[-1:]
    out = []
    for step, ckpt in found:
        stage_name = name if len(found) == 1 else f"{name}@{step}"
        out.append(Boundary(str(ckpt), name=stage_name, kind=kind, optimizer=dict(optimizer)))
    return out


def parse_boundaries(boundaries: Sequence[Mapping[str, Any]]) -> list[Boundary]:
    """Validate the boundary dicts, expand Trainer output directories, fill default names and kinds."""
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise CheckpointImportError(
            f"Expected a list of stage boundaries ({{'model': ..., 'revision': ..., 'name': ...}}), found "
            f"{type(boundaries).__name__}."
        )
    out: list[Boundary] = []
    for position, entry in enumerate(boundaries):
        if not isinstance(entry, Mapping):
            raise _fail(position, "a mapping with at least `model`", entry)
        unknown = sorted(set(entry) - set(BOUNDARY_KEYS))
        if unknown:
            raise _fail(position, f"keys among {', '.join(BOUNDARY_KEYS)}", unknown)
        model = _optional_str(position, entry, "model")
        if model is None:
            raise _fail(position, "`model`: a Hub repo id or a local path", entry.get("model"))
        revision, subfolder = _optional_str(position, entry, "revision"), _optional_str(position, entry, "subfolder")
        name = _optional_str(position, entry, "name")
        kind = _optional_str(position, entry, "kind")
        if kind is not None and kind not in STAGE_KINDS:
            raise _fail(position, f"`kind` among {', '.join(STAGE_KINDS)}", kind)
        optimizer = _check_optimizer(position, entry.get("optimizer"))
        if position == 0 and (optimizer or entry.get("kind")):
            raise _fail(
                position, "no `optimizer`/`kind` on the first boundary", entry,
                "The first boundary is the starting point θ_0; describe training on the boundary that ends it.",
            )  # fmt: skip
        default = "start" if position == 0 else (revision or Path(model.rstrip("/")).name or f"stage-{position}")
        expanded = None if revision else _expand(position, entry, name or default, kind, optimizer)
        if expanded is None:
            expanded = [Boundary(model, revision, subfolder, name or default, kind, optimizer)]
        out.extend(expanded)
    if len(out) < 2:
        raise CheckpointImportError(
            f"Expected at least two stage boundaries (a start and the end of one stage), found {len(out)}."
        )
    names = [b.name for b in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CheckpointImportError(
            f"Stage names must be unique; {duplicates} appear more than once. Give each boundary a `name`."
        )
    for index, boundary in enumerate(out):
        boundary.index = index
    return out


def load_spec(path: str | Path) -> list[dict[str, Any]]:
    """Read a YAML or JSON spec file holding the boundary list under ``stages``.

    A ``model`` starting with ``./`` or ``../`` is a folder relative to the spec file; other relative names are
    local folders relative to the working directory if they exist, else Hub repo ids.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointImportError(f"Could not read the spec file {path}: {exc.strerror or exc}.") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, ImportError) as exc:
        raise CheckpointImportError(f"The spec file {path} is not valid YAML/JSON: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        raise CheckpointImportError(f"The spec file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list):
        raise CheckpointImportError(
            f"Expected {path} to hold a mapping with the list of boundaries under `stages`, found "
            f"{type(data).__name__ if not isinstance(data, Mapping) else sorted(data)}."
        )
    unknown = sorted(set(data) - {"stages", "description"})
    if unknown:
        raise CheckpointImportError(
            f"{path}: unknown top-level keys {unknown}; expected `stages` (and `description`)."
        )
    stages = [dict(entry) if isinstance(entry, Mapping) else entry for entry in data["stages"]]
    for entry in stages:  # "./x" and "../x" are relative to the spec file, as a reader of the spec expects
        model = entry.get("model") if isinstance(entry, dict) else None
        if isinstance(model, str) and model.startswith(("./", "../")):
            entry["model"] = str((path.parent / model).resolve())
    return stages
