"""Steps the case-study recipes share: rank stages by |effect| and attribute with replay beside the estimate."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..attributor import StageAttributor
from ..estimators import fidelity
from ..model_card import derived_card_text, write_model_card
from ..report.build import json_safe


def rank_stages(report: Any, behavior: str) -> list[str]:
    """Stages by |effect| on ``behavior``, most accountable first (ties: earlier stage first)."""
    rows = report.rows_for(behavior)
    return [r.stage for r in sorted(rows, key=lambda r: (-abs(r.effect), r.stage_index))]


def attribute_with_replay(pipeline: Any, out: Path) -> tuple[Any, Any]:
    """The default estimator's report (with fidelity against replay) and the replay report, written to ``out``.

    ``pipeline`` has ``ledger_dir``, ``model``, ``stage_fns`` and ``behaviors``. The estimate is checked against
    strided replay first (``second_opinion="strided-replay"``; by default replay itself would check it): the recipes
    show what the verdict said before replay (``trust.evidence.without_replay``) beside replay's.
    """

    report = StageAttributor(
        pipeline.ledger_dir, pipeline.model, stage_fns=pipeline.stage_fns, second_opinion="strided-replay"
    ).attribute(pipeline.behaviors)
    replay = StageAttributor(
        pipeline.ledger_dir, pipeline.model, estimator="replay", stage_fns=pipeline.stage_fns, diagnostics=False
    ).attribute(pipeline.behaviors)
    estimates = {(r.stage, r.behavior): r.effect for r in report.rows}
    truth = {(r.stage, r.behavior): r.effect for r in replay.rows}
    report.fidelity = json_safe(fidelity(estimates, truth, terminal_stage=report.stages[-1].name))
    report.verify_with_replay(replay)  # the card then says "verified by replay" or why replay disagrees
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    report.plot(out / "plot.png")
    replay.to_json(out / "replay.json")
    return report, replay


def rank_and_publish(
    recipe: str,
    behavior: str,
    pipeline: Any,
    report: Any,
    replay: Any,
    *,
    size: str,
    update_example_card: bool,
    repo_root: Path,
    **extra: Any,
) -> dict[str, Any]:
    """Print both reports and both rankings on ``behavior``, write the model card beside ``pipeline.model_dir`` (and
    copy it to ``model_cards/<recipe>/`` when asked); return the recipe summary (``extra`` entries appended)."""

    print("\n" + report.table())  # noqa: T201 (recipe output)
    print("\nReplay (ground truth):\n" + replay.table())  # noqa: T201
    ranks = {"attribution": rank_stages(report, behavior), "replay": rank_stages(replay, behavior)}
    print(  # noqa: T201
        f"\nRanking by |effect| on {behavior}: {report.estimator}: {ranks['attribution']}; replay: {ranks['replay']}"
    )
    card = write_model_card(report, pipeline.model_dir / "README.md")
    weights = f" ({card.weights.summary()})" if card is not None and card.weights is not None else ""
    print(f"Model card: {card.readme if card else '(not the main process)'}{weights}")  # noqa: T201
    if update_example_card and card is not None:
        publish_example_card(card, recipe, repo_root)
    return {
        "recipe": recipe, "size": size, "estimator": report.estimator, "rankings": ranks,
        "effects": {r.stage: r.effect for r in report.rows},
        "replay_effects": {r.stage: r.effect for r in replay.rows}, "fidelity": report.fidelity, **extra,
    }  # fmt: skip


def write_summary(summary: dict[str, Any], out: Path, started: float) -> None:
    """``out/summary.json`` and the recipe's closing line."""

    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(f"\nDone in {time.time() - started:.1f} s; summary in {out / 'summary.json'}")  # noqa: T201


def publish_example_card(card: Any, recipe: str, repo_root: Path) -> Path:
    """Copy a rendered card (README, sidecar JSON, plot) into ``<repo>/model_cards/<recipe>/``; return that folder."""

    dest = repo_root / "model_cards" / recipe
    dest.mkdir(parents=True, exist_ok=True)
    for path in (card.readme, card.sidecar, card.plot):
        if path is not None:
            shutil.copyfile(path, dest / path.name)
    return dest


def intervene_top_and_last(intervene: Any, ranks: list[str], out: Path, summary: dict, **save_kwargs: Any) -> None:
    """Scale the top- and the last-ranked stage (``intervene(stage) -> InterventionResult``), print both sweeps,
    save the top-ranked stage's chosen model under ``out/intervened`` and record everything in ``summary``.

    A ``card_from`` card is copied without its stage-attribution section and key (they describe the unedited
    model; ``model_card.strip_attribution``), the rest of it byte for byte."""
    card_from = save_kwargs.pop("card_from", None)
    if card_from is not None and Path(card_from).is_file():
        save_kwargs["card_text"] = derived_card_text(card_from)
        save_kwargs.setdefault("derived_from", Path(card_from).resolve().parent)
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
