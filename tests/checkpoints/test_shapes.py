"""Differing shapes between boundaries: a resized vocabulary imports (overlap delta + added rows), another
architecture or a shrinking tensor is a clear error with nothing left behind."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import CheckpointMismatchError
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
            message = "Only growth"
        with pytest.raises(CheckpointMismatchError, match=message):
            StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False)
    assert _ls(tmp_path) == before


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
