"""Adapter boundaries beyond a single LoRA stage: successive versions of one adapter (Trainer checkpoints, Hub
revisions) replace each other on their shared base, an embedding's saved base layer keeps its LoRA delta, and
adapter features the ledger cannot hold (LoRA bias, trainable tokens, a separately trained tied lm_head) are refused
with the merged model as the way out."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.checkpoints.cache import lay_out_hub_cache
from hf_stage_attribution.errors import CheckpointImportError
from tests.checkpoints.test_fixtures import tiny_gpt2, train


def _peft(model, r: int = 4, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, **config))


def _merged(peft_model) -> dict[str, torch.Tensor]:
    """The weights PEFT's merge_and_unload gives, in base names (the adapted model is left as it is)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.named_parameters()}


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _state_after(ledger, stages: int) -> dict[str, torch.Tensor]:
    state = {n: v.clone() for n, v in ledger.initial_state().items()}
    for stage in ledger.stages[:stages]:
        for name, delta in stage.iter_delta():
            state[name] += delta
    return state


def _assert_close(state, truth, atol=1e-6):
    for name, value in truth.items():
        torch.testing.assert_close(state[name], value, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Base + one LoRA run saved as checkpoint-2 and checkpoint-4 (each adapter relative to the base)."""
    root = tmp_path_factory.mktemp("lora_run")
    model = tiny_gpt2(seed=11)
    model.save_pretrained(root / "base")
    peft_model = _peft(model, target_modules=["c_attn", "c_proj"])
    truth = []
    for step in (2, 4):
        train(peft_model, 2, lr=5e-2, seed=step)
        peft_model.save_pretrained(root / "run" / f"checkpoint-{step}")
        truth.append(_merged(peft_model))
    return {"root": root, "truth": truth}


def test_trainer_checkpoints_of_one_lora_run_replace_each_other(lora_run, tmp_path):
    root, (mid, final) = lora_run["root"], lora_run["truth"]
    boundaries = [{"model": str(root / "base")}, {"model": str(root / "run"), "name": "lora", "checkpoints": "all"}]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert [s.name for s in ledger.stages] == ["lora@2", "lora@4"]
    _assert_close(_state_after(ledger, 1), mid)
    _assert_close(_state_after(ledger, 2), final)  # checkpoint-4's adapter on the base, not on checkpoint-2
    second = ledger.stages[1]
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(second.delta_tensor(name), final[name] - mid[name], atol=1e-6, rtol=0)
    assert second.info["delta_file"] is None and second.info["lora_file"] == "lora.safetensors"  # exact factors
    assert any("checkpoints of one Trainer run" in note for note in second.info["notes"])
    availability = second.info["source"]["estimator_availability"]
    assert "lora-exact" not in availability["available"]
    assert "previous stage" in availability["unavailable"]["lora-exact"]


def test_adapter_revisions_of_one_repo_replace_each_other(tmp_path):
    model = tiny_gpt2(seed=12)
    model.save_pretrained(tmp_path / "base")
    first = _peft(copy.deepcopy(model), r=4, target_modules=["c_attn"])
    train(first, 2, lr=5e-2, seed=1)
    first.save_pretrained(tmp_path / "v1")
    second = _peft(copy.deepcopy(model), r=2, target_modules=["c_attn", "c_fc"])  # another rank, scaling, module
    train(second, 2, lr=5e-2, seed=2)
    second.save_pretrained(tmp_path / "v2")
    cache = tmp_path / "cache"
    lay_out_hub_cache(cache, "org/base", {"main": tmp_path / "base"})
    lay_out_hub_cache(cache, "org/lora", {"v1": tmp_path / "v1", "v2": tmp_path / "v2"})
    boundaries = [
        {"model": "org/base"},
        {"model": "org/lora", "revision": "v1"},
        {"model": "org/lora", "revision": "v2"},
    ]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", cache_dir=cache, progress=False)
    _assert_close(_state_after(ledger, 1), _merged(first))
    _assert_close(_state_after(ledger, 2), _merged(second))
    assert any("revisions of one adapter repo" in note for note in ledger.stages[1].info["notes"])


def test_consecutive_adapters_whose_base_is_unknown_are_refused(lora_run, tmp_path):
    root = lora_run["root"]
    for index, step in enumerate((2, 4)):  # the same adapters, outside their run folder: nothing ties them
        copy_dir = tmp_path / f"adapter{index}"
        copy_dir.mkdir()
        for path in (root / "run" / f"checkpoint-{step}").iterdir():
            (copy_dir / path.name).write_bytes(path.read_bytes())
    boundaries = [{"model": str(root / "base")}, {"model": str(tmp_path / "adapter0"), "name": "a"},
                  {"model": str(tmp_path / "adapter1"), "name": "b"}]  # fmt: skip
    with pytest.raises(CheckpointImportError, match="cannot be decided.*merge_and_unload"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    configs = [tmp_path / f"adapter{i}" / "adapter_config.json" for i in (0, 1)]
    for path, base in zip(configs, ("org/base", "org/other")):
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base}))
    with pytest.raises(CheckpointImportError, match="trained on \\('org/other', None\\).*merge_and_unload"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    configs[1].write_text(json.dumps({**json.loads(configs[1].read_text()), "base_model_name_or_path": "org/base"}))
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    _assert_close(_state_after(ledger, 2), lora_run["truth"][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter0", "adapter1", "ledger"]


def test_embedding_lora_with_its_saved_base_layer(tmp_path):
    model = _tiny_llama(seed=13)
    model.save_pretrained(tmp_path / "base")
    peft_model = _peft(model, target_modules=["q_proj", "embed_tokens"])
    train(peft_model, 2, lr=5e-2, seed=3)
    peft_model.save_pretrained(tmp_path / "adapter")  # PEFT also saves model.embed_tokens.base_layer.weight
    merged = _merged(peft_model)
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(tmp_path / "merged")
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "adapter"), "name": "lora"},
                  {"model": str(tmp_path / "merged"), "name": "after"}]  # fmt: skip
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    _assert_close(_state_after(ledger, 1), merged)
    name = "model.embed_tokens.weight"
    assert name in ledger.stages[0].lora["modules"]
    assert torch.count_nonzero(ledger.stages[1].delta_tensor(name)) == 0  # the merged model adds nothing
    assert any("base layer" in note for note in ledger.stages[0].info["notes"])


def _gpt2_adapter(path, **config):
    peft_model = _peft(tiny_gpt2(seed=14), **config)
    peft_model.save_pretrained(path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_modules": ["c_attn"], "lora_bias": True}, "LoRA bias"),
        ({"target_modules": ["c_attn"], "trainable_token_indices": {"wte": [1, 2]}}, "trainable tokens"),
        ({"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}, "ties it to 'transformer.wte.weight'"),
        ({"target_modules": ["c_attn", "lm_head"]}, "ties it to 'transformer.wte.weight'"),
    ],
    ids=["lora_bias", "trainable_tokens", "tied_modules_to_save", "tied_lora_head"],
)
def test_unsupported_adapter_features_are_refused_with_the_merged_model_as_the_way_out(tmp_path, config, message):
    tiny_gpt2(seed=14).save_pretrained(tmp_path / "base")
    _gpt2_adapter(tmp_path / "adapter", **config)
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "adapter"), "name": "lora"}]
    with pytest.raises(CheckpointImportError, match=f"{message}.*merge_and_unload"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    if "lora_bias" in config:  # the tensor alone tells too, whatever the config says
        path = tmp_path / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "lora_bias": False}))
        with pytest.raises(CheckpointImportError, match="LoRA bias \\(tensor .*lora_B.bias"):
            StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert not (tmp_path / "ledger").exists()
