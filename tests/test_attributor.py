"""StageAttributor: one process, two processes (torchrun on CPU), bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_stage_attribution import StageAttributor
from hf_stage_attribution.errors import BehaviorError, ModelMismatchError, UnknownNameError
from tests.helpers.attributor import behaviors_for, record_pipeline
from tests.helpers.replaying import count_stage_runs

WORKER = Path(__file__).parent / "distributed" / "attribute_worker.py"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("attributor")
    ledger, model = record_pipeline(root / "ledger")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return root, ledger, model


@pytest.mark.parametrize("estimator", ["aa-linear", "aa-fd"])
def test_report_rows_match_the_estimator_run_directly(pipeline, estimator):
    from hf_stage_attribution import estimators

    _, ledger, model = pipeline
    report = StageAttributor(ledger, model, estimator=estimator, show_progress=False).attribute(behaviors_for())
    assert report.estimator == estimator
    direct = estimators.get(estimator).estimate(ledger, model, behaviors_for()["logit-0"])
    for row in report.rows_for("logit-0"):
        torch.testing.assert_close(torch.tensor(row.per_example, dtype=torch.float64), direct.per_example[row.stage])
        assert row.ci_low <= row.effect <= row.ci_high
    diag = report.diagnostics["logit-0"]
    assert diag.total_change is not None and diag.interaction_residual is not None
    assert diag.linearisation_gap, "the paired linear/finite-difference estimator must run for the diagnostics"


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run_worker(nproc: int, root: Path, out: Path, estimator: str, mode: str = "", ok: bool = True) -> dict | str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent), HSA_TEST_BEHAVIORS=mode)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        _free_port(),
    ]
    if nproc == 1:
        cmd = [sys.executable]
    args = [str(WORKER), str(root / "ledger"), str(root / "model.safetensors"), str(out), estimator]
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    if not ok:
        assert proc.returncode != 0 and not out.exists()
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_two_processes_give_the_answer_of_one(pipeline, tmp_path):
    root, _, _ = pipeline
    shutil.rmtree(root / "ledger" / "embeddings", ignore_errors=True)  # the 2-process run computes the cache itself
    two = _run_worker(2, root, tmp_path / "two.json", "aa-ggn")
    one = _run_worker(1, root, tmp_path / "one.json", "aa-ggn")
    assert (two["processes"], one["processes"]) == (2, 1)  # the worker asserts accelerate sees them all
    assert one["rows"].keys() == two["rows"].keys()
    for key, row in one["rows"].items():
        assert len(row["per_example"]) in (5, 7)
        torch.testing.assert_close(
            torch.tensor(two["rows"][key]["per_example"]), torch.tensor(row["per_example"]), rtol=1e-5, atol=1e-9
        )
        assert two["rows"][key]["effect"] == pytest.approx(row["effect"], rel=1e-5, abs=1e-12)
    for name, total in one["totals"].items():
        assert two["totals"][name] == pytest.approx(total, rel=1e-5, abs=1e-12)


@pytest.mark.distributed
def test_two_processes_split_the_replays_by_stage_and_give_the_answer_of_one(pipeline, tmp_path):
    """A replaying estimator (auto -> partial replay, checked by replay) under two processes: each stage's replays run
    in one process over every example, so the stage functions run as often as in one process, not once per process,
    and the numbers, verdicts and merged diagnostics are one process's."""
    root, _, _ = pipeline
    two = _run_worker(2, root, tmp_path / "two.json", "auto", mode="replay")
    one = _run_worker(1, root, tmp_path / "one.json", "auto", mode="replay")
    assert two["estimator"] == one["estimator"] == "partial-replay"
    runs = {rank: json.loads((tmp_path / f"two.json.runs{rank}").read_text()) for rank in (0, 1)}
    alone = json.loads((tmp_path / "one.json.runs0").read_text())
    assert runs[0] and runs[1], runs  # both processes replayed
    assert sorted(map(str, runs[0] + runs[1])) == sorted(map(str, alone)), (runs, alone)  # ... none ran twice
    assert one["rows"].keys() == two["rows"].keys()
    for key, row in one["rows"].items():
        for field in ("per_example", "ci", "effect", "replay"):
            assert two["rows"][key][field] == row[field], (key, field)
    assert two["verdicts"] == one["verdicts"] and set(one["verdicts"].values()) == {"verified"}
    # the total change is still split by example (another batching of the same examples: float32 rounding)
    assert two["totals"] == pytest.approx(one["totals"], rel=1e-5)

    def settings(notes: dict) -> dict:  # seconds and call counts are each process's own
        plan = {k: v for k, v in notes["partial_replay"].items() if k != "seconds"}
        return {**{k: v for k, v in notes.items() if k != "calls"}, "partial_replay": plan}

    for name, notes in one["notes"].items():
        assert settings(two["notes"][name]) == settings(notes)
        assert list(two["notes"][name]["partial_replay"]["plans"]) == ["stage0", "stage1", "stage2"]
    assert sorted(two["approximations"]) == sorted(one["approximations"])


@pytest.mark.distributed
def test_an_error_in_one_process_s_stages_is_raised_in_every_process(pipeline, tmp_path):
    """With the stages split, a replay that fails runs in one process only: the error is raised in both (the other
    does not wait for its result), and no report is written."""
    root, _, _ = pipeline
    _run_worker(2, root, tmp_path / "two.json", "auto", mode="failing", ok=False)
    for rank in (0, 1):
        assert "stage2 cannot be re-run without stage1" in (tmp_path / f"two.json.error{rank}").read_text()


@pytest.mark.distributed
def test_a_bare_function_behavior_is_counted_once_in_two_processes(pipeline, tmp_path):
    root, _, _ = pipeline
    two = _run_worker(2, root, tmp_path / "two.json", "aa-fd", mode="bare")
    one = _run_worker(1, root, tmp_path / "one.json", "aa-fd", mode="bare")
    for key, row in one["rows"].items():
        if key.startswith("bare/"):  # was each process's 6 values, twice (and intervals 1/√2 too narrow)
            assert len(row["per_example"]) == len(two["rows"][key]["per_example"]) == 6
        torch.testing.assert_close(
            torch.tensor(two["rows"][key]["per_example"]), torch.tensor(row["per_example"]), rtol=1e-5, atol=1e-9
        )
        assert two["rows"][key]["ci"] == pytest.approx(row["ci"], rel=1e-5, abs=1e-12)
    assert two["totals"]["bare"] == pytest.approx(one["totals"]["bare"], rel=1e-5, abs=1e-12)


@pytest.mark.distributed
def test_processes_given_different_behaviors_are_refused(pipeline, tmp_path):
    root, _, _ = pipeline
    out = _run_worker(2, root, tmp_path / "two.json", "aa-fd", mode="mismatch", ok=False)
    assert "Expected every process to attribute the same inputs, found different behaviors in process 1" in out
    assert "logit-0" in out


def test_bad_input_is_refused_clearly(pipeline, tmp_path):
    root, ledger, model = pipeline
    with pytest.raises(BehaviorError, match="No behaviors"):
        StageAttributor(ledger, model, estimator="aa-linear").attribute({})
    with pytest.raises(UnknownNameError, match="Known estimators"):
        StageAttributor(ledger, model, estimator="not-an-estimator")
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with pytest.raises(ModelMismatchError, match="tensor"):
        StageAttributor(ledger, other, estimator="aa-linear")
    before = sorted(p.name for p in (root / "ledger").iterdir())
    assert "report.json" not in before


def _tiny_ledger(path):
    import torch

    from hf_stage_attribution import StageLedger

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = StageLedger(path)
    with ledger.record_stage("a", model=model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        rec.step()
    return ledger, model


def test_a_world_size_the_attributor_does_not_see_is_warned_about(tmp_path, monkeypatch):
    """torchrun says WORLD_SIZE=2 but accelerate's state (initialised before, single-process) sees one process."""
    import warnings

    import pytest
    from accelerate import PartialState

    from hf_stage_attribution import StageAttributor

    ledger, model = _tiny_ledger(tmp_path / "l")
    assert PartialState().num_processes == 1  # the shared state is initialised here, before WORLD_SIZE is set
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="WORLD_SIZE=2 in the environment, but the attributor sees 1 process"):
        StageAttributor(ledger, model, estimator="delta-fd", show_progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StageAttributor(ledger, model, estimator="delta-fd", show_progress=False)


def test_the_auto_rule_documents_each_branch_the_code_takes():
    from pathlib import Path

    import hf_stage_attribution.estimators.selection as selection
    from hf_stage_attribution import StageAttributor, estimators

    branches = ["delta-fd", "partial-replay", "aa-ggn-fd", "aa-fd"]
    source = Path(selection.__file__).read_text(encoding="utf-8")
    code = source[source.index("def choose_estimator") : source.index("def lacks_optimizer_information")]
    returned = [f'"{name}"' if name != selection.PARTIAL_REPLAY else "PARTIAL_REPLAY" for name in branches]
    assert all(text in code for text in returned)  # the branches the code has ...
    for text in (selection.__doc__, estimators.get("auto").description, StageAttributor.__doc__):
        assert all(name in text for name in branches), text  # ... each description names
    assert "imported" in estimators.get("auto").description


def test_auto_precomputes_only_what_the_chosen_estimator_reads(tmp_path):
    """With step-limited stage functions ``auto`` runs partial replay; the precompute step resolves ``auto`` the same
    way, so no ``aa-ggn`` embeddings (``aa-ggn-fd``'s: the choice without stage functions on this curvature ledger)
    are computed."""
    from hf_stage_attribution import estimators
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    pipe = build_digits_pipeline("decay", tmp_path, steps_scale=0.05, base_steps_scale=0.05)
    assert estimators.choose_estimator(pipe.ledger)[0] == "aa-ggn-fd"  # what a resolution without stage_fns picks
    report = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, diagnostics=False, show_progress=False
    ).attribute({"margin_7": pipe.behaviors["margin_7"]})
    assert report.estimator == "partial-replay"
    written = sorted(p.name for p in Path(pipe.ledger.embeddings_dir).glob("*.safetensors"))
    assert not any(name.startswith("aa-ggn") for name in written), written


def test_partial_replay_verdict_checks_its_linear_read_out_without_replaying_again(tmp_path, monkeypatch):
    """The trust verdict of ``partial-replay`` weighs its linear read-out (its top stage, signs and ranking; the
    linearisation gap is shown but not counted where strided replay checks the estimate), computed from the same
    memoised embeddings: the diagnostics add read-outs, not step-limited replays.
    Measured (BENCHMARKS.md §8, verdict calibration): with task-vector negation as the only second opinion the
    digits-hf verdicts said "agree" for 16 of 35 behaviors, of which 4 named replay's top stage."""
    from hf_stage_attribution.estimators import partial_replay
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    pipe = build_digits_pipeline("hf", tmp_path, steps_scale=0.05, base_steps_scale=0.05)
    replays = count_stage_runs(monkeypatch, partial_replay)
    behavior = {"margin_7": pipe.behaviors["margin_7"]}
    plain = StageAttributor(pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, diagnostics=False, show_progress=False)
    plain.attribute(behavior)
    without = list(replays)
    partial_replay._MEMO.clear()
    replays.clear()
    # strided replay as the check, as asked (by default replay itself checks it and no sibling runs)
    attributor = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, second_opinion="strided-replay"
    )
    report = attributor.attribute(behavior)
    assert report.estimator == "partial-replay" and without and replays == without
    diag = report.diagnostics["margin_7"]
    # the last stage's finite-difference reading is replay itself: its linear reading is not computed
    last = pipe.ledger.stages[-1].name
    assert set(diag.linearisation_gap) == {s.name for s in pipe.ledger.stages} - {last}
    evidence = diag.trust["evidence"]
    assert evidence["exact_stages"] == [last]
    assert evidence["second_opinions"]["partial-replay-linear"]["stages"] == len(pipe.ledger.stages)
    assert f"not read linearly: {last} (the last stage" in report.to_markdown()
    assert evidence["linearisation_pair"] == ["partial-replay-linear", "partial-replay"]
    # the digits stage functions have the gradient-reuse form: strided replay is the second opinion asked for (its
    # own replays, counted by tests/estimators/test_second_opinion.py), task-vector negation is not needed
    assert set(evidence["second_opinions"]) == {"partial-replay-linear", "strided-replay"}
    # the finite-difference reading checked by the other replay family: the gap is the linear read-out's own error,
    # shown in the evidence and not counted (report/trust.py gap_counts)
    assert evidence["max_relative_linearisation_gap"] > 0 and evidence["linearisation_gap_counted"] is False
    assert "linearisation gap" not in diag.trust["label"]

    # budget 1 replays every later stage whole: the estimate is replay, and the verdict says so
    exact = StageAttributor(
        pipe.ledger, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, estimator_options={"budget": 1.0}
    ).attribute({**behavior, "margin_3": pipe.behaviors["margin_3"]})
    assert {exact.trust(name)["verdict"] for name in ("margin_7", "margin_3")} == {"verified"}


def _counted_at(model: torch.nn.Module, params: list[torch.Tensor], base):
    """``base`` as a behavior that also counts its plain evaluations of ``model`` holding ``params`` (not the linear
    read-out's forward-mode passes); returns ``(behavior, hits)``."""
    hits: list[int] = []

    def counted(m):
        inside_jvp = torch._C._functorch.is_functorch_wrapped_tensor(next(m.parameters()))
        if m is model and not inside_jvp and all(torch.equal(p, q) for p, q in zip(m.parameters(), params)):
            hits.append(1)
        return base(m)

    return counted, hits


def test_the_final_model_is_evaluated_once_for_every_estimator_that_reads_it(pipeline):
    """``f(θ_K)`` is read by the estimator, task-vector negation (second opinion), the total change and replay
    (``validate=True``): evaluated once and served again while the model is unchanged (it was evaluated 4 times);
    the estimates, replay's effects and the total change are those computed without the shared value."""
    from hf_stage_attribution import estimators
    from hf_stage_attribution.behaviors import as_behavior
    from tests.helpers.attributor import stage_fns

    _, ledger, model = pipeline
    base = behaviors_for()["logit-0"]
    counted, on_final = _counted_at(model, [p.detach().clone() for p in model.parameters()], base)

    attributor = StageAttributor(ledger, model, estimator="aa-fd", stage_fns=stage_fns(), show_progress=False)
    report = attributor.attribute({"logit-0": counted}, validate=True)
    assert len(on_final) == 1
    direct = estimators.get("aa-fd").estimate(ledger, model, as_behavior(base))  # evaluates the final model itself
    replay = estimators.get("replay").estimate(ledger, model, as_behavior(base), stage_fns=stage_fns())
    for row in report.rows_for("logit-0"):
        got = torch.as_tensor(row.per_example, dtype=torch.float64)
        torch.testing.assert_close(got, direct.per_example[row.stage])
        assert row.replay_effect == pytest.approx(float(replay.per_example[row.stage].mean()), abs=1e-12)
    total = report.diagnostics["logit-0"].total_change
    with torch.no_grad():
        initial = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        initial.load_state_dict(dict(ledger.initial_state().items()), strict=True)
    expected = (base(model) - base(initial)).double().mean()
    torch.testing.assert_close(torch.as_tensor(total, dtype=torch.float64), expected)


def test_validate_does_not_run_the_linear_sibling(pipeline):
    """With ``validate=True`` replay decides every verdict and measures the estimate's error itself: the linear
    sibling of a finite-difference estimate (a forward-mode pass per example) is not run, the report says why the
    linearisation gap is absent, and without validate the sibling runs as before."""
    from tests.helpers.attributor import stage_fns

    _, ledger, model = pipeline
    attributor = StageAttributor(ledger, model, estimator="aa-fd", stage_fns=stage_fns(), show_progress=False)
    validated = attributor.attribute(behaviors_for(), validate=True)
    diag = validated.diagnostics["logit-0"]
    assert not diag.linearisation_pair and not diag.linearisation_gap
    assert validated.trust("logit-0")["verdict"] in ("verified", "unreliable")  # replay's verdict
    assert "Linearisation gap: not computed (replay ran" in validated.to_markdown()
    plain = attributor.attribute(behaviors_for())
    assert plain.diagnostics["logit-0"].linearisation_pair == ["aa-linear", "aa-fd"]
    assert plain.diagnostics["logit-0"].linearisation_gap


def test_attribute_again_reads_the_ledger_and_the_model_as_they_are_now(tmp_path):
    """One attributor, ``attribute()`` called again after a stage was recorded into the same folder (through another
    ``StageLedger`` object, training the same model in place): the ledger is read as it is now (4 stages, the numbers
    of a fresh attributor; it was attributed as its first 3 with the new model: a sign flip, an 11× effect, the new
    stage missing), and a model trained further without recording is refused as a fresh attributor refuses it."""
    from tests.helpers.attributor import _data, forward, loss

    ledger, model = record_pipeline(tmp_path / "ledger")
    behaviors = {"logit-0": behaviors_for()["logit-0"]}
    attributor = StageAttributor(tmp_path / "ledger", model, estimator="aa-fd", diagnostics=False, show_progress=False)
    first = attributor.attribute(behaviors)
    assert [r.stage for r in first.rows_for("logit-0")] == ["stage0", "stage1", "stage2"]
    opt, batch = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.5), _data(7)
    with ledger.record_stage(
        "stage3", kind="custom", model=model, optimizer=opt, loss_fn=(forward, loss), num_steps=4
    ) as rec:
        for _ in range(4):
            opt.zero_grad()
            loss(forward(model, batch), batch).backward()
            opt.step()
            rec.step(batch)
    again = attributor.attribute(behaviors)
    fresh = StageAttributor(tmp_path / "ledger", model, estimator="aa-fd", diagnostics=False, show_progress=False)
    expected = {r.stage: r.effect for r in fresh.attribute(behaviors).rows_for("logit-0")}
    assert {r.stage: r.effect for r in again.rows_for("logit-0")} == expected
    assert len(expected) == 4
    with torch.no_grad():
        model[0].bias.add_(0.5)  # trained further, not recorded
    with pytest.raises(ModelMismatchError, match="does not match the ledger's final state"):
        attributor.attribute(behaviors)


def test_the_shared_final_value_follows_the_model(pipeline):
    """The joint behavior serves its kept ``f(θ_K)`` only while the model holds the same parameters: after an
    in-place change, or for another model, it evaluates again."""
    from hf_stage_attribution.attributor import _Joint

    _, _, model = pipeline
    joint = _Joint({"logit-0": behaviors_for()["logit-0"]})
    first = joint.cached_final_values(model)
    assert torch.equal(joint.cached_final_values(model), first)
    with torch.no_grad():
        bias = model[-1].bias
        bias.add_(1.0)
        try:
            shifted = joint.cached_final_values(model)
        finally:
            bias.sub_(1.0)
    torch.testing.assert_close(shifted, first + 1.0)
    with torch.no_grad():
        bias.add_(torch.tensor([1.0, -1.0, 0.0]))  # a shift whose entries sum to zero is seen too
        try:
            zero_sum = joint.cached_final_values(model)
        finally:
            bias.sub_(torch.tensor([1.0, -1.0, 0.0]))
    assert not torch.equal(zero_sum, first)
    torch.testing.assert_close(joint.cached_final_values(model), first)
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[-1].bias.add_(2.0)
    torch.testing.assert_close(joint.cached_final_values(other), first + 2.0)
    torch.testing.assert_close(joint.cached_final_values(model), first)


def test_the_model_without_its_last_stage_is_evaluated_once_for_the_estimate_and_its_check(pipeline):
    """Every finite-difference estimate leaves the last stage out as ``θ_K − Δ_K`` with the same recorded tensors:
    ``aa-fd`` and its second opinion, task-vector negation, evaluated that state twice; the joint behavior now keeps
    it (``_Joint.cached_values``). The estimates are those of the estimators run on their own."""
    from hf_stage_attribution import estimators
    from hf_stage_attribution.behaviors import as_behavior
    from hf_stage_attribution.report.trust import compare

    _, ledger, model = pipeline
    last = ledger.stages[-1]
    without_last = [
        (p - last.delta_tensor(name)) if name in last.delta_names() else p.detach().clone()
        for name, p in model.named_parameters()
    ]
    base = behaviors_for()["logit-0"]
    counted, on_shifted = _counted_at(model, without_last, base)

    report = StageAttributor(ledger, model, estimator="aa-fd", show_progress=False).attribute({"logit-0": counted})
    assert len(on_shifted) == 1, "θ_K − Δ_K is evaluated once for aa-fd and task-vector negation together"
    direct = estimators.get("aa-fd").estimate(ledger, model, as_behavior(base))
    for row in report.rows_for("logit-0"):
        torch.testing.assert_close(torch.tensor(row.per_example, dtype=torch.float64), direct.per_example[row.stage])
    negation = estimators.get("delta-fd").estimate(ledger, model, as_behavior(base))
    effects = {row.stage: row.effect for row in report.rows_for("logit-0")}
    expected = compare(effects, {s: float(v.mean()) for s, v in negation.per_example.items()})
    assert report.trust("logit-0")["evidence"]["second_opinions"]["delta-fd"] == pytest.approx(expected)


def test_the_model_keeps_its_attention_implementation(tmp_path):
    """Per-example linear effects need eager attention (forward-mode autodiff has no rule for CPU SDPA kernels): the
    attributor switches for its own work and gives the user's model back its own implementation."""
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.behaviors import PerExample
    from tests.helpers.tiny import one_layer_gpt2, record_lm_steps

    model = one_layer_gpt2(vocab_size=11)
    model.set_attn_implementation("sdpa")
    data = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    ledger = StageLedger(tmp_path / "ledger")
    for k, name in enumerate(["a", "b"]):
        record_lm_steps(ledger, name, model, data[k::2], lr=1e-2)
    rows = [data[i] for i in range(4)]
    behavior = PerExample(lambda m, batch: m(input_ids=torch.stack(batch)).logits[:, -1, 0], rows, batch_size=2)
    report = StageAttributor(ledger, model, estimator="aa-linear", show_progress=False).attribute({"logit": behavior})
    assert model.config._attn_implementation == "sdpa"  # was left "eager" by the attributor
    assert [r.stage for r in report.rows_for("logit")] == ["a", "b"]
    assert all(torch.isfinite(torch.tensor(r.per_example)).all() for r in report.rows_for("logit"))


def test_attribute_sizes_the_allocator_threshold_for_the_model_it_attributes(pipeline, monkeypatch):
    """Every ``release_freed_memory`` of an attribution fixes glibc's mmap threshold for the model attributed
    (``_internal.memory.mmap_threshold_for``): 128 KiB for this tiny model, as the memory bounds were measured."""
    from hf_stage_attribution import attributor as attributor_module
    from hf_stage_attribution._internal import memory

    _, ledger, model = pipeline
    sized = []
    monkeypatch.setattr(attributor_module, "size_heap_for", lambda n: sized.append(n) or memory.size_heap_for(n))
    StageAttributor(ledger, model, estimator="delta-linear", diagnostics=False, show_progress=False).attribute(
        behaviors_for()
    )
    assert sized == [sum(p.numel() * 4 for p in model.parameters())]
    assert memory._THRESHOLD[0] == memory.MMAP_THRESHOLD_MIN == memory.mmap_threshold_for(sized[0])
    assert memory.mmap_threshold_for(600_000_000) == memory.MMAP_THRESHOLD_MAX
