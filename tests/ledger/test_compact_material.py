"""Compact curvature material (format 2): what is stored, how it is read back, the size bound, the disk check."""

from __future__ import annotations

import json
import math
from collections import namedtuple

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError
from hf_stage_attribution.ledger import recorder as recorder_module
from hf_stage_attribution.ledger.segments import lr_mass_fraction
from hf_stage_attribution.ledger.storage import open_safetensors

STEPS = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4)
    )


def _record(directory, model, name, material="compact", lr=0.01):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * STEPS))
    gen = torch.Generator().manual_seed(len(name))
    x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen)

    def forward(m, b):
        return m(b[0])

    def loss(out, b):
        return torch.nn.functional.cross_entropy(out, b[1])

    def loss_fn(m, b):
        return loss(forward(m, b), b)

    ledger = StageLedger(directory)
    with ledger.record_stage(
        name, model=model, optimizer=opt, loss_fn=(forward, loss), num_steps=STEPS, curvature_material=material
    ) as rec:
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
            rec.step((x, y))
            sched.step()
    return ledger, opt


def test_compact_segments_store_factored_moments_and_no_snapshot(tmp_path):
    model = _model()
    ledger, opt = _record(tmp_path / "l", model, "a")
    stage = ledger.stages[0]
    assert stage.segments and all(
        s.material == {"params": "interpolated", "moments": "factored"} for s in stage.segments
    )
    seg = stage.segments[0]
    assert not (seg.dir / "params_delta.safetensors").exists()
    keys = set(open_safetensors(seg.dir / "second_moments.safetensors").keys())
    assert "exp_avg_sq/0.weight::row" in keys and "exp_avg_sq/0.weight::col" in keys and "exp_avg_sq/0.bias" in keys
    # θ_mid − θ_start: the stage's Δ scaled by the learning-rate mass up to the midpoint
    fraction = lr_mass_fraction(stage.learning_rates, seg.mid_step)
    assert 0 < fraction < 1
    mid = seg.params_delta()
    for name, delta in stage.iter_delta():
        torch.testing.assert_close(mid[name], delta * fraction)
    # the expansion of the factored second moment keeps the recorded row means
    moments = seg.second_moments()
    v = moments["exp_avg_sq"]["0.weight"]
    assert v.shape == (512, 32) and bool((v >= 0).all())
    row = open_safetensors(seg.dir / "second_moments.safetensors").get_tensor("exp_avg_sq/0.weight::row")
    torch.testing.assert_close(v.mean(dim=1), row)


def test_full_material_keeps_snapshots_and_a_format_1_ledger_still_reads(tmp_path):
    model = _model()
    ledger, _ = _record(tmp_path / "l", model, "a", material="full")
    seg = ledger.stages[0].segments[0]
    assert (seg.dir / "params_delta.safetensors").exists()
    snapshot = seg.params_delta()
    # rewrite as a format-1 ledger (no material fields): read as snapshots and full moments
    manifest = json.loads((tmp_path / "l" / "ledger.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "l" / "ledger.json").write_text(json.dumps(manifest))
    stage_json = ledger.stages[0].dir / "stage.json"
    info = json.loads(stage_json.read_text())
    info["format_version"] = 1
    for s in info["segments"]:
        s.pop("params"), s.pop("moments")
    stage_json.write_text(json.dumps(info))
    old = StageLedger.load(tmp_path / "l").stages[0].segments[0]
    assert old.material == {"params": "snapshot", "moments": "full"}
    for name, value in snapshot.items():
        torch.testing.assert_close(old.params_delta()[name], value)
    assert old.second_moments()["exp_avg_sq"]["0.weight"].shape == (512, 32)


def test_default_ledger_fits_in_k_plus_one_model_sizes(tmp_path):
    model = _model()
    for name in ("a", "b"):
        _record(tmp_path / "l", model, name)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    files = [p for p in (tmp_path / "l").rglob("*.safetensors")]
    tensor_bytes = sum(p.stat().st_size for p in files)
    curvature = sum(p.stat().st_size for p in files if "segments" in p.parts and p.name != "examples.safetensors")
    assert tensor_bytes <= (2 + 1.1) * model_bytes  # θ_0 + two Δ + everything else within 10 %
    assert curvature <= 0.1 * model_bytes


def test_the_recorder_prints_the_projected_size_and_refuses_a_disk_too_small(tmp_path, capsys, monkeypatch):
    model = _model()
    _record(tmp_path / "l", model, "a")
    err = capsys.readouterr().err
    assert "stage 'a': projected ledger growth" in err and "start" in err and "delta" in err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(recorder_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(LedgerError, match=r"needs about .* but the disk has 1.0 kB free"):
        _record(tmp_path / "l2", model, "a")
    assert not (tmp_path / "l2" / "ledger.json").exists()
    with pytest.raises(LedgerError, match="disk"):
        _record(tmp_path / "l", model, "b")
    assert [s.name for s in StageLedger.load(tmp_path / "l").stages] == ["a"]


def test_bad_material_is_refused(tmp_path):
    with pytest.raises(LedgerError, match="curvature_material"):
        StageLedger(tmp_path).record_stage("a", model=_model(), curvature_material="tiny")


def test_lr_mass_fraction():
    assert lr_mass_fraction([[1.0], [1.0], [1.0], [1.0]], 1) == 0.5
    assert math.isclose(lr_mass_fraction([[0.0], [0.0]], 0), 0.5)
