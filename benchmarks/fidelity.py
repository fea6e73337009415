"""Fidelity figure: every estimator against replay, per pipeline, over seeds, with the costs of the same run.

Per pipeline and seed (:func:`measure`), after an untimed warm-up: the forward+backward floor, replay (the ground
truth), then each estimator: its stage embeddings computed from an empty cache (timed once per embedding kind and
options; an ``-fd`` estimator reads what its linear sibling computed), its per-example read-out, and for linear
estimators the means-only read-out; *cold* cost = embeddings + read-out. Also ``aa-ggn``/``aa-ggn-fd`` in
ESTIMATORS.md §5's cheap configuration, and the *exact first-order response* of real training,
``(f(replay, stage k scaled to 1) − f(replay, stage k scaled to 1 − ε)) / ε``, the ceiling of any first-order
method. All behaviors of a pipeline are evaluated as one concatenated behavior, so each estimator runs once per
pipeline and seed. Every timing is the median of repetitions filling ``settings.timing_min_seconds`` (a single run
when it is longer).

:func:`trust_calibration` gives, per estimator, the trust verdicts the report would print without replay
(``report/trust.py``) and how often each verdict's claim was right against replay.

:func:`summarise` pools the (stage, behavior) pairs of all seeds of a pipeline (a behavior of seed s counts as its
own behavior) and computes ``estimators.fidelity`` on all pairs and on non-terminal pairs, plus the spread over
seeds of the non-terminal Spearman.

Example:
    >>> # run = measure(pipelines.build("digits-hf", 0, settings, root), settings)
    >>> # summarise([run, ...])["digits-hf"]["aa-ggn"]["non_terminal"]["spearman"]
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from .common import by_pipeline, repeated, timed
from .cost import CHEAP, floor_seconds

ESTIMATORS = (
    "delta-linear", "delta-fd", "aa-linear", "aa-fd", "aa-ggn", "aa-ggn-fd", "aa-hvp", "aa-hvp-fd", "lora-exact",
)  # fmt: skip
# (label, registry name, extra curvature options); an estimator reading embeddings follows the one computing them
VARIANTS = [(name, name, {}) for name in ESTIMATORS] + [
    ("aa-ggn (cheap)", "aa-ggn", CHEAP),
    ("aa-ggn-fd (cheap)", "aa-ggn-fd", CHEAP),
]
LINEAR = ("delta-linear", "aa-linear", "aa-ggn", "aa-hvp")
FIRST_ORDER = "first-order response"


class Joint:
    """Several behaviors evaluated as one (values concatenated in a fixed order, split back afterwards)."""

    name = "benchmark-behaviors"

    def __init__(self, behaviors: Mapping[str, Any], model: torch.nn.Module) -> None:
        from hf_stage_attribution.estimators.base import eval_mode

        self.parts = dict(behaviors)
        with torch.no_grad(), eval_mode(model):
            self.sizes = {name: int(b(model).numel()) for name, b in self.parts.items()}

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([b(model).reshape(-1).to(torch.float64) for b in self.parts.values()])

    def split(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, n in self.sizes.items():
            out[name] = values[offset : offset + n].detach().to(torch.float64)
            offset += n
        return out


def _pairs(joint: Joint, per_example: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    return {(stage, b): v for stage, values in per_example.items() for b, v in joint.split(values).items()}


def _curvature_counts(diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    curv = dict(diagnostics.get("curvature") or {})
    curv.pop("per_stage_pair", None)
    return curv


def measure(pipe: Any, settings: Any) -> dict[str, Any]:
    """Replay, every applicable estimator and the first-order response on one pipeline; values and timings."""
    from hf_stage_attribution import estimators
    from hf_stage_attribution.errors import StageAttributionError

    ledger, model = pipe.ledger, pipe.model
    joint = Joint(pipe.behaviors, model)
    stages = [s.name for s in ledger.stages]
    opts: dict[str, Any] = {"check_model": False, "prepare_behavior": False}
    opts.update({k: v for k, v in (("stage_fns", pipe.stage_fns), ("loss_fns", pipe.loss_fns)) if v})
    if pipe.curvature_options:
        opts["curvature_options"] = dict(pipe.curvature_options)
    # the section measures the propagation estimators: its "default" is what `auto` picks where no later stage can
    # be replayed (also where the ledger holds replay data, as the LM pipeline's does); what `auto` picks with the
    # pipeline's (step-limited) stage functions is recorded beside it
    default, reason = estimators.choose_estimator(ledger, pipe.loss_fns, partial_replay=False)
    plain_default, plain_reason = estimators.choose_estimator(ledger, None, partial_replay=False)
    auto, auto_reason = estimators.choose_estimator(ledger, pipe.loss_fns, pipe.stage_fns)
    run: dict[str, Any] = {
        "pipeline": pipe.name, "seed": pipe.seed, "stages": stages, "terminal": stages[-1],
        "behaviors": dict(joint.sizes), "build_seconds": pipe.build_seconds, "description": pipe.description,
        "notes": list(pipe.notes), "default": {"name": default, "reason": reason},
        "default_without_loss_fns": {"name": plain_default, "reason": plain_reason},
        "auto": {"name": auto, "reason": auto_reason},
        "times": {}, "errors": {}, "diagnostics": {},
    }  # fmt: skip
    values: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    for name in ("delta-linear", "delta-fd"):  # warm-up of lazy imports and kernels, not timed
        estimators.get(name).estimate(ledger, model, joint, **opts)
    least = settings.timing_min_seconds
    run["floor"] = floor_seconds(model, joint, least)

    result, seconds = repeated(lambda: estimators.get("replay").estimate(ledger, model, joint, **opts), least)
    values["replay"] = _pairs(joint, result.per_example)
    run["replay_seconds"] = seconds
    run["replay_stage_runs"] = result.diagnostics.get("stages_replayed")

    prepared: tuple[Any, float] = (None, 0.0)  # (embedding kind and options, seconds to compute them)
    for label, name, extra in VARIANTS:
        est, options = estimators.get(name), {**opts, **_merge_curvature(opts, extra)}
        kind = getattr(est, "kind", None)
        try:
            prepare = 0.0
            if kind not in (None, "delta"):
                key = (kind, repr(sorted(extra.items())))
                if prepared[0] != key:  # cold: the cache is deleted and the embeddings computed, timed
                    prepared = (None, 0.0)
                    seconds = repeated(partial(_cold_prepare, est, ledger, model, options), least)[1]
                    prepared = (key, seconds)
                prepare = prepared[1]  # an -fd estimator reads the embeddings its linear sibling computed
            result, readout = repeated(partial(est.estimate, ledger, model, joint, **options), least)
        except StageAttributionError as exc:  # not applicable here (e.g. lora-exact without a terminal LoRA)
            run["errors"][label] = f"n/a: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        except Exception as exc:  # a failure of the estimator itself: reported, the benchmark goes on
            run["errors"][label] = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        times = {"embeddings": prepare, "readout": readout, "cold": prepare + readout}
        if name in LINEAR:
            means_only = partial(est.estimate, ledger, model, joint, **options, per_example=False)
            times["means_only"] = repeated(means_only, least)[1]
        values[label] = _pairs(joint, result.per_example)
        run["times"][label] = times
        run["diagnostics"][label] = {"approximations": list(result.approximations),
                                     **_curvature_counts(result.diagnostics)}  # fmt: skip

    first_order, seconds = timed(lambda: _first_order(pipe, joint, settings.eps))
    values[FIRST_ORDER] = _pairs(joint, first_order)
    run["first_order_seconds"] = seconds
    run["eps"] = settings.eps
    if pipe.seed == _first_seed(settings, pipe.name):
        run["replay_gap"] = estimators.replay_gap(ledger, model, stage_fns=pipe.stage_fns)
    run["means"] = {est: {f"{s}/{b}": float(v.mean()) for (s, b), v in pairs.items()} for est, pairs in values.items()}
    run["_values"] = values  # per-example tensors for summarise (not serialised)
    return run


def _cold_prepare(est: Any, ledger: Any, model: torch.nn.Module, options: Mapping[str, Any]) -> None:
    shutil.rmtree(ledger.embeddings_dir, ignore_errors=True)
    est.prepare(ledger, model=model, **_embedding_options(options))


def _merge_curvature(opts: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    if not extra:
        return {}
    return {"curvature_options": {**(opts.get("curvature_options") or {}), **extra}}


def _embedding_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("stage_fns", "check_model", "prepare_behavior")}


def _first_order(pipe: Any, joint: Joint, eps: float) -> dict[str, torch.Tensor]:
    """Per stage ``(f(replay, stage scaled to 1)) − f(replay, stage scaled to 1 − ε)) / ε`` per example.

    Both ends are replayed, so a replay that does not reproduce θ_K bit for bit (``replay_gap``) does not enter
    the difference divided by ε."""
    from hf_stage_attribution.estimators import replay_model
    from hf_stage_attribution.estimators.base import evaluate

    out = {}
    for stage in pipe.ledger.stages:
        ends = []
        for scale in (1.0, 1.0 - eps):
            cf = replay_model(pipe.ledger, pipe.model, stage.index, stage_fns=pipe.stage_fns, scale=scale)
            cf.eval()
            ends.append(evaluate(joint, cf, f"first-order response to {stage.name!r}"))
            del cf
        out[stage.name] = (ends[0] - ends[1]) / eps
    return out


def _first_seed(settings: Any, pipeline: str) -> int:
    if pipeline.startswith("digits"):
        return settings.digits_seeds[0]
    return (settings.lm_seeds if pipeline == "lm" else settings.toxicity_seeds)[0]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else (str(value) if math.isinf(value) else round(value, 6))
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def pool_seeds(group: list[Mapping[str, Any]], name: str) -> tuple[dict, dict, list[float]]:
    """``name``'s values and replay's over the runs of ``group`` that have ``name``, behaviors tagged by seed (a
    behavior of each seed counts separately), and the non-terminal Spearman of each of those runs."""
    from hf_stage_attribution.estimators import fidelity

    est: dict = {}
    true: dict = {}
    per_seed: list[float] = []
    for run in group:
        if name not in run["_values"]:
            continue
        tag = f"@{run['seed']}"
        e = {(s, b + tag): v for (s, b), v in run["_values"][name].items()}
        t = {(s, b + tag): v for (s, b), v in run["_values"]["replay"].items()}
        est.update(e)
        true.update(t)
        per_seed.append(fidelity(e, t, terminal_stage=run["terminal"])["non_terminal"]["spearman"])
    return est, true, per_seed


def summarise(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per pipeline and estimator (replay excluded): pooled fidelity over seeds, and the per-seed Spearman spread."""
    from hf_stage_attribution.estimators import fidelity

    out: dict[str, Any] = {}
    for pipeline, group in by_pipeline(runs).items():
        names = [n for n in dict.fromkeys(n for run in group for n in run["_values"]) if n != "replay"]
        table: dict[str, Any] = {}
        for name in names:
            est, true, per_seed = pool_seeds(group, name)
            if not est:
                continue
            block = fidelity(est, true, terminal_stage=group[0]["terminal"])
            finite = [v for v in per_seed if not math.isnan(v)]
            block["seeds"] = len(per_seed)
            block["non_terminal_spearman_per_seed"] = per_seed
            block["non_terminal_spearman_seed_range"] = [min(finite), max(finite)] if finite else None
            block["non_terminal_spearman_seed_median"] = statistics.median(finite) if finite else math.nan
            table[name] = _clean(block)
        out[pipeline] = table
    return out


def trust_calibration(
    runs: list[Mapping[str, Any]], second_opinion: str | None = "delta-fd", with_sibling: bool = True
) -> dict[str, Any]:
    """How the report's trust verdicts (``report/trust.py``) fare against replay, per pipeline.

    For each seed, behavior and estimator ``E`` that has a linear/finite-difference sibling, the verdict the
    attributor would print without replay (``E`` checked against its sibling and task-vector negation, the
    linearisation gap and the intervals, through ``AttributionReport.build``; ``second_opinion`` as the attributor's
    ``estimators.second_opinion.DEFAULT_SECOND_OPINION``, None: the sibling alone), and whether ``E``'s top stage is
    replay's (``right``) and whether replay would have verified the whole claim, top stage, signs and ranking
    (``verified``: the verdict ``validate`` would print). Calibration = how much more often "agree" is right than
    "unreliable". Returns ``{pipeline: {"default", "estimators": {E: {verdict: {"n", "right", "verified"}}},
    "reasons": {reason: n}}}`` (reasons of the default's "unreliable" verdicts, counted by kind).
    ``with_sibling=False`` leaves the sibling out (``second_opinion`` alone, no linearisation gap).
    """
    from hf_stage_attribution.report import AttributionReport
    from hf_stage_attribution.report.build import FD_READINGS, LINEARISATION_PAIRS
    from hf_stage_attribution.report.trust import assess_trust, top_of

    sibling = {a: b for pair in LINEARISATION_PAIRS for a, b in (pair, pair[::-1])}
    out: dict[str, Any] = {}
    for pipeline, group in by_pipeline(runs).items():
        default = group[0]["default"]["name"]
        table: dict[str, dict[str, dict[str, int]]] = {}
        reasons: dict[str, int] = {}
        for run in group:
            values = run["_values"]
            for name in [default, *(n for n in ESTIMATORS if n != default)]:
                if name not in values or (with_sibling and sibling.get(name) not in values):
                    continue
                per = _by_behavior(values[name])
                others = {sibling.get(name) if with_sibling else None, second_opinion} - {name, None}
                alternates = {n: _by_behavior(values[n]) for n in others if n in values}
                linear = sibling.get(name) if with_sibling and name in FD_READINGS else None
                for effects in alternates.get(linear, {}).values():  # as the attributor: the last stage's linear
                    effects.pop(run["terminal"], None)  # reading is not computed beside an exact fd one
                report = AttributionReport.build(per, estimator=name, stages=run["stages"], alternates=alternates,
                                                 versions={}, n_resamples=400)  # fmt: skip
                truth = _by_behavior(values["replay"])
                for behavior in per:
                    verdict = report.trust(behavior)
                    replay = {s: float(v.mean()) for s, v in truth[behavior].items()}
                    effects = {r.stage: r.effect for r in report.rows_for(behavior)}
                    checked = assess_trust(effects, estimator=name, replay=replay)["verdict"]
                    cells = table.setdefault(name, {})
                    cell = cells.setdefault(verdict["verdict"], {"n": 0, "right": 0, "verified": 0})
                    cell["n"] += 1
                    cell["right"] += int(report.top_stage(behavior) == top_of(replay))
                    cell["verified"] += int(checked == "verified")
                    if name == default and verdict["verdict"] == "unreliable":
                        for why in verdict["label"].split(": ", 1)[-1].split("; "):
                            kind = _reason_kind(why)
                            reasons[kind] = reasons.get(kind, 0) + 1
        out[pipeline] = {"default": default, "estimators": table, "reasons": reasons}
    return out


def _by_behavior(pairs: Mapping[tuple[str, str], torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (stage, behavior), value in pairs.items():
        out.setdefault(behavior, {})[stage] = value
    return out


def _reason_kind(why: str) -> str:
    """The kind of an "unreliable" reason, for the counts of §8.

    Example:
        >>> _reason_kind("the sizes of sft and dpo overlap within their intervals (|sft| ≥ 1.462, |dpo| ≤ 1.655)")
        'top two intervals overlap'
    """
    for key, kind in (("name different top stages", "second opinion names another top stage"),
                      ("disagree on the sign", "second opinion disagrees on a sign"),
                      ("ranks the stages differently", "second opinion ranks the stages differently"),
                      ("linearisation gap", "large linearisation gap"),
                      ("intervals overlap", "top two intervals overlap"),  # the wording before 2026-12-06
                      ("overlap within their intervals", "top two intervals overlap"),
                      ("-fold on", "second opinion's size more than 2-fold off on a stage")):  # fmt: skip
        if key in why:
            return kind
    return why
