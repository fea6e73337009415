"""Differing shapes between boundaries: a resized vocabulary imports (overlap delta + added rows), another
architecture or a shrinking tensor is a clear error with nothing left behind; so is a quantized checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import CheckpointImportError, CheckpointMismatchError
from tests.checkpoints.test_fixtures import tiny_gpt2, train


def _ls(path):
    return sorted(p.name for p in path.iterdir())


def test_resized_vocabulary_gives_overlap_delta_and_added_rows(tmp_path):
    model = tiny_gpt2(seed=5)
    model.save_pretrained(tmp_path / "base")
    base = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(70)
    train(model, 2, seed=5)
    model.save_pretrained(tmp_path / "resized")
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "resized"), "name": "new-tokens"}]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    name = "transformer.wte.weight"
    assert ledger.parameter_shapes[name] == (70, 16)
    final = model.transformer.wte.weight.detach()
    start = ledger.initial_state()[name]
    assert torch.equal(start[:64], base) and torch.count_nonzero(start[64:]) == 0
    delta = ledger.stages[0].delta_tensor(name)
    torch.testing.assert_close(delta[:64], final[:64] - base, atol=1e-6, rtol=0)
    torch.testing.assert_close(delta[64:], final[64:], atol=0, rtol=0)  # added rows: their full value
    ledger.check_model(model)  # θ_K of the ledger is the resized final model
    stage = ledger.stages[0]
    assert stage.info["source"]["resized"][name] == {"from": [64, 16], "to": [70, 16], "dim": 0}
    assert any("were added by this stage" in note for note in stage.info["notes"])


def test_shrinking_or_other_architectures_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    small = tiny_gpt2(seed=6)
    small.save_pretrained(tmp_path / "gpt2")
    tiny_gpt2(seed=6, layers=1).save_pretrained(tmp_path / "gpt2-1layer")
    big = tiny_gpt2(seed=6, vocab=80)
    big.save_pretrained(tmp_path / "gpt2-80")
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    before = _ls(tmp_path)
    cases = [("gpt2-1layer", "different architecture"), ("bert", "'bert' model"), ("gpt2-80", None)]
    for other, message in cases:
        boundaries = [{"model": str(tmp_path / "gpt2")}, {"model": str(tmp_path / other), "name": "x"}]
        if message is None:  # growing vocabulary: fine; the reverse order shrinks, which is refused
            boundaries = boundaries[::-1]
            boundaries[0].pop("name")
            boundaries[1]["name"] = "x"
            message = "only a resized vocabulary.*wte.weight \\[80, 16\\] -> \\[64, 16\\].*vocab_size: 80 -> 64"
        with pytest.raises(CheckpointMismatchError, match=message):
            StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert _ls(tmp_path) == before


def _tiny_llama(intermediate_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=intermediate_size, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_only_embeddings_grow_and_only_with_the_vocabulary(tmp_path):
    _tiny_llama(32).save_pretrained(tmp_path / "a")
    _tiny_llama(48).save_pretrained(tmp_path / "wider-mlp")  # same names, other shapes: another architecture
    boundaries = [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "wider-mlp"), "name": "x"}]
    with pytest.raises(CheckpointMismatchError, match="mlp.gate_proj.weight \\[32, 16\\] -> \\[48, 16\\].*"
                       "intermediate_size: 32 -> 48"):  # fmt: skip
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    model = _tiny_llama(32)
    model.resize_token_embeddings(70)
    model.save_pretrained(tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    (tmp_path / "resized" / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    boundaries[1]["model"] = str(tmp_path / "resized")
    with pytest.raises(CheckpointMismatchError, match="embeddings that grew.*vocab_size did not \\(64 -> 64\\)"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert _ls(tmp_path) == ["a", "resized", "wider-mlp"]
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))  # vocab_size 70: a resized vocabulary
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert sorted(ledger.stages[0].info["source"]["resized"]) == ["lm_head.weight", "model.embed_tokens.weight"]


def _quantized(folder, codes, scales: dict | None = None, quantization_config: dict | None = None):
    """``folder``'s checkpoint with its projection weights stored as ``codes(weight)`` (+ ``scales``)."""
    weights = load_file(str(folder / "model.safetensors"))
    out = {}
    for name, value in weights.items():
        if name.endswith("proj.weight"):
            out[name] = codes(value)
            out.update({name.replace(".weight", suffix): s.clone() for suffix, s in (scales or {}).items()})
        else:
            out[name] = value
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if quantization_config:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))


def _fp8(value):
    return (value / (value.abs().max() / 448.0)).to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    ("codes", "scales", "quantization_config", "message"),
    [
        (_fp8, {".weight_scale_inv": torch.ones(1, 1)}, {"quant_method": "fp8"}, "quant_method 'fp8'"),
        (_fp8, {".weight_scale_inv": torch.ones(1, 1)}, None, "float8 tensor"),
        (lambda v: torch.zeros(v.numel() // 2, 1, dtype=torch.uint8), {".weight.absmax": torch.ones(4)}, None,
         "integer tensor.*U8"),
    ],
    ids=["fp8-config", "fp8-tensors", "bitsandbytes-like"],
)  # fmt: skip
def test_quantized_checkpoints_are_refused(tmp_path, codes, scales, quantization_config, message):
    _tiny_llama().save_pretrained(tmp_path / "base")
    _tiny_llama().save_pretrained(tmp_path / "sft")
    _quantized(tmp_path / "sft", codes, scales, quantization_config)
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "sft"), "name": "sft"}]
    with pytest.raises(CheckpointImportError, match=f"found a quantized one.*{message}.*Dequantize.*save_pretrained"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert _ls(tmp_path) == ["base", "sft"]


def test_half_precision_checkpoints_give_float32_deltas(tmp_path):
    model = tiny_gpt2(seed=7)
    model.save_pretrained(tmp_path / "fp32")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, 2, seed=7)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    boundaries = [{"model": str(tmp_path / "fp32")}, {"model": str(tmp_path / "bf16"), "name": "bf16"}]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    name = "transformer.h.0.mlp.c_fc.weight"
    delta = ledger.stages[0].delta_tensor(name)
    expected = model.get_parameter(name).detach().float() - base[name]
    assert delta.dtype == torch.float32 and torch.equal(delta, expected)


def _bf16_base_then_trained(tmp_path, seed: int, trained_dtype: torch.dtype):
    """A bf16 checkpoint, then the same model trained 2 steps in float32 and saved in ``trained_dtype``, imported."""
    model = tiny_gpt2(seed=seed).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    base = {n: p.detach().float() for n, p in model.named_parameters()}
    trained = tiny_gpt2(seed=seed)
    train(trained, 2, seed=seed)
    trained = trained.to(trained_dtype)
    trained.save_pretrained(tmp_path / "sft")
    boundaries = [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "sft"), "name": "sft"}]
    return StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False), base, trained


def test_a_half_precision_start_checkpoint_is_stored_in_its_own_dtype(tmp_path):
    ledger, base, trained = _bf16_base_then_trained(tmp_path, 8, torch.float32)
    stored = load_file(tmp_path / "ledger" / "start.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # half a float32 θ_0's size, exactly
    start = ledger.initial_state()
    name = "transformer.h.0.mlp.c_fc.weight"
    assert start[name].dtype == torch.float32 and torch.equal(start[name], base[name])
    ledger.check_model(trained)  # θ_0 + Δ is the trained model


def test_two_bf16_checkpoints_give_a_bf16_delta_read_back_exactly(tmp_path):
    ledger, base, trained = _bf16_base_then_trained(tmp_path, 9, torch.bfloat16)
    (stage,) = ledger.stages
    stored = load_file(stage.dir / "delta.safetensors")
    dtypes = [t.dtype for t in stored.values()]
    assert dtypes.count(torch.bfloat16) > dtypes.count(torch.float32)  # half a float32 Δ (but where bf16 rounds a lot)
    for name, delta in stage.iter_delta():
        assert torch.equal(delta, trained.get_parameter(name).detach().float() - base[name])
    ledger.check_model(trained)
    ledger.verify()
