"""A PEFT adapter repo imported as a LoRA stage: factors + scaling in the ledger's lora format, equal to the
recorder's LoRA stage; modules_to_save as dense deltas; lora-exact offered for a terminal adapter."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_stage_attribution import StageLedger
from hf_stage_attribution._internal.params import lora_layers
from hf_stage_attribution.errors import CheckpointImportError
from tests.checkpoints.test_fixtures import assert_same_deltas, tiny_gpt2, train


def _peft(model, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config))


@pytest.fixture(scope="module")
def full_then_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = tiny_gpt2(seed=1)
    model.save_pretrained(root / "base")
    recorded = StageLedger(root / "recorded")
    train(model, 2, seed=1, ledger=recorded, name="full")
    model.save_pretrained(root / "full")
    peft_model = _peft(model, target_modules=["c_attn", "c_proj"])
    train(peft_model, 3, lr=5e-2, seed=2, ledger=recorded, name="adapter")
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "recorded": StageLedger.load(root / "recorded")}


def test_adapter_stage_equals_the_recorded_lora_stage(full_then_adapter, tmp_path):
    root = full_then_adapter["root"]
    boundaries = [
        {"model": str(root / "base")},
        {"model": str(root / "full"), "name": "full"},
        {"model": str(root / "adapter"), "name": "adapter"},
    ]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert_same_deltas(ledger, full_then_adapter["recorded"])
    stage = ledger.stages[1]
    assert stage.kind == "lora" and stage.info["lora_file"] == "lora.safetensors"
    assert stage.info["delta_file"] is None  # factors only; Δ expanded on read
    spec = stage.lora["modules"]["transformer.h.0.attn.c_attn.weight"]
    assert spec["scaling"] == 2.0 and spec["fan_in_fan_out"] is True and spec["layer_type"] == "linear"
    assert stage.info["source"]["format"] == "peft-adapter"
    full_avail = ledger.stages[0].info["source"]["estimator_availability"]["available"]
    adapter_avail = stage.info["source"]["estimator_availability"]["available"]
    # an adapter stage leaves base weights alone (D = 1), so it does not block aa-* for the stage before it
    assert {"aa-linear", "aa-fd"} <= set(full_avail) and "lora-exact" not in full_avail
    assert "lora-exact" in adapter_avail
    assert stage.end_hash == full_then_adapter["recorded"].stages[1].end_hash


def test_embeddings_modules_to_save_and_alpha_pattern(tmp_path):
    model = tiny_gpt2(seed=2, tie=False)  # a LoRA on a tied wte is refused by the recorder (it moves the head too)
    model.save_pretrained(tmp_path / "base")
    peft_model = _peft(
        model, target_modules=["c_attn", "wte"], modules_to_save=["ln_f"], alpha_pattern={"h.1.attn.c_attn": 16}
    )
    recorded = StageLedger(tmp_path / "recorded")
    train(peft_model, 3, lr=5e-2, seed=4, ledger=recorded, name="adapter")
    peft_model.save_pretrained(tmp_path / "adapter")
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "adapter"), "name": "adapter"}]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert_same_deltas(ledger, StageLedger.load(tmp_path / "recorded"))
    modules = ledger.stages[0].lora["modules"]
    for name, info in lora_layers(peft_model).items():
        assert modules[name]["scaling"] == pytest.approx(info.scaling)
        assert modules[name]["layer_type"] == info.layer_type
    assert modules["transformer.h.1.attn.c_attn.weight"]["scaling"] == 4.0
    assert "transformer.ln_f.weight" in ledger.stages[0].info["trainable_parameters"]
    assert ledger.stages[0].info["delta_file"] == "delta.safetensors"  # ln_f (modules_to_save) as a dense delta


def test_adapter_errors(full_then_adapter, tmp_path):
    root = full_then_adapter["root"]
    with pytest.raises(CheckpointImportError, match="full model"):
        StageLedger.from_checkpoints(
            [{"model": str(root / "adapter")}, {"model": str(root / "full")}], tmp_path / "a", progress=False
        )
    dora = tmp_path / "dora"
    shutil.copytree(root / "adapter", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointImportError, match="DoRA"):
        StageLedger.from_checkpoints(
            [{"model": str(root / "full")}, {"model": str(dora)}], tmp_path / "b", progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora"]


def test_an_adapter_on_a_tied_embedding_is_refused(tmp_path):
    model = tiny_gpt2(seed=2)  # wte and lm_head tied: a LoRA on wte changes the lookup, not the head
    model.save_pretrained(tmp_path / "base")
    _peft(model, target_modules=["c_attn", "wte"]).save_pretrained(tmp_path / "adapter")
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "adapter"), "name": "adapter"}]
    with pytest.raises(CheckpointImportError, match=r"'transformer\.wte\.weight', which the base model ties to"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert not (tmp_path / "ledger").exists()
