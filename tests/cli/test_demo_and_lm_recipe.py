"""The demo command and the LM recipe at reduced size: they run offline, print tables, write cards that parse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_stage_attribution.cli.main import main

ROOT = Path(__file__).parent.parent.parent


def test_demo_digits_part_prints_tables_and_writes_a_card_that_parses(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--only", "digits"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "patch-reliance" in out and "Fidelity against replay:\npairs of (stage, behavior)" in out
    assert "* patch raised patch-reliance the most (+" in out and "model card:" in out
    # a quiet console: one plain line per phase on a non-terminal stderr, no redraws, no library chatter
    assert captured.err.splitlines()[0].startswith("training 3 stages: done (3/3) in ")
    assert "attributing 3 behaviors (estimates and replay): done in " in captured.err
    assert "\r" not in captured.err and len((out + captured.err).splitlines()) < 32  # 2: the CLI command to rerun
    card = ModelCard.load(tmp_path / "digits" / "model" / "README.md")
    meta = card.data.to_dict()["stage_attribution"]
    assert meta["estimator"] == "partial-replay" and meta["replay_validated"] is True
    top = {entry["name"]: entry["top_stage"] for entry in meta["behaviors"]}
    assert top["patch-reliance"] == "patch"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("lm_recipe", ROOT / "recipes" / "lm_sft_lora_dpo" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_recipe_at_tiny_size_records_four_stages_and_publishes(tmp_path):
    pipe, report, _, _ = _load_recipe().run(tmp_path, size="tiny", validate=True)
    assert [s.name for s in report.stages] == ["pretraining", "sft", "lora", "dpo"]
    assert {b.name for b in report.behaviors} == {"toxicity-teacher-forced", "toxicity-generations"}
    assert report.fidelity is not None and report.fidelity["non_terminal"]["n_pairs"] == 6
    rows = {r.stage: r.effect for r in report.rows_for("toxicity-teacher-forced")}
    assert rows["sft"] > 0, "the SFT stage trained on toxic completions must raise teacher-forced toxicity"
    card = ModelCard.load(pipe.model_dir / "README.md")
    assert card.data.to_dict()["stage_attribution"]["estimator"] == report.estimator


def test_demo_writes_behavior_specs_that_the_command_line_attributes_again(tmp_path, capsys):
    """The demo's output can be taken up by `attribute`: a behaviors.json beside the ledger, the command printed, and
    the example's DigitsMLP loads from --model (it is not a transformers class)."""
    assert main(["demo", "--output-dir", str(tmp_path), "--only", "digits", "--no-validate"]) == 0
    part = tmp_path / "digits"
    spec, out = part / "behaviors.json", capsys.readouterr().out
    assert f"--model {part / 'model'} --behaviors {spec} --output-dir" in out
    cli_out = tmp_path / "cli"
    args = ["attribute", str(part / "ledger"), "--model", str(part / "model"), "--behaviors", str(spec)]
    assert main([*args, "--output-dir", str(cli_out), "--estimator", "delta-fd"]) == 0
    demo = json.loads((part / "report" / "report.json").read_text(encoding="utf-8"))
    again = json.loads((cli_out / "report.json").read_text(encoding="utf-8"))
    assert [b["name"] for b in again["behaviors"]] == ["patch-reliance", "label-margin", "cross-entropy"]
    for name in ("patch-reliance", "label-margin", "cross-entropy"):  # the same behaviors: the same f(θ_K) − f(θ_0)
        total = demo["diagnostics"][name]["total_change"]
        assert again["diagnostics"][name]["total_change"] == pytest.approx(total, rel=1e-5, abs=1e-6)
