"""Where a stage boundary's weights live: a local folder, or a Hub repo revision resolved through huggingface_hub.

Hub repos go through ``snapshot_download``/``hf_hub_download`` with ``revision=``, so the same call downloads
online and reads the local cache offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Only JSON files
and the chosen weight files are fetched; pickle weights (``pytorch_model.bin``) are refused unless the caller
allows them (and are then only read with ``torch.load(weights_only=True)``).

Example, with ``org/model`` in the local Hub cache::

    loc = locate(Boundary("org/model", revision="v1.0"), local_files_only=True)
    loc.directory, loc.weight_format, loc.source["commit"]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointImportError, CheckpointNotFoundError, UnsafeCheckpointError
from .spec import Boundary

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class CheckpointLocation:
    """A resolved boundary: its folder, weight files and format, configs, and JSON-safe provenance."""

    boundary: Boundary
    directory: Path
    weight_format: str  # "safetensors", "safetensors-sharded", "peft-adapter", "pickle", "peft-adapter-pickle"
    weight_files: list[Path]
    config: dict | None
    adapter_config: dict | None
    source: dict[str, Any]
    allow_pickle: bool = False  # the caller's permission, also for optimizer.pt/scheduler.pt (see trainer.py)

    @property
    def is_adapter(self) -> bool:
        return self.weight_format.startswith("peft-adapter")


def is_offline(local_files_only: bool | None) -> bool:
    """``local_files_only`` if given, else whether ``HF_HUB_OFFLINE`` is set (read now, not at import)."""
    if local_files_only is not None:
        return bool(local_files_only)
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_relative(name: str, where: str) -> str:
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or ":" in name or any(p in ("..", "") for p in parts):
        raise UnsafeCheckpointError(f"{where}: expected a file name inside the checkpoint, found {name!r}.")
    return name


def _cached_revisions(repo_id: str, cache_dir: str | os.PathLike | None) -> tuple[Path, list[str]]:
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    refs = root / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snaps = sorted(p.name for p in (root / "snapshots").iterdir()) if (root / "snapshots").is_dir() else []
    return root, names + [s[:12] for s in snaps]


def _hub_error(exc: Exception, boundary: Boundary, cache_dir: Any, offline: bool, what: str = "") -> Exception:
    from huggingface_hub import errors

    repo, rev = boundary.model, boundary.revision or "main"
    target = f"Revision {rev!r} of {repo}" + (f" (file {what})" if what else "")
    if isinstance(exc, errors.RevisionNotFoundError):
        return CheckpointNotFoundError(
            f"Revision {rev!r} of {repo} does not exist on the Hub. Check the branch, tag or commit name on the "
            "repo's 'Files and versions' page."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointNotFoundError(
            f"Repository {repo} was not found on the Hub or is not accessible (private or gated). Check the id, or "
            "log in (`hf auth login`) / pass a token."
        )
    if isinstance(exc, errors.HFValidationError):
        return CheckpointImportError(f"{target}: not a valid repo id or revision name ({exc}).")
    if isinstance(exc, (errors.EntryNotFoundError, FileNotFoundError)) or offline:
        root, known = _cached_revisions(repo, cache_dir)
        if offline or isinstance(exc, errors.LocalEntryNotFoundError):
            return CheckpointNotFoundError(
                f"{target} is not in the local Hugging Face cache ({root}) and the Hub is offline "
                f"(HF_HUB_OFFLINE / local_files_only). Cached revisions of {repo}: {known or 'none'}. Download it "
                f"once online (`hf download {repo} --revision {rev}`) or give a revision that is cached."
            )
        return CheckpointNotFoundError(f"{target}: file not found in the repository ({exc}).")
    return CheckpointImportError(f"Could not fetch {target} from the Hub: {exc}")


def _local(boundary: Boundary) -> tuple[Path, set[str], Callable[[str], Path], dict]:
    path = Path(boundary.model).expanduser()
    if boundary.revision:
        raise CheckpointImportError(
            f"{boundary.label()}: {path} is a local directory; `revision` only applies to Hub repos. Point `model` "
            "at the folder of that revision instead."
        )
    directory = path / boundary.subfolder if boundary.subfolder else path
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{boundary.label()}: expected a checkpoint folder at {directory}, found none.")
    available = {p.name for p in directory.iterdir() if p.is_file()}
    source = {"model": str(path.resolve()), "location": "local", "subfolder": boundary.subfolder}
    return directory, available, lambda rel: directory / rel, source


def _hub(boundary: Boundary, cache_dir, offline: bool, token) -> tuple[Path, set[str], Callable[[str], Path], dict]:
    from huggingface_hub import hf_hub_download, snapshot_download

    if not _REPO_ID.match(boundary.model) or ".." in boundary.model:
        raise CheckpointNotFoundError(
            f"{boundary.model!r} is neither an existing local directory nor a Hub repo id such as 'org/name'."
        )
    sub = (boundary.subfolder or "").strip("/")
    if sub:
        _check_relative(sub, boundary.label())
    prefix = f"{sub}/" if sub else ""
    kwargs = {"cache_dir": cache_dir, "local_files_only": offline, "token": token}
    try:
        snapshot = Path(
            snapshot_download(boundary.model, revision=boundary.revision, allow_patterns=[f"{prefix}*.json"], **kwargs)
        )
    except Exception as exc:
        raise _hub_error(exc, boundary, cache_dir, offline) from exc
    commit = snapshot.name
    directory = snapshot / sub if sub else snapshot
    available: set[str] | None = None
    if not offline:
        try:
            from huggingface_hub import HfApi

            files = HfApi(token=token).list_repo_files(boundary.model, revision=commit)
            available = {f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]}
        except Exception:  # network trouble: fall back to what the cache holds
            available = None
    if available is None:
        if not directory.is_dir():
            raise CheckpointNotFoundError(
                f"{boundary.label()}: the cached snapshot {snapshot} has no folder {sub!r}. Check `subfolder`."
            )
        available = {p.name for p in directory.iterdir() if p.is_file()}

    def fetch(rel: str) -> Path:
        try:
            return Path(hf_hub_download(boundary.model, rel, subfolder=sub or None, revision=commit, **kwargs))
        except Exception as exc:
            raise _hub_error(exc, boundary, cache_dir, offline, rel) from exc

    source = {
        "model": boundary.model, "location": "hub", "revision": boundary.revision, "commit": commit,
        "subfolder": boundary.subfolder,
    }  # fmt: skip
    return directory, available, fetch, source


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointImportError(f"Could not read the {what} {path}: {exc}.") from exc
    if not isinstance(data, dict):
        raise CheckpointImportError(f"Expected the {what} {path} to hold a JSON object, found {type(data).__name__}.")
    return data


def _shards(index_path: Path, where: str) -> list[str]:
    weight_map = _read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointImportError(f"{index_path}: expected a non-empty `weight_map`, found {weight_map!r}.")
    return sorted({_check_relative(str(v), where) for v in weight_map.values()})


def _choose(available: set[str], fetch: Callable[[str], Path], allow_pickle: bool, label: str) -> tuple[str, list]:
    if "model.safetensors.index.json" in available:
        return "safetensors-sharded", [fetch(s) for s in _shards(fetch("model.safetensors.index.json"), label)]
    if "model.safetensors" in available:
        return "safetensors", [fetch("model.safetensors")]
    if "adapter_config.json" in available and "adapter_model.safetensors" in available:
        return "peft-adapter", [fetch("adapter_model.safetensors")]
    pickles = [n for n in ("pytorch_model.bin.index.json", "pytorch_model.bin", "adapter_model.bin") if n in available]
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{label}: only pickle weights were found ({', '.join(pickles)}), no safetensors. Unpickling can "
                "run arbitrary code, so it is refused. If you trust the source, pass allow_pickle=True "
                "(--allow-pickle); they are then read with torch.load(weights_only=True) only. Better: convert the "
                "checkpoint to safetensors."
            )
        if pickles[0] == "pytorch_model.bin.index.json":
            return "pickle", [fetch(s) for s in _shards(fetch(pickles[0]), label)]
        return ("peft-adapter-pickle" if pickles[0] == "adapter_model.bin" else "pickle"), [fetch(pickles[0])]
    raise CheckpointNotFoundError(
        f"{label}: expected weights (model.safetensors, a model.safetensors.index.json with shards, or a PEFT "
        f"adapter_model.safetensors), found files {sorted(available)[:12] or 'none'}."
    )


def locate(
    boundary: Boundary,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> CheckpointLocation:
    """Resolve ``boundary`` to a folder and weight files (downloading them when online)."""
    offline = is_offline(local_files_only)
    if Path(boundary.model).expanduser().exists():
        directory, available, fetch, source = _local(boundary)
    else:
        directory, available, fetch, source = _hub(boundary, cache_dir, offline, token)
    label = boundary.label()
    weight_format, files = _choose(available, fetch, allow_pickle, label)
    config = _read_json(fetch("config.json"), "model config") if "config.json" in available else None
    adapter = None
    if weight_format.startswith("peft-adapter"):
        adapter = _read_json(fetch("adapter_config.json"), "adapter config")
    source.update(format=weight_format, files=sorted(p.name for p in files))
    return CheckpointLocation(boundary, directory, weight_format, files, config, adapter, source, allow_pickle)
