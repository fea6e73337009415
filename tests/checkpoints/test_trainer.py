"""Importing a Trainer output directory: checkpoint-* folders become stages, learning rates come from log_history
(or a known schedule), optimizer.pt/scheduler.pt are read only with allow_pickle=True and then weights-only, and no
pickle is ever executed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import CheckpointImportError, UnsafeCheckpointError
from tests.checkpoints.test_fixtures import tiny_gpt2


class _Evil:
    """Unpickling this creates a file: the marker that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    root = tmp_path_factory.mktemp("trainer")
    model = tiny_gpt2(seed=3)
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (48, 8), generator=gen)]
    applied: list[list[float]] = []

    class Rates(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            applied.append([g["lr"] for g in optimizer.param_groups])

    args = TrainingArguments(
        str(root / "out"), max_steps=6, save_steps=3, logging_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1, use_cpu=True,
        report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Rates()]).train()
    return {"root": root, "base": root / "base", "out": root / "out", "applied": applied}


def _same_rates(found, expected):
    torch.testing.assert_close(torch.tensor(found, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def _import(base, out, dest, allow_pickle=True, **kw):
    boundaries = [{"model": str(base)}, {"model": str(out), "name": "sft", "kind": "sft", **kw}]
    return StageLedger.from_checkpoints(boundaries, dest, progress=False, allow_pickle=allow_pickle)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_checkpoint_folders_become_stages_with_logged_rates_and_optimizer(run, tmp_path):
    ledger = _import(run["base"], run["out"], tmp_path / "ledger")
    assert [(s.name, s.kind, s.num_steps) for s in ledger.stages] == [("sft@3", "sft", 3), ("sft@6", "sft", 3)]
    applied = run["applied"]
    _same_rates(ledger.stages[0].learning_rates, applied[:3])
    _same_rates(ledger.stages[1].learning_rates, applied[3:])
    first, second = ledger.stages
    assert first.optimizer["type"] == "AdamW" and first.optimizer["decoupled_weight_decay"] is True
    decay, no_decay = first.optimizer["param_groups"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decay["params"] and "transformer.ln_f.weight" in no_decay["params"]
    assert first.optimizer_state_policy == "fresh" and second.optimizer_state_policy == "continued"
    # the continued stage starts from checkpoint-3's optimizer state, mapped to parameter names
    saved = torch.load(run["out"] / "checkpoint-3" / "optimizer.pt", weights_only=True)
    start = second.optimizer_state_at_start()
    index = (decay["params"] + no_decay["params"]).index("transformer.h.1.mlp.c_fc.weight")
    torch.testing.assert_close(start["exp_avg"]["transformer.h.1.mlp.c_fc.weight"], saved["state"][index]["exp_avg"])
    # deltas are the checkpoint differences; the final state is checkpoint-6
    base, mid, final = (_weights(p) for p in (run["base"], run["out"] / "checkpoint-3", run["out"] / "checkpoint-6"))
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(first.delta_tensor(name), mid[name] - base[name], atol=1e-7, rtol=0)
    for name, value in final.items():
        torch.testing.assert_close(ledger.final_state()[name], value, atol=1e-6, rtol=0)
    source = first.info["source"]
    assert source["trainer"]["global_step"] == 3 and source["trainer"]["start_step"] == 0
    assert {"aa-linear", "aa-fd", "delta-linear"} <= set(source["estimator_availability"]["available"])
    assert any("training_args.bin was not read" in note for note in first.info["notes"])


def _sparse_logs(run, dest):
    """A copy of the run whose trainer_state.json logs every second step (logging_steps=2)."""
    shutil.copytree(run["out"], dest)
    for ckpt in dest.glob("checkpoint-*"):
        path = ckpt / "trainer_state.json"
        state = json.loads(path.read_text())
        state["logging_steps"] = 2
        state["log_history"] = [e for e in state["log_history"] if e.get("step", 0) % 2 == 0]
        path.write_text(json.dumps(state))
    return dest


def test_sparse_logging_warns_and_a_known_schedule_interpolates(run, tmp_path):
    out = _sparse_logs(run, tmp_path / "sparse")
    with pytest.warns(UserWarning, match="logging_steps=2"):
        ledger = _import(run["base"], out, tmp_path / "a")
    assert ledger.stages[0].optimizer is None and ledger.stages[0].num_steps == 0
    assert ledger.stages[0].info["source"]["num_steps"] == 3
    assert ledger.stages[0].info["source"]["estimator_availability"]["available"] == ["delta-linear", "delta-fd"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger = _import(
            run["base"], out, tmp_path / "b", optimizer={"lr_scheduler_type": "linear", "warmup_steps": 2}
        )
    _same_rates(ledger.stages[0].learning_rates + ledger.stages[1].learning_rates, run["applied"])
    with pytest.raises(CheckpointImportError, match="log_history recorded"):
        _import(run["base"], out, tmp_path / "c", optimizer={"lr_scheduler_type": "linear", "warmup_steps": 0})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_optimizer_pickle_is_refused_and_never_runs(run, tmp_path, how):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    marker = tmp_path / "pwned"
    payload = {"state": {}, "param_groups": [_Evil(str(marker))]}
    if how == "torch.save":
        torch.save(payload, out / "checkpoint-6" / "optimizer.pt")
    else:
        (out / "checkpoint-6" / "optimizer.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        _import(run["base"], out, tmp_path / "ledger")
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_optimizer_and_scheduler_pickles_are_not_opened_without_allow_pickle(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    marker = tmp_path / "pwned"
    for ckpt in out.glob("checkpoint-*"):  # were they unpickled (weights-only or not), the import would fail
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({"state": {}, "param_groups": [_Evil(str(marker))]}, ckpt / name)
    calls = []
    real_load = torch.load

    def tripwire(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    torch.load = tripwire
    try:
        with pytest.warns(UserWarning, match="optimizer.pt and scheduler.pt were not read.*allow_pickle=True"):
            ledger = _import(run["base"], out, tmp_path / "ledger", allow_pickle=False, optimizer={"type": "AdamW"})
    finally:
        torch.load = real_load
    assert calls == [] and not marker.exists()
    first, second = ledger.stages
    rates = [row[0] for row in first.learning_rates + second.learning_rates]  # one group: the spec names no decay
    _same_rates(rates, [row[0] for row in run["applied"]])
    assert first.optimizer["type"] == "AdamW" and first.optimizer["source"] == "spec"
    assert second.optimizer_state_policy == "continued" and second.optimizer_state_at_start() is None
    assert any("were not read (pickles" in note for note in first.info["notes"])


def test_training_args_pickle_is_never_read(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    marker = tmp_path / "pwned"
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / "training_args.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    ledger = _import(run["base"], out, tmp_path / "ledger", checkpoints="last")
    assert [s.name for s in ledger.stages] == ["sft"] and ledger.stages[0].num_steps == 6
    _same_rates(ledger.stages[0].learning_rates, run["applied"])
    assert not marker.exists()


def test_pickle_only_weights_need_permission_and_load_weights_only(run, tmp_path):
    repo = tmp_path / "pickled"
    repo.mkdir()
    shutil.copy(run["out"] / "checkpoint-6" / "config.json", repo)
    torch.save(_weights(run["out"] / "checkpoint-6"), repo / "pytorch_model.bin")
    boundaries = [{"model": str(run["base"])}, {"model": str(repo), "name": "final"}]
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        StageLedger.from_checkpoints(boundaries, tmp_path / "a", progress=False)
    ledger = StageLedger.from_checkpoints(boundaries, tmp_path / "b", progress=False, allow_pickle=True)
    final = _weights(run["out"] / "checkpoint-6")
    torch.testing.assert_close(ledger.final_state()["transformer.wte.weight"], final["transformer.wte.weight"])
    assert ledger.stages[0].info["source"]["format"] == "pickle"
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": _Evil(str(marker))}, repo / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        StageLedger.from_checkpoints(boundaries, tmp_path / "c", progress=False, allow_pickle=True)
    assert not marker.exists() and not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
