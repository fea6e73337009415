"""The example cards in model_cards/ are exactly what the writer renders from their sidecar reports (golden files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hf_stage_attribution import write_model_card

CARDS = sorted(p.parent for p in (Path(__file__).parent.parent.parent / "model_cards").glob("*/README.md"))


def test_there_are_example_cards():
    assert len(CARDS) >= 2


@pytest.mark.parametrize("card_dir", CARDS, ids=lambda p: p.name)
def test_example_card_is_the_rendering_of_its_sidecar(card_dir, tmp_path):
    work = tmp_path / card_dir.name
    shutil.copytree(card_dir, work)
    write_model_card(work / "stage_attribution.json", work / "README.md")
    for name in ("README.md", "stage_attribution.json"):
        assert (work / name).read_bytes() == (card_dir / name).read_bytes(), f"{card_dir.name}/{name} is stale"
    from huggingface_hub import ModelCard

    card = ModelCard.load(work / "README.md")
    assert card.data.to_dict()["stage_attribution"]["estimator"]


@pytest.mark.parametrize("card_dir", CARDS, ids=lambda p: p.name)
def test_example_card_says_the_direction_and_plots_one_panel_per_behavior(card_dir):
    from hf_stage_attribution.report import AttributionReport

    report = AttributionReport.from_json(card_dir / "stage_attribution.json")
    text = (card_dir / "README.md").read_text(encoding="utf-8")
    for behavior in report.behaviors:
        top = report.top_stage(behavior.name)
        way = "raised" if next(r for r in report.rows_for(behavior.name) if r.stage == top).effect > 0 else "lowered"
        assert f"{way} {behavior.name} the most (" in text  # the direction sentence
    assert "effect ÷ total change" not in text
    # these sidecars come from runs without replay: no replay column (tests/fixtures/cards/new_card.md has one)
    assert ("replay (ground truth)" in text) == any(r.replay_effect is not None for r in report.rows)
    assert len(report.plot_figure().axes) == len(report.behaviors)
