"""The ledger's on-disk schema: format version, validation of ``ledger.json`` and ``stage.json``.

Validation is strict about what the code relies on (types, ranges, safe relative paths) and lenient about the
rest: keys this version does not know are ignored with a warning, so a ledger written by a newer minor release
still loads. A ``format_version`` newer than this library's is refused.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from ..errors import LedgerFormatError, UnsafeInputError

FORMAT_NAME = "hf-stage-attribution-ledger"
#: 1: curvature segments hold θ_mid snapshots and full second moments; 2: segments say how they store them
#: (``params``: snapshot | interpolated, ``moments``: full | factored); 3: a stage may store a half-precision
#: weight's Δ in that dtype, the entries it would round as a sparse float32 residual (``delta_residual_file``).
#: All are read.
FORMAT_VERSION = 3
#: the version written in a file that uses nothing newer, so that older releases keep reading such ledgers
BASE_FORMAT_VERSION = 2
MAX_NAME_LENGTH = 256
MAX_COUNT = 10**12

STAGE_KINDS = (
    "pretraining",
    "fine-tuning",
    "sft",
    "lora",
    "dpo",
    "grpo",
    "reward",
    "kto",
    "rloo",
    "ppo",
    "distillation",
    "custom",
    "untracked",
    "imported",
)

LEDGER_KEYS = {"format", "format_version", "created_with", "created_at", "model", "start", "stages"}
STAGE_ENTRY_KEYS = {"index", "name", "kind", "dir", "start_hash", "end_hash", "chain_hash", "files"}
STAGE_KEYS = {
    "format_version", "index", "name", "kind", "trainer", "training_arguments", "optimizer", "learning_rates",
    "num_steps", "gradient_clipping", "gradient_accumulation_steps", "seed", "epochs", "datasets",
    "peft_config", "lora", "trainable_parameters", "optimizer_state_policy", "optimizer_state_file",
    "start_hash", "end_hash", "end_digests", "wall_time_seconds", "started_at", "finished_at", "segments",
    "curvature_loss", "trl", "replay", "notes", "delta_file", "lora_file", "world_size", "framework_versions",
    "source", "recipe", "metadata", "estimator_availability", "skipped_steps", "early_checkpoint",
    "changed_without_grad", "unstepped_parameters", "scheduler", "delta_residual_file", "training_precision",
}  # fmt: skip

_HEX = re.compile(r"^[0-9a-f]{16,128}$")


def _fail(path: Path, what: str, found: Any, fix: str = "") -> LedgerFormatError:
    shown = repr(found)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return LedgerFormatError(f"{path}: expected {what}, found {shown}.{(' ' + fix) if fix else ''}")


def warn_unknown_keys(path: Path, data: dict, known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(
            f"{path}: ignoring keys this version of hf-stage-attribution does not know: {', '.join(unknown)} "
            "(written by a newer version?).",
            stacklevel=3,
        )


def check_version(path: Path, data: Any) -> None:
    if not isinstance(data, dict):
        raise _fail(path, "a JSON object", type(data).__name__)
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, "an integer `format_version` >= 1", version)
    if version > FORMAT_VERSION:
        raise LedgerFormatError(
            f"{path}: format_version {version} is newer than this library reads ({FORMAT_VERSION}). "
            "Upgrade hf-stage-attribution (`pip install -U hf-stage-attribution`) to read this ledger."
        )


def check_name(path: Path, name: Any, what: str = "a stage name") -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise _fail(path, f"{what}: a non-empty string of at most {MAX_NAME_LENGTH} characters", name)
    if any(ord(c) < 32 for c in name):
        raise _fail(path, f"{what} without control characters", name)
    return name


def check_count(path: Path, value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise _fail(path, f"`{what}`: an integer between 0 and {MAX_COUNT}", value)
    return value


def check_hash(path: Path, value: Any, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _HEX.match(value):
        raise _fail(path, f"`{what}`: a lowercase hex digest", value)
    return value


MAX_PATH_LENGTH = 1024
MAX_PATH_PART = 255


def check_relative_path(path: Path, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value.startswith(("/", "\\")) or ":" in value:
        raise UnsafeInputError(f"{path}: expected `{what}` to be a relative path inside the ledger, found {value!r}.")
    if any(part in ("..", "") for part in Path(value).parts):
        raise UnsafeInputError(f"{path}: `{what}` = {value!r} would leave the ledger directory.")
    if (
        any(ord(c) < 32 or c == "\x7f" for c in value)
        or len(value) > MAX_PATH_LENGTH
        or any(len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_PART for part in Path(value).parts)
    ):
        raise _fail(
            path, f"`{what}`: a path without control characters, of at most {MAX_PATH_LENGTH} characters", value
        )
    return value


def check_digest_map(path: Path, value: Any, what: str) -> dict[str, str]:
    """``{parameter name: hex digest}`` (per-tensor digests of a state)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(path, f"`{what}`: an object mapping parameter names to digests", value)
    for name, digest in value.items():
        check_hash(path, digest, f"{what}[{name!r}]")
    return value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_NUMBER_KEYS = ("lr", "weight_decay", "momentum", "dampening", "alpha", "lr_decay", "initial_accumulator_value")
_NUMBER_OR_LIST_KEYS = ("eps", "betas")
_FLAG_KEYS = ("nesterov", "amsgrad", "maximize", "centered", "decoupled_weight_decay")


def check_hyperparameters(path: Path, group: dict) -> None:
    """The hyperparameters readers compute with: numbers (or lists of numbers) and flags, or null."""
    for key in _NUMBER_KEYS:
        if group.get(key) is not None and not _is_number(group[key]):
            raise _fail(path, f"param group `{key}`: a finite number or null", group[key])
    for key in _NUMBER_OR_LIST_KEYS:
        value = group.get(key)
        listed = isinstance(value, list) and bool(value) and all(_is_number(x) for x in value)
        if value is not None and not _is_number(value) and not listed:
            raise _fail(path, f"param group `{key}`: a finite number, a list of them, or null", value)
    for key in _FLAG_KEYS:
        if group.get(key) is not None and not isinstance(group[key], bool):
            raise _fail(path, f"param group `{key}`: true, false or null", group[key])


def check_lora(path: Path, lora: Any) -> None:
    """``lora``: ``{"modules": {base name: {"scaling": number, "fan_in_fan_out": bool, ...}}, ...}``."""
    if lora is None:
        return
    if not isinstance(lora, dict) or not isinstance(lora.get("modules", {}), dict):
        raise _fail(path, "`lora`: an object with a `modules` object", lora)
    for name, spec in lora.get("modules", {}).items():
        if (
            not isinstance(spec, dict)
            or not _is_number(spec.get("scaling"))
            or not isinstance(spec.get("fan_in_fan_out", False), bool)
            or not isinstance(spec.get("layer_type", "linear"), str)
        ):
            raise _fail(
                path, f"`lora.modules[{name!r}]`: an object with a finite `scaling` and boolean `fan_in_fan_out`", spec
            )
    dense = lora.get("dense_modules", [])
    if not isinstance(dense, list) or not all(isinstance(x, str) for x in dense):
        raise _fail(path, "`lora.dense_modules`: a list of names", dense)


def check_datasets(path: Path, datasets: Any) -> None:
    """``datasets``: a list of objects whose ``name``/``fingerprint`` are strings and ``size`` a count."""
    if datasets is None:
        return
    if not isinstance(datasets, list):
        raise _fail(path, "`datasets`: a list of objects", datasets)
    for d in datasets:
        if not isinstance(d, dict):
            raise _fail(path, "each `datasets` entry to be an object", d)
        for key in ("name", "fingerprint", "revision", "split", "config"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise _fail(path, f"`datasets[].{key}`: a string", d[key])
        if d.get("size") is not None:
            check_count(path, d["size"], "datasets[].size")


def validate_ledger(path: Path, data: Any) -> dict:
    """Validate a parsed ``ledger.json``; return it (unknown keys warned about, not removed)."""
    check_version(path, data)
    if data.get("format") != FORMAT_NAME:
        raise _fail(path, f"`format` = {FORMAT_NAME!r}", data.get("format"), "Is this an hf-stage-attribution ledger?")
    warn_unknown_keys(path, data, LEDGER_KEYS)
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("parameters"), list):
        raise _fail(path, "`model.parameters`: a list of [name, shape] pairs", model)
    seen: set[str] = set()
    for item in model["parameters"]:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_COUNT for d in item[1])
        ):
            raise _fail(path, "a [name, [non-negative dims...]] pair in `model.parameters`", item)
        if item[0] in seen:
            raise _fail(path, "unique parameter names", item[0])
        seen.add(item[0])
    start = data.get("start")
    if not isinstance(start, dict):
        raise _fail(path, "`start`: an object describing the initial parameters (file, state_hash)", start)
    check_relative_path(path, start.get("file"), "start.file")
    check_hash(path, start.get("state_hash"), "start.state_hash")
    check_digest_map(path, start.get("digests", {}), "start.digests")
    stages = data.get("stages")
    if not isinstance(stages, list):
        raise _fail(path, "`stages`: a list", stages)
    names: set[str] = set()
    for position, entry in enumerate(stages):
        if not isinstance(entry, dict):
            raise _fail(path, "a stage entry object", entry)
        warn_unknown_keys(path, entry, STAGE_ENTRY_KEYS)
        if entry.get("index") != position:
            raise _fail(path, f"stage entry {position} to have `index` {position}", entry.get("index"))
        name = check_name(path, entry.get("name"))
        if name in names:
            raise _fail(path, "unique stage names", name)
        names.add(name)
        rel = check_relative_path(path, entry.get("dir"), f"stages[{position}].dir")
        if not rel.startswith("stages/"):
            raise UnsafeInputError(f"{path}: stage directory {rel!r} must be under stages/.")
        for key in ("start_hash", "end_hash", "chain_hash"):
            check_hash(path, entry.get(key), f"stages[{position}].{key}")
        files = entry.get("files", {})
        if not isinstance(files, dict):
            raise _fail(path, f"`stages[{position}].files`: an object", files)
        for rel_file, digest in files.items():
            check_relative_path(path, rel_file, f"stages[{position}].files key")
            check_hash(path, digest, f"stages[{position}].files[{rel_file!r}]")
    return data


def validate_stage(path: Path, data: Any, expected_name: str) -> dict:
    """Validate a parsed ``stage.json``."""
    check_version(path, data)
    warn_unknown_keys(path, data, STAGE_KEYS)
    if check_name(path, data.get("name")) != expected_name:
        raise _fail(path, f"the stage named {expected_name!r} (as in ledger.json)", data.get("name"))
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        raise _fail(path, "`kind`: a non-empty string", kind)
    steps = check_count(path, data.get("num_steps"), "num_steps")
    lrs = data.get("learning_rates", [])
    if not isinstance(lrs, list) or len(lrs) != steps:
        raise _fail(
            path,
            f"`learning_rates`: a list with one entry per step ({steps})",
            f"{type(lrs).__name__} of {len(lrs) if isinstance(lrs, list) else '?'}",
        )
    for row in lrs:
        if not isinstance(row, list) or not all(_is_number(x) for x in row):
            raise _fail(path, "each `learning_rates` entry to be a list of finite numbers (one per param group)", row)
    skipped = data.get("skipped_steps", [])  # absent (ledgers before it existed): every step was applied
    if (
        not isinstance(skipped, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < steps for t in skipped)
        or len(set(skipped)) != len(skipped)
    ):
        raise _fail(path, f"`skipped_steps`: distinct step indices in [0, {steps})", skipped)
    opt = data.get("optimizer")
    if opt is not None:
        if (
            not isinstance(opt, dict)
            or not isinstance(opt.get("type"), str)
            or not isinstance(opt.get("param_groups"), list)
        ):
            raise _fail(path, "`optimizer`: an object with `type` and `param_groups`", opt)
        for group in opt["param_groups"]:
            if (
                not isinstance(group, dict)
                or not isinstance(group.get("params", []), list)
                or not all(isinstance(x, str) for x in group.get("params", []))
            ):
                raise _fail(path, "each param group to be an object with a `params` list of names", group)
            check_hyperparameters(path, group)
    trainable = data.get("trainable_parameters", [])
    if not isinstance(trainable, list) or not all(isinstance(x, str) for x in trainable):
        raise _fail(path, "`trainable_parameters`: a list of names", trainable)
    unflagged = data.get("changed_without_grad", [])  # absent (ledgers before it existed): none is known
    if not isinstance(unflagged, list) or not all(isinstance(x, str) and x in trainable for x in unflagged):
        raise _fail(path, "`changed_without_grad`: a list of names from `trainable_parameters`", unflagged)
    unstepped = data.get("unstepped_parameters", [])  # absent (ledgers before it existed): every one was stepped
    if not isinstance(unstepped, list) or not all(isinstance(x, str) and x in trainable for x in unstepped):
        raise _fail(path, "`unstepped_parameters`: a list of names from `trainable_parameters`", unstepped)
    policy = data.get("optimizer_state_policy", "fresh")
    if policy not in ("fresh", "continued", "unknown"):
        raise _fail(path, "`optimizer_state_policy` in fresh/continued/unknown", policy)
    segments = data.get("segments", [])
    if not isinstance(segments, list):
        raise _fail(path, "`segments`: a list", segments)
    for position, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise _fail(path, "a segment object", seg)
        if check_count(path, seg.get("index"), "segments[].index") != position:
            raise _fail(path, f"segment {position} to have `index` {position}", seg.get("index"))
        check_count(path, seg.get("num_examples", 0), "segments[].num_examples")
        if seg.get("batch_layout", "dict") not in ("tensor", "tuple", "dict"):
            raise _fail(path, "`segments[].batch_layout` in tensor/tuple/dict", seg.get("batch_layout"))
        start, end, mid = (
            check_count(path, seg.get(k), f"segments[].{k}") for k in ("step_start", "step_end", "mid_step")
        )
        if not start <= mid < end <= steps:
            raise _fail(path, f"segment steps with step_start <= mid_step < step_end <= num_steps ({steps})", seg)
        check_relative_path(path, seg.get("dir"), "segments[].dir")
        if seg.get("params", "snapshot") not in ("snapshot", "interpolated"):
            raise _fail(path, "`segments[].params` in snapshot/interpolated", seg.get("params"))
        if seg.get("moments", "full") not in ("full", "factored"):
            raise _fail(path, "`segments[].moments` in full/factored", seg.get("moments"))
    for key in ("delta_file", "lora_file", "optimizer_state_file", "delta_residual_file"):
        if data.get(key) is not None:
            check_relative_path(path, data[key], key)
    if data.get("delta_residual_file") is not None and (data.get("delta_file") is None or data["format_version"] < 3):
        raise _fail(path, "`delta_residual_file` only beside a `delta_file`, in format_version 3 or later", data)
    early = data.get("early_checkpoint")
    if early is not None:
        if not isinstance(early, dict):
            raise _fail(path, "`early_checkpoint`: an object with `steps` and two file names", early)
        if not 0 < check_count(path, early.get("steps"), "early_checkpoint.steps") < steps:
            raise _fail(path, f"`early_checkpoint.steps` in [1, num_steps) = [1, {steps})", early.get("steps"))
        for key in ("params_delta_file", "optimizer_state_file"):
            check_relative_path(path, early.get(key), f"early_checkpoint.{key}")
    precision = data.get("training_precision")  # absent: float32, or a ledger from before the field (its notes say)
    if precision is not None and (
        not isinstance(precision, dict)
        or not precision
        or set(precision) - {"mixed", "weights"}
        or precision.get("mixed", "bf16") not in ("bf16", "fp16")
        or not isinstance(precision.get("weights", []), list)
        or not all(w in ("bfloat16", "float16") for w in precision.get("weights", []))
    ):
        raise _fail(
            path, '`training_precision`: an object such as {"mixed": "bf16"} or {"weights": ["bfloat16"]}', precision
        )
    check_lora(path, data.get("lora"))
    if data.get("lora_file") is not None and data.get("lora") is None:
        raise _fail(path, "a `lora` description next to `lora_file`", None)
    check_digest_map(path, data.get("end_digests", {}), "end_digests")
    check_datasets(path, data.get("datasets"))
    loss = data.get("curvature_loss")
    if loss is not None and (not isinstance(loss, dict) or not isinstance(loss.get("type", ""), str)):
        raise _fail(path, '`curvature_loss`: an object such as {"type": "causal-lm"}', loss)
    trainer = data.get("trainer")
    if trainer is not None and not isinstance(trainer, (str, dict)):
        raise _fail(path, "`trainer`: a class name or an object", trainer)
    return data
