"""The two spurious-correlation recipes at their reduced size (``--small``): the stage that introduced the spurious
feature is ranked first for the reliance behavior by the default estimator AND by replay (issue 5), the recipe
writes its report directory and its model card, and scaling the top-ranked stage down buys worst-group accuracy
while the same edit on the last-ranked stage barely moves the behavior (issue 8); the intervened model is saved.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parents[1]


def _recipe(name: str):
    module_name = f"hsa_recipe_{name}_run"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "recipes" / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _check_outputs(out: Path, behavior: str) -> None:
    from hf_stage_attribution import AttributionReport

    report = AttributionReport.from_json(out / "report" / "report.json")
    assert {r.behavior for r in report.rows} == {behavior}
    assert report.fidelity is not None and report.fidelity["all"]["top_stage_agreement"] == 1.0
    assert (out / "report" / "plot.png").exists() and (out / "report" / "replay.json").exists()
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert "## Accountability: training-stage attribution" in card and behavior in card
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["rankings"]["attribution"][0] == summary["rankings"]["replay"][0]


def test_spurious_digits_small_ranks_the_patch_stage_first(tmp_path):
    recipe = _recipe("spurious_digits")
    summary = recipe.main(["--output-dir", str(tmp_path / "digits"), "--small"])
    assert summary["estimator"] == "partial-replay"  # the stage functions have the step-limited form
    assert summary["rankings"]["attribution"][0] == "patch"
    assert summary["rankings"]["replay"][0] == "patch"
    assert summary["effects"]["patch"] > 0 and summary["replay_effects"]["patch"] > 0
    _check_outputs(tmp_path / "digits", "patch-reliance")
    top = summary["intervention_top-ranked"]
    assert top["stage"] == "patch" and top["chosen"] is not None
    gain = top["chosen"]["metrics"]["worst_group_accuracy"] - top["baseline"]["metrics"]["worst_group_accuracy"]
    cost = top["baseline"]["metrics"]["accuracy"] - top["chosen"]["metrics"]["accuracy"]
    assert gain >= 10.0 and cost <= 1.0
    assert summary["saved"]["max_difference"] < 1e-5
    intervened = (tmp_path / "digits" / "intervened" / "README.md").read_text(encoding="utf-8")
    assert "## Intervention: scaling down training stage `patch`" in intervened
    # the source card is kept without its accountability section, which describes the unedited model
    assert "## Accountability: training-stage attribution" not in intervened and "stage_attribution:" not in intervened
    assert "It is derived from the model" in intervened


def test_toxicity_classifier_minilm_small_ranks_the_refresh_stage_first_and_scaling_it_down_helps(tmp_path):
    recipe = _recipe("toxicity_classifier_minilm")
    summary = recipe.main(["--output-dir", str(tmp_path / "tox"), "--small"])
    assert summary["estimator"] == "partial-replay"  # its stage functions take Trainer callbacks: step-limitable
    # the biased data refresh, not the clean fine-tuning before it, taught the shortcut: both rankings agree
    assert summary["rankings"]["attribution"][0] == "data-refresh"
    assert summary["rankings"]["replay"][0] == "data-refresh"
    assert summary["replay_gap"] < 1e-5  # the ground truth is the recorded recipe (frozen embeddings stay frozen)
    assert summary["effects"]["data-refresh"] > 0 and summary["replay_effects"]["data-refresh"] > 0
    # the cross-check with alt-profanity-check: it agrees with the clean labels; the refresh's over-flagging shows
    agreement = summary["agreement"]
    assert agreement["held-out/all"] >= 90.0 and agreement["fine-tuning/clean+term"] >= 90.0
    assert agreement["data-refresh/clean+term"] < 60.0
    _check_outputs(tmp_path / "tox", "identity-reliance")
    specs = summary["specs"]
    assert Path(specs["target"]).exists() and Path(specs["utility"]).exists()
    # scaling the top-ranked stage down buys ≥ 10 points of worst-group accuracy within 2 points of accuracy
    top, last = summary["intervention_top-ranked"], summary["intervention_last-ranked"]
    assert top["stage"] == "data-refresh" and top["chosen"] is not None
    assert last["stage"] == summary["rankings"]["attribution"][-1]
    gain = top["chosen"]["metrics"]["worst_group_accuracy"] - top["baseline"]["metrics"]["worst_group_accuracy"]
    cost = top["baseline"]["metrics"]["accuracy"] - top["chosen"]["metrics"]["accuracy"]
    assert gain >= 10.0 and cost <= 2.0, (gain, cost)
    assert top["chosen"]["target"] < top["baseline"]["target"]

    # the same edit (α = 1) on the last-ranked stage moves the target far less, and buys no worst-group accuracy
    def at_one(result):
        return next(p for p in result["points"] if p["variant"] == result["kind"] and p["alpha"] == 1.0)

    moved_top = abs(at_one(top)["target"] - top["baseline"]["target"])
    moved_last = abs(at_one(last)["target"] - last["baseline"]["target"])
    assert moved_last < 0.2 * moved_top, (moved_top, moved_last)
    last_gain = at_one(last)["metrics"]["worst_group_accuracy"] - last["baseline"]["metrics"]["worst_group_accuracy"]
    assert last_gain < gain - 10.0, (gain, last_gain)
    assert summary["saved"]["max_difference"] < 1e-5
    intervened = (tmp_path / "tox" / "intervened" / "README.md").read_text(encoding="utf-8")
    assert "## Intervention: scaling down training stage `data-refresh`" in intervened


@pytest.mark.parametrize("name", ["spurious_digits", "toxicity_classifier_minilm"])
def test_recipe_readme_starts_with_its_command(name):
    text = (ROOT / "recipes" / name / "README.md").read_text(encoding="utf-8")
    first_code = text.split("```")[1]
    assert f"recipes/{name}/run.py" in first_code.splitlines()[1]
