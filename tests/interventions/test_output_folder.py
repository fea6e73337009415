"""Where an intervention is saved and when it is not: a folder holding someone else's card or model is refused (even
with ``overwrite`` for a card this package did not write), a save is written beside the folder and moved in at the
end (a killed one leaves the folder as it was, and its leftover does not block the next), a stage that changed
nothing and an α that helps nothing save nothing, α stays in [0, 1], and the card and table say what was run."""

from __future__ import annotations

import json

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.behaviors import as_behavior
from hf_stage_attribution.errors import InterventionError
from hf_stage_attribution.interventions import scale_stage
from hf_stage_attribution.interventions.card import SECTION_BEGIN, render_section
from hf_stage_attribution.interventions.metrics import Constraint
from hf_stage_attribution.interventions.sweep import check_alphas
from tests.helpers.tiny import one_layer_gpt2, record_lm_steps

V = 32
DATA = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))


def _logp5(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=DATA).logits[:, -1, :].log_softmax(-1)[:, 5].float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-layer GPT-2 trained in stages ``a`` and ``b``, then a stage ``noop`` at learning rate 0."""
    root = tmp_path_factory.mktemp("tiny")
    ledger = StageLedger(root / "ledger")
    model = one_layer_gpt2(V, tie=False)
    for name, lr in (("a", 5e-2), ("b", 5e-2), ("noop", 0.0)):
        record_lm_steps(ledger, name, model, DATA, lr=lr)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=DATA).logits.clone()

    def distance(m: torch.nn.Module) -> torch.Tensor:  # 0 at the final model, larger for any edit of it
        with torch.no_grad():
            return ((m(input_ids=DATA).logits - reference) ** 2).mean(dim=(1, 2))

    result = scale_stage(
        ledger, model, "a", [0.5, 1.0], kind="delta", target=as_behavior(_logp5, name="logp5"), compare_delta=False,
        replay=False,
    )  # fmt: skip
    return StageLedger.load(root / "ledger"), model, result, as_behavior(distance, name="distance")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --- finding 1: someone else's files in the folder ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["README.md", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "config.json", "vocab.json"]
)
def test_a_folder_holding_model_or_card_files_is_refused_without_overwrite(tiny, tmp_path, name):
    _, _, result, _ = tiny
    (tmp_path / name).write_bytes(b"someone else's")
    with pytest.raises(InterventionError, match=f"already holds .*{name}.*overwrite=True"):
        result.save(tmp_path, alpha=1.0, card_text="# new card\n")
    assert _files(tmp_path) == {name: b"someone else's"}


def test_overwrite_never_replaces_a_card_this_package_did_not_write(tiny, tmp_path):
    _, _, result, _ = tiny
    (tmp_path / "README.md").write_text("# Someone else's card\nimportant text\n", encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"someone else's weights")
    before = _files(tmp_path)
    with pytest.raises(InterventionError, match="README.md to be absent or a card this package wrote"):
        result.save(tmp_path, alpha=1.0, card_text="# new card\n", overwrite=True)
    assert _files(tmp_path) == before
    (tmp_path / "README.md").unlink()  # weights alone: overwrite replaces them
    saved = result.save(tmp_path, alpha=1.0, card_text="# Mine\n", overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() != b"someone else's weights"
    assert saved.max_difference is not None and saved.max_difference < 1e-5
    # an earlier save of ours is replaced, its card spliced: the owner's text kept, one section
    result.save(tmp_path, alpha=0.5, overwrite=True)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# Mine\n") and card.count(SECTION_BEGIN) == 1 and "α = 0.5" in card
    assert json.loads((tmp_path / "intervention.json").read_text(encoding="utf-8"))["saved"]["alpha"] == 0.5


# --- finding 4: written beside the folder, moved in at the end ------------------------------------------------------


class _WatchingTokenizer:
    """Saved after the model: records what the output folder and its siblings hold at that moment."""

    def __init__(self, out):
        self.out, self.seen = out, None

    def save_pretrained(self, directory):
        self.seen = {
            "out": {p.name: p.read_bytes() for p in self.out.iterdir()} if self.out.exists() else None,
            "into": str(directory),
            "partials": sorted(p.name for p in self.out.parent.iterdir() if p.name.startswith(f".{self.out.name}.")),
        }


def test_a_save_is_written_beside_the_folder_and_a_leftover_does_not_block_the_next(tiny, tmp_path):
    _, _, result, _ = tiny
    out = tmp_path / "saved"
    killed = tmp_path / ".saved.partial-killed"  # what a save killed part way (kill -9) leaves behind
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    tokenizer = _WatchingTokenizer(out)
    saved = result.save(out, alpha=1.0, tokenizer=tokenizer)
    assert tokenizer.seen["out"] is None  # nothing in the output folder while the save is under way
    assert tokenizer.seen["into"] != str(out) and len(tokenizer.seen["partials"]) == 2
    assert {"config.json", "model.safetensors", "README.md", "intervention.json"} <= set(_files(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".saved.partial-")] == [killed.name]
    assert any(killed.name in note for note in saved.notes)  # the leftover is named, not read or removed


def test_an_existing_folder_keeps_its_files_until_the_save_is_complete(tiny, tmp_path):
    _, _, result, _ = tiny
    result.save(tmp_path, alpha=0.5)
    before = _files(tmp_path)
    tokenizer = _WatchingTokenizer(tmp_path)
    result.save(tmp_path, alpha=1.0, tokenizer=tokenizer, overwrite=True)
    assert tokenizer.seen["out"] == before  # untouched while the new save was written beside it
    assert _files(tmp_path)["model.safetensors"] != before["model.safetensors"]
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.partial-")]


# --- finding 5: a stage that changed nothing ------------------------------------------------------------------------


def test_a_stage_that_changed_no_parameter_is_refused_before_the_sweep(tiny):
    ledger, model, _, _ = tiny
    calls = []

    def target(m):
        calls.append(1)
        return _logp5(m)

    with pytest.raises(InterventionError, match="'noop' .*delta is zero.*nothing to scale down"):
        scale_stage(ledger, model, "noop", [0.5, 1.0], kind="delta", target=target, replay=False)
    assert calls == []


# --- finding 6: no α helps ------------------------------------------------------------------------------------------


def test_no_model_is_chosen_or_saved_when_no_alpha_improves_on_the_original(tiny, tmp_path):
    ledger, model, _, distance = tiny
    result = scale_stage(ledger, model, "a", [0.0, 0.5, 1.0], kind="delta", target=distance, replay=False)
    assert result.chosen is None and result.message.startswith("No α improves on the original model")
    with pytest.raises(InterventionError, match="No α improves.*Nothing was saved"):
        result.save(tmp_path / "none")
    with pytest.raises(InterventionError, match="α=0: that is the original model"):
        result.save(tmp_path / "none", alpha=0.0)
    assert not (tmp_path / "none").exists()
    loose = Constraint("logp5", max_drop=100.0)
    with_constraint = scale_stage(ledger, model, "a", [1.0], kind="delta", target=distance, replay=False,
                                  utilities={"logp5": _logp5}, constraint=loose)  # fmt: skip
    assert with_constraint.chosen is None and "among those that meet the constraint" in with_constraint.message


# --- finding 7: α outside [0, 1] -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alphas", "match"), [([2.0], "got 2"), ([0.5, -1.0], "got -1"), ([0.0], "only α = 0")])
def test_alphas_outside_zero_to_one_are_refused(alphas, match):
    with pytest.raises(InterventionError, match=match) as info:
        check_alphas(alphas)
    if alphas != [0.0]:
        assert "Expected every α in [0, 1]" in str(info.value) and "amplify" in str(info.value)


# --- finding 8: the card and table say what was run ------------------------------------------------------------------


def test_the_legend_and_table_describe_what_was_run(tiny):
    _, _, result, _ = tiny
    section = render_section(result)
    assert "`delta` subtracts α·Δ_k, the stage's own parameter delta (task-vector negation)." in section
    assert "for comparison" not in section and "`replay`" not in section
    assert "meets constraint" not in result.table() and "meets constraint" not in section
    assert [row[-1] for row in result.rows()].count("*") == (result.chosen is not None)


def test_the_saved_tokenizer_does_not_carry_the_loading_option(tiny, tmp_path):
    from transformers import AutoTokenizer

    from hf_stage_attribution.behaviors.loading import load_tokenizer
    from hf_stage_attribution.testing.lm import tiny_tokenizer

    _, _, result, _ = tiny
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))  # as the intervene command loads it: local_files_only=True
    result.save(tmp_path / "out", alpha=1.0, tokenizer=tokenizer, verify=False)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "local_files_only" not in config and config["model_max_length"] == 64
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("ab")["input_ids"] == tokenizer("ab")["input_ids"]
