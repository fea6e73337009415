"""Turning per-example stage effects into report rows: means, bootstrap intervals, shares, diagnostics.

Used by :meth:`hf_stage_attribution.report.schema.AttributionReport.build`; kept apart so ``report.py`` stays a plain
results object. numpy only (torch tensors are read through ``.detach()`` without importing torch here).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReportError, StageAttributionError
from ..ledger.core import LedgerCore
from .schema import BehaviorDiagnostics, BehaviorSummary, ReportRow, StageSummary
from .trust import assess_trust, exact_stages

# (linear, finite-difference) estimator pairs whose disagreement is the linearisation gap (ESTIMATORS.md §4)
LINEARISATION_PAIRS = (
    ("aa-linear", "aa-fd"),
    ("aa-ggn", "aa-ggn-fd"),
    ("aa-hvp", "aa-hvp-fd"),
    ("delta-linear", "delta-fd"),
    ("partial-replay-linear", "partial-replay"),
)
#: the finite-difference side of each pair: exact on the ledger's last stage (report/trust.py ``exact_stages``)
FD_READINGS = frozenset(fd for _, fd in LINEARISATION_PAIRS)
_VERSION_DISTS = ("hf-stage-attribution", "torch", "transformers", "trl", "peft", "accelerate", "huggingface_hub")


def json_safe(value: Any) -> Any:
    """Plain JSON values (tensors and numpy values become numbers/lists; non-finite floats become None)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, Sequence):
        return [json_safe(v) for v in value]
    return str(value)


def as_vector(value: Any, what: str) -> np.ndarray:
    """A finite, non-empty float64 vector from a tensor, array, list or scalar; ReportError otherwise."""
    if hasattr(value, "detach"):  # torch.Tensor, any dtype or device
        value = value.detach().to("cpu").double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ReportError(f"Expected numbers for {what}, got {type(value).__name__}: {exc}.") from exc
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise ReportError(f"Expected a non-empty 1-D per-example vector for {what}, got shape {tuple(arr.shape)}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ReportError(
            f"Expected finite effects for {what}, got {arr[bad[0]]} at example {int(bad[0])}: check the behavior "
            "for overflow or a NaN loss."
        )
    return arr


def bootstrap_intervals(
    matrix: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of the row means of ``matrix`` (stages × examples).

    The same resampled example indices are used for every row (a paired bootstrap), drawn from a fresh
    ``numpy.random.default_rng(seed)`` so the result depends only on the inputs. With fewer than 2 examples there is
    no sampling to resample: both ends are ``nan`` (the report stores None and prints no interval).

    Example:
        >>> bootstrap_intervals(np.array([[2.0], [-1.0]]), n_resamples=40)[0].tolist()
        [nan, nan]
    """
    rows, n = matrix.shape
    if n < 2:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled_means(matrix, n_resamples, seed), [alpha, 1.0 - alpha], axis=1)
    return low, high


def resampled_means(matrix: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """The row means of ``matrix`` (stages × examples) over ``n_resamples`` resamples of its examples (rows ×
    resamples): the same example indices for every row (paired), from a fresh ``numpy.random.default_rng(seed)``,
    drawn in chunks that keep the index array below about 2 million entries.

    Example:
        >>> resampled_means(np.array([[1.0, 1.0], [2.0, 4.0]]), n_resamples=3).shape
        (2, 3)
    """
    rows, n = matrix.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // max(1, rows * n)))
    means = np.empty((rows, n_resamples))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = matrix[:, idx].mean(axis=2)
    return means


def replay_top_separation(
    replay: Mapping[str, Any] | None, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any] | None:
    """Whether replay's own examples separate its top stage from the runner-up: a paired percentile bootstrap of
    ``|mean top| − |mean runner-up|`` over the behavior's examples (as :func:`bootstrap_intervals`). Returns
    ``{"top", "runner_up", "difference", "interval", "separated"}``, or None with fewer than 2 stages or 2 examples.
    Replay is exact for the examples it ran on, not for the behavior they sample: two stages whose replay effects
    are within that sampling of each other are not ranked by it.

    Example:
        >>> tie = replay_top_separation({"a": [2.6, 2.7, 2.65], "b": [2.7, 2.6, 2.66]}, n_resamples=200)
        >>> tie["top"], tie["runner_up"], tie["separated"]
        ('b', 'a', False)
        >>> replay_top_separation({"a": [0.1, 0.2, 0.15], "b": [2.7, 2.6, 2.66]}, n_resamples=200)["separated"]
        True
    """
    if not replay or len(replay) < 2:
        return None
    names = list(replay)
    vectors = [as_vector(replay[s], f"replay of stage {s!r}") for s in names]
    if len({v.size for v in vectors}) != 1 or vectors[0].size < 2:
        return None
    matrix = np.stack(vectors)
    order = sorted(range(len(names)), key=lambda k: (-abs(float(matrix[k].mean())), k))
    top, runner = order[0], order[1]
    means = resampled_means(matrix[[top, runner]], n_resamples, seed)  # paired, as the intervals
    diff = np.abs(means[0]) - np.abs(means[1])
    alpha = (1.0 - confidence) / 2.0
    low, high = (float(q) for q in np.quantile(diff, [alpha, 1.0 - alpha]))
    return {
        "top": names[top],
        "runner_up": names[runner],
        "difference": abs(float(matrix[top].mean())) - abs(float(matrix[runner].mean())),
        "interval": [low, high],
        "separated": bool(low > 0.0),
    }


def unseparated_top_two(separation: Mapping[str, Any] | None) -> list[str] | None:
    """``[replay's top, its runner-up]`` where :func:`replay_top_separation` found its examples do not separate them
    (what :func:`~.trust.assess_trust` takes as ``replay_tie``); None otherwise.

    Example:
        >>> unseparated_top_two({"top": "b", "runner_up": "a", "separated": False}), unseparated_top_two(None)
        (['b', 'a'], None)
    """
    if not separation or separation.get("separated", True):
        return None
    return [str(separation["top"]), str(separation["runner_up"])]


def stage_summary(stage: Any, position: int) -> Any:
    """A :class:`~.schema.StageSummary` from a ledger ``Stage``, a dict, a name or a summary."""

    if isinstance(stage, StageSummary):
        return stage
    if isinstance(stage, str):
        return StageSummary(index=position, name=stage)
    if isinstance(stage, Mapping):
        keys = StageSummary.__dataclass_fields__
        return StageSummary(**{"index": position, **{k: json_safe(v) for k, v in stage.items() if k in keys}})
    optimizer = getattr(stage, "optimizer", None) or None
    rates = [float(lr) for step in (getattr(stage, "learning_rates", None) or []) for lr in step]
    info = getattr(stage, "info", None) or {}
    return StageSummary(
        index=int(getattr(stage, "index", position)),
        name=str(stage.name),
        kind=str(getattr(stage, "kind", "custom")),
        num_steps=getattr(stage, "num_steps", None),
        optimizer=_optimizer_label(optimizer),
        lr_min=min(rates) if rates else None,
        lr_max=max(rates) if rates else None,
        data=_data_identity(info),
        source=model_source(info.get("source")),
    )


def model_source(source: Any) -> dict[str, Any] | None:
    """The Hub/local model a stage (or the start) was imported from: ``{"model", "location", "revision", "commit",
    "subfolder"}`` (present keys only), or None when the ledger names no model (a recorded training run).

    Example:
        >>> model_source({"type": "checkpoints", "model": "org/m", "location": "hub", "revision": "sft", "files": []})
        {'model': 'org/m', 'location': 'hub', 'revision': 'sft'}
        >>> model_source({"front_end": "StageRecorder"}) is None
        True
    """
    if not isinstance(source, Mapping) or not source.get("model"):
        return None
    keys = ("model", "location", "revision", "commit", "subfolder")
    return {k: json_safe(source[k]) for k in keys if source.get(k) is not None}


def _optimizer_label(optimizer: Mapping[str, Any] | None) -> str | None:
    if not optimizer:
        return None
    label = str(optimizer.get("type", "unknown"))
    decays = sorted({float(g.get("weight_decay") or 0.0) for g in optimizer.get("param_groups", [])} - {0.0})
    if decays:
        label += ", weight decay " + "/".join(f"{d:g}" for d in decays)
    return label


def _data_identity(info: Mapping[str, Any]) -> dict[str, Any] | None:
    for key in ("dataset", "data", "datasets"):
        value = info.get(key)
        if isinstance(value, Mapping):
            return json_safe(value)
        if isinstance(value, list) and value:
            return {"datasets": json_safe(value)}
        if isinstance(value, str) and value:
            return {"name": value}
    return None


def behavior_summary(name: str, behavior: Any, num_examples: int) -> Any:
    """A :class:`~.schema.BehaviorSummary` from a ``Behavior``, a dict, a summary or None."""

    if isinstance(behavior, BehaviorSummary):
        return BehaviorSummary(name, behavior.unit, behavior.description, behavior.num_examples or num_examples)
    if isinstance(behavior, Mapping):
        return BehaviorSummary(name, str(behavior.get("unit", "")), str(behavior.get("description", "")), num_examples)
    if behavior is None or isinstance(behavior, str):
        return BehaviorSummary(name, "", "", num_examples)
    return BehaviorSummary(
        name, str(getattr(behavior, "unit", "") or ""), str(getattr(behavior, "description", "") or ""), num_examples
    )


def ledger_summary(ledger: LedgerCore | Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"name", "fingerprint", "final_hash", "final_digests", "num_stages", "stage_names"}`` of a ``StageLedger``
    (or a dict, kept as given). ``final_digests`` (per-tensor digests of the final model, as the recorder took them)
    let a model card check that the weights published beside it are the model attributed (``model_card/weights.py``);
    ``stage_names`` let a report of some stages name the others."""
    if ledger is None:
        return {}
    if isinstance(ledger, Mapping):
        return json_safe(ledger)
    directory = getattr(ledger, "dir", None)
    summary = {
        "name": Path(directory).name if directory is not None else None,
        "fingerprint": getattr(ledger, "fingerprint", None),
        "final_hash": getattr(ledger, "final_hash", None),
        "num_stages": len(getattr(ledger, "stages", []) or []),
        # a report of some stages names the others (report/text.py stage_coverage)
        "stage_names": [str(s.name) for s in getattr(ledger, "stages", []) or []],
    }
    try:
        digests = dict(getattr(ledger, "final_digests", None) or {})
    except StageAttributionError:  # a ledger without a manifest yet
        digests = {}
    if digests:
        summary["final_digests"] = digests
    try:
        start = model_source(((getattr(ledger, "manifest", None) or {}).get("model") or {}).get("source"))
    except StageAttributionError:  # a ledger without a manifest yet
        start = None
    return {**summary, "start_source": start} if start else summary


def default_versions() -> dict[str, str]:
    """Installed versions of the package and the frameworks it reads (read from metadata, nothing imported)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in _VERSION_DISTS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _per_behavior(value: Any, behavior: str, default: Any) -> Any:
    return value.get(behavior, default) if isinstance(value, Mapping) else (default if value is None else value)


def ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    """The sentences of ``lists`` in order of first appearance, each once.

    Example:
        >>> ordered_union([["a", "b"], ["b", "c"]])
        ['a', 'b', 'c']
    """
    out: list[str] = []
    for items in lists:
        out.extend(str(item) for item in items if str(item) not in out)
    return out


def _check_names(names: Sequence[str], kind: str) -> None:
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ReportError(f"Expected non-empty {kind} names (strings), got {name!r}: name every {kind}.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if list(names).count(n) > 1})
        raise ReportError(f"Expected distinct {kind} names, got duplicates {dup}: rename them.")


def ledger_stage_count(ledger: Any) -> int | None:
    """How many stages the ledger has (a ``StageLedger``, or a summary dict's ``num_stages``); None when not known.

    Example:
        >>> ledger_stage_count({"num_stages": 3}), ledger_stage_count(None)
        (3, None)
    """
    count = ledger.get("num_stages") if isinstance(ledger, Mapping) else len(getattr(ledger, "stages", None) or [])
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def last_stage_name(stage_list: Sequence[StageSummary], ledger: Any, given: bool) -> str | None:
    """The name of the ledger's last stage among ``stage_list``, or None when it is not there or not known (stages
    inferred from the effects, which may cover a subset)."""
    count = ledger.get("num_stages") if isinstance(ledger, Mapping) else len(getattr(ledger, "stages", None) or [])
    if isinstance(count, int) and count > 0:
        return next((s.name for s in stage_list if s.index == count - 1), None)
    return stage_list[-1].name if given and stage_list else None


def _linearisation(
    behavior: str,
    estimator: str,
    per_example: Mapping[str, Any],
    alternates: Mapping[str, Mapping[str, Any]],
    last_stage: str | None = None,
) -> tuple[list[str] | None, dict[str, dict[str, float]]]:
    """The linearisation pair of ``behavior`` and its per-stage gaps; the ledger's last stage, where the
    finite-difference reading f(θ_K) − f(θ_K − Δ_K) is replay itself, is marked ``fd_exact``."""
    sources = {name: results.get(behavior) for name, results in alternates.items() if results.get(behavior)}
    sources[estimator] = per_example
    for linear, fd in LINEARISATION_PAIRS:
        if linear not in sources or fd not in sources:
            continue
        fdm = {s: float(as_vector(v, f"{fd} / {behavior} / {s}").mean()) for s, v in sources[fd].items()}
        stages = [s for s in sources[linear] if s in fdm]
        lin = {s: float(as_vector(sources[linear][s], f"{linear} / {behavior} / {s}").mean()) for s in stages}
        # the largest effect of either reading; a stage read by finite difference alone (the attributor skips the
        # linear reading of the last stage, which is exact) still counts
        scale = max([abs(v) for v in lin.values()] + [abs(v) for v in fdm.values()] or [0.0])
        gaps = {}
        for s in stages:
            gap = fdm[s] - lin[s]
            gaps[s] = {"linear": lin[s], "fd": fdm[s], "gap": gap, "relative_gap": abs(gap) / scale if scale else 0.0}
            if s == last_stage:
                gaps[s]["fd_exact"] = True
        return [linear, fd], gaps
    return None, {}


def _trust(
    behavior: str,
    estimator: str,
    means: Mapping[str, float],
    intervals: Mapping[str, tuple[float, float] | None],
    alternates: Mapping[str, Mapping[str, Any]],
    pair: list[str] | None,
    gaps: Mapping[str, Mapping[str, float]],
    last_stage: str | None = None,
    replay_tie: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The trust verdict of one behavior (:func:`~.trust.assess_trust`) from the other estimators' results; the
    ledger's last stage is exact when ``estimator`` is the finite-difference side of ``pair``; ``replay_tie`` is
    replay's top two where its examples do not separate them."""
    opinions: dict[str, dict[str, float]] = {}
    for name, results in alternates.items():
        effects = results.get(behavior)
        if effects:
            opinions[name] = {s: float(as_vector(v, f"{name} / {behavior} / {s}").mean()) for s, v in effects.items()}
    replay = opinions.pop("replay", None)
    verdict = assess_trust(
        means, estimator=estimator, intervals=intervals, second_opinions=opinions, linearisation_gap=gaps,
        linearisation_pair=pair, replay=replay, exact_stages=exact_stages(means, estimator, pair, last_stage),
        replay_tie=replay_tie,
    )  # fmt: skip
    return json_safe(verdict)


def build_report(
    per_example: Mapping[str, Mapping[str, Any]],
    *,
    estimator: str,
    estimator_reason: str = "",
    stages: Sequence[Any] | None = None,
    behaviors: Mapping[str, Any] | Sequence[Any] | None = None,
    approximations: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    total_change: Mapping[str, Any] | None = None,
    alternates: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    unstable_modes: int | Mapping[str, int] | None = None,
    notes: Mapping[str, Mapping[str, Any]] | None = None,
    fidelity: Mapping[str, Any] | None = None,
    replay: Mapping[str, Mapping[str, Any]] | None = None,
    ledger: LedgerCore | Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The keyword arguments of ``AttributionReport(...)``; see :meth:`AttributionReport.build`."""

    if not per_example:
        raise ReportError("Expected effects for at least one behavior, got none: attribute at least one behavior.")
    if not 0.0 < float(confidence) < 1.0:
        raise ReportError(f"Expected 0 < `confidence` < 1, got {confidence}.")
    if int(n_resamples) < min_resamples(confidence):
        tail = 50 * (1 - float(confidence))
        raise ReportError(
            f"Expected `n_resamples` >= {min_resamples(confidence)} for a {100 * float(confidence):g} % interval (its "
            f"ends are the {tail:g}th and {100 - tail:g}th percentiles of the resampled means, which fewer resamples "
            f"cannot place), got {n_resamples}. The default is 1000."
        )
    given_stages = stages is not None or getattr(ledger, "stages", None) is not None
    if stages is None:
        stages = getattr(ledger, "stages", None) or list(next(iter(per_example.values())))
    stage_list = [stage_summary(stage, position) for position, stage in enumerate(stages)]
    last_stage = last_stage_name(stage_list, ledger, given_stages)
    ledger_count = ledger_stage_count(ledger)
    _check_names([s.name for s in stage_list], "stage")
    by_name = {s.name: s for s in stage_list}
    _check_names(list(per_example), "behavior")
    given = dict(behaviors) if isinstance(behaviors, Mapping) else {}
    if behaviors is not None and not isinstance(behaviors, Mapping):
        given = {getattr(b, "name", b if isinstance(b, str) else None): b for b in behaviors}
    alternates = dict(alternates or {})
    if replay is None:
        replay = alternates.get("replay")
    elif "replay" not in alternates:
        alternates["replay"] = replay  # replay shown beside the estimates is evidence for the verdict too
    elif alternates["replay"] is not replay:
        raise ReportError(
            "Expected replay once: pass it as `replay=` (or `alternates['replay']`), not both with different values."
        )

    rows, summaries, diagnostics, all_approx = [], [], {}, []
    for behavior, effects in per_example.items():
        unknown = [s for s in effects if s not in by_name]
        if unknown or not effects:
            raise ReportError(
                f"Behavior {behavior!r}: expected effects for stages among {list(by_name)}, got {list(effects)}."
            )
        names = sorted(effects, key=lambda s: by_name[s].index)
        vectors = [as_vector(effects[s], f"behavior {behavior!r}, stage {s!r}") for s in names]
        if len({v.size for v in vectors}) != 1:
            sizes = {s: v.size for s, v in zip(names, vectors)}
            raise ReportError(f"Behavior {behavior!r}: expected as many examples for every stage, got {sizes}.")
        matrix = np.stack(vectors)
        means = matrix.mean(axis=1)
        low, high = bootstrap_intervals(matrix, int(n_resamples), int(seed), float(confidence))
        total_value = _per_behavior(total_change, behavior, None)
        total = None if total_value is None else float(as_vector(total_value, f"total change of {behavior!r}").mean())
        truth = (replay or {}).get(behavior) or {}
        abs_total = float(np.abs(means).sum())
        for k, stage in enumerate(names):
            effect = float(means[k])
            share = effect / total if total is not None and abs(total) > _tiny(means) else None
            rows.append(
                ReportRow(
                    stage,
                    by_name[stage].index,
                    behavior,
                    estimator,
                    effect,
                    _finite(low[k]),
                    _finite(high[k]),
                    [float(x) for x in matrix[k]],
                    share,
                    _replay_mean(truth.get(stage), behavior, stage),
                    abs(effect) / abs_total if abs_total > 0 else None,
                )
            )
        summaries.append(behavior_summary(behavior, given.get(behavior), int(matrix.shape[1])))
        approx = ordered_union([_per_behavior(approximations, behavior, [])])
        all_approx.append(approx)
        pair, gaps = _linearisation(behavior, estimator, effects, alternates, last_stage)
        stage_means = {stage: float(means[k]) for k, stage in enumerate(names)}
        stage_intervals = {
            stage: (float(low[k]), float(high[k])) if matrix.shape[1] > 1 else None for k, stage in enumerate(names)
        }
        in_order = sorted(truth, key=lambda st: by_name[st].index if st in by_name else 0)
        ordered_truth = {st: truth[st] for st in in_order}
        if estimator == "replay":  # the effects are replay: do its own examples separate its top two?
            ordered_truth = {stage: effects[stage] for stage in names}
        separation = replay_top_separation(ordered_truth, int(n_resamples), int(seed), float(confidence))
        trust = _trust(
            behavior, str(estimator), stage_means, stage_intervals, alternates, pair, gaps, last_stage,
            unseparated_top_two(separation),
        )  # fmt: skip
        replay_evidence = (trust.get("evidence") or {}).get("replay")
        if separation is not None and isinstance(replay_evidence, dict):
            replay_evidence["top_separation"] = separation  # read by the headline: a tie is not named as a top stage
        total_sum = float(means.sum())
        # the total change is over every stage of the ledger: a residual needs an effect for each of them
        covers_all = len(names) == len(stage_list) and (ledger_count is None or len(names) == ledger_count)
        diagnostics[behavior] = BehaviorDiagnostics(
            total_change=total,
            sum_of_effects=total_sum,
            interaction_residual=(total - total_sum) if total is not None and covers_all else None,
            linearisation_pair=pair,
            linearisation_gap=gaps,
            approximations=approx,
            unstable_modes=int(_per_behavior(unstable_modes, behavior, 0) or 0),
            notes=json_safe(dict(_per_behavior(notes, behavior, {}) or {})),
            trust=trust,
        )
    return {
        "rows": rows,
        "stages": stage_list,
        "behaviors": summaries,
        "estimator": str(estimator),
        "estimator_reason": str(estimator_reason),
        "approximations": ordered_union(all_approx),
        "diagnostics": diagnostics,
        "fidelity": None if fidelity is None else json_safe(_as_mapping(fidelity)),
        "ledger": ledger_summary(ledger),
        "versions": dict(default_versions() if versions is None else {str(k): str(v) for k, v in versions.items()}),
        "interval": {
            "method": "percentile bootstrap over behavior examples (paired across stages)",
            "confidence": float(confidence),
            "resamples": int(n_resamples),
            "seed": int(seed),
        },
    }


def _finite(value: Any) -> float | None:
    """``value`` as a float, None where it is not finite (no interval)."""
    value = float(value)
    return value if math.isfinite(value) else None


def min_resamples(confidence: float) -> int:
    """The fewest bootstrap resamples for a percentile interval at ``confidence``: each tail must hold at least one
    resampled mean, ``⌈2 / (1 − confidence)⌉`` (40 at 95 %).

    Example:
        >>> min_resamples(0.95), min_resamples(0.9)
        (40, 20)
    """
    return math.ceil(round(2.0 / (1.0 - float(confidence)), 9))


def _tiny(means: np.ndarray) -> float:
    """Below this a total change is 0 for shares: float rounding of the stage effects' size (a share divided by it
    would be ~1e16). Example: ``_tiny(np.array([1.0, -1.0]))`` is about 4.4e-15."""
    return 1e-12 * float(np.abs(means).sum()) + 1e-300


def _replay_mean(values: Any, behavior: str, stage: str) -> float | None:
    """The mean replay effect of one (behavior, stage), or None when replay did not run for it."""
    if values is None:
        return None
    return float(as_vector(values, f"replay of behavior {behavior!r}, stage {stage!r}").mean())


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise ReportError(f"Expected `fidelity` as a dict of figures, got {type(value).__name__}.")
