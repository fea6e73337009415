"""TRL's default ``ref_model=None`` reloads the DPO reference from ``config._name_or_path`` (the folder the model was
first loaded from, not the stage's start): the ledger records it as a separate model with its path and hash, replay
rebuilds it from that path, and a reference that cannot be rebuilt is refused before any work, with the fix.
Also: SFT of a PEFT model without ``stage_kind`` is recorded as kind ``lora``; bf16 and gradient checkpointing warn."""

from __future__ import annotations

import copy
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

import tests.helpers.recording as F
from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder
from hf_stage_attribution.errors import ReplayError
from hf_stage_attribution.integrations.trl import training_mode_warnings


def _logprob(model):
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    logits = model(input_ids=ids).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).reshape(-1)


def _record_ft(model, tmp_path, ledger_dir) -> None:
    """A 2-step Trainer stage ``ft`` of ``model`` recorded with replay data into ``ledger_dir``."""
    from transformers import Trainer

    Trainer(
        model=model, args=F.training_args(str(tmp_path / "o1"), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2),
        train_dataset=F.lm_dataset(16),
        callbacks=[StageRecorder(ledger_dir, "ft", curvature_segments=0, save_replay_data=True)],
    ).train()  # fmt: skip


def _record_sft_then_dpo(tmp_path):
    """An SFT stage, then DPO with TRL's default reference (reloaded from the base folder): (ledger, model, base)."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    base_dir = tmp_path / "base"
    F.gpt2().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)  # config._name_or_path = base_dir
    ledger_dir = tmp_path / "ledger"
    _record_ft(model, tmp_path, ledger_dir)
    args = F.trl_args(DPOConfig, str(tmp_path / "o2"), max_steps=2, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-2)  # fmt: skip
    DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=F.preference_dataset(8), processing_class=F.tokenizer(),
        callbacks=[StageRecorder(ledger_dir, "dpo", curvature_segments=0, save_replay_data=True)],
    ).train()  # fmt: skip
    return StageLedger.load(ledger_dir), model, base_dir


def test_dpo_with_the_default_reference_replays_from_the_recorded_path(tmp_path):
    ledger, model, base_dir = _record_sft_then_dpo(tmp_path)
    ref = ledger.stages[1].info["trl"]["reference_model"]
    assert ref["policy"] == "separate model" and ref["name_or_path"] == str(base_dir) and ref["state_hash"]
    # a float32 Trainer leaves only accelerate's "prepared" flag: no autocast wrapper for replay to put back
    assert ledger.stages[1].info["trainer"]["inherited_autocast_wrapper"] is False

    report = StageAttributor(ledger, model, estimator="aa-linear", diagnostics=False, show_progress=False).attribute(
        {"lp": _logprob}, validate=True
    )
    assert report.fidelity is not None

    shutil.rmtree(base_dir)  # the reference can no longer be rebuilt: refused before any work, naming the fix
    attributor = StageAttributor(ledger, model, estimator="aa-linear", diagnostics=False, show_progress=False)
    with pytest.raises(
        ReplayError, match=r"stage 'dpo' \(dpo\) trained against a separate reference.*--ref-model dpo="
    ):
        attributor.attribute({"lp": lambda m: 1 / 0}, validate=True)  # the behavior is never evaluated


def test_peft_sft_is_recorded_as_lora_and_risky_settings_warn(tmp_path):
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    model = get_peft_model(F.gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                                                fan_in_fan_out=True))  # fmt: skip
    args = F.trl_args(SFTConfig, str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, max_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32, checkpointing-free run: no training-mode warning
        recorder = StageRecorder(tmp_path / "ledger", "adapter", curvature_segments=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=F.sft_dataset(8), processing_class=F.tokenizer(),
                             callbacks=[recorder])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "trains in" in str(w.message) or "checkpointing" in str(w.message)]
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    assert stage.kind == "lora" and stage.curvature_loss == {"type": "causal-lm"}
    messages = training_mode_warnings(SimpleNamespace(bf16=True, fp16=False, gradient_checkpointing=True))
    assert len(messages) == 2 and "bf16 mixed precision" in messages[0] and "replay" in messages[0]
    assert "gradient checkpointing" in messages[1]
    assert training_mode_warnings(SimpleNamespace(bf16=False), torch.nn.Linear(2, 2).to(torch.bfloat16))


def test_aa_ggn_takes_the_dpo_reference_from_its_recorded_path(tmp_path, monkeypatch):
    """With TRL's default ``ref_model=None`` the built-in DPO curvature loss uses the separate reference reloaded
    from its recorded path (hash-checked), not the stage's start; aa-ggn then runs on the ledger."""
    from transformers import AutoModelForCausalLM, Trainer
    from trl import DPOConfig, DPOTrainer

    from hf_stage_attribution.estimators.curvature.trl import dpo_loss_pair, sequence_logprobs, supports_dpo
    from hf_stage_attribution.estimators.replay import load_state

    base_dir = tmp_path / "base"
    F.gpt2().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    ledger_dir = tmp_path / "ledger"
    Trainer(
        model=model, args=F.training_args(str(tmp_path / "o1"), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2),
        train_dataset=F.lm_dataset(16), callbacks=[StageRecorder(ledger_dir, "ft", curvature_segments=1)],
    ).train()  # fmt: skip
    args = F.trl_args(DPOConfig, str(tmp_path / "o2"), max_steps=2, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-2)  # fmt: skip
    DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=F.preference_dataset(8), processing_class=F.tokenizer(),
        callbacks=[StageRecorder(ledger_dir, "dpo", curvature_segments=1)],
    ).train()  # fmt: skip
    ledger = StageLedger.load(ledger_dir)
    stage = ledger.stages[1]
    assert stage.info["trl"]["reference_model"]["policy"] == "separate model" and supports_dpo(stage)

    forward, loss = dpo_loss_pair(ledger, model, stage)
    batch = stage.segments[0].examples()[0]
    start = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_state(start, ledger.state_at(0))
    reference = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        lp, ref, same = forward(start, batch), sequence_logprobs(reference, batch), sequence_logprobs(start, batch)
        half = lp.shape[0] // 2
        beta = float(stage.curvature_loss.get("beta", 0.1))
        expected = -torch.nn.functional.logsigmoid(beta * ((lp[:half] - ref[:half]) - (lp[half:] - ref[half:]))).mean()
        assert torch.allclose(loss(lp, batch), expected, atol=1e-6)
        assert not torch.allclose(ref, same)  # the stage start would have been a different reference

    report = StageAttributor(ledger, model, estimator="aa-ggn", diagnostics=False, show_progress=False).attribute(
        {"lp": _logprob}
    )
    assert report.estimator == "aa-ggn" and all(torch.isfinite(torch.tensor(r.effect)) for r in report.rows)

    # the products of larger models (no retained graphs: functorch transforms) give the same effects; the reference's
    # log-probabilities are computed before them (first computed inside a transform, they failed as "escaped")
    import hf_stage_attribution.estimators.curvature.propagation as propagation

    monkeypatch.setattr(propagation, "graph_cache_fits", lambda *a: False)
    shutil.rmtree(ledger_dir / "embeddings")  # computed again, not read from the cache
    functorch = StageAttributor(ledger, model, estimator="aa-ggn", diagnostics=False, show_progress=False).attribute(
        {"lp": _logprob}
    )
    for a, b in zip(report.rows, functorch.rows):
        assert a.stage == b.stage and abs(a.effect - b.effect) <= 1e-4 * max(1.0, abs(a.effect))


def test_a_reference_model_given_must_be_the_recorded_one(tmp_path):
    """A reference passed in ``ref_models`` is checked against the recorded reference's hash before any work:
    another model (the earlier stage's effect 33 % off on a tiny GPT-2) or the right one trained further in place
    (13 % off between two attributions) replays another counterfactual, silently; the recorded one replays as the
    reference rebuilt from its folder does."""
    from transformers import AutoModelForCausalLM

    ledger, model, base_dir = _record_sft_then_dpo(tmp_path)
    rebuilt = StageAttributor(ledger, model, estimator="replay", diagnostics=False, show_progress=False)
    expected = {r.stage: r.effect for r in rebuilt.attribute({"lp": _logprob}).rows_for("lp")}
    reference = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")  # as TRL loaded it
    attributor = StageAttributor(ledger, model, estimator="replay", diagnostics=False, show_progress=False,
                                 ref_models={"dpo": reference})  # fmt: skip
    given = {r.stage: r.effect for r in attributor.attribute({"lp": _logprob}).rows_for("lp")}
    assert given == pytest.approx(expected, rel=1e-3, abs=1e-6)  # float noise (threads); another reference: 33 % off
    with torch.no_grad():
        next(reference.parameters()).add_(0.01)  # trained further in place
    with pytest.raises(ReplayError, match=r"the reference model given for stage 'dpo' \(ref_models\) is not the one"):
        attributor.attribute({"lp": lambda m: 1 / 0})  # refused before any work: the behavior is never evaluated
    other = StageAttributor(ledger, model, estimator="replay", diagnostics=False, show_progress=False,
                            ref_models={"dpo": F.gpt2(seed=1)})  # fmt: skip
    with pytest.raises(ReplayError, match="its weights hash to"):
        other.attribute({"lp": lambda m: 1 / 0})


def test_a_reference_folder_is_hashed_once_per_process_until_its_files_change(tmp_path, monkeypatch):
    """A default attribution replays a DPO stage several times: the reference reloaded from its recorded folder is
    checked against the recorded hash each time, but hashed only while the folder's files are new to the process."""
    from hf_stage_attribution._internal.hashing import combine_digests
    from hf_stage_attribution._internal.params import state_digests
    from hf_stage_attribution.integrations import replay

    folder = tmp_path / "base"
    model = F.gpt2()
    model.save_pretrained(folder)
    recorded = combine_digests(state_digests(model))
    ref = {"policy": "separate model", "name_or_path": str(folder), "state_hash": recorded}
    hashed = []
    monkeypatch.setattr(replay, "state_digests", lambda m: hashed.append(1) or state_digests(m))
    for _ in range(3):
        assert replay.load_recorded_reference(ref) is not None
    assert len(hashed) == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(folder)  # the weights there changed: hashed again, and refused
    with pytest.raises(ReplayError, match="the weights there now differ from the recorded ones"):
        replay.load_recorded_reference(ref)
    assert len(hashed) == 2


def test_the_default_reference_replays_with_the_recorded_attention_implementation(tmp_path):
    """TRL loads the default reference with the policy's attention implementation; replay loaded it with
    ``from_pretrained``'s default (sdpa), which rounds differently from an eager run: the DPO stage missed θ_K by 8e-6
    on this model in float32 (the whole update under bf16 autocast)."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from hf_stage_attribution.estimators.replay import replay_gap

    F.gpt2().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    args = F.trl_args(DPOConfig, str(tmp_path / "o"), max_steps=3, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-2)  # fmt: skip
    DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=F.preference_dataset(8), processing_class=F.tokenizer(),
        callbacks=[StageRecorder(tmp_path / "ledger", "dpo", curvature_segments=0, save_replay_data=True)],
    ).train()  # fmt: skip
    ledger = StageLedger.load(tmp_path / "ledger")
    ref = ledger.stages[0].info["trl"]["reference_model"]
    assert ref["attn_implementation"] == "eager" and ref["dtype"] == "float32"
    assert replay_gap(ledger, model) < 1e-7


def test_a_synced_reference_given_for_replay_is_not_changed_by_it(tmp_path):
    """With ``sync_ref_model`` TRL mixes the policy into the reference in place: a reference given in ``ref_models``
    was changed by the first replay and stood for another reference in the next ones (and no longer matched the
    recorded one). The replay trains a copy: the given model is unchanged, and attributing again replays the same."""
    from trl import DPOConfig, DPOTrainer

    model, reference = F.gpt2(), F.gpt2(seed=1)  # a separate reference built in memory
    ledger_dir = tmp_path / "ledger"
    _record_ft(model, tmp_path, ledger_dir)
    args = F.trl_args(DPOConfig, str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=1)  # fmt: skip
    DPOTrainer(
        model=model, ref_model=copy.deepcopy(reference), args=args, train_dataset=F.preference_dataset(8),
        processing_class=F.tokenizer(),
        callbacks=[StageRecorder(ledger_dir, "dpo", curvature_segments=0, save_replay_data=True)],
    ).train()  # fmt: skip
    ledger = StageLedger.load(ledger_dir)
    assert "synced every 1 steps" in ledger.stages[1].info["trl"]["reference_model"]["policy"]
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    attributor = StageAttributor(ledger, model, estimator="replay", diagnostics=False, show_progress=False,
                                 ref_models={"dpo": reference})  # fmt: skip
    first = {r.stage: r.effect for r in attributor.attribute({"lp": _logprob}).rows_for("lp")}
    assert first["ft"] != 0.0  # removing ft replays dpo with the given reference
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    again = {r.stage: r.effect for r in attributor.attribute({"lp": _logprob}).rows_for("lp")}
    assert again == pytest.approx(first, rel=1e-6, abs=1e-9)
