"""Partial replay's fidelity-versus-cost curve (issue 13, ESTIMATORS.md §4b), per benchmark pipeline.

For every pipeline whose later stages can be replayed (stage functions or recorded replay data), per seed: replay
(the ground truth, timed), ``delta-fd`` (the baseline to beat), and ``partial-replay`` / ``partial-replay-linear``
at budgets 0, 5, 10, 25, 50, 100 % of replay's optimizer steps (``budget_unit="steps"``), at 10, 25, 50 % with the
opt-in Gauss–Newton carry (``carry="aa-ggn"``, pipelines that give ``loss_fns``), at 10 and 25 % with the factual
branch interpolated along the recorded stage delta (``factual="interpolated"``) and, outside ``--quick``,
of the later stages' learning-rate mass (``"lr-mass"``), and at 10 and 25 % with the factual branch read from an
early checkpoint (every pipeline is recorded with ``early_checkpoint=0.25``, which the other rows ignore). Before
the timings, one untimed partial replay at 25 %
warms up the replay machinery (the Trainer/TRL imports would otherwise be charged to replay). Each budget's
embeddings are computed cold (timed), then
read out by finite difference and linearly (timed); *time ÷ replay* = (embeddings + read-out) / replay, per seed.
Every timing is the median of repeated runs until ``TIMING_SECONDS`` (0.25 s) have passed (one run when a single
run is longer; at most 25): the digits pipelines' replays take tens of milliseconds, where one run is noise.
Fidelity (``estimators.fidelity``) pools the (stage, behavior) pairs of all seeds, on all pairs and on non-terminal
pairs; the non-terminal Spearman is also given per seed (median). Stage functions that take Trainer ``callbacks``
but no ``max_steps`` (the toxicity recipe) are given the step-limited form with
``integrations.replay.stop_after_steps_callback``.

    python benchmarks/run.py --sections partial-replay [--pipelines digits-hf,lm] [--quick]

Example:
    >>> label("partial-replay", 0.25, "steps")
    'partial-replay @ 25 % (steps)'
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from . import pipelines
from .common import by_pipeline, quiet, repeated
from .fidelity import Joint, _pairs, pool_seeds

BUDGETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
#: every pipeline is recorded with an early checkpoint at this fraction of each stage (``record_stage``'s opt-in
#: ``early_checkpoint``); the budget rows ignore it (``use_early_checkpoints=False``: the default recording has
#: none), the ``EARLY`` rows read the factual branch from it
EARLY_CHECKPOINT = 0.25
EARLY_BUDGETS = (0.1, 0.25)
EARLY = "partial-replay, early checkpoint"
#: the factual branch read off the recorded stage delta (``factual="interpolated"``, opt-in, nothing recorded): the
#: budget buys twice the counterfactual steps
INTERPOLATED_BUDGETS = (0.1, 0.25)
INTERPOLATED = "partial-replay, interpolated factual"
GGN_BUDGETS = (0.1, 0.25, 0.5)  # the opt-in Gauss–Newton carry, where the pipeline gives loss_fns
#: strided replay (``estimators.strided_replay``): every later stage from both starts, a gradient every s steps;
#: where every later stage has the gradient-reuse form (stage functions with ``grad_every``, or replay data)
STRIDED_BUDGETS = (0.1, 0.25, 0.5)
STRIDED = "strided-replay"
READOUTS = ("partial-replay", "partial-replay-linear")
BASELINE = "delta-fd"
TIMING_SECONDS = 0.25  # each timing repeated until this long, median (a single run when one is longer)


def label(name: str, budget: float, unit: str) -> str:
    return f"{name} @ {100 * budget:g} % ({unit})"


def units(settings: Any) -> tuple[str, ...]:
    return ("steps",) if settings.quick else ("steps", "lr-mass")


def _cold(ledger: Any, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with nothing cached: partial replay's memo cleared, the embeddings cache removed."""
    from hf_stage_attribution.estimators import partial_replay as pr
    from hf_stage_attribution.estimators import strided_replay as sr

    pr._MEMO.clear()
    sr._MEMO.clear()
    shutil.rmtree(ledger.embeddings_dir, ignore_errors=True)
    return fn(*args, **kwargs)


def strided_supported(ledger: Any, fns: Mapping[str, Callable] | None) -> bool:
    """Whether every stage after the first can be re-run with gradient reuse (strided replay)."""
    from hf_stage_attribution.estimators.replay import can_replay

    return all(can_replay(s, fns or {}, grad_reuse=True) for s in ledger.stages[1:])


def _cold_embeddings(ledger: Any, *args: Any, **kwargs: Any) -> Any:
    from hf_stage_attribution.estimators import partial_replay as pr

    return _cold(ledger, pr.partial_replay_embeddings, ledger, *args, **kwargs)


def measure(pipe: Any, settings: Any, budgets: tuple[float, ...] = BUDGETS) -> dict[str, Any]:
    """Replay, delta-fd, and the partial-replay family at every budget on one pipeline; values and timings (inside
    one ``reusing_replays`` block, as in an attribution: the read-outs read the embeddings computed just before)."""
    from hf_stage_attribution.estimators import reusing_replays

    with reusing_replays():
        return _measure(pipe, settings, budgets)


def _measure(pipe: Any, settings: Any, budgets: tuple[float, ...]) -> dict[str, Any]:
    from hf_stage_attribution import estimators
    from hf_stage_attribution.estimators import partial_replay as pr

    ledger, model = pipe.ledger, pipe.model
    joint = Joint(pipe.behaviors, model)
    fns = pipe.stage_fns or None  # None: the ledger's replay data (callback-taking functions: the package limits them)
    opts: dict[str, Any] = {"check_model": False, "prepare_behavior": False}
    if fns:
        opts["stage_fns"] = fns
    early = any(getattr(s, "early_checkpoint", None) for s in ledger.stages)
    as_recorded_by_default = {"use_early_checkpoints": False}  # every row but the EARLY ones
    default, reason = estimators.choose_estimator(ledger, pipe.loss_fns, fns)
    stages = [s.name for s in ledger.stages]
    run: dict[str, Any] = {"pipeline": pipe.name, "seed": pipe.seed, "stages": stages, "terminal": stages[-1],
                           "default": {"name": default, "reason": reason}, "times": {}, "plans": {}}  # fmt: skip
    estimators.get(BASELINE).estimate(ledger, model, joint, **opts)  # warm-up of lazy imports, not timed
    chosen = list(ledger.stages)
    # warm-up of the replay machinery (Trainer/TRL imports, kernels): one short partial replay, not timed
    pr.partial_replay_embeddings(ledger, model, chosen, budget=0.25, stage_fns=fns, reuse=False,
                                 **as_recorded_by_default)  # fmt: skip
    values: dict[str, Any] = {}
    least = min(TIMING_SECONDS, settings.timing_min_seconds)
    result, run["replay_seconds"] = repeated(lambda: estimators.get("replay").estimate(ledger, model, joint, **opts),
                                             least)  # fmt: skip
    values["replay"] = _pairs(joint, result.per_example)
    result, seconds = repeated(lambda: estimators.get(BASELINE).estimate(ledger, model, joint, **opts), least)
    values[BASELINE], run["times"][BASELINE] = _pairs(joint, result.per_example), seconds
    for unit in units(settings):
        for budget in budgets:
            embed = partial(_cold_embeddings, ledger, model, chosen, budget=budget, budget_unit=unit, stage_fns=fns,
                            **as_recorded_by_default)  # fmt: skip
            emb, prepare = repeated(embed, least)  # cold each time: the aa-linear part is timed too
            run["plans"][f"{100 * budget:g} % ({unit})"] = emb.diagnostics["partial_replay"]
            for name in READOUTS:
                readout_fn = partial(estimators.get(name).estimate, ledger, model, joint, budget=budget,
                                     budget_unit=unit, **as_recorded_by_default, **opts)  # fmt: skip
                result, readout = repeated(readout_fn, least)  # reads the memoised embeddings
                values[label(name, budget, unit)] = _pairs(joint, result.per_example)
                run["times"][label(name, budget, unit)] = prepare + readout
    for budget in EARLY_BUDGETS if early else ():  # the factual branch read from the recorded early checkpoint
        embed = partial(_cold_embeddings, ledger, model, chosen, budget=budget, stage_fns=fns)
        emb, prepare = repeated(embed, least)
        run["plans"][f"{100 * budget:g} % (steps), early checkpoint"] = emb.diagnostics["partial_replay"]
        readout_fn = partial(estimators.get("partial-replay").estimate, ledger, model, joint, budget=budget, **opts)
        result, readout = repeated(readout_fn, least)
        values[label(EARLY, budget, "steps")] = _pairs(joint, result.per_example)
        run["times"][label(EARLY, budget, "steps")] = prepare + readout
    for budget in INTERPOLATED_BUDGETS:
        embed = partial(_cold_embeddings, ledger, model, chosen, budget=budget, stage_fns=fns, factual="interpolated",
                        **as_recorded_by_default)  # fmt: skip
        emb, prepare = repeated(embed, least)
        run["plans"][f"{100 * budget:g} % (steps), interpolated factual"] = emb.diagnostics["partial_replay"]
        readout_fn = partial(estimators.get("partial-replay").estimate, ledger, model, joint, budget=budget,
                             factual="interpolated", **as_recorded_by_default, **opts)  # fmt: skip
        result, readout = repeated(readout_fn, least)
        values[label(INTERPOLATED, budget, "steps")] = _pairs(joint, result.per_example)
        run["times"][label(INTERPOLATED, budget, "steps")] = prepare + readout
    for budget in GGN_BUDGETS if pipe.loss_fns else ():
        ggn = {"carry": "aa-ggn", "loss_fns": pipe.loss_fns, "curvature_options": dict(pipe.curvature_options)}
        fd = partial(_cold, ledger, estimators.get("partial-replay").estimate, ledger, model, joint, budget=budget,
                     **as_recorded_by_default, **ggn, **opts)  # fmt: skip
        result, seconds = repeated(fd, least)
        values[label("partial-replay, ggn carry", budget, "steps")] = _pairs(joint, result.per_example)
        run["times"][label("partial-replay, ggn carry", budget, "steps")] = seconds
    for budget in STRIDED_BUDGETS if strided_supported(ledger, fns) else ():
        strided = partial(_cold, ledger, estimators.get(STRIDED).estimate, ledger, model, joint, budget=budget, **opts)
        result, seconds = repeated(strided, least)  # cold each time: embeddings + read-out
        values[label(STRIDED, budget, "passes")] = _pairs(joint, result.per_example)
        run["times"][label(STRIDED, budget, "passes")] = seconds
        diag = result.diagnostics["strided_replay"]
        run["plans"][f"{100 * budget:g} % (passes), strided"] = diag
    pr._MEMO.clear()
    run["_values"] = values
    return run


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per pipeline and variant: pooled fidelity against replay, per-seed non-terminal Spearman, time ÷ replay."""
    from hf_stage_attribution.estimators import fidelity

    out: dict[str, Any] = {}
    for pipeline, group in by_pipeline(runs).items():
        names = [n for n in dict.fromkeys(n for run in group for n in run["_values"]) if n != "replay"]
        table: dict[str, Any] = {}
        for name in names:
            est, true, per_seed = pool_seeds(group, name)
            ratios = [run["times"][name] / run["replay_seconds"] for run in group]
            block = fidelity(est, true, terminal_stage=group[0]["terminal"])
            table[name] = {
                "all": {k: block["all"][k] for k in ("spearman", "sign_agreement", "top_stage_agreement", "n_pairs")},
                "non_terminal": {
                    k: block["non_terminal"][k]
                    for k in ("spearman", "sign_agreement", "top_stage_agreement", "n_pairs")
                },
                "non_terminal_spearman_seed_median": _median(per_seed),
                "time_over_replay": statistics.median(ratios),
            }
        first = group[0]
        out[pipeline] = {
            "seeds": [run["seed"] for run in group],
            "default": first["default"],
            "replay_seconds": statistics.median(run["replay_seconds"] for run in group),
            "plans": first["plans"],
            "table": table,
            "trust": trust_at_default(group),
        }
    return out


#: the verdict of the default with task-vector negation as its only second opinion (what the attributor printed for
#: partial replay before its linear read-out joined the evidence), shown beside today's for comparison
DELTA_ONLY = "partial-replay, delta-fd only"
#: the verdict with the linear read-out and task-vector negation (what the attributor printed before strided replay
#: became the second opinion of a replaying estimate, ``estimators.second_opinion``)
WITH_DELTA = "partial-replay, sibling + delta-fd"
#: the verdict with the linear read-out and partial replay itself at a smaller budget as the second opinion: the
#: cheaper check that was measured against strided replay (it costs the estimate at 10 %, not about one replay) and
#: not adopted — two budgets of one family share their carry's errors, so they agree where both are wrong
SMALLER_BUDGET = 0.1
TWO_BUDGETS = f"partial-replay, sibling + itself at {100 * SMALLER_BUDGET:g} %"


def trust_at_default(group: list[Mapping[str, Any]], budget: float = 0.25) -> dict[str, Any] | None:
    """The trust verdicts the attributor prints for ``partial-replay`` at ``budget`` without replay (its linear
    read-out and its second opinion — strided replay at the same budget where the pipeline has it, as
    ``second_opinion="strided-replay"`` asks and ``auto`` chose before 2026-12-07 (it now checks against replay
    itself, :func:`verdicts_by_replay`), else task-vector negation — the linearisation gap, the intervals) and how
    often they were right against replay; beside them the verdicts with the linear read-out and task-vector negation
    (:data:`WITH_DELTA`), with task-vector negation alone (:data:`DELTA_ONLY`) and with the linear read-out and
    partial replay at :data:`SMALLER_BUDGET` (:data:`TWO_BUDGETS`, where that budget was measured).
    ``benchmarks.fidelity.trust_calibration``'s figures, one pipeline; None when a value is missing."""
    from .fidelity import trust_calibration

    fd, linear = label("partial-replay", budget, "steps"), label("partial-replay-linear", budget, "steps")
    strided = label(STRIDED, budget, "passes")
    smaller = label("partial-replay", SMALLER_BUDGET, "steps")
    renamed = []
    for run in group:
        values = run["_values"]
        if any(name not in values for name in (fd, linear, BASELINE, "replay")):
            return None
        renamed.append({**run, "default": {"name": "partial-replay"}, "_values": {
            "partial-replay": values[fd], "partial-replay-linear": values[linear], BASELINE: values[BASELINE],
            "replay": values["replay"], **({STRIDED: values[strided]} if strided in values else {}),
            **({TWO_BUDGETS: values[smaller]} if smaller in values else {})}})  # fmt: skip
    pipeline = group[0]["pipeline"]
    second = STRIDED if all(STRIDED in run["_values"] for run in renamed) else BASELINE
    now = trust_calibration(renamed, second_opinion=second)[pipeline]
    cells = {"partial-replay": now["estimators"].get("partial-replay", {})}
    if second != BASELINE:
        cells[WITH_DELTA] = trust_calibration(renamed)[pipeline]["estimators"].get("partial-replay", {})
    alone = trust_calibration(renamed, with_sibling=False)[pipeline]
    cells[DELTA_ONLY] = alone["estimators"].get("partial-replay", {})
    if all(TWO_BUDGETS in run["_values"] for run in renamed):
        two = trust_calibration(renamed, second_opinion=TWO_BUDGETS)[pipeline]
        cells[TWO_BUDGETS] = two["estimators"].get("partial-replay", {})
    return {"default": "partial-replay", "budget": budget, "second_opinion": second, "estimators": cells,
            "reasons": now["reasons"]}  # fmt: skip


def run(settings: Any, names: list[str], work: Any, seeds_for: Callable, log: Callable[[str], None] = print) -> dict:
    """Every replayable pipeline × seed (``seeds_for(settings, name)``): build, measure; then the summary."""
    runs, skipped = [], {}
    start = time.perf_counter()
    for name in names:
        for seed in seeds_for(settings, name):
            t0 = time.perf_counter()
            with quiet():
                pipe = pipelines.build(name, seed, settings, work / f"partial-{name}-{seed}", EARLY_CHECKPOINT)
                if not pipe.stage_fns and not all(s.replay_dir for s in pipe.ledger.stages[1:]):
                    skipped[name] = "no stage functions and no replay data"
                    break
                runs.append(measure(pipe, settings))
            del pipe
            log(f"partial replay {name} seed {seed}: {time.perf_counter() - t0:.0f} s")
    return {"summary": summarise(runs), "skipped": skipped, "budgets": list(BUDGETS), "units": list(units(settings)),
            "figure_seconds": time.perf_counter() - start}  # fmt: skip


# --- targets and rendering ---------------------------------------------------------------------------------------

GOALS = (("spearman", "Spearman ≥ 0.9"), ("sign_agreement", "sign ≥ 90 %"), ("top_stage_agreement", "top ≥ 90 %"))


def target_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's acceptance, per pipeline: the default at its default budget against replay (all and non-terminal
    pairs), its time, and never worse than delta-fd (non-terminal Spearman)."""
    from .targets import not_worse_than, verdict

    block = results.get("partial_replay")
    if not block:
        return []
    rows = []

    def add(target: str, scope: str, measured: Any, op: str, goal: float, how: str, shown: str | None = None):
        measured = None if measured is None or (isinstance(measured, float) and math.isnan(measured)) else measured
        met, margin = verdict(measured, op, goal)
        sign = {">=": "≥", "<=": "≤"}[op]
        rows.append({"target": target, "scope": scope, "measured": measured, "goal": f"{sign} {goal:g}",
                     "shown": shown or ("—" if measured is None else f"{measured:.3f}"), "met": met,
                     "margin": margin, "how": how})  # fmt: skip

    for pipeline, summary in block["summary"].items():
        default = summary["default"]["name"]
        if default != "partial-replay":
            add("issue 13: default is partial replay", pipeline, None, ">=", 1.0, summary["default"]["reason"])
            continue
        # the default recording, then (where measured) a recording with the opt-in early checkpoint
        for key, scope in ((label("partial-replay", 0.25, "steps"), pipeline),
                           (label(EARLY, 0.25, "steps"), f"{pipeline}, early checkpoint")):  # fmt: skip
            if key not in summary["table"] and scope != pipeline:
                continue
            row = summary["table"].get(key) or {}
            for part in ("all", "non_terminal"):
                for metric, name in GOALS:
                    how = f"{key} against replay, {part.replace('_', '-')} pairs, seeds pooled"
                    add(f"issue 13: {name}", f"{scope} ({part.replace('_', '-')})", row.get(part, {}).get(metric),
                        ">=", 0.9, how)  # fmt: skip
            add("issue 13: ≤ 25 % of replay's time", scope, row.get("time_over_replay"), "<=", 0.25,
                f"{key}: (embeddings + read-out) / replay, median over seeds")  # fmt: skip
            if scope == pipeline:  # what a user waits for: the estimate and the check of its trust verdict
                add("issue 13: ≤ 25 % of replay's time, with its trust check", scope, time_with_check(summary),
                    "<=", 0.25, f"{key} + its check, replay itself (1 by definition): the sum of the "
                    "medians of time ÷ replay")  # fmt: skip
            worst, where = not_worse_than({key: row, BASELINE: summary["table"].get(BASELINE, {})}, key, BASELINE)
            add("issue 13: never worse than delta-fd", scope, worst, ">=", 0.0,
                f"min over Spearman, sign and top-stage agreement, all and non-terminal pairs, of {key} − "
                f"{BASELINE}; worst: {where}")  # fmt: skip
    return rows


def time_with_check(summary: Mapping[str, Any], budget: float = 0.25, check: str = "replay") -> float | None:
    """Time ÷ replay of the default as the attributor runs it: the estimate (``partial-replay`` at ``budget``) plus
    its check, the sum of the medians over seeds; None when a part is missing. ``check="replay"`` (the default's
    check where every later stage can be re-run, ``estimators.second_opinion``; every pipeline of this section can):
    one replay (1 by definition);
    ``check="strided-replay"``: strided replay at the same budget (the check on request, and the default's before
    2026-12-07).

    Example:
        >>> row = {"table": {"partial-replay @ 25 % (steps)": {"time_over_replay": 0.3},
        ...                  "strided-replay @ 25 % (passes)": {"time_over_replay": 0.9}}}
        >>> round(time_with_check(row), 3), round(time_with_check(row, check="strided-replay"), 3)
        (1.3, 1.2)
    """
    table = summary["table"]
    own = table.get(label("partial-replay", budget, "steps"))
    strided = table.get(label(STRIDED, budget, "passes"))
    if not own or (check != "replay" and not strided):
        return None
    return float(own["time_over_replay"]) + (1.0 if check == "replay" else float(strided["time_over_replay"]))


def verdicts_by_replay(trust: Mapping[str, Any]) -> dict[str, int]:
    """The default's verdicts with replay as its check: replay's verdict on every behavior × seed, so "verified" where
    replay verifies the estimate (the *replay verifies* counts of its verdicts without replay, summed) and
    "unreliable: replay disagrees" elsewhere.

    Example:
        >>> verdicts_by_replay({"estimators": {"partial-replay": {"agree": {"n": 4, "right": 4, "verified": 3},
        ...                                                   "unreliable": {"n": 31, "right": 12, "verified": 4}}}})
        {'n': 35, 'verified': 7, 'unreliable': 28}
    """
    cells = trust["estimators"]["partial-replay"].values()
    n = sum(int(c.get("n", 0)) for c in cells)
    verified = sum(int(c.get("verified", 0)) for c in cells)
    return {"n": n, "verified": verified, "unreliable": n - verified}


def _f(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _p(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f} %"


def render(block: Mapping[str, Any]) -> list[str]:
    """The markdown section: per pipeline, the fidelity-versus-cost table."""
    out = ["## 8. Partial replay: fidelity versus cost", "",
           "Against replay; Spearman / sign / top-stage agreement pooled over seeds on all (stage, behavior) pairs "
           "and "
           "on non-terminal pairs; NT ρ median = median over seeds of the non-terminal Spearman; time ÷ replay = "
           "(embeddings + read-out) / replay, median over seeds. Budget = fraction of replay's optimizer steps "
           "(steps) or of the later stages' learning-rate mass (lr-mass).", ""]  # fmt: skip
    for pipeline, summary in block["summary"].items():
        out += [f"### {pipeline} (partial replay)", "",
                f"Seeds {summary['seeds']}; replay {summary['replay_seconds']:.1f} s (median); `auto` → "
                f"**{summary['default']['name']}**: {summary['default']['reason']}.", ""]  # fmt: skip
        out += ["| variant | ρ all | sign all | top all | ρ NT | sign NT | top NT | NT ρ median | time ÷ replay |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, row in summary["table"].items():
            a, n = row["all"], row["non_terminal"]
            out.append(
                f"| {name} | {_f(a['spearman'])} | {_p(a['sign_agreement'])} | {_p(a['top_stage_agreement'])} | "
                f"{_f(n['spearman'])} | {_p(n['sign_agreement'])} | {_p(n['top_stage_agreement'])} | "
                f"{_f(row['non_terminal_spearman_seed_median'])} | {row['time_over_replay']:.3f} |"
            )
        plans = "; ".join(f"{b}: {p['plans']}" for b, p in summary["plans"].items() if p["cost_fraction"])
        out += ["", f"Plans (first seed): {plans}", ""]
        checked, strided = time_with_check(summary), time_with_check(summary, check=STRIDED)
        if checked is not None:
            out += [f"Time ÷ replay of the default as the attributor runs it (the estimate at 25 % and replay itself "
                    f"as its check, sum of the medians): **{checked:.2f}**"
                    + (f"; with strided replay at the same budget as the check instead (`second_opinion="
                       f"'strided-replay'`, the default's check before 2026-12-07): {strided:.2f}" if strided else "")
                    + ".", ""]  # fmt: skip
        if summary.get("trust"):
            from .render import _trust  # render imports this module

            trust = summary["trust"]
            by_replay = verdicts_by_replay(trust)
            out += [f"Trust verdicts of the default with replay as its check: verified by replay "
                    f"{by_replay['verified']} of {by_replay['n']} (behavior × seed), \"unreliable: replay disagrees\" "
                    f"{by_replay['unreliable']}, each with replay's values beside the estimate.", ""]  # fmt: skip
            out += [f"Without replay: trust verdicts of the default at {100 * trust['budget']:g} % (steps), its "
                    f"second opinion {trust.get('second_opinion', BASELINE)} (asked for with `second_opinion=`); "
                    f"*{WITH_DELTA}*: the same estimates checked against "
                    f"their linear read-out and task-vector negation; *{DELTA_ONLY}*: against task-vector negation "
                    f"alone; *{TWO_BUDGETS}*: against their linear read-out and partial replay at "
                    f"{100 * SMALLER_BUDGET:g} % (a cheaper check of the same family).", ""]  # fmt: skip
            out += _trust(summary["trust"])
    for pipeline, why in block.get("skipped", {}).items():
        out += [f"{pipeline}: not measured ({why}).", ""]
    return out
