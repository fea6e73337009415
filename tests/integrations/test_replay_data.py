"""``replay_trainer_stage`` rebuilds a recorded TRL stage from its replay data (Arrow dataset, saved tokenizer,
JSON arguments, collator, reference policy) and, from the same start, reproduces the recorded end exactly."""

from __future__ import annotations

import copy
import json

import pytest

import tests.helpers.recording as F
from hf_stage_attribution import StageLedger  # noqa: E402
from hf_stage_attribution.errors import ReplayError  # noqa: E402


def reward_length(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _lm_trainer(model, out, callbacks, texts, max_length, **args):
    """A plain Trainer whose collator holds the tokenizer (the Trainer itself has no processing_class)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    tok = F.tokenizer()
    data = Dataset.from_dict(dict(tok(texts, truncation=True, max_length=max_length)))
    args = F.training_args(out, max_steps=3, per_device_train_batch_size=8, **args)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)


def _trainer_with_lm_collator(model, out, callbacks):
    from hf_stage_attribution.testing.lm import toy_corpus

    return _lm_trainer(model, out, callbacks, toy_corpus(0).clean[:32], 32)


def _trainer_grouped_by_length(model, out, callbacks):
    """Batches of similar lengths (``train_sampling_strategy="group_by_length"``, transformers 5's name for
    ``group_by_length=True``): the replay rebuilds the same LengthGroupedSampler from the recorded arguments."""
    from hf_stage_attribution.testing.lm import toy_corpus

    texts = [t * (1 + i % 4) for i, t in enumerate(toy_corpus(0).clean[:48])]  # lengths that differ
    return _lm_trainer(model, out, callbacks, texts, 48, train_sampling_strategy="group_by_length")


def _sft(model, out, callbacks):
    from trl import SFTConfig, SFTTrainer

    args = F.trl_args(SFTConfig, out, max_steps=3, per_device_train_batch_size=4, max_length=32)
    return SFTTrainer(model=model, args=args, train_dataset=F.sft_dataset(), processing_class=F.tokenizer(),
                      callbacks=callbacks)  # fmt: skip


def _kto(model, out, callbacks):
    from trl import KTOConfig, KTOTrainer

    args = F.trl_args(KTOConfig, out, max_steps=2, per_device_train_batch_size=4, max_length=32)
    return KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=F.unpaired_dataset(),
                      processing_class=F.tokenizer(), callbacks=callbacks)  # fmt: skip


def _dpo_precomputed(model, out, callbacks):
    from trl import DPOConfig, DPOTrainer

    args = F.trl_args(DPOConfig, out, max_steps=2, per_device_train_batch_size=4, max_length=32,
                      precompute_ref_log_probs=True)  # fmt: skip
    return DPOTrainer(model=model, args=args, train_dataset=F.preference_dataset(), processing_class=F.tokenizer(),
                      callbacks=callbacks)  # fmt: skip


def _grpo(model, out, callbacks):
    from trl import GRPOConfig, GRPOTrainer

    args = F.trl_args(GRPOConfig, out, max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4)  # fmt: skip
    return GRPOTrainer(model=model, reward_funcs=[reward_length], args=args, train_dataset=F.prompt_dataset(),
                       processing_class=F.tokenizer(), callbacks=callbacks)  # fmt: skip


def _record(tmp_path, make, name="stage"):
    from hf_stage_attribution import StageRecorder

    model = F.gpt2()
    start = copy.deepcopy(model)
    recorder = StageRecorder(tmp_path / "ledger", name, save_replay_data=True, curvature_segments=0)
    make(model, str(tmp_path / "out"), [recorder]).train()
    return model, start, StageLedger.load(tmp_path / "ledger").stages[-1]


@pytest.mark.parametrize(
    ("make", "extra"),
    [
        (_trainer_with_lm_collator, {}),
        (_trainer_grouped_by_length, {}),
        (_sft, {}),
        (_kto, {}),
        (_dpo_precomputed, {}),
        (_grpo, {"reward_funcs": [reward_length]}),
    ],
    ids=["trainer-lm-collator", "trainer-group-by-length", "sft", "kto", "dpo-precomputed", "grpo"],
)
def test_replay_from_the_same_start_reproduces_the_recorded_end(tmp_path, make, extra, capsys):
    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    trained, start, stage = _record(tmp_path, make)
    printed = capsys.readouterr()
    assert "'train_runtime'" in printed.out  # the recorded training printed its log dicts
    # the replay data (a copy of the dataset) are not in the projected growth: their size is said and kept
    assert f"stage {stage.name!r}: replay data " in printed.err
    assert stage.info["replay"]["bytes"] == sum(f.stat().st_size for f in stage.replay_dir.rglob("*") if f.is_file())
    info = json.loads((stage.replay_dir / "replay.json").read_text())
    assert info["config"]["module"].startswith(("trl.", "transformers.")) and info["dataset"]["num_rows"] > 0
    plain = make in (_trainer_with_lm_collator, _trainer_grouped_by_length)
    saved = "collator_tokenizer" if plain else "processing_class"
    assert (stage.replay_dir / saved / "tokenizer.json").exists()
    assert not any(p.suffix in (".pkl", ".pickle", ".bin") for p in stage.replay_dir.rglob("*"))
    replayed = replay_trainer_stage(stage, start, **extra)
    assert "'train_runtime'" not in capsys.readouterr().out  # its replay prints none (they would read as training)
    diff = max((p - q).abs().max().item() for p, q in zip(trained.parameters(), replayed.parameters()))
    assert diff <= 1e-6, diff


def test_replay_refuses_what_it_cannot_rebuild(tmp_path):
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    _, start, grpo = _record(tmp_path / "grpo", _grpo)
    with pytest.raises(ReplayError, match=r"needs `reward_funcs=` \(recorded: \['reward_length'\]\)"):
        replay_trainer_stage(grpo, start)
    replay_json = grpo.replay_dir / "replay.json"
    info = json.loads(replay_json.read_text())
    replay_json.write_text(json.dumps({**info, "trainer": {"class": "Evil", "module": "os"}}))
    with pytest.raises(ReplayError, match="replay imports nothing else"):
        replay_trainer_stage(grpo, start, reward_funcs=[reward_length])

    args = F.training_args(str(tmp_path / "plain"), max_steps=4, per_device_train_batch_size=8)
    recorder = StageRecorder(tmp_path / "plain_ledger", "a", stage_boundaries={"b": 2})  # no replay data saved
    Trainer(model=F.gpt2(), args=args, train_dataset=F.lm_dataset(), callbacks=[recorder]).train()
    first, second = StageLedger.load(tmp_path / "plain_ledger").stages
    with pytest.raises(ReplayError, match="save_replay_data=True"):
        replay_trainer_stage(first, F.gpt2())
    with pytest.raises(ReplayError, match="continued the previous stage's optimizer state"):
        replay_trainer_stage(second, F.gpt2())


def test_replay_trains_only_the_parameters_the_stage_trained(tmp_path):
    """The start handed to replay may have other flags than the recorded stage had (a copy of a final ``PeftModel`` is
    unloaded with every parameter trainable): a layer frozen when the stage was recorded stays frozen in its replay."""
    from hf_stage_attribution.integrations.replay import replay_trainer_stage
    from hf_stage_attribution.integrations.transformers import StageRecorder

    model = F.gpt2()
    model.transformer.wpe.weight.requires_grad_(False)  # frozen by the user before the stage
    start = copy.deepcopy(model)
    recorder = StageRecorder(tmp_path / "ledger", "stage", save_replay_data=True, curvature_segments=0)
    _trainer_with_lm_collator(model, str(tmp_path / "out"), [recorder]).train()
    stage = StageLedger.load(tmp_path / "ledger").stages[-1]
    assert "transformer.wpe.weight" not in stage.trainable_parameters
    start.requires_grad_(True)  # what replay's working copy of an unloaded PeftModel looks like
    replayed = replay_trainer_stage(stage, start)
    assert not replayed.transformer.wpe.weight.requires_grad
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), replayed.parameters()))
    assert diff <= 1e-6, diff


def test_a_replay_shows_none_of_the_library_warnings_its_recorded_training_showed(tmp_path):
    """Deprecations the training libraries raise inside each other (transformers' `is_gradient_checkpointing`, read
    by TRL's DPO loss at every step; PEFT's `get_peft_model` read it too before peft 0.22) are shown when the stage is
    trained; its replays — ten in one default attribution of SmolLM2-135M — show none of them
    (`_internal.notices.HARMLESS_WARNINGS`)."""
    import warnings

    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    def library_deprecations(seen) -> list[str]:
        def library(path: str) -> bool:
            return path.replace("\\", "/").split("site-packages/")[-1].startswith(("transformers", "trl"))

        deprecations = (FutureWarning, DeprecationWarning)
        return [str(w.message) for w in seen if issubclass(w.category, deprecations) and library(w.filename)]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trained, start, stage = _record(tmp_path, _dpo_precomputed)
    assert library_deprecations(seen), "the recorded DPO stage raised no library deprecation: nothing to check"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        replay_trainer_stage(stage, start)
    assert library_deprecations(seen) == []


def test_the_replay_data_are_in_the_projected_growth_and_the_disk_check(tmp_path, capsys, monkeypatch):
    """The copy of the training dataset was written after the disk check and left out of the projection."""
    import re
    from collections import namedtuple

    from transformers import Trainer

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.errors import LedgerError
    from hf_stage_attribution.ledger import recorder as recorder_module

    rows = F.lm_dataset(512)
    args = F.training_args(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8)
    recorder = StageRecorder(tmp_path / "ledger", "s", save_replay_data=True, curvature_segments=0)
    Trainer(model=F.gpt2(), args=args, train_dataset=rows, callbacks=[recorder]).train()
    err = capsys.readouterr().err
    projected = re.search(r"projected ledger growth ([\d.]+ [kMG]?B) \(.*replay_dataset ([\d.]+ [kMG]?B)\)", err)
    assert projected, err

    def size(text: str) -> float:
        value, unit = text.split()
        return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]

    total, replay_data = size(projected.group(1)), size(projected.group(2))
    saved = sum(f.stat().st_size for f in (tmp_path / "ledger").rglob("replay/dataset/*.arrow"))
    assert 0.5 * saved <= replay_data <= 2 * saved  # the Arrow table's size, as written
    usage = namedtuple("usage", "total used free")
    free = int(total - replay_data / 2)  # room for everything but half the copy of the dataset
    monkeypatch.setattr(recorder_module.shutil, "disk_usage", lambda path: usage(10**12, 10**12, free))
    recorder = StageRecorder(tmp_path / "ledger2", "s", save_replay_data=True, curvature_segments=0)
    with pytest.raises(LedgerError, match=r"needs about .*replay_dataset .* but the disk has"):
        Trainer(model=F.gpt2(), args=args, train_dataset=rows, callbacks=[recorder]).train()
    assert not (tmp_path / "ledger2" / "ledger.json").exists()


def test_replay_data_edited_after_recording_is_refused(tmp_path):
    """The replay files are hashed in ``ledger.json``; a replay re-hashes them before it trains (once per unchanged
    folder and process): a saved dataset replaced by another with the same columns was replayed silently (the first
    stage's effect 31 % off on a tiny GPT-2), though ``StageLedger.verify()`` caught it. ``auto``'s and the up-front
    checks' reason says so too."""
    import shutil

    from transformers import Trainer

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.estimators.replay import stage_replay_problem
    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    model = F.gpt2()
    start = copy.deepcopy(model)
    args = F.training_args(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4)
    recorder = StageRecorder(tmp_path / "ledger", "ft", curvature_segments=0, save_replay_data=True)
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(16), callbacks=[recorder]).train()
    stage = StageLedger.load(tmp_path / "ledger").stages[-1]
    assert stage_replay_problem(stage) is None
    replay_trainer_stage(stage, copy.deepcopy(start))  # unchanged: replays
    F.lm_dataset(16, seed=5).save_to_disk(str(tmp_path / "other"))
    shutil.rmtree(stage.replay_dir / "dataset")
    shutil.copytree(tmp_path / "other", stage.replay_dir / "dataset")
    with pytest.raises(ReplayError, match=r"Cannot replay stage 'ft': its replay data file .*does not match the hash"):
        replay_trainer_stage(stage, copy.deepcopy(start))
    assert "does not match the hash recorded in ledger.json" in stage_replay_problem(stage)
