"""Computing and writing the stage-embedding cache (used by :func:`.embeddings.stage_embeddings`).

``aa-linear`` is computed tensor by tensor (one parameter tensor of every requested stage in memory at a time) and
streamed into the safetensors file. ``aa-ggn``/``aa-hvp`` need whole vectors (curvature couples tensors): one ``v_k``
at a time is carried through the later stages, written to a temporary file, and the temporary files are then
streamed into the cache.

Called by :func:`.embeddings.stage_embeddings` (whose docstring has a runnable example), e.g.::

    write_linear(ledger, path, [0, 1], False, metadata)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import MissingCurvatureError
from ...ledger.core import LedgerCore
from ...ledger.storage import open_safetensors, write_safetensors, write_safetensors_stream
from ..curvature.propagation import check_curvature_memory, propagate
from ..propagation.rules import first_moment_key, recorded_family
from ..propagation.stage import StagePropagator, iter_propagated, momentum_tail, next_trained


def _propagators(ledger: LedgerCore, first: int, allow_identity: bool) -> dict[int, StagePropagator]:
    stages = ledger.stages
    return {
        j: StagePropagator(stages[j], next_trained(stages, j), allow_identity) for j in range(first + 1, len(stages))
    }


def _tail_names(ledger: LedgerCore, k: int, states: dict[int, Any]) -> set[str]:
    following = next_trained(ledger.stages, k)
    if following is None or following.optimizer_state_policy != "continued" or not ledger.stages[k].num_steps:
        return set()
    key = first_moment_key(recorded_family(following.optimizer) or "")
    if key is None:
        return set()
    if following.index not in states:
        states[following.index] = following.optimizer_state_at_start()
    return set((states[following.index] or {}).get(key, {}))


def _tail_notes(ledger: LedgerCore, tails: set[int]) -> list[str]:
    notes = []
    for k in sorted(tails):
        removed, following = ledger.stages[k], next_trained(ledger.stages, k)
        family = recorded_family(following.optimizer)
        groups = (following.optimizer or {}).get("param_groups", [])
        if family == "sgd" and removed.optimizer_state_policy != "continued":
            if any(float(g.get("dampening") or 0.0) for g in groups):
                notes.append(
                    f"Momentum tail of {removed.name!r} into {following.name!r}: the counterfactual SGD buffer is "
                    "taken as zero (the removed stage started fresh); with dampening the first step differs."
                )
        elif family in ("adam", "adamw", "rmsprop"):
            notes.append(
                f"Momentum tail of {removed.name!r} into {following.name!r}: first-moment difference carried with "
                "the preconditioner frozen at the recorded second moments; the second-moment difference and "
                "bias-correction offsets are ignored."
            )
    return notes


def _diagnostics(ledger: LedgerCore, props: dict[int, StagePropagator]) -> dict[str, Any]:
    factors: dict[str, dict[str, float | str]] = {}
    for prop in props.values():
        groups = (prop.stage.optimizer or {}).get("param_groups", []) if prop.family else []
        entry: dict[str, float | str] = {}
        for index, group in enumerate(groups):
            names = [n for n in group.get("params", []) if prop.rule(n) is not None]
            if names:
                d = prop.factor(names[0])
                entry[f"group {index}"] = "per-coordinate" if d is None else d
        factors[prop.stage.name] = entry or {"all": 1.0}
    return {"D": factors}


def write_linear(ledger: LedgerCore, path: Path, wanted: list[int], allow_identity: bool, meta: dict[str, str]) -> str:
    """Compute ``aa-linear`` embeddings tensor by tensor and stream them into ``path``; return the file's sha256.

    A tensor whose embedding is the recorded delta itself, bit for bit (no later stage changes it: the last stage,
    or later stages that ran Adam or SGD without weight decay), is not copied: the metadata key ``unchanged`` lists
    it (``{k: [names]}``) and :class:`~.cache.StageEmbeddings` reads it from the ledger."""

    stages = ledger.stages
    props = _propagators(ledger, min(wanted) if wanted else len(stages), allow_identity)
    states: dict[int, Any] = {}
    tail_k = {k: _tail_names(ledger, k, states) for k in wanted}
    names_k = {k: set(stages[k].delta_names()) | tail_k[k] for k in wanted}
    unchanged = {
        k: sorted(
            name
            for name in stages[k].delta_names()
            if name not in tail_k[k] and all(props[j].leaves_unchanged(name) for j in range(k + 1, len(stages)))
        )
        for k in wanted
    }
    shapes = ledger.parameter_shapes
    copied = {k: names_k[k] - set(unchanged[k]) for k in wanted}
    order = [(name, [k for k in wanted if name in copied[k]]) for name in ledger.parameter_names]
    order = [(name, ks) for name, ks in order if ks]
    specs = [(f"{k}/{name}", torch.float32, tuple(shapes[name])) for name, ks in order for k in ks]
    tails = {k for k in wanted if tail_k[k]}
    approximations = sorted({a for p in props.values() for a in p.approximations}) + _tail_notes(ledger, tails)
    meta = dict(meta, approximations=json.dumps(approximations), diagnostics=json.dumps(_diagnostics(ledger, props)))
    meta["unchanged"] = json.dumps({str(k): names for k, names in unchanged.items() if names})

    def stream():
        for name, ks in order:
            for k, x in iter_propagated(ledger, name, ks, props, states, set()):
                yield f"{k}/{name}", x.to(torch.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors_stream(path, specs, stream(), meta)


def check_curvature_material(ledger: LedgerCore, first: int, mode: str) -> None:
    """Raise :class:`MissingCurvatureError` naming the first later stage that trained without curvature material."""
    for stage in ledger.stages[first + 1 :]:
        if stage.num_steps and stage.learning_rates and not stage.segments:
            raise MissingCurvatureError(
                f"The `aa-{mode}` estimator needs curvature material for every later stage, but stage {stage.index} "
                f"{stage.name!r} holds none. Record it with curvature segments: `curvature_segments=3` in "
                "StageRecorder / StageLedger.record_stage (custom loops also pass num_steps=..., loss_fn=... and call "
                "rec.step(batch)). Or use estimator='aa-linear', which needs no curvature."
            )


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def write_curvature(
    ledger: LedgerCore,
    path: Path,
    wanted: list[int],
    mode: str,
    allow_identity: bool,
    loss_fns: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    meta: dict[str, str],
) -> str:
    """Compute ``aa-ggn``/``aa-hvp`` embeddings one stage at a time and stream them into ``path``; return the file's
    sha256.

    ``options`` go to :func:`~.curvature.propagate` (``model`` — the architecture, needed for curvature products —,
    ``krylov_size``, ``curvature_scale``, ``sample_size`` ...). The momentum tail enters the stage after the removed
    one as ``initial_buffer``; the first-moment difference leaving a stage enters the next one when it continued.
    """

    stages = ledger.stages
    first = min(wanted) if wanted else len(stages)
    check_curvature_material(ledger, first, mode)
    settings = {k: v for k, v in options.items() if k != "preset"}
    check_curvature_memory(ledger, first, int(settings.get("krylov_size") or 12), f"aa-{mode}")
    states: dict[int, Any] = {}
    approximations: set[str] = set()
    counts = {"curvature_products": 0, "example_products": 0, "unstable_modes": 0, "negative_modes": 0}
    per_pair: dict[str, Any] = {}
    tails: set[int] = set()
    path.parent.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[int, Path]] = []
    try:
        for k in wanted:
            v = dict(stages[k].iter_delta())  # as stored: propagate takes each tensor over in float64 (consume)
            buf = None
            for j in range(k + 1, len(stages)):
                stage = stages[j]
                if not (stage.num_steps and stage.learning_rates):
                    continue  # no optimizer step: the stage leaves v (and the optimizer state) as they are
                if allow_identity and recorded_family(stage.optimizer) is None:
                    approximations.add(
                        f"Stage {stage.name!r}: optimizer {(stage.optimizer or {}).get('type')!r} unknown; deltas "
                        "passed through it with D = 1 (allow_identity_propagation)."
                    )
                    buf = None
                    continue
                init = None
                if stage.optimizer_state_policy == "continued":
                    if stage is next_trained(stages, k):
                        init = {}
                        for name in _tail_names(ledger, k, states):
                            tail = momentum_tail(stages[k], stage, name, states)
                            if tail is not None:
                                init[name] = tail
                        tails |= {k} if init else set()
                    else:
                        init = buf
                # consume: the dicts (or the scratch-file mappings of an earlier stage) are handed over, so that
                # no carried vector is held twice while the stage is propagated
                v, info = propagate(v, ledger, j, mode=mode, loss_fns=loss_fns, initial_buffer=init, consume=True,
                                    **settings)  # fmt: skip
                init = None
                buf = info.get("buffer")
                approximations |= set(info.get("approximations") or [])
                for key in counts:
                    counts[key] += int(info.get(key) or 0)
                per_pair[f"{stages[k].name} -> {stage.name}"] = {key: _json_safe(info.get(key)) for key in counts}
            temp = path.parent / f".{path.stem}-{k}.partial.safetensors"
            write_safetensors(temp, {n: t.to(torch.float32).contiguous() for n, t in v.items()}, durable=False)
            temps.append((k, temp))
            del v, buf
        approximations |= set(_tail_notes(ledger, tails))
        handles = [(k, open_safetensors(t)) for k, t in temps]
        order = [(k, h, n) for k, h in handles for ks in [set(h.keys())] for n in ledger.parameter_names if n in ks]
        specs = [(f"{k}/{name}", torch.float32, tuple(ledger.parameter_shapes[name])) for k, _, name in order]
        used = {k: _json_safe(v) for k, v in options.items() if k != "model"}
        diagnostics = {"curvature": {**counts, "settings": used, "per_stage_pair": per_pair}}
        meta = dict(meta, approximations=json.dumps(sorted(approximations)), diagnostics=json.dumps(diagnostics))
        return write_safetensors_stream(path, specs, ((f"{k}/{n}", h.get_tensor(n)) for k, h, n in order), meta)
    finally:
        for _, temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
