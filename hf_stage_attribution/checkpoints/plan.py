"""Planning an import before any tensor is written: the parameter space, the state at each boundary, what is known
of each stage's training, and which estimators that information supports.

Everything here reads headers and JSON only (plus LoRA factors, which are small), so errors in a late boundary
(a missing revision, another architecture, a pickle) surface before the first byte of the ledger is written.

Example, for the ``boundaries`` of :meth:`StageLedger.from_checkpoints`::

    plan = build_plan([locate(b) for b in parse_boundaries(boundaries)])
    plan.names[:3], plan.stages[0].availability["available"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointImportError, CheckpointMismatchError
from ..ledger.optimizer_info import recorded_family
from .hub import CheckpointLocation
from .lora import AdapterDelta, read_adapter
from .model import parameter_names
from .tensors import AdapterState, CheckpointState, FullState, TensorReader, growth
from .trainer import TrainingInfo, training_info

ALWAYS = ["delta-linear", "delta-fd"]
NO_CURVATURE = "imported checkpoints carry no curvature material (segments with training examples)"
NO_REPLAY = "replay needs each stage's training data and recipe: pass stage_fns to the attributor to replay"


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

    @property
    def name(self) -> str:
        return self.location.boundary.name

    @property
    def propagatable(self) -> bool:
        """Whether ``D_j`` of this stage is known (optimizer + rates, or an adapter that leaves base weights be)."""
        if self.info.optimizer is not None and self.info.learning_rates:
            return recorded_family(self.info.optimizer) is not None
        return self.adapter is not None and not self.adapter.replaced

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


def _parameter_keys(reader: TensorReader, loc: CheckpointLocation, notes: list[str]) -> list[str]:
    """The stored tensors that are parameters: floating point, and (with a buildable config) the model's own."""
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
        if k == len(stages) - 1 and stage.adapter is not None:
            available.append("lora-exact")
            reason += "; a terminal LoRA adapter stage (lora-exact is exact)"
        else:
            unavailable["lora-exact"] = "only for a terminal LoRA adapter stage"
        stage.availability = {"available": available, "unavailable": unavailable, "reason": reason}


def build_plan(locations: list[CheckpointLocation]) -> ImportPlan:
    """Check the boundaries against each other and plan every stage (headers and JSON only)."""
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
    readers: list[TensorReader | None] = [first_reader]
    resized_at: list[dict[str, dict]] = [{}]
    for loc in locations[1:]:
        if loc.is_adapter:
            readers.append(_reader(loc))
            resized_at.append({})
            continue
        reader = _reader(loc)
        keys = _parameter_keys(reader, loc, [])
        _check_same_model(first, loc, names, keys)
        resized = {}
        for n in names:
            dim = growth(n, current[n], reader.shape(n), loc.boundary.label())
            if dim is not None:
                resized[n] = {"from": list(current[n]), "to": list(reader.shape(n)), "dim": dim}
                current[n] = reader.shape(n)
        readers.append(reader)
        resized_at.append(resized)
    shapes = dict(current)
    state: CheckpointState = FullState(first_reader, {n: n for n in names}, shapes)
    start_state, stages = state, []
    for k, loc in enumerate(locations[1:], start=1):
        adapter = None
        if loc.is_adapter:
            adapter = read_adapter(readers[k], loc.adapter_config or {}, shapes, loc.boundary.label())
            state = AdapterState(state, adapter, shapes)
        else:
            state = FullState(readers[k], {n: n for n in names}, shapes)
        info = training_info(loc, locations[k - 1], names, sorted(adapter.replaced) if adapter else None)
        kind = loc.boundary.kind or ("lora" if adapter else "imported")
        notes = [_resize_note(n, tuple(r["from"]), tuple(r["to"]), r["dim"]) for n, r in resized_at[k].items()]
        notes += info.notes + (adapter.notes if adapter else [])
        stages.append(StagePlan(loc, state, info, kind, adapter, resized_at[k], notes))
    availability(stages)
    model_class = ((first.config or {}).get("architectures") or ["unknown"])[0]
    return ImportPlan(first, start_state, names, shapes, str(model_class), stages, ledger_notes)
