"""Planning an import before any tensor is written: the parameter space, the state at each boundary, what is known
of each stage's training, and which estimators that information supports.

Everything here reads headers and JSON only (plus LoRA factors, which are small), so errors in a late boundary
(a missing revision, another architecture, a pickle) surface before the first byte of the ledger is written.

Example, for the ``boundaries`` of :meth:`StageLedger.from_checkpoints`::

    plan = build_plan([locate(b) for b in parse_boundaries(boundaries)])
    plan.names[:3], plan.stages[0].availability["available"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointImportError, CheckpointMismatchError
from ..ledger.optimizer_info import recorded_family
from .hub import CheckpointLocation
from .lora import AdapterDelta, StageFactors, read_adapter, stage_factors
from .model import embedding_parameters, parameter_names, tied_parameters
from .tensors import AdapterState, CheckpointState, FullState, TensorReader, growth
from .trainer import TrainingInfo, training_info

ALWAYS = ["delta-linear", "delta-fd"]
NO_CURVATURE = "imported checkpoints carry no curvature material (segments with training examples)"
NO_REPLAY = "replay needs each stage's training data and recipe: pass stage_fns to the attributor to replay"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
_CONFIG_HOUSEKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
_QUANTIZED_SUFFIXES = (
    ".weight_scale_inv", ".weight_scale", ".input_scale", ".absmax", ".quant_map", ".nested_absmax",
    ".nested_quant_map", ".SCB", ".weight_format", ".qweight", ".qzeros", ".g_idx",
)  # fmt: skip


@dataclass
class StagePlan:
    """One stage to write: its boundary, state, training information, adapter (if any) and notes."""

    location: CheckpointLocation
    state: CheckpointState
    info: TrainingInfo
    kind: str
    adapter: AdapterDelta | None = None
    resized: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    availability: dict[str, Any] = field(default_factory=dict)
    factors: StageFactors | None = None  # what an adapter stage stores (see lora.stage_factors)

    @property
    def name(self) -> str:
        return self.location.boundary.name

    @property
    def propagatable(self) -> bool:
        """Whether ``D_j`` of this stage is known (optimizer + rates, or an adapter that leaves base weights be)."""
        if self.info.optimizer is not None and self.info.learning_rates:
            return recorded_family(self.info.optimizer) is not None
        return self.factors is not None and not self.factors.dense

    def why_not_propagatable(self) -> str:
        if self.info.optimizer is not None:
            return f"no propagation rule for optimizer {self.info.optimizer.get('type')!r}"
        return self.info.missing or "optimizer unknown"


@dataclass
class ImportPlan:
    """The whole import: start location/state, parameter names and (final) shapes, the stages, ledger notes."""

    start: CheckpointLocation
    start_state: CheckpointState
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    model_class: str
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)


def _reader(loc: CheckpointLocation) -> TensorReader:
    return TensorReader(loc.weight_files, pickled=loc.weight_format.endswith("pickle"))


def _check_not_quantized(reader: TensorReader, loc: CheckpointLocation) -> None:
    """Refuse a quantized checkpoint: its tensors are codes and scales, whose differences are not weight changes."""
    config = (loc.config or {}).get("quantization_config")
    found = None
    if config:
        method = config.get("quant_method") if isinstance(config, dict) else None
        found = f"config.json has a quantization_config (quant_method {method!r})"
    else:
        names = reader.names()
        fp8 = [k for k in names if "F8" in reader.dtype(k).upper() or "float8" in reader.dtype(k)]
        codes = [k for k in names if not reader.is_float(k) and k.endswith((".weight", "qweight"))]
        scales = [k for k in names if k.endswith(_QUANTIZED_SUFFIXES) or ".quant_state." in k]
        for keys, what in ((fp8, "float8"), (codes, "integer"), (scales, "quantization-scale")):
            if keys:
                found = f"{len(keys)} {what} tensor(s) such as {keys[0]!r} ({reader.dtype(keys[0])})"
                break
    if found:
        raise CheckpointImportError(
            f"{loc.boundary.label()}: expected a checkpoint that stores the model's weights in floating point, found "
            f"a quantized one: {found}. Its tensors are quantization codes and scales, so their differences are not "
            "the weight changes of training. Dequantize it and save it in float32 or bfloat16 (e.g. load it with "
            "transformers — FP8: quantization_config=FineGrainedFP8Config(dequantize=True); bitsandbytes: "
            "model.dequantize() — and save_pretrained()), then import that folder."
        )


def _parameter_keys(reader: TensorReader, loc: CheckpointLocation, notes: list[str]) -> list[str]:
    """The stored tensors that are parameters: floating point, and (with a buildable config) the model's own.
    Quantized checkpoints are refused."""
    _check_not_quantized(reader, loc)
    floats = [k for k in reader.names() if reader.is_float(k)]
    if len(floats) < len(reader.names()):
        skipped = [k for k in reader.names() if not reader.is_float(k)]
        notes.append(f"{len(skipped)} non-floating-point tensor(s) left out of the ledger, e.g. {skipped[0]!r}.")
    model_names = parameter_names(loc.config)
    if model_names is None:
        return floats
    if set(model_names) <= set(floats):
        extra = [k for k in floats if k not in set(model_names)]
        if extra:
            notes.append(
                f"{len(extra)} stored tensor(s) are not parameters of {loc.config['architectures'][0]} (buffers or "
                f"tied copies, e.g. {extra[0]!r}) and are left out of the ledger."
            )
        return model_names
    notes.append(
        f"Parameter names kept as stored: they differ from {loc.config['architectures'][0]}'s parameter names "
        f"(e.g. {sorted(set(model_names) - set(floats))[:1]})."
    )
    return floats


def _check_same_model(first: CheckpointLocation, loc: CheckpointLocation, names: list[str], keys: list[str]) -> None:
    label = loc.boundary.label()
    a, b = (first.config or {}).get("model_type"), (loc.config or {}).get("model_type")
    if a and b and a != b:
        raise CheckpointMismatchError(
            f"{label} is a {b!r} model but the first boundary ({first.boundary.label()}) is a {a!r} model: a ledger "
            "follows one architecture. Import checkpoints of the same model."
        )
    missing, extra = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{label} has a different architecture from {first.boundary.label()}: {len(missing)} tensor(s) missing "
            f"(e.g. {missing[:2]}) and {len(extra)} extra (e.g. {extra[:2]}). Import checkpoints of one model."
        )


def _vocab_size(config: dict | None) -> int | None:
    value = (config or {}).get("vocab_size")
    if value is None and isinstance((config or {}).get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value if isinstance(value, int) else None


def _config_changes(before: dict | None, after: dict | None) -> list[str]:
    """``"field: before -> after"`` for the config.json fields (bar housekeeping ones) that differ."""
    if not before or not after:
        return []
    keys = sorted((set(before) | set(after)) - _CONFIG_HOUSEKEEPING)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


def _grown(
    prev: CheckpointLocation, loc: CheckpointLocation, current: dict, reader: TensorReader, names: list[str]
) -> dict[str, dict]:
    """``source["resized"]`` of the full boundary ``loc`` against the shapes so far; an error unless a resized
    vocabulary (see :func:`~.checkpoints.tensors.growth`)."""
    changed = {n: (current[n], reader.shape(n)) for n in names if reader.shape(n) != current[n]}
    if not changed:
        return {}
    label = f"{loc.boundary.label()} (previous full boundary: {prev.boundary.label()})"
    vocab = (_vocab_size(prev.config), _vocab_size(loc.config))
    dims = growth(changed, embedding_parameters(loc.config), vocab, _config_changes(prev.config, loc.config), label)
    return {n: {"from": list(changed[n][0]), "to": list(changed[n][1]), "dim": d} for n, d in dims.items()}


def _base_of(config: dict) -> tuple[str | None, str | None]:
    return config.get("base_model_name_or_path") or None, config.get("revision") or None


def _same_base(prev: CheckpointLocation, loc: CheckpointLocation) -> str:
    """Why the adapter ``loc`` was trained on the base of the adapter ``prev`` right before it (so it replaces that
    adapter rather than stacking on it); an error where the boundaries do not tell."""
    label, before = loc.boundary.label(), prev.boundary.label()
    bases = [_base_of(prev.adapter_config or {}), _base_of(loc.adapter_config or {})]
    named = all(base[0] for base in bases)
    merged = (
        "if this adapter was trained on the previous one merged into its base, replace the previous boundary with "
        "that merged model (PeftModel.merge_and_unload() + save_pretrained())"
    )
    if named and bases[0] != bases[1]:
        raise CheckpointImportError(
            f"{label} is a PEFT adapter trained on {bases[1]} but the adapter before it ({before}) on {bases[0]} "
            "(base_model_name_or_path, revision): expected consecutive adapters to be versions of one adapter on "
            f"one base model. Put the base model this adapter was trained on before it; or, {merged}."
        )
    runs = [f.parent.resolve() for f in (prev.directory, loc.directory) if _CHECKPOINT_DIR.match(f.name)]
    if len(runs) == 2 and runs[0] == runs[1]:
        return f"checkpoints of one Trainer run ({loc.directory.parent})"
    hub = prev.source.get("location") == loc.source.get("location") == "hub"
    if hub and (prev.boundary.model, prev.boundary.subfolder) == (loc.boundary.model, loc.boundary.subfolder):
        return f"revisions of one adapter repo ({loc.boundary.model})"
    if named:
        return f"adapters of one base model ({bases[1][0]}{'@' + bases[1][1] if bases[1][1] else ''})"
    raise CheckpointImportError(
        f"{label} is a PEFT adapter right after another adapter ({before}), and the base it was trained on cannot "
        "be decided: expected checkpoint-<step> folders of one Trainer run, revisions of one Hub repo, or "
        "adapter_config.json files naming the same base_model_name_or_path, found base_model_name_or_path "
        f"{bases[0][0]!r} and {bases[1][0]!r}. If both were trained on the same base model, set it in both "
        f"adapter_config.json files; {merged}."
    )


def _resize_note(name: str, before: tuple, after: tuple, dim: int) -> str:
    return (
        f"Resized {name!r} from {list(before)} to {list(after)} along dimension {dim}: the delta covers the overlap "
        f"(indices < {before[dim]}); indices {before[dim]}..{after[dim] - 1} were added by this stage and their "
        "delta is their full value (earlier states are zero-padded there in the ledger's parameter space)."
    )


def availability(stages: list[StagePlan]) -> None:
    """Fill ``stage.availability``: the estimators the imported information supports, and why (ESTIMATORS.md §3-4)."""
    for k, stage in enumerate(stages):
        blocking = [s for s in stages[k + 1 :] if not s.propagatable]
        available, unavailable = list(ALWAYS), {"aa-ggn": NO_CURVATURE, "aa-hvp": NO_CURVATURE, "replay": NO_REPLAY}
        if blocking:
            why = "; ".join(f"{s.name}: {s.why_not_propagatable()}" for s in blocking)
            reason = f"later stage(s) lack optimizer information, so their propagation D_j is unknown ({why})"
            unavailable["aa-linear"] = unavailable["aa-fd"] = reason
        else:
            available += ["aa-linear", "aa-fd"]
            reason = (
                "every later stage has optimizer information, so aa-* can propagate this stage's delta"
                if k + 1 < len(stages)
                else "the last stage: no later stage moves its delta, so aa-* equals delta-*"
            )
        continued = stage.factors is not None and stage.factors.continued
        if k == len(stages) - 1 and stage.adapter is not None and not continued:
            available.append("lora-exact")
            reason += "; a terminal LoRA adapter stage (lora-exact is exact)"
        elif continued:
            unavailable["lora-exact"] = (
                "this adapter replaces the previous stage's adapter on the same base: disabling it would also undo "
                "the previous stage"
            )
        else:
            unavailable["lora-exact"] = "only for a terminal LoRA adapter stage"
        stage.availability = {"available": available, "unavailable": unavailable, "reason": reason}


def build_plan(locations: list[CheckpointLocation]) -> ImportPlan:
    """Check the boundaries against each other and plan every stage (headers and JSON only).

    A full boundary's stage goes from the previous boundary's state to it. An adapter is applied to the last full
    boundary before it: after a full boundary that is the previous state (the adapter's stage is its delta); after
    another adapter of the same base (:func:`_same_base`) it replaces that adapter, and its stage is the difference
    of the two adapters (an adapter trained on a merged earlier adapter is imported through that merged model).
    """
    first = locations[0]
    if first.is_adapter:
        raise CheckpointImportError(
            f"The first boundary ({first.boundary.label()}) is a PEFT adapter; the start θ_0 must be a full model "
            "checkpoint (the adapter's base model)."
        )
    ledger_notes: list[str] = []
    first_reader = _reader(first)
    names = _parameter_keys(first_reader, first, ledger_notes)
    current = {n: first_reader.shape(n) for n in names}
    readers: list[TensorReader] = [first_reader]
    resized_at: list[dict[str, dict]] = [{}]
    last_full = first
    for loc in locations[1:]:
        reader = _reader(loc)
        readers.append(reader)
        if loc.is_adapter:
            resized_at.append({})
            continue
        _check_same_model(first, loc, names, _parameter_keys(reader, loc, []))
        resized = _grown(last_full, loc, current, reader, names)
        current.update({n: tuple(r["to"]) for n, r in resized.items()})
        resized_at.append(resized)
        last_full = loc
    shapes = dict(current)
    tied = tied_parameters(first.config)
    full_state: CheckpointState = FullState(first_reader, {n: n for n in names}, shapes)
    start_state, stages, previous = full_state, [], None
    for k, loc in enumerate(locations[1:], start=1):
        notes = [_resize_note(n, tuple(r["from"]), tuple(r["to"]), r["dim"]) for n, r in resized_at[k].items()]
        adapter, factors = None, None
        if loc.is_adapter:
            adapter = read_adapter(readers[k], loc.adapter_config or {}, shapes, loc.boundary.label(), tied)
            if previous is not None:
                why = _same_base(locations[k - 1], loc)
                notes.append(
                    f"This adapter and the previous stage's are {why}, trained on the same base: it replaces that "
                    "adapter, and this stage's delta is the difference of the two (factors A/B minus A0/B0)."
                )
            factors = stage_factors(adapter, previous)
            state: CheckpointState = AdapterState(full_state, adapter, shapes)
        else:
            full_state = state = FullState(readers[k], {n: n for n in names}, shapes)
        previous = adapter
        info = training_info(loc, locations[k - 1], names, factors.dense if factors else None)
        kind = loc.boundary.kind or ("lora" if adapter else "imported")
        notes += info.notes + (adapter.notes if adapter else [])
        stages.append(StagePlan(loc, state, info, kind, adapter, resized_at[k], notes, factors=factors))
    availability(stages)
    model_class = ((first.config or {}).get("architectures") or ["unknown"])[0]
    return ImportPlan(first, start_state, names, shapes, str(model_class), stages, ledger_notes)
