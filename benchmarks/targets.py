"""The targets the figures are read against (issues 4 and 7), checked on the run's data: met, or missed by how much.

Example:
    >>> verdict(0.72, ">=", 0.9)
    (False, 'missed by 0.180')
    >>> verdict(1.5, "<=", 2.0)
    (True, 'met with 0.500 to spare')
"""

from __future__ import annotations

from typing import Any

from .common import SECTIONS
from .interventions import target_rows
from .partial_replay import target_rows as partial_replay_rows
from .pipelines import PIPELINES

FLAT_TOLERANCE = 1.10  # "flat in K": the rise at the largest K at most 10 % above the rise at the smallest K


def verdict(measured: float | None, op: str, target: float) -> tuple[bool | None, str]:
    """Whether ``measured op target`` holds, and by how much it is met or missed."""
    if measured is None:
        return None, "not measured"
    gap = measured - target if op == ">=" else target - measured
    return (True, f"met with {gap:.3f} to spare") if gap >= 0 else (False, f"missed by {-gap:.3f}")


NEGATION = "delta-fd"  # task-vector negation: the anchor the default must never do worse than (issue 13)
_COMPARED = ("spearman", "sign_agreement", "top_stage_agreement")


def not_worse_than(block: dict[str, Any], default: str, anchor: str) -> tuple[float | None, str]:
    """``min(default − anchor)`` over :data:`_COMPARED` on all and non-terminal pairs, and where it is reached.

    Example:
        >>> fig = {"all": {"spearman": 0.9, "sign_agreement": 1.0, "top_stage_agreement": 1.0},
        ...        "non_terminal": {"spearman": 0.7, "sign_agreement": 1.0, "top_stage_agreement": 1.0}}
        >>> worst, where = not_worse_than({"a": fig, "b": {**fig, "non_terminal": {**fig["all"]}}}, "a", "b")
        >>> round(worst, 3), where
        (-0.2, 'non_terminal spearman 0.700 vs 0.900')
    """
    ours, theirs = block.get(default) or {}, block.get(anchor) or {}
    gaps = []
    for part in ("all", "non_terminal"):
        for metric in _COMPARED:
            a, b = (ours.get(part) or {}).get(metric), (theirs.get(part) or {}).get(metric)
            if isinstance(a, int | float) and isinstance(b, int | float) and a == a and b == b:
                gaps.append((a - b, f"{part} {metric} {a:.3f} vs {b:.3f}"))
    if not gaps:
        return None, "not measured"
    return min(gaps, key=lambda g: g[0])


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, scope): measured value, target, met, margin, how it was read."""
    rows: list[dict[str, Any]] = []

    def add(target: str, scope: str, measured: float | None, op: str, goal: float, how: str, show: str = "",
            percent: bool = False) -> None:  # fmt: skip
        met, margin = verdict(None if measured is None else (100 * measured if percent else measured), op,
                              100 * goal if percent else goal)  # fmt: skip
        if percent:
            margin = margin.replace(" to spare", " points to spare") if met else f"{margin} points"
        shown = show or ("—" if measured is None else f"{measured:.3f}")
        sign = {">=": "≥", "<=": "≤"}[op]
        goal_shown = f"{sign} {100 * goal:g} %" if percent else f"{sign} {goal:g}"
        rows.append({"target": target, "scope": scope, "measured": measured, "shown": shown, "goal": goal_shown,
                     "met": met, "margin": margin, "how": how})  # fmt: skip

    for pipeline, block in (results.get("fidelity", {}).get("summary") or {}).items():
        info = results["fidelity"]["pipelines"][pipeline]
        default = info["default"]["name"]
        auto = (info.get("auto") or {}).get("name", default)
        # where `auto` picks partial replay (stage functions or replay data), its rows are issue 13's (section 8);
        # these rows then read `auto`'s choice on a ledger where no later stage can be replayed
        who, where_ = ("default estimator", pipeline) if auto == default else (
            f"fallback estimator (auto picks {auto} here; {default} where no later stage can be replayed)",
            f"{pipeline}, fallback {default}")  # fmt: skip
        nt = (block.get(default) or {}).get("non_terminal") or {}
        how = f"{who} {default}, non-terminal pairs, seeds pooled"
        add("Spearman ≥ 0.9", where_, nt.get("spearman"), ">=", 0.9, how)
        add("sign agreement ≥ 90 %", where_, nt.get("sign_agreement"), ">=", 0.9, how)
        add("top-stage agreement 100 %", where_, nt.get("top_stage_agreement"), ">=", 1.0, how)
        every = (block.get(default) or {}).get("all") or {}
        how_all = f"{who} {default}, all pairs (what the card claims), seeds pooled"
        add("Spearman ≥ 0.9", f"{where_}, all pairs", every.get("spearman"), ">=", 0.9, how_all)
        add("sign agreement ≥ 90 %", f"{where_}, all pairs", every.get("sign_agreement"), ">=", 0.9, how_all)
        add("top-stage agreement ≥ 90 %", f"{where_}, all pairs", every.get("top_stage_agreement"), ">=", 0.9,
            how_all)  # fmt: skip
        worst, where = not_worse_than(block, default, NEGATION)
        add(f"never worse than task-vector negation ({NEGATION})", where_, worst, ">=", 0.0,
            f"{who}: min over Spearman, sign and top-stage agreement, all and non-terminal pairs, of {default} − "
            f"{NEGATION}; worst: {where}")  # fmt: skip
    for pipeline, cost in (results.get("cost") or {}).items():
        ggn = cost["estimators"].get("aa-ggn", {})
        add("aa-ggn ≤ 25 % of replay's time", pipeline, ggn.get("cold_over_replay"), "<=", 0.25,
            "aa-ggn cold (embeddings + read-out) / replay, median over seeds")  # fmt: skip
        cheap = cost["estimators"].get("aa-ggn (cheap)", {})
        if cheap:
            add(
                "aa-ggn ≤ 25 % of replay's time",
                f"{pipeline}, cheap preset",
                cheap.get("cold_over_replay"),
                "<=",
                0.25,
                "as above, curvature_options={'preset': 'cheap'} (1 segment, 8 Krylov vectors per later stage)",
            )
        linear = {n: e["means_only_over_fb"] for n, e in cost["estimators"].items() if "means_only_over_fb" in e}
        if linear:
            worst = max(linear, key=linear.get)
            add("linear estimators ≤ 2 × one forward+backward", pipeline, linear[worst], "<=", 2.0,
                f"means-only read-out with the embedding cache warm; worst: {worst}")  # fmt: skip
    sweep = (results.get("cost_sweep") or {}).get("rows")
    if sweep:
        last = sweep[-1]
        add("aa-ggn ≤ 25 % of replay's time", f"digits-hf, later stages ×{last['scale']:g}",
            last["aa-ggn"]["over_replay"], "<=", 0.25, "length sweep of §2 (cheap configuration: "
            f"{last['aa-ggn (cheap)']['over_replay']:.3f})")  # fmt: skip
    overhead = results.get("overhead")
    if overhead:
        ratio = overhead["timing"].get("cpu_ratio/recorder", {}).get("median")
        add("recording overhead ≤ 3 %", "Trainer + StageRecorder (defaults)", None if ratio is None else ratio - 1,
            "<=", 0.03, "median of per-repetition CPU-time ratios − 1 (wall-time ratio in §3)",
            "—" if ratio is None else f"{100 * (ratio - 1):.1f} %", percent=True)  # fmt: skip
    memory = results.get("memory")
    if memory:
        default = [c for c in memory["cases"] if c.get("malloc", "glibc default") == "glibc default"]
        head = {c["K"]: c["phases"][next(iter(c["phases"]))] for c in default}
        params = memory["cases"][0]["parameter_bytes"]
        at4 = head.get(4) or head[sorted(head)[len(head) // 2]]
        add("attribution memory rise ≤ 2 × parameter bytes (K = 4)", "GPT-2 from config", at4["rise"] / params, "<=",
            2.0, "peak RSS − RSS after loading model and ledger, StageAttributor aa-linear")  # fmt: skip
        ks = sorted(head)
        growth = head[ks[-1]]["rise"] / max(head[ks[0]]["rise"], 1)
        add(f"memory rise flat in K (K={ks[-1]} ≤ {FLAT_TOLERANCE:.2f} × K={ks[0]})", "GPT-2 from config", growth,
            "<=", FLAT_TOLERANCE, f"rise at K={ks[-1]} / rise at K={ks[0]}")  # fmt: skip
    dist = results.get("distributed")
    if dist:
        worst = max(max(r["max_rel_diff_per_example"], r["max_rel_diff_means"]) for r in dist["estimators"].values())
        add("2 processes = 1 process to 1e-5 relative", "digits, torchrun", worst, "<=", 1e-5,
            "largest relative difference of per-example and mean effects", f"{worst:.1e}")  # fmt: skip
    if "total_seconds" in results and not results["settings"]["quick"]:
        ran, full = results.get("sections_run"), list(SECTIONS)
        every = results.get("pipelines_run")
        if ran is None or (sorted(ran) == sorted(full) and (every is None or sorted(every) == sorted(PIPELINES))):
            add("full run < 30 min on 2 CPU cores", "this run", results["total_seconds"] / 60, "<=", 30.0,
                "wall time of the whole command (machine shared, see load average)",
                f"{results['total_seconds'] / 60:.1f} min")  # fmt: skip
        else:  # a run of some sections or pipelines says nothing of the full run's time
            add("full run < 30 min on 2 CPU cores", "this run", None, "<=", 30.0,
                f"not a full run: sections {', '.join(ran)}; pipelines {', '.join(every or PIPELINES)} "
                f"({results['total_seconds'] / 60:.1f} min)")  # fmt: skip
    return rows + target_rows(results) + partial_replay_rows(results)


def render(results: dict[str, Any]) -> list[str]:
    rows = evaluate(results)
    met = sum(1 for r in rows if r["met"])
    out = ["## Targets", "", f"{met} of {len(rows)} target checks met.", "",
           "| target | scope | measured | goal | met | margin | how it is read |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        flag = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        out.append(
            f"| {r['target']} | {r['scope']} | {r['shown']} | {r['goal']} | {flag} | {r['margin']} | {r['how']} |"
        )
    return out + [""]
