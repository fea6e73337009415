"""Importing Hub revisions offline: a real huggingface_hub cache layout (refs/ + snapshots/ + blobs/) of a tiny model
resolved by ``revision=`` with ``HF_HUB_OFFLINE=1`` gives the recorder's deltas; errors leave nothing behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.checkpoints.cache import lay_out_hub_cache
from hf_stage_attribution.errors import CheckpointImportError, CheckpointNotFoundError
from tests.checkpoints.test_fixtures import assert_same_deltas, recorded_run


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    recorded, folders, rates = recorded_run(root, stage_steps=(3, 2), weight_decay=0.1)
    cache = root / "cache"
    commits = lay_out_hub_cache(cache, "org/tiny", {"base": folders[0], "sft": folders[1], "main": folders[2]})
    return {"recorded": recorded, "cache": cache, "commits": commits, "rates": rates, "root": root}


def _boundaries(optimizer=None):
    return [
        {"model": "org/tiny", "revision": "base"},
        {"model": "org/tiny", "revision": "sft", "name": "s1", **({"optimizer": optimizer[0]} if optimizer else {})},
        {"model": "org/tiny", "name": "s2", **({"optimizer": optimizer[1]} if optimizer else {})},
    ]


def test_offline_revisions_give_the_recorded_deltas_and_hashes(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ledger = StageLedger.from_checkpoints(_boundaries(), tmp_path / "ledger", cache_dir=hub["cache"], progress=False)
    recorded = hub["recorded"]
    assert_same_deltas(ledger, recorded)
    # same float32 states => the same per-stage end hashes as the recorder computed from the live model
    assert [s.end_hash for s in ledger.stages] == [s.end_hash for s in recorded.stages]
    assert ledger.manifest["start"]["state_hash"] == recorded.manifest["start"]["state_hash"]
    assert ledger.manifest["model"]["class"] == "GPT2LMHeadModel"
    first = ledger.stages[0]
    assert first.info["source"]["type"] == "checkpoints"
    assert first.info["source"]["commit"] == hub["commits"]["sft"]
    assert first.info["source"]["revision"] == "sft"
    assert ledger.stages[1].info["source"]["commit"] == hub["commits"]["main"]
    # no optimizer information given: only delta-* estimators, and the ledger says why
    assert first.optimizer is None and first.num_steps == 0
    availability = first.info["source"]["estimator_availability"]
    assert availability["available"] == ["delta-linear", "delta-fd"]
    assert "s2" in availability["unavailable"]["aa-linear"]
    assert ledger.manifest["model"]["source"]["estimator_availability"]["every_stage"] == ["delta-linear", "delta-fd"]


def test_revision_by_commit_hash_and_optimizer_from_the_spec(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rates = hub["rates"]
    opts = [{"type": "AdamW", "weight_decay": 0.1, "learning_rates": r} for r in rates]
    boundaries = _boundaries(opts)
    boundaries[0]["revision"] = hub["commits"]["base"]
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", cache_dir=hub["cache"], progress=False)
    assert_same_deltas(ledger, hub["recorded"])
    stage = ledger.stages[0]
    assert stage.optimizer["type"] == "AdamW" and stage.optimizer["decoupled_weight_decay"] is True
    assert [row[0] for row in stage.learning_rates] == pytest.approx(rates[0])
    assert set(stage.info["source"]["estimator_availability"]["available"]) >= {"aa-linear", "aa-fd"}
    # the propagation rules read the imported stage exactly as the recorded one (D_j of the later stage)
    from hf_stage_attribution.estimators.propagation.stage import StagePropagator

    imported, recorded = StagePropagator(ledger.stages[1]), StagePropagator(hub["recorded"].stages[1])
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert imported.factor(name) == pytest.approx(recorded.factor(name), rel=1e-12)
        assert imported.factor(name) < 1.0


def test_missing_revision_is_a_clear_error_and_leaves_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    boundaries = _boundaries()
    boundaries[1]["revision"] = "no-such-branch"
    with pytest.raises(CheckpointNotFoundError, match="no-such-branch") as info:
        StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", cache_dir=hub["cache"], progress=False)
    assert "base" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)  # lists the cached revisions
    assert os.listdir(tmp_path) == []


def test_unknown_repo_and_bad_spec_entries(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="org/other"):
        StageLedger.from_checkpoints(
            [{"model": "org/other"}, {"model": "org/other", "revision": "x"}], tmp_path / "l", cache_dir=hub["cache"]
        )
    with pytest.raises(CheckpointImportError, match="keys among"):
        StageLedger.from_checkpoints([{"model": "org/tiny", "rev": "x"}, {"model": "org/tiny"}], tmp_path / "l")
    with pytest.raises(CheckpointImportError, match="at least two"):
        StageLedger.from_checkpoints([{"model": "org/tiny"}], tmp_path / "l")
    with pytest.raises(CheckpointImportError, match="first boundary"):
        StageLedger.from_checkpoints(
            [{"model": "org/tiny", "optimizer": {"type": "SGD"}}, {"model": "org/tiny"}], tmp_path / "l"
        )
    assert os.listdir(tmp_path) == []


def test_sharded_checkpoints_import_like_single_files(tmp_path):
    recorded, folders, _ = recorded_run(tmp_path, stage_steps=(2,), shard_size="6KB")
    assert json.loads((folders[1] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(list(folders[1].glob("model-*.safetensors"))) >= 3
    ledger = StageLedger.from_checkpoints(
        [{"model": str(folders[0])}, {"model": str(folders[1]), "name": "s1"}], tmp_path / "ledger", progress=False
    )
    assert_same_deltas(ledger, recorded)
    assert ledger.stages[0].info["source"]["format"] == "safetensors-sharded"


def test_existing_output_is_refused_and_overwrite_replaces_it(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ledger"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for overwrite in (False, True):  # a folder that is not a ledger is never replaced
        with pytest.raises(CheckpointImportError, match="not a ledger"):
            StageLedger.from_checkpoints(
                _boundaries(), out, cache_dir=hub["cache"], progress=False, overwrite=overwrite
            )
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    StageLedger.from_checkpoints(_boundaries()[:2], out, cache_dir=hub["cache"], progress=False)
    with pytest.raises(CheckpointImportError, match="overwrite"):
        StageLedger.from_checkpoints(_boundaries(), out, cache_dir=hub["cache"], progress=False)
    ledger = StageLedger.from_checkpoints(_boundaries(), out, cache_dir=hub["cache"], progress=False, overwrite=True)
    assert len(ledger.stages) == 2
    assert sorted(os.listdir(tmp_path)) == ["ledger"]
    torch.testing.assert_close(
        ledger.final_state()["transformer.wpe.weight"], hub["recorded"].final_state()["transformer.wpe.weight"]
    )


def test_an_optimizer_without_propagation_rule_does_not_enable_aa(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opts = [{"type": "Adafactor", "learning_rates": r} for r in hub["rates"]]
    ledger = StageLedger.from_checkpoints(_boundaries(opts), tmp_path / "l", cache_dir=hub["cache"], progress=False)
    availability = ledger.stages[0].info["source"]["estimator_availability"]
    assert availability["available"] == ["delta-linear", "delta-fd"]
    assert "no propagation rule for optimizer 'Adafactor'" in availability["unavailable"]["aa-linear"]


def test_what_an_imported_ledger_lacks_is_said_as_an_import_not_as_a_recording(hub, tmp_path, monkeypatch):
    """Checkpoints carry neither replay data nor curvature material: `auto`'s reason and replay's problems say the
    stage was imported (and where from) and name what can still be done (stage functions), not 'record it'."""
    from hf_stage_attribution.estimators import choose_estimator
    from hf_stage_attribution.estimators.replay import replay_needs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opts = [{"type": "AdamW", "weight_decay": 0.1, "learning_rates": r} for r in hub["rates"]]
    ledger = StageLedger.from_checkpoints(_boundaries(opts), tmp_path / "l", cache_dir=hub["cache"], progress=False)
    assert [s.imported_from for s in ledger.stages] == ["org/tiny@sft", "org/tiny"]
    assert [s.imported_from for s in hub["recorded"].stages] == [None, None]
    name, reason = choose_estimator(ledger)
    assert name == "aa-fd"
    assert "['s2'] hold no curvature material (imported from checkpoints, which carry none" in reason
    assert "['s2'] have neither replay data (imported from checkpoints, which carry none) nor a step-limited" in reason
    (problem,) = replay_needs(ledger, [0]).problems
    assert problem.startswith("stage 's2' was imported from checkpoints (org/tiny) and has no function in stage_fns")
    assert "--stage-fn s2=MODULE:FUNCTION" in problem and "StageRecorder" not in problem
    # the recorded run (same stages, no replay data) is still told how to record it
    (problem,) = replay_needs(hub["recorded"], [0]).problems
    assert "StageRecorder(..., save_replay_data=True)" in problem
    # the replaying estimators refuse up front, saying the same (and not to record it)
    from transformers import GPT2LMHeadModel

    from hf_stage_attribution import estimators
    from hf_stage_attribution.errors import PartialReplayError, ReplayError

    model = GPT2LMHeadModel.from_pretrained(hub["root"] / "ckpt-2")
    behavior = lambda m: m(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1, :4].float()  # noqa: E731
    quiet = {"check_model": False, "prepare_behavior": False}
    imported = r"'s2', but it was imported from checkpoints \(org/tiny\), which hold no replay data, and no stage"
    for name, error, options in (("partial-replay", PartialReplayError, {"budget": 1.0}),
                                 ("strided-replay", PartialReplayError, {"budget": 1.0})):  # fmt: skip
        with pytest.raises(error, match=imported) as refused:
            estimators.get(name).estimate(ledger, model, behavior, **options, **quiet)
        assert "StageRecorder" not in str(refused.value) and "stage_fns={'s2': fn}" in str(refused.value)
    with pytest.raises(ReplayError, match=r"stage 's2' was imported from checkpoints \(org/tiny\)") as refused:
        estimators.get("replay").estimate(ledger, model, behavior, **quiet)
    assert "StageRecorder" not in str(refused.value) and "stage_fns={'s2': fn}" in str(refused.value)
