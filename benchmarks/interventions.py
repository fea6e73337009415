"""Intervention figures (issue 8): scale the stage the attribution ranks first, and the one it ranks last, down.

Each spurious-correlation recipe runs as shipped (``recipes/<name>/run.py``, its ``main``: record the stages,
attribute the reliance behavior with the default estimator and with replay, then sweep ``θ_K − α · v_k``
(``aa-linear``) and ``θ_K − α · Δ_k`` (``delta``) on the top- and the last-ranked stage, pick ``α`` under the
recipe's accuracy constraint, save the chosen model and reload it). This module only runs the recipes and keeps, per
stage, the sweep (α, target behavior, average accuracy, worst-group accuracy, constraint, choice) and the changes
at the chosen α and at α = 1 — the top-vs-last comparison. ``--quick`` runs the recipes at their reduced size
(``--small``), the full run at their full size; seed 0 (the figures in the recipes' READMEs).

Example:
    >>> from benchmarks.interventions import RECIPES
    >>> RECIPES
    ('spurious_digits', 'toxicity_classifier_minilm')
    >>> # results = run(Settings.make(quick=True), Path("/tmp/work"))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import REPO, Settings, import_script, quiet

RECIPES = ("spurious_digits", "toxicity_classifier_minilm")
SEED = 0


def load_recipe(name: str) -> Any:
    """``recipes/<name>/run.py`` imported by path (recipes are scripts, not a package)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {RECIPES}")
    return import_script(f"hsa_bench_recipe_{name}_run", REPO / "recipes" / name / "run.py")


def run(settings: Settings, work: Path, recipes: tuple[str, ...] = RECIPES) -> dict[str, Any]:
    """Run every recipe (reduced size with ``settings.quick``) and summarise its two interventions."""
    size = "small" if settings.quick else "full"
    start = time.perf_counter()
    out: dict[str, Any] = {"size": size, "seed": SEED, "recipes": {}}
    for name in recipes:
        recipe = load_recipe(name)
        argv = ["--output-dir", str(work / f"interventions-{name}"), "--seed", str(SEED)]
        t0 = time.perf_counter()
        with quiet():
            summary = recipe.main(argv + (["--small"] if settings.quick else []))
        out["recipes"][name] = summarise(summary, time.perf_counter() - t0)
    out["figure_seconds"] = time.perf_counter() - start
    return out


def summarise(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The figures of one recipe run (its ``summary.json`` content): rankings and both interventions."""
    ranks = summary["rankings"]["attribution"]
    stages = {}
    for label in ("top-ranked", "last-ranked"):
        result = summary.get(f"intervention_{label}")
        if result is None:
            raise ValueError(f"the {summary['recipe']} run reported no {label} intervention (run without it?)")
        stages[label] = stage_figures(result, ranks.index(result["stage"]) + 1)
        stages[label]["effect"] = summary["effects"].get(result["stage"])
        stages[label]["replay_effect"] = summary["replay_effects"].get(result["stage"])
    saved = summary.get("saved") or {}
    return {
        "size": summary["size"], "estimator": summary["estimator"], "rankings": summary["rankings"],
        "stages": stages, "saved_form": saved.get("form"), "reload_max_difference": saved.get("max_difference"),
        "seconds": seconds,
    }  # fmt: skip


def stage_figures(result: dict[str, Any], rank: int) -> dict[str, Any]:
    """One intervention (``InterventionResult.to_dict()``): its sweep rows and the changes it buys and costs."""
    names = result["accuracy_metrics"]
    average, worst = names.get("average"), names.get("worst_group")
    if average is None or worst is None:
        raise ValueError(f"stage {result['stage']!r}: the intervention reports no average/worst-group accuracy")
    base, chosen = result["baseline"], result["chosen"]

    def row(p: dict[str, Any]) -> dict[str, Any]:
        is_chosen = chosen is not None and (p["variant"], p["alpha"]) == (chosen["variant"], chosen["alpha"])
        return {"variant": p["variant"], "alpha": p["alpha"], "target": p["target"],
                "average": p["metrics"][average], "worst_group": p["metrics"][worst], "feasible": p["feasible"],
                "chosen": is_chosen}  # fmt: skip

    def change(p: dict[str, Any] | None) -> dict[str, float] | None:
        if p is None:
            return None
        return {"alpha": p["alpha"], "target": p["target"] - base["target"],
                "average": p["metrics"][average] - base["metrics"][average],
                "worst_group": p["metrics"][worst] - base["metrics"][worst]}  # fmt: skip

    main = sorted((p for p in result["points"] if p["variant"] == result["kind"]), key=lambda p: p["alpha"])
    others = sorted((p for p in result["points"] if p["variant"] != result["kind"]), key=lambda p: p["alpha"])
    full = next((p for p in main if abs(p["alpha"] - 1.0) < 1e-12), None)
    replay = result.get("replay")
    return {
        "stage": result["stage"], "rank": rank, "kind": result["kind"], "target_name": result["target"]["name"],
        "target_unit": result["target"]["unit"], "average_name": average, "worst_group_name": worst,
        "constraint": _describe(result.get("constraint")), "message": result["message"],
        "headline": result["headline"], "replay_note": result.get("replay_note", ""),
        "rows": [row(p) for p in [base, *main, *others, *([replay] if replay else [])]],
        "at_chosen": change(chosen), "at_alpha_1": change(full), "replay": change(replay),
    }  # fmt: skip


def _describe(constraint: dict[str, Any] | None) -> str:
    if not constraint:
        return "no constraint"
    parts = []
    if constraint.get("max_drop") is not None:
        drop = constraint["max_drop"]
        parts.append(f"{constraint['metric']} may drop by at most {drop:g} point{'' if drop == 1 else 's'}")
    if constraint.get("min_value") is not None:
        parts.append(f"{constraint['metric']} ≥ {constraint['min_value']:g}")
    return " and ".join(parts)


# --- markdown ----------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def render(block: dict[str, Any]) -> list[str]:
    """The section's markdown lines (heading first), from the JSON figures alone."""
    size = block["size"]
    out = ["## 7. Interventions: scaling the accountable stage down (issue 8)", "",
           f"Each recipe runs as shipped (`python recipes/<name>/run.py{' --small' if size == 'small' else ''}`, "
           f"seed {block['seed']}): it records its stages, ranks them by |effect| on its reliance behavior with the "
           "default estimator (replay beside it), then scales the top-ranked and the last-ranked stage down — "
           "`aa-linear`: θ_K − α·v_k; `delta`: θ_K − α·Δ_k (task-vector negation); `replay`: the stage removed and "
           "the later stages re-run — and picks α: the lowest target among the `aa-linear` α values that meet the "
           "recipe's accuracy constraint. Accuracies in percent on held-out data; *worst-group* is the lowest group "
           "accuracy (the groups cross the label with the spurious feature). The chosen model is saved with "
           "`save_pretrained` and reloaded.", ""]  # fmt: skip
    for name, r in block["recipes"].items():
        diff = r["reload_max_difference"]
        saved = (
            "no model saved (no α met the constraint)" if diff is None else
            f"chosen model saved as a {r['saved_form']} model; reloaded with `from_pretrained`, largest difference "
            f"to the evaluated figures {diff:.1e}"
        )  # fmt: skip
        out += [f"### {name}", "",
                f"Size `{r['size']}`, {r['seconds']:.0f} s for the whole recipe. Ranking by |effect|: "
                f"{r['estimator']} {r['rankings']['attribution']}; replay {r['rankings']['replay']}; {saved}.",
                ""]  # fmt: skip
        for label, s in r["stages"].items():
            effects = f"{_num(s['effect'], 3, True)} by {r['estimator']}, {_num(s['replay_effect'], 3, True)} (replay)"
            out += [f"**{label.capitalize()} stage `{s['stage']}`** (rank {s['rank']}; effect {effects}; constraint: "
                    f"{s['constraint']}):", ""]  # fmt: skip
            out += _sweep_table(s)
            out += [s["message"], "", s["headline"], ""]
    out += _comparison(block)
    return out


def _sweep_table(s: dict[str, Any]) -> list[str]:
    header = ["variant", "α", f"{s['target_name']}", f"average accuracy ({s['average_name']})",
              f"worst-group accuracy ({s['worst_group_name']})", "meets constraint", "chosen"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in s["rows"]:
        ok = "" if row["feasible"] is None else ("yes" if row["feasible"] else "no")
        lines.append(f"| {row['variant']} | {row['alpha']:g} | {row['target']:+.4g} | {row['average']:.2f} | "
                     f"{row['worst_group']:.2f} | {ok} | {'*' if row['chosen'] else ''} |")  # fmt: skip
    return lines + [""]


def _comparison(block: dict[str, Any]) -> list[str]:
    out = ["### Top-ranked vs last-ranked stage", "",
           "Changes against the original model (target in its unit; accuracies in points), for the same edit at "
           "α = 1 and at each stage's chosen α (same constraint); last/top: the last-ranked stage's |target change| "
           "over the top-ranked stage's.", ""]  # fmt: skip
    header = ["recipe", "stage (rank)", "target behavior", "α = 1: Δ target", "Δ average", "Δ worst-group",
              "chosen α", "Δ target", "Δ average", "Δ worst-group", "replay: Δ target"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = []
    for name, r in block["recipes"].items():
        for s in r["stages"].values():
            one, ch, rp = s["at_alpha_1"] or {}, s["at_chosen"] or {}, s["replay"] or {}
            alpha = f"{ch['alpha']:g}" if ch else "none chosen"  # none met the constraint or improved the target
            lines.append(
                f"| {name} | `{s['stage']}` ({s['rank']}) | {s['target_name']} | {_num(one.get('target'), 3, True)} | "
                f"{_num(one.get('average'), 1, True)} | {_num(one.get('worst_group'), 1, True)} | "
                f"{alpha} | {_num(ch.get('target'), 3, True)} | "
                f"{_num(ch.get('average'), 1, True)} | {_num(ch.get('worst_group'), 1, True)} | "
                f"{_num(rp.get('target'), 3, True)} |"
            )  # fmt: skip
        ratios.append((name, *[_ratio(r, key) for key in ("at_alpha_1", "at_chosen")]))
    out += lines + [""]
    for name, at_one, at_chosen in ratios:
        shown = ["—" if x is None else f"{x:.2g}" for x in (at_one, at_chosen)]
        out.append(f"- {name}: last/top |target change| {shown[0]} at α = 1, {shown[1]} at the chosen α.")
    return out + [""]


def _ratio(r: dict[str, Any], key: str) -> float | None:
    top, last = r["stages"]["top-ranked"].get(key), r["stages"]["last-ranked"].get(key)
    if not top or not last or top["target"] == 0:
        return None
    return abs(last["target"]) / abs(top["target"])


def target_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the targets table: per recipe, the top-ranked stage's chosen α buys ≥ 10 points of worst-group
    accuracy for ≤ 2 points of average accuracy."""
    rows = []
    for name, r in ((results.get("interventions") or {}).get("recipes") or {}).items():
        s = r["stages"]["top-ranked"]
        ch = s["at_chosen"]
        how = (f"top-ranked stage `{s['stage']}`, chosen α (aa-linear), size {r['size']}; worst-group gain, met only "
               "if average accuracy drops by ≤ 2 points")  # fmt: skip
        if ch is None:
            rows.append({"target": "≥ 10 points worst-group for ≤ 2 points average", "scope": name, "measured": None,
                         "shown": "no α met the constraint", "goal": "≥ 10 points (average ≥ −2)", "met": False,
                         "margin": "no α chosen", "how": how})  # fmt: skip
            continue
        gain, cost = ch["worst_group"], -ch["average"]
        met = gain >= 10.0 and cost <= 2.0
        if met:
            margin = f"met with {gain - 10.0:.1f} points to spare"
        else:
            missed = [f"worst-group {10.0 - gain:.1f} points short"] if gain < 10.0 else []
            missed += [f"average {cost - 2.0:.1f} points over"] if cost > 2.0 else []
            margin = "missed: " + ", ".join(missed)
        rows.append({"target": "≥ 10 points worst-group for ≤ 2 points average", "scope": name, "measured": gain,
                     "shown": f"{gain:+.1f} worst-group, {ch['average']:+.1f} average (α={ch['alpha']:g})",
                     "goal": "≥ 10 points (average ≥ −2)", "met": met, "margin": margin, "how": how})  # fmt: skip
    return rows
