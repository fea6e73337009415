"""The card writer checks that the weights beside the card are the model its report attributes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import ModelCardError
from hf_stage_attribution.model_card import write_model_card
from hf_stage_attribution.model_card.weights import check_card_weights
from hf_stage_attribution.report import AttributionReport


def _recorded(tmp_path):
    """A tiny GPT-2 trained in two recorded stages, and a report of its ledger."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    ledger = StageLedger(tmp_path / "ledger")
    ids = torch.randint(0, 32, (2, 8))
    for name in ("sft", "dpo"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                rec.step()
    report = AttributionReport.build(
        {"loss": {"sft": [0.4, 0.6], "dpo": [-0.1, 0.1]}}, estimator="aa-linear", stages=ledger.stages, ledger=ledger
    )
    return model, report


def test_a_card_beside_the_attributed_weights_says_they_match(tmp_path):
    model, report = _recorded(tmp_path)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert set(report.ledger["final_digests"]) == {n for n, _ in model.named_parameters()}

    files = write_model_card(report, folder, plot=False)

    assert files.weights is not None and not files.weights.differ
    assert files.weights.matched == len(report.ledger["final_digests"])
    assert "match its recorded digests" in files.weights.summary()
    assert "Caution" not in files.readme.read_text()
    again = AttributionReport.from_json(files.sidecar)  # the sidecar keeps the digests for a later check
    assert check_card_weights(folder, again.ledger).matched == files.weights.matched


def test_weights_trained_after_the_report_refuse_the_card_and_write_nothing(tmp_path):
    model, report = _recorded(tmp_path)
    folder = tmp_path / "model"
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1e-4)  # trained further, without recording
    model.save_pretrained(folder)
    (folder / "README.md").write_text("# my model\n", encoding="utf-8")

    with pytest.raises(ModelCardError, match=r"1 of \d+ tensors differ .*'transformer.h.0.mlp.c_fc.weight'") as err:
        write_model_card(report, folder, plot=False)

    assert "allow_other_weights=True" in str(err.value) and "nothing was written" in str(err.value)
    assert (folder / "README.md").read_text(encoding="utf-8") == "# my model\n"
    assert not (folder / "stage_attribution.json").exists()

    files = write_model_card(report, folder, plot=False, allow_other_weights=True)
    text = files.readme.read_text(encoding="utf-8")
    assert "**Caution: the weights beside the card are not the attributed model: 1 of" in text
    assert "# my model" in text  # the author's card is kept


def test_weights_that_cannot_be_compared_are_said_so_and_the_card_is_written(tmp_path):
    model, report = _recorded(tmp_path)
    half = tmp_path / "half"
    model.to(torch.bfloat16).save_pretrained(half)  # rounded: its digests differ without any training
    files = write_model_card(report, half, plot=False)
    assert files.weights.checked == 0 and files.weights.unchecked > 0
    assert "could not be checked" in files.weights.summary() and "bfloat16" in files.weights.summary()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    files = write_model_card(report, broken, plot=False)
    assert files.weights.unreadable == ["model.safetensors"] and "could not be read" in files.weights.summary()

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # a PEFT adapter alone: the base weights are elsewhere
    assert write_model_card(report, adapter, plot=False).weights is None


def test_weights_published_in_half_precision_match_the_attributed_model_rounded(tmp_path):
    """A model attributed in float32 and saved in bfloat16 or float16 (as models are often published): the
    attributor's report carries the attributed model's rounded digests, and the card's check compares with them."""
    from hf_stage_attribution import StageAttributor

    model, built = _recorded(tmp_path)
    ids = torch.randint(0, 32, (2, 8))

    def loss(m):
        with torch.no_grad():
            return m(input_ids=ids, labels=ids).loss.reshape(1)

    report = StageAttributor(StageLedger.load(tmp_path / "ledger"), model, estimator="delta-fd", show_progress=False)
    report = report.attribute({"loss": loss})
    rounded = report.ledger["final_digests_rounded"]
    assert set(rounded) == {"bfloat16", "float16"} and set(rounded["bfloat16"]) == set(report.ledger["final_digests"])
    assert "final_digests_rounded" not in built.ledger  # a report built from effects alone has no model to round
    n = len(report.ledger["final_digests"])

    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        folder = tmp_path / name
        copy.deepcopy(model).to(dtype).save_pretrained(folder)
        files = write_model_card(report, folder, plot=False)
        assert (files.weights.matched, files.weights.rounded, files.weights.unchecked) == (n, n, 0)
        assert files.weights.summary().endswith(f"({n} saved as {name}: compared with the attributed model rounded "
                                                f"to {name})")  # fmt: skip
        again = AttributionReport.from_json(files.sidecar)  # the sidecar keeps the rounded digests
        assert check_card_weights(folder, again.ledger).rounded == n
        assert check_card_weights(folder, built.ledger).unchecked == n  # without them: only unchecked, as before

    # the published bfloat16 model attributed itself: checked against the float32 record to a rounding step
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "half")
    for checked, expected in ((True, n), (False, 0)):
        attributor = StageAttributor(
            StageLedger.load(tmp_path / "ledger"), half, estimator="delta-fd", show_progress=False, check_model=checked
        )
        ledger = attributor.attribute({"loss": loss}).ledger
        assert (len(ledger["final_digests_rounded"]["bfloat16"]), ledger["final_digests_rounded"]["float16"]) == (
            expected, {}
        )  # fmt: skip
        assert check_card_weights(tmp_path / "half", ledger).rounded == expected  # unchecked model: not vouched for

    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1e-2)  # trained further, then published in bfloat16
    model.to(torch.bfloat16).save_pretrained(tmp_path / "later")
    check = check_card_weights(tmp_path / "later", report.ledger)
    assert (check.matched, check.rounded, check.unchecked) == (n - 1, n - 1, 1)  # not called a match


def test_a_report_without_digests_is_not_checked(tmp_path):
    model, _ = _recorded(tmp_path)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    report = AttributionReport.build({"loss": {"sft": [0.4, 0.6]}}, estimator="aa-linear")
    assert write_model_card(report, folder, plot=False).weights is None


def test_the_cli_refuses_other_weights_and_names_its_escape(tmp_path, capsys):
    from hf_stage_attribution.cli.main import main

    model, report = _recorded(tmp_path)
    folder = tmp_path / "model"
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # tied to the embeddings: both names differ in the checkpoint
    model.save_pretrained(folder)
    (tmp_path / "report.json").write_text(report.to_json(), encoding="utf-8")
    argv = ["card", str(tmp_path), "--readme", str(folder)]

    assert main(argv) == 1
    assert "--allow-other-weights" in capsys.readouterr().err
    assert not (folder / "README.md").exists()

    assert main([*argv, "--allow-other-weights"]) == 0
    assert "Weights: the weights beside the card are not the attributed model" in capsys.readouterr().out


def test_half_precision_weights_that_were_recorded_in_half_precision_match(tmp_path):
    from safetensors.torch import save_file

    from hf_stage_attribution._internal.hashing import tensor_digest

    w = torch.randn(4, 4).to(torch.bfloat16)  # an imported bfloat16 checkpoint: the ledger holds its float32 upcast
    save_file({"w": w, "b": torch.randn(4).to(torch.bfloat16)}, tmp_path / "model.safetensors")
    recorded = {"w": tensor_digest(w.float()), "b": tensor_digest(torch.randn(4))}  # b: float32 weights, rounded
    check = check_card_weights(tmp_path, {"final_digests": recorded})
    assert (check.matched, check.differ, check.unchecked) == (1, [], 1)
    assert "1 more saved in another dtype were not checked" in check.summary()


def test_unchanged_weights_are_read_once_and_weights_saved_again_are_read_again(tmp_path, monkeypatch):
    from hf_stage_attribution.model_card import weights as weights_module

    model, report = _recorded(tmp_path)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    reads = []
    real = weights_module.open_safetensors
    monkeypatch.setattr(weights_module, "open_safetensors", lambda path: reads.append(path) or real(path))

    first = check_card_weights(folder, report.ledger)
    first.differ.append("edited by the caller")  # the memo hands out copies
    second = check_card_weights(folder, report.ledger)
    assert len(reads) == 1 and not second.differ and second.matched == first.matched

    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)  # trained further and saved over the same file
    model.save_pretrained(folder)
    third = check_card_weights(folder, report.ledger)
    assert len(reads) == 2 and third.differ == ["transformer.wte.weight"]  # tied with lm_head, saved once
