"""PEFT set-ups the ledger cannot represent are refused when a stage begins, before anything is written; the
set-ups it represents exactly (plain LoRA, rsLoRA, modules_to_save, untied embedding LoRA, two adapters with one
active) are recorded as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution._internal.params import peft_recording_problems
from hf_stage_attribution.errors import LedgerError
from tests.helpers.tiny import one_layer_gpt2, record_lm_steps

V = 32
DATA = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))


def _gpt2(tie: bool = True) -> torch.nn.Module:
    return one_layer_gpt2(V, tie=tie)


def _train(ledger: StageLedger, name: str, model: torch.nn.Module, steps: int = 2) -> None:
    record_lm_steps(ledger, name, model, DATA, lr=1e-2, steps=steps)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lora(**config):
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **config)


def _config(name: str):
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    return {
        "dora": _lora(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
        "lora_bias": _lora(target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True),
        "tied_embedding": _lora(target_modules=["wte"]),
        "tied_lm_head": _lora(target_modules=["lm_head"]),
        "tied_modules_to_save": _lora(target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"]),
        "ia3": IA3Config(
            target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
        ),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    }[name]


REFUSED = {
    "dora": "DoRA.*use_dora=True.*merge_and_unload",
    "lora_bias": "LoRA bias.*c_attn.*lora_bias=False.*merge_and_unload",
    "tied_embedding": "tied weight: transformer.wte.weight .*lm_head.weight.*tie_word_embeddings=False",
    "tied_lm_head": "tied weight: lm_head.weight .*transformer.wte.weight.*target_modules",
    "tied_modules_to_save": "tied weight: lm_head.weight \\(modules_to_save",
    "ia3": "PEFT IA3 adapter.*merge_and_unload",
    "prompt": "PEFT PROMPT_TUNING adapter.*cannot be merged.*LoRA adapter instead",
    "prefix": "PEFT PREFIX_TUNING adapter.*LoRA adapter instead",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unrepresentable_peft_stages_are_refused_before_anything_is_written(tmp_path, name):
    from peft import get_peft_model

    ledger = StageLedger(tmp_path / "ledger")
    model = _gpt2()
    _train(ledger, "base", model)
    before = _snapshot(tmp_path / "ledger")
    peft_model = get_peft_model(model, _config(name))
    with pytest.raises(LedgerError, match=REFUSED[name]) as caught:
        _train(ledger, "adapter", peft_model)
    assert "Nothing was written; the ledger is unchanged." in str(caught.value)
    assert _snapshot(tmp_path / "ledger") == before
    assert [s.name for s in StageLedger(tmp_path / "ledger").stages] == ["base"]


@pytest.mark.parametrize("name", ["prompt", "ia3", "dora"])
def test_a_refused_first_stage_creates_no_ledger(tmp_path, name):
    from peft import get_peft_model

    with pytest.raises(LedgerError, match="cannot be recorded faithfully"):
        _train(StageLedger(tmp_path / "ledger"), "first", get_peft_model(_gpt2(), _config(name)))
    assert not (tmp_path / "ledger").exists()


def _two_adapters(model: torch.nn.Module) -> torch.nn.Module:
    from peft import get_peft_model

    peft_model = get_peft_model(model, _lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), "first")
    peft_model.add_adapter("second", _lora(target_modules=["c_attn"], fan_in_fan_out=True))
    peft_model.set_adapter("second")
    return peft_model


ACCEPTED = {
    "plain": lambda m: _lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "rslora": lambda m: _lora(target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True),
    "modules_to_save": lambda m: _lora(target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["ln_f"]),
    "untied_embedding": lambda m: _lora(target_modules=["wte", "wpe"]),
}


@pytest.mark.parametrize("name", [*sorted(ACCEPTED), "two_adapters"])
def test_representable_peft_stages_are_still_recorded_exactly(tmp_path, name):
    from peft import get_peft_model

    ledger = StageLedger(tmp_path / "ledger")
    model = _gpt2(tie=name != "untied_embedding")
    _train(ledger, "base", model)
    peft_model = _two_adapters(model) if name == "two_adapters" else get_peft_model(model, ACCEPTED[name](model))
    assert peft_recording_problems(peft_model) == []
    before = {n: t.clone() for n, t in ledger.final_state().items()}
    _train(ledger, "adapter", peft_model)
    stage = ledger.stage("adapter")
    merged = peft_model.merge_and_unload()
    after = {n: p.detach().float() for n, p in merged.named_parameters()}
    for n in stage.delta_names():
        torch.testing.assert_close(stage.delta_tensor(n), after[n] - before[n], rtol=1e-5, atol=1e-6)


def test_a_merged_adapter_is_no_longer_a_problem():
    from peft import get_peft_model

    peft_model = get_peft_model(_gpt2(), _config("dora"))
    assert peft_recording_problems(peft_model)
    assert peft_recording_problems(peft_model.merge_and_unload()) == []
