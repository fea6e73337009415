"""Models with bfloat16 weights (how most Hugging Face fine-tuning loads them): the attributor evaluates a float32
copy (bf16 evaluations are rounding noise for small effects), a finite difference removes the last stage exactly
(bf16 subtraction rounded twice), replays still train in bf16 as the stages did, ``check_model`` accepts one bf16
rounding step, and a custom loop that trains bf16 weights says so in its stage notes."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_stage_attribution import StageAttributor, StageLedger, estimators
from hf_stage_attribution._internal.precision import float32_working_model
from hf_stage_attribution.errors import ModelMismatchError, ReportError
from hf_stage_attribution.estimators.embeddings.cache import stage_embeddings
from hf_stage_attribution.estimators.finite_difference import subtract_embedding
from hf_stage_attribution.estimators.replay import replay_model
from hf_stage_attribution.ledger.storage import open_safetensors

X = torch.linspace(-1, 1, 24).reshape(6, 4)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(torch.bfloat16)


def _train(model, seed: int, steps: int = 3) -> None:
    """SGD steps on the model's own dtype (what a stage function replays)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        dtype = next(model.parameters()).dtype
        (model(X.to(dtype)).float() ** 2).mean().backward()
        opt.step()


def behavior(model):
    dtype = next(model.parameters()).dtype
    return model(X.to(dtype))[:, 0].float()


def _ledger(tmp_path):
    model = _model()
    ledger = StageLedger(tmp_path / "ledger")
    states = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for k, name in enumerate(("a", "b")):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = ledger.record_stage(name, model=model, optimizer=opt, num_steps=3, curvature_segments=0)
        assert any("trains bfloat16 weights" in str(w.message) for w in caught)
        with rec:
            torch.manual_seed(k)
            for _ in range(3):
                opt.zero_grad()
                (model(X.to(torch.bfloat16)).float() ** 2).mean().backward()
                opt.step()
                rec.step()
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return StageLedger.load(tmp_path / "ledger"), model, states


def test_the_last_stage_is_removed_exactly_and_the_notes_say_bf16(tmp_path):
    ledger, model, states = _ledger(tmp_path)
    assert any("trains bfloat16 weights" in note for note in ledger.stages[0].info.get("notes", []))
    with subtract_embedding(model, stage_embeddings(ledger, "delta"), 1):  # θ_K − Δ_K, rounded once: θ_{K−1}
        assert all(torch.equal(p, states[1][n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, states[2][n]) for n, p in model.named_parameters())


def test_the_attributor_evaluates_a_float32_copy_and_says_so(tmp_path):
    ledger, model, _ = _ledger(tmp_path)
    report = StageAttributor(ledger, model, estimator="delta-fd", show_progress=False, diagnostics=False).attribute(
        {"out": behavior}
    )
    assert next(model.parameters()).dtype == torch.bfloat16  # the user's model is left as it was
    want = estimators.get("delta-fd").estimate(ledger, float32_working_model(model), behavior)
    for row in report.rows:
        assert row.effect == pytest.approx(float(want.per_example[row.stage].mean()), abs=1e-12)
    assert any("float32 copy" in note for note in report.approximations)
    # the stages' own notes (bf16 weights, not a Trainer's mixed precision) are named too
    assert (
        "Stages trained in reduced precision: a (bfloat16 weights), b (bfloat16 weights)." in report.approximations[-1]
    )
    with pytest.warns(UserWarning, match="evaluates and shifts them in bfloat16"):  # called directly: said
        estimators.get("delta-fd").estimate(ledger, model, behavior)


def test_native_half_precision_evaluates_the_model_itself_and_says_so(tmp_path):
    ledger, model, _ = _ledger(tmp_path)
    kw = {"estimator": "delta-fd", "show_progress": False, "diagnostics": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*evaluates and shifts them")  # said in the report instead
        report = StageAttributor(ledger, model, half_precision="native", **kw).attribute({"out": behavior})
    assert any("were evaluated in bfloat16 (half_precision='native'" in note for note in report.approximations)
    with pytest.warns(UserWarning):  # the same estimate, called directly, warns
        want = estimators.get("delta-fd").estimate(ledger, model, behavior)
    for row in report.rows:
        assert row.effect == pytest.approx(float(want.per_example[row.stage].mean()), abs=1e-12)
    with pytest.raises(ReportError, match="Expected half_precision to be one of 'float32-copy', 'native'"):
        StageAttributor(ledger, model, half_precision="bf16", **kw)


def test_replay_trains_in_bf16_and_hands_back_float32(tmp_path):
    ledger, model, _ = _ledger(tmp_path)
    seen = []

    def stage_fn(k):
        def fn(m):
            seen.append(next(m.parameters()).dtype)
            _train(m, k)

        return fn

    fns = {"a": stage_fn(0), "b": stage_fn(1)}
    work = float32_working_model(model)
    cf = replay_model(ledger, work, 0, stage_fns=fns)
    direct = replay_model(ledger, model, 0, stage_fns=fns)  # the bf16 model itself
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert next(cf.parameters()).dtype == torch.float32
    assert all(torch.equal(a, b.float()) for a, b in zip(cf.parameters(), direct.parameters()))


def test_check_model_accepts_one_bf16_rounding_step_and_no_more(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ledger = StageLedger(tmp_path / "ledger")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ledger.record_stage("a", model=model, optimizer=opt, curvature_segments=0) as rec:
        opt.zero_grad()
        model(X).sum().backward()
        opt.step()
        rec.step()
    rounded = torch.nn.Linear(4, 2)
    rounded.load_state_dict(model.state_dict())
    rounded = rounded.to(torch.bfloat16)
    ledger.check_model(rounded)  # θ_K rounded to bf16: no extra training
    with torch.no_grad():
        rounded.weight[0, 0] += 0.1
    with pytest.raises(ModelMismatchError, match="more than one rounding step of its half-precision dtype"):
        ledger.check_model(rounded)


def test_the_recorder_keeps_a_bf16_start_snapshot_in_bf16_and_the_delta_exact(tmp_path):
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = StageLedger(tmp_path / "ledger").record_stage("a", model=model, optimizer=opt, curvature_segments=0)
    with rec:
        assert {t.dtype for t in rec._snapshot.values()} == {torch.bfloat16}  # half a float32 copy's memory
        opt.zero_grad()
        (model(X.to(torch.bfloat16)).float() ** 2).mean().backward()
        opt.step()
        rec.step()
    (stage,) = StageLedger.load(tmp_path / "ledger").stages
    for name, delta in stage.iter_delta():
        assert delta.dtype == torch.float32
        assert torch.equal(start[name].float() + delta, dict(model.named_parameters())[name].float())


def test_a_bf16_models_start_is_stored_in_bf16_and_read_back_exactly(tmp_path):
    ledger, model, states = _ledger(tmp_path)
    handle = open_safetensors(tmp_path / "ledger" / "start.safetensors")
    assert {handle.info(name)[0] for name in handle.keys()} == {"BF16"}  # half a float32 θ_0's size
    start = ledger.initial_state()
    for name, value in states[0].items():
        assert start[name].dtype == torch.float32 and torch.equal(start[name], value.float())
    ledger.check_model(model)  # θ_0 + ΣΔ is the trained bf16 model
    projected = StageLedger(tmp_path / "new").record_stage("a", model=model, curvature_segments=0).projected_bytes()
    assert projected["start"] == 2 * sum(p.numel() for p in model.parameters())  # what the file holds
    StageLedger.load(tmp_path / "ledger").verify()  # the hashes of the bf16 θ_0 file hold


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_a_weight_under_a_lora_adapter_is_stored_merged_in_float32(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Two().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))
    merged = model.base_model.model.up.weight.float() + model.base_model.model.up.get_delta_weight("default").float()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = StageLedger(tmp_path / "ledger").record_stage("lora", model=model, optimizer=opt, curvature_segments=0)
    with rec:
        opt.zero_grad()
        (model(X.to(torch.bfloat16)).float() ** 2).mean().backward()
        opt.step()
        rec.step()
    handle = open_safetensors(tmp_path / "ledger" / "start.safetensors")
    dtypes = {name: handle.info(name)[0] for name in handle.keys()}
    assert dtypes == {"up.weight": "F32", "up.bias": "BF16", "down.weight": "BF16", "down.bias": "BF16"}
    ledger = StageLedger.load(tmp_path / "ledger")
    torch.testing.assert_close(ledger.initial_state()["up.weight"], merged, rtol=0, atol=1e-7)
    ledger.check_model(model)


def test_a_start_value_its_dtype_would_round_is_refused_and_nothing_is_written(tmp_path):
    from hf_stage_attribution.ledger.writer import LedgerWriter

    with pytest.raises(ValueError, match="'w' holds values that torch.bfloat16 would round"):
        LedgerWriter(tmp_path / "ledger").initialize(
            [("w", (1,))], iter([("w", torch.tensor([1 / 3]))]), model_class="Toy", dtypes={"w": torch.bfloat16}
        )
    assert not (tmp_path / "ledger" / "ledger.json").exists()
    assert [p.name for p in (tmp_path / "ledger").iterdir()] == []


def test_stage_json_records_the_precision_as_a_field_and_the_report_reads_it(tmp_path):
    """The report's precision note reads ``stage.json["training_precision"]`` (both recorders write it), not the
    wording of a note; a ledger recorded before the field still has its notes read."""
    from types import SimpleNamespace

    from hf_stage_attribution.attributor import _training_precision_note

    ledger, _, _ = _ledger(tmp_path)
    assert [s.info.get("training_precision") for s in ledger.stages] == [{"weights": ["bfloat16"]}] * 2

    def stage(name, info):
        return SimpleNamespace(name=name, info=info)

    reworded = stage("a", {"training_precision": {"mixed": "fp16"}, "notes": ["another wording entirely"]})
    old = stage("b", {"notes": ["The stage trains in bf16 mixed precision: the ledger stores ..."]})
    plain = stage("c", {"notes": ["The stage trains with gradient checkpointing: ..."]})
    note = _training_precision_note(SimpleNamespace(stages=[reworded, old, plain]))
    assert note.startswith("Stages trained in reduced precision: a (fp16 mixed precision), b (bf16 mixed precision).")
    assert _training_precision_note(SimpleNamespace(stages=[plain])) is None


@pytest.mark.parametrize("bad", [{}, {"mixed": "fp8"}, {"weights": "bfloat16"}, {"weights": ["float32"]}, ["bf16"]])
def test_a_malformed_training_precision_field_is_a_clear_error(tmp_path, bad):
    from hf_stage_attribution.errors import LedgerFormatError
    from hf_stage_attribution.ledger.format import validate_stage

    data = {"format_version": 3, "name": "s", "kind": "sft", "num_steps": 0, "training_precision": bad}
    with pytest.raises(LedgerFormatError, match=r"`training_precision`: an object such as \{\"mixed\": \"bf16\"\}"):
        validate_stage(tmp_path / "stage.json", data, "s")
