"""Saving interventions on PEFT models: only the active adapter, into the folder itself; nothing left behind by a
failed save; no silent skip of a stage tensor the model does not hold (when shifting or scaling it)."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.behaviors import as_behavior
from hf_stage_attribution.errors import InterventionError, ModelMismatchError
from hf_stage_attribution.estimators.finite_difference import subtract_embedding
from hf_stage_attribution.interventions import scale_stage
from hf_stage_attribution.interventions.save import apply_scaling
from tests.helpers.tiny import one_layer_gpt2, record_lm_steps

V = 32
DATA = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))


def _gpt2() -> torch.nn.Module:
    return one_layer_gpt2(V)


def _train(ledger: StageLedger, name: str, model: torch.nn.Module, steps: int = 2) -> None:
    record_lm_steps(ledger, name, model, DATA, lr=5e-2, steps=steps)


def _target(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=DATA).logits[:, -1, :].log_softmax(-1)[:, 5].float()


@pytest.fixture
def two_adapters(tmp_path):
    """A ledger whose last stage trained the second of two LoRA adapters (the active one)."""
    from peft import LoraConfig, get_peft_model

    ledger = StageLedger(tmp_path / "ledger")
    model = _gpt2()
    _train(ledger, "base", model)
    lora = dict(lora_dropout=0.0, fan_in_fan_out=True)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], **lora), "first"
    )
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], **lora))
    peft_model.set_adapter("second")
    _train(ledger, "lora", peft_model)
    result = scale_stage(
        ledger, peft_model, "lora", [1.0], kind="delta", target=as_behavior(_target), compare_delta=False,
        replay=False,
    )  # fmt: skip
    return ledger, peft_model, result


def test_the_active_adapter_is_saved_into_the_folder_and_reloads(two_adapters, tmp_path):
    from peft import PeftModel

    _, peft_model, result = two_adapters
    out = tmp_path / "saved"
    saved = result.save(out, alpha=1.0, variant="delta")
    assert saved.form == "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no first/ nor second/ subfolder
    assert saved.max_difference is not None and saved.max_difference < 1e-5
    with peft_model.disable_adapter():
        removed = _target(peft_model)
    reloaded = PeftModel.from_pretrained(peft_model.get_base_model().__class__(peft_model.config), out)
    assert list(reloaded.peft_config) == ["default"]
    assert abs(saved.figures["target"] - float(removed.mean())) < 1e-5


def test_a_failed_save_leaves_nothing_behind(two_adapters, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    _, _, result = two_adapters
    out = tmp_path / "new" / "saved"
    with pytest.raises(OSError, match="disk full"):
        result.save(out, alpha=1.0, variant="delta", tokenizer=BrokenTokenizer())
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        result.save(kept, alpha=1.0, variant="delta", tokenizer=BrokenTokenizer())
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "ledger", "new"]  # no hidden partial folder left
    assert list((tmp_path / "new").iterdir()) == []


class _Vectors:
    """The read interface of stage embeddings that apply_scaling and subtract_embedding use."""

    def __init__(self, vectors: dict[str, torch.Tensor]) -> None:
        self.vectors = vectors

    def names(self, k: int) -> list[str]:
        return list(self.vectors)

    def get(self, k: int, name: str) -> torch.Tensor:
        return self.vectors[name]

    def items(self, k: int):
        return iter(self.vectors.items())


def test_a_stage_tensor_the_model_does_not_hold_is_an_error_not_a_skip():
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    vectors = _Vectors({"weight": torch.ones(2, 3), "lm_head.weight": torch.ones(2, 3)})
    with pytest.raises(ModelMismatchError, match="'lm_head.weight'"), subtract_embedding(model, vectors, 0):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored
    with pytest.raises(InterventionError, match="1 the model does not hold .*'lm_head.weight'"):
        apply_scaling(model, vectors, 0, 1.0)


def test_scaling_a_stage_that_names_no_tensor_is_an_error_not_an_adapter_edit():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(InterventionError, match="found no tensor at all"):
        apply_scaling(peft_model, _Vectors({}), 0, 1.0)
