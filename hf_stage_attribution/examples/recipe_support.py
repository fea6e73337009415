"""Steps the case-study recipes share: rank stages by |effect| and attribute with replay beside the estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def rank_stages(report: Any, behavior: str) -> list[str]:
    """Stages by |effect| on ``behavior``, most accountable first (ties: earlier stage first)."""
    rows = report.rows_for(behavior)
    return [r.stage for r in sorted(rows, key=lambda r: (-abs(r.effect), r.stage_index))]


def attribute_with_replay(pipeline: Any, out: Path) -> tuple[Any, Any]:
    """The default estimator's report (with fidelity against replay) and the replay report, written to ``out``.

    ``pipeline`` has ``ledger_dir``, ``model``, ``stage_fns`` and ``behaviors``.
    """
    from .. import StageAttributor
    from ..estimators import fidelity
    from ..report_build import json_safe

    report = StageAttributor(pipeline.ledger_dir, pipeline.model, stage_fns=pipeline.stage_fns).attribute(
        pipeline.behaviors
    )
    replay = StageAttributor(
        pipeline.ledger_dir, pipeline.model, estimator="replay", stage_fns=pipeline.stage_fns, diagnostics=False
    ).attribute(pipeline.behaviors)
    estimates = {(r.stage, r.behavior): r.effect for r in report.rows}
    truth = {(r.stage, r.behavior): r.effect for r in replay.rows}
    report.fidelity = json_safe(fidelity(estimates, truth, terminal_stage=report.stages[-1].name))
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    report.plot(out / "plot.png")
    replay.to_json(out / "replay.json")
    return report, replay


def publish_example_card(card: Any, recipe: str, repo_root: Path) -> Path:
    """Copy a rendered card (README, sidecar JSON, plot) into ``<repo>/model_cards/<recipe>/``; return that folder."""
    import shutil

    dest = repo_root / "model_cards" / recipe
    dest.mkdir(parents=True, exist_ok=True)
    for path in (card.readme, card.sidecar, card.plot):
        if path is not None:
            shutil.copyfile(path, dest / path.name)
    return dest


def intervene_top_and_last(intervene: Any, ranks: list[str], out: Path, summary: dict, **save_kwargs: Any) -> None:
    """Scale the top- and the last-ranked stage (``intervene(stage) -> InterventionResult``), print both sweeps,
    save the top-ranked stage's chosen model under ``out/intervened`` and record everything in ``summary``."""
    for label, stage in (("top-ranked", ranks[0]), ("last-ranked", ranks[-1])):
        result = intervene(stage)
        print(f"\nIntervention on the {label} stage {stage!r}:\n{result.table()}")  # noqa: T201 (recipe output)
        summary[f"intervention_{label}"] = result.to_dict()
        if label == "top-ranked" and result.chosen is not None:
            saved = result.save(out / "intervened", **save_kwargs)
            summary["saved"] = saved.to_dict()
            print(  # noqa: T201 (recipe output)
                f"Saved the {saved.form} model to {saved.directory}; reloaded with from_pretrained, largest "
                f"difference to the evaluated figures: {saved.max_difference:.2g}"
            )
