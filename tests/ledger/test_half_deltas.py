"""A stage that trains bf16 weights stores their Δ in bf16 with the few entries bf16 would round as a sparse float32
residual (ledger format 3): read back bit for bit at half the size; a stage without such entries stays format 2
(older releases read it); a release that reads only format 2 refuses a format-3 stage instead of misreading it; a
damaged residual is a clear error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerFormatError
from hf_stage_attribution.ledger import format as ledger_format
from hf_stage_attribution.ledger.residual import RESIDUAL_FILE, join_delta, split_delta

X = torch.linspace(-1, 1, 24).reshape(6, 4)


def _record(tmp_path, model, lr: float, steps: int = 3):
    """SGD steps on a bf16 model, recorded; returns the ledger and the states before and after."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trains bfloat16 weights"
        rec = StageLedger(tmp_path / "ledger").record_stage("a", model=model, optimizer=opt, curvature_segments=0)
    with rec:
        for _ in range(steps):
            opt.zero_grad()
            (model(X.to(torch.bfloat16)).float() ** 2).mean().backward()
            opt.step()
            rec.step()
    end = {n: p.detach().clone() for n, p in model.named_parameters()}
    return StageLedger.load(tmp_path / "ledger"), start, end


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).to(torch.bfloat16)


def test_a_bf16_stage_stores_its_delta_in_bf16_with_a_residual_and_reads_back_bit_for_bit(tmp_path):
    model = _mlp()
    ledger, start, end = _record(tmp_path, model, lr=0.1)  # 5 of 450 entries cross zero or halve: not exact in bf16
    (stage,) = ledger.stages
    stored = load_file(stage.dir / "delta.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    residual = load_file(stage.dir / RESIDUAL_FILE)
    assert residual and sum(v.numel() for k, v in residual.items() if k.endswith("::index")) > 0
    assert stage.info["format_version"] == 3 and stage.info["delta_residual_file"] == RESIDUAL_FILE
    for name, delta in stage.iter_delta():
        assert delta.dtype == torch.float32 and torch.equal(delta, end[name].float() - start[name].float())
    final = ledger.final_state()
    assert all(torch.equal(final[n].to(torch.bfloat16), p) for n, p in model.named_parameters())
    ledger.check_model(model)
    ledger.verify()  # the residual file is hashed in ledger.json like every stage file


def test_a_tensor_whose_delta_bf16_would_round_too_often_is_stored_in_float32(tmp_path):
    ledger, start, end = _record(tmp_path, _mlp(), lr=0.5)  # 2.weight: 23 of 128 entries round, 2.bias: 1 of 2
    (stage,) = ledger.stages
    dtypes = {name: t.dtype for name, t in load_file(stage.dir / "delta.safetensors").items()}
    assert dtypes == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16, "2.weight": torch.float32,
                      "2.bias": torch.float32}  # fmt: skip
    for name, delta in stage.iter_delta():
        assert torch.equal(delta, end[name].float() - start[name].float())


def test_a_bf16_stage_whose_delta_is_exact_in_bf16_stays_format_2(tmp_path):
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    with torch.no_grad():  # weights in [0.5, 1) moving by far less than half their size: exact in bf16 (Sterbenz)
        model.weight.copy_(torch.linspace(0.5, 0.99, 8).reshape(2, 4))
        model.bias.fill_(0.75)
    ledger, start, end = _record(tmp_path, model, lr=1e-3, steps=1)
    (stage,) = ledger.stages
    assert stage.info["format_version"] == 2 and "delta_residual_file" not in stage.info
    assert not (stage.dir / RESIDUAL_FILE).exists()
    assert {t.dtype for t in load_file(stage.dir / "delta.safetensors").values()} == {torch.bfloat16}
    for name, delta in stage.iter_delta():
        assert torch.equal(delta, end[name].float() - start[name].float())


def test_a_float32_stage_is_written_as_before(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with StageLedger(tmp_path / "ledger").record_stage("a", model=model, optimizer=opt, curvature_segments=0) as rec:
        model(X).sum().backward()
        opt.step()
        rec.step()
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    assert stage.info["format_version"] == 2 and not (stage.dir / RESIDUAL_FILE).exists()
    assert {t.dtype for t in load_file(stage.dir / "delta.safetensors").values()} == {torch.float32}
    manifest = json.loads((tmp_path / "ledger" / "ledger.json").read_text())
    assert manifest["format_version"] == 2


def test_a_release_reading_only_format_2_refuses_a_format_3_stage(tmp_path, monkeypatch):
    _record(tmp_path, _mlp(), lr=0.1)
    monkeypatch.setattr(ledger_format, "FORMAT_VERSION", 2)
    with pytest.raises(LedgerFormatError, match="format_version 3 is newer than this library reads"):
        StageLedger.load(tmp_path / "ledger")


def test_a_tensor_that_would_round_too_often_is_kept_in_float32():
    delta = torch.tensor([1 / 3, 0.5, 0.25, 1 / 7])
    assert split_delta(delta, torch.bfloat16, max_fraction=0.25) is None  # 2 of 4 entries round
    half, index, value = split_delta(delta, torch.bfloat16, max_fraction=0.5)
    assert index.tolist() == [0, 3] and torch.equal(join_delta(half, index, value), delta)
    half, index, value = split_delta(torch.tensor([float("nan"), 1.0]), torch.bfloat16, max_fraction=0.5)
    assert join_delta(half, index, value).isnan().tolist() == [True, False]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r, k: {**r, k: torch.full_like(r[k], 10**9)}, r"positions in \[0, "),
        (lambda r, k: {**r, k: r[k].to(torch.int32)}, "NAME::index \\(I64\\) and NAME::value \\(F32\\)"),
        (lambda r, k: {kk: v for kk, v in r.items() if kk != k}, "an index and a value vector of one length"),
    ],
    ids=["index out of range", "index not int64", "value without index"],
)
def test_a_damaged_residual_is_a_clear_error(tmp_path, damage, message):
    ledger, _, _ = _record(tmp_path, _mlp(), lr=0.1)
    (stage,) = ledger.stages
    path = stage.dir / RESIDUAL_FILE
    residual = load_file(path)
    key = next(k for k, v in residual.items() if k.endswith("::index") and v.numel())
    save_file({k: v.contiguous() for k, v in damage(residual, key).items()}, path)
    with pytest.raises(LedgerFormatError, match=message):
        StageLedger.load(tmp_path / "ledger").stages[0].delta_tensor(key.removesuffix("::index"))


def test_a_format_2_stage_that_names_a_residual_is_refused(tmp_path):
    ledger, _, _ = _record(tmp_path, _mlp(), lr=0.1)
    path = ledger.stages[0].dir / "stage.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 2}))
    with pytest.raises(LedgerFormatError, match="`delta_residual_file` only beside a `delta_file`, in format_versi"):
        StageLedger.load(tmp_path / "ledger")


def test_a_stage_that_turns_weights_into_nan_is_recorded_with_a_warning_and_a_note(tmp_path):
    model = torch.nn.Linear(4, 2).to(torch.float16)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # eps=1e-8 is 0 in float16: 0 / 0 on a zero gradient
    rec = StageLedger(tmp_path / "ledger").record_stage("a", model=model, optimizer=opt, curvature_segments=0)
    with pytest.warns(UserWarning, match="changed to NaN or infinite values in this stage"), rec:
        model.weight.grad = torch.zeros_like(model.weight)
        model.bias.grad = torch.zeros_like(model.bias)
        opt.step()
        rec.step()
    assert model.weight.isnan().all()
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    assert any("changed to NaN or infinite values" in note for note in stage.info["notes"])
