"""Partial replay (ESTIMATORS.md §4b): its exact limits (budget 0 = the propagation-only sibling, budget 1 = replay),
its budget plan, the step-limited replay of Trainer stages and stage functions, ``auto``'s choice, and bad input."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import tests.helpers.recording as F
import tests.helpers.replaying as H
from hf_stage_attribution import StageLedger, estimators
from hf_stage_attribution.errors import BudgetError, PartialReplayError, StageAttributionError
from hf_stage_attribution.estimators import partial_plan
from hf_stage_attribution.estimators import partial_replay as pr
from hf_stage_attribution.estimators.curvature.scratch import SCRATCH_DIR_ENV
from hf_stage_attribution.estimators.selection import PARTIAL_REPLAY_BUDGET, choose_estimator
from hf_stage_attribution.testing.digits import build_digits_pipeline

QUIET = {"check_model": False, "prepare_behavior": False}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small 3-stage digits pipeline per configuration (AdamW + warmup/decay; SGD momentum/nesterov + decay)."""
    return H.small_digits(tmp_path_factory.mktemp("digits"))


def _estimate(name, pipe, **options):
    pr._MEMO.clear()
    return estimators.get(name).estimate(pipe.ledger, pipe.model, H.joint(pipe), stage_fns=pipe.stage_fns, **QUIET,
                                         **options)  # fmt: skip


@pytest.mark.parametrize("config", ["hf", "decay"])
def test_budget_one_equals_replay_and_budget_zero_equals_the_propagation_only_sibling(digits, config):
    pipe = digits[config]
    replay = _estimate("replay", pipe)
    full = _estimate("partial-replay", pipe, budget=1.0)
    for stage, truth in replay.per_example.items():
        torch.testing.assert_close(full.per_example[stage], truth, rtol=1e-5, atol=1e-5)
    assert full.diagnostics["partial_replay"]["cost_fraction"] == pytest.approx(1.0)
    for (name, sibling), unit in zip((("partial-replay", "aa-fd"), ("partial-replay-linear", "aa-linear")) * 2,
                                     ("steps", "steps", "lr-mass", "lr-mass")):  # fmt: skip
        zero = _estimate(name, pipe, budget=0.0, budget_unit=unit)
        ref = _estimate(sibling, pipe)
        assert zero.per_example.keys() == ref.per_example.keys()
        for stage in ref.per_example:
            assert torch.equal(zero.per_example[stage], ref.per_example[stage]), (name, stage)
        assert zero.diagnostics["partial_replay"]["steps_run"] == 0


def test_an_intermediate_budget_stays_within_it_and_the_last_stage_stays_exact(digits):
    pipe = digits["hf"]
    replay = _estimate("replay", pipe)
    last = pipe.ledger.stages[-1].name
    for budget in (0.1, 0.5, 0.9):
        result = _estimate("partial-replay", pipe, budget=budget)
        diag = result.diagnostics["partial_replay"]
        assert 0 < diag["steps_run"] <= budget * diag["replay_steps"]
        torch.testing.assert_close(result.per_example[last], replay.per_example[last], rtol=1e-5, atol=1e-5)
        linear = _estimate("partial-replay-linear", pipe, budget=budget)
        assert linear.diagnostics["partial_replay"]["steps_run"] == diag["steps_run"]
        assert any("Partial replay" in a for a in result.approximations)


def test_the_plan_spends_the_budget_on_the_next_stages_in_order(digits):
    ledger = digits["hf"].ledger
    n = [s.num_steps for s in ledger.stages]
    plan = pr.plan_partial_replay(ledger, 0, 0.5)
    assert plan.replay_steps == n[1] + n[2]
    legs = [(leg.index, leg.steps, leg.full) for leg in plan.legs]
    budget = 0.5 * (n[1] + n[2])
    if budget >= n[1]:
        assert (
            legs[0] == (1, n[1], True)
            and legs[1:] == [(2, int((budget - n[1]) // 2), False)][: int(budget > n[1] + 1)]
        )
    else:
        assert legs == [(1, int(budget // 2), False)]
    assert pr.plan_partial_replay(ledger, 2, 0.7).legs == []  # the terminal stage: nothing to replay
    assert [leg.full for leg in pr.plan_partial_replay(ledger, 0, 1.0).legs] == [True, True]
    mass = pr.plan_partial_replay(ledger, 1, 0.3, "lr-mass")
    assert mass.unit == "lr-mass" and mass.legs and not mass.legs[0].full


@pytest.mark.parametrize("budget", [-0.1, 1.5, math.nan, "0.5", True, None])
def test_a_budget_outside_zero_one_is_refused(digits, budget):
    with pytest.raises(BudgetError, match=r"number in \[0, 1\]"):
        _estimate("partial-replay", digits["hf"], budget=budget)
    with pytest.raises(BudgetError, match="budget_unit"):
        _estimate("partial-replay", digits["hf"], budget=0.5, budget_unit="seconds")


def test_a_stage_without_replay_material_or_step_limited_function_is_refused(digits):
    pipe = digits["hf"]
    later = pipe.ledger.stages[1].name
    with pytest.raises(PartialReplayError, match=r"save_replay_data=True.*stage_fns=\{'digits-patch'"):
        estimators.get("partial-replay").estimate(pipe.ledger, pipe.model, H.joint(pipe), budget=0.5, **QUIET)
    plain = dict(pipe.stage_fns)
    plain[later] = lambda model: pipe.stage_fns[later](model)  # the whole stage only
    with pytest.raises(PartialReplayError, match=r"no step-limited form.*fn\(model, max_steps=None\)"):
        estimators.get("partial-replay").estimate(
            pipe.ledger, pipe.model, H.joint(pipe), stage_fns=plain, budget=0.1, **QUIET
        )
    # budget 0 replays nothing, so it needs nothing
    result = estimators.get("partial-replay").estimate(pipe.ledger, pipe.model, H.joint(pipe), budget=0.0, **QUIET)
    assert set(result.per_example) == {s.name for s in pipe.ledger.stages}
    assert issubclass(PartialReplayError, StageAttributionError) and issubclass(BudgetError, StageAttributionError)


def test_auto_chooses_partial_replay_where_the_later_stages_can_be_replayed(digits):
    pipe = digits["hf"]
    assert PARTIAL_REPLAY_BUDGET == pr.DEFAULT_BUDGET
    name, reason = choose_estimator(pipe.ledger, {s.name: pipe.loss_fn for s in pipe.ledger.stages}, pipe.stage_fns)
    assert name == "partial-replay" and "stage functions" in reason and "0.25" in reason
    name, reason = choose_estimator(pipe.ledger, {s.name: pipe.loss_fn for s in pipe.ledger.stages})
    assert name == "aa-ggn-fd" and "partial replay not used" in reason and "max_steps" in reason
    plain = {n: (lambda fn: lambda model: fn(model))(f) for n, f in pipe.stage_fns.items()}
    name, reason = choose_estimator(pipe.ledger, None, plain)  # whole-stage functions only: no partial replay
    assert name in ("aa-ggn-fd", "aa-fd") and "step-limited stage function" in reason
    pr._MEMO.clear()
    result = estimators.get("auto").estimate(pipe.ledger, pipe.model, H.joint(pipe), stage_fns=pipe.stage_fns, **QUIET)
    assert result.estimator == "partial-replay" and result.reason.startswith("every later stage")
    assert result.diagnostics["partial_replay"]["budget"] == PARTIAL_REPLAY_BUDGET


# --- Trainer stages with replay data ---------------------------------------------------------------------------


class _Snapshot:
    """Keeps a copy of the parameters after optimizer step ``at`` (a TrainerCallback built lazily)."""

    def __new__(cls, at):
        from transformers import TrainerCallback

        class Snap(TrainerCallback):
            params = None

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == at:
                    Snap.params = [p.detach().clone() for p in model.parameters()]

        return Snap()


@pytest.fixture(scope="module")
def trainer_ledger(tmp_path_factory):
    """Two Trainer stages (warmup + linear decay, AdamW) of a tiny GPT-2, recorded with replay data."""
    return H.trainer_stages(tmp_path_factory.mktemp("trainer"), ("first", "second"))


def test_a_step_limited_trainer_replay_stops_without_changing_the_schedule(trainer_ledger):
    from hf_stage_attribution.estimators.replay import load_state, working_copy
    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    ledger, model, _ = trainer_ledger
    stage = ledger.stages[1]
    starts = []
    for _ in range(2):
        work = working_copy(model)
        load_state(work, ledger.state_at(0))
        starts.append(work)
    snap = _Snapshot(3)
    replay_trainer_stage(stage, starts[0], callbacks=[snap])  # the whole stage, watched at step 3
    state: dict = {}
    stopped = replay_trainer_stage(stage, starts[1], max_steps=3, optimizer_out=state)
    for p, q in zip(stopped.parameters(), type(snap).params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    steps = {float(entry["step"]) for entry in state.values()}
    assert steps == {3.0} and all("exp_avg_sq" in entry for entry in state.values())


def test_partial_replay_of_trainer_stages_matches_replay_at_budget_one(trainer_ledger):
    ledger, model, behavior = trainer_ledger
    name, reason = choose_estimator(ledger)  # 25 % of the 6-step second stage buys no step from each start
    assert name != "partial-replay" and "would replay no optimizer step for any stage" in reason
    fallback, why = choose_estimator(ledger, partial_replay=False)  # what the benchmarks' fidelity section compares
    assert fallback != "partial-replay" and "partial replay" not in why
    pr._MEMO.clear()
    truth = estimators.get("replay").estimate(ledger, model, behavior, **QUIET)
    full = estimators.get("partial-replay").estimate(ledger, model, behavior, budget=1.0, **QUIET)
    H.assert_same_effects(full, truth, rtol=1e-4, atol=1e-4)
    half = estimators.get("partial-replay").estimate(ledger, model, behavior, budget=0.5, **QUIET)
    assert half.diagnostics["partial_replay"]["steps_run"] == 2  # 3 steps = 50 % of 6: 1 step from each start
    assert all(torch.isfinite(v).all() for v in half.per_example.values())


def test_a_trainer_stage_function_made_step_limited_with_the_stop_callback(trainer_ledger, tmp_path):
    from transformers import Trainer

    from hf_stage_attribution.integrations.replay import stop_after_steps_callback

    ledger, model, behavior = trainer_ledger
    args = F.training_args(str(tmp_path / "second"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                           lr_scheduler_type="linear", warmup_steps=2, seed=1)  # fmt: skip
    seen = []

    def second(m, max_steps=None):  # the recorded recipe of stage "second", as a stage function
        state: dict = {}
        callbacks = [] if max_steps is None else [stop_after_steps_callback(max_steps, optimizer_out=state)]
        Trainer(model=m, args=args, train_dataset=F.lm_dataset(seed=1), callbacks=callbacks).train()
        seen.append(state)
        return m, state

    fns = {"second": second}
    pr._MEMO.clear()
    truth = estimators.get("replay").estimate(ledger, model, behavior, stage_fns=fns, **QUIET)
    full = estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns=fns, budget=1.0, **QUIET)
    torch.testing.assert_close(full.per_example["first"], truth.per_example["first"], rtol=1e-4, atol=1e-4)
    seen.clear()
    estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns=fns, budget=0.5, **QUIET)
    assert len(seen) == 2 and all({float(e["step"]) for e in s.values()} == {1.0} for s in seen)


def test_a_trainer_stage_function_that_takes_callbacks_is_step_limited_by_the_package(trainer_ledger, tmp_path):
    """The callback form: ``fn(model, callbacks=None)`` handing its callbacks to the Trainer needs no ``max_steps``;
    the package adds the stop callback, and the estimate equals the explicit step-limited form's."""
    from transformers import Trainer

    from hf_stage_attribution.estimators.replay import can_replay, step_limitable
    from hf_stage_attribution.integrations.replay import stop_after_steps_callback

    ledger, model, behavior = trainer_ledger
    args = F.training_args(str(tmp_path / "second"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                           lr_scheduler_type="linear", warmup_steps=2, seed=1)  # fmt: skip
    handed = []

    def with_callbacks(m, callbacks=None):  # a stage function as users write it for a Trainer stage
        handed.append(list(callbacks or []))
        Trainer(model=m, args=args, train_dataset=F.lm_dataset(seed=1), callbacks=callbacks or []).train()
        return m

    def explicit(m, max_steps=None):
        state: dict = {}
        callbacks = [] if max_steps is None else [stop_after_steps_callback(max_steps, optimizer_out=state)]
        Trainer(model=m, args=args, train_dataset=F.lm_dataset(seed=1), callbacks=callbacks).train()
        return m, state

    def ignores_them(m, callbacks=None):  # takes callbacks but never hands them to its Trainer
        Trainer(model=m, args=args, train_dataset=F.lm_dataset(seed=1)).train()
        return m

    pr._MEMO.clear()
    with pytest.raises(PartialReplayError, match=r"callback never ran.*Trainer\(\.\.\., callbacks=callbacks\)"):
        estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns={"second": ignores_them},
                                                  budget=0.5, **QUIET)  # fmt: skip
    assert step_limitable(with_callbacks) and not step_limitable(lambda m: m)
    assert can_replay(ledger.stages[1], {"second": with_callbacks}, step_limited=True)
    name, reason = choose_estimator(ledger, None, {"second": with_callbacks})  # step-limited: only too short for 25 %
    assert name != "partial-replay" and "would replay no optimizer step for any stage" in reason
    estimates = {}
    for form, fn in (("callbacks", with_callbacks), ("max_steps", explicit)):
        pr._MEMO.clear()
        estimates[form] = estimators.get("partial-replay").estimate(
            ledger, model, behavior, stage_fns={"second": fn}, budget=0.5, **QUIET
        )
    assert len(handed) == 2 and all(len(cbs) == 1 for cbs in handed)  # both branches: the stop callback only
    by_callback, by_max_steps = (estimates[f].per_example["first"] for f in ("callbacks", "max_steps"))
    torch.testing.assert_close(by_callback, by_max_steps, rtol=0, atol=0)
    # the first-moment difference was carried: without the optimizer state the estimate differs
    pr._MEMO.clear()
    dropped = estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns={"second": explicit},
                                                        budget=0.5, carry_moments=False, **QUIET)  # fmt: skip
    assert not torch.equal(dropped.per_example["first"], estimates["callbacks"].per_example["first"])
    handed.clear()
    pr._MEMO.clear()
    truth = estimators.get("replay").estimate(ledger, model, behavior, stage_fns={"second": with_callbacks}, **QUIET)
    assert handed == [[]]  # the whole stage: no callback added
    full = estimators.get("partial-replay").estimate(ledger, model, behavior, stage_fns={"second": with_callbacks},
                                                     budget=1.0, **QUIET)  # fmt: skip
    torch.testing.assert_close(full.per_example["first"], truth.per_example["first"], rtol=1e-4, atol=1e-4)


def test_the_curvature_carry_reduces_to_the_linear_carry_without_curvature(digits):
    pipe = digits["decay"]
    loss_fns = {s.name: pipe.loss_fn for s in pipe.ledger.stages}
    linear = _estimate("partial-replay", pipe, budget=0.1)
    flat = _estimate("partial-replay", pipe, budget=0.1, carry="aa-ggn", loss_fns=loss_fns,
                     curvature_options={"curvature_scale": 0.0})  # fmt: skip
    curved = _estimate("partial-replay", pipe, budget=0.1, carry="aa-ggn", loss_fns=loss_fns)
    # stage 2's partial replay stops inside the SGD stage 3 (no preconditioner): the two carries coincide there
    second = pipe.ledger.stages[1].name
    torch.testing.assert_close(flat.per_example[second], linear.per_example[second], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(curved.per_example[second], linear.per_example[second], rtol=1e-4, atol=1e-6)
    assert curved.diagnostics["partial_replay"]["carry"] == "aa-ggn"
    with pytest.raises(BudgetError, match="carry"):
        _estimate("partial-replay", pipe, budget=0.1, carry="aa-hvp")


def test_a_recorded_mid_segment_checkpoint_is_the_factual_branch_at_its_step(tmp_path):
    from hf_stage_attribution._internal.params import iter_merged_state
    from hf_stage_attribution.estimators.replay import load_state, run_stage, working_copy

    # mid-segment parameters are only on disk with curvature_material="full" (the compact default interpolates them)
    pipe = build_digits_pipeline(
        "hf", tmp_path, seed=0, steps_scale=0.1, base_steps_scale=0.1, curvature_material="full"
    )
    ledger, stage = pipe.ledger, pipe.ledger.stages[2]
    steps, index = partial_plan._checkpoints(stage)[0]
    segment = next(s for s in stage.segments if s.index == index)
    work = working_copy(pipe.model)
    load_state(work, ledger.state_at(1))
    work, _ = run_stage(stage, work, pipe.stage_fns, {}, max_steps=steps)
    start, moved = ledger.state_at(1), segment.params_delta()
    for name, value in iter_merged_state(work):
        torch.testing.assert_close(value, start[name] + moved.get(name, 0), rtol=1e-5, atol=1e-6)
    n = stage.num_steps
    budget = (steps + 0.5) / n  # enough for the checkpoint's steps from one start, not from two
    plan = pr.plan_partial_replay(ledger, 1, budget, use_checkpoints=True)
    assert [(leg.steps, leg.factual, leg.segment) for leg in plan.legs] == [(steps, "segment", index)]
    assert plan.cost_steps == steps and plan.legs[0].one_branch
    result = _estimate("partial-replay", pipe, budget=budget, use_checkpoints=True)
    assert "segment" in result.diagnostics["partial_replay"]["plans"][ledger.stages[1].name]
    assert any("mid-segment checkpoint" in a for a in result.approximations)


@pytest.mark.parametrize("config", ["hf", "decay"])
def test_a_recorded_early_checkpoint_is_the_factual_branch_and_halves_the_leg(tmp_path, config):
    """With ``early_checkpoint=0.25`` recorded, a 25 % budget replays the next stage's first quarter from the
    counterfactual start only (cost: its steps, not twice them), and the embedding equals the one whose factual
    branch is replayed over the same steps (the checkpoint stores θ_m − θ_start in float32: to 1e-6); budget 1 still
    equals replay, and ``use_early_checkpoints=False`` gives back the two-branch plan."""
    scale = {"steps_scale": 0.1, "base_steps_scale": 0.1}
    pipe = build_digits_pipeline(config, tmp_path, seed=0, early_checkpoint=0.25, **scale)
    ledger = pipe.ledger
    early = ledger.stages[2].early_checkpoint
    assert early is not None and early.steps == int(0.25 * ledger.stages[2].num_steps)
    name, reason = choose_estimator(ledger, stage_fns=pipe.stage_fns)
    assert name == "partial-replay" and "read from their recorded early checkpoints" in reason
    plan = pr.plan_partial_replay(ledger, 1, 0.25)  # stage 1's replay is stage 2 alone: the checkpoint fits
    assert [(leg.index, leg.steps, leg.factual) for leg in plan.legs] == [(2, early.steps, "early")]
    assert plan.cost_steps == early.steps and "early checkpoint" in plan.describe(ledger)
    two_branch = pr.plan_partial_replay(ledger, 1, 0.25, use_early_checkpoints=False)
    assert {leg.factual for leg in two_branch.legs} == {"replay"} and not two_branch.legs[0].one_branch
    assert two_branch.cost_steps == 2 * two_branch.legs[0].steps
    read = pr.partial_embedding(ledger, pipe.model, plan, pipe.stage_fns, set())
    plan.legs[0].factual = "replay"  # the same steps, the factual branch replayed
    run = pr.partial_embedding(ledger, pipe.model, plan, pipe.stage_fns, set())
    assert set(read) == set(run)
    for name in run:
        torch.testing.assert_close(read[name], run[name], rtol=1e-6, atol=1e-6)
    result = _estimate("partial-replay", pipe, budget=0.25)
    assert "early checkpoint" in result.diagnostics["partial_replay"]["plans"][ledger.stages[1].name]
    assert any("recorded early checkpoint" in a for a in result.approximations)
    truth = _estimate("replay", pipe)
    full = _estimate("partial-replay", pipe, budget=1.0)
    H.assert_same_effects(full, truth, rtol=1e-4, atol=1e-5)


def _open_scratch_files(where) -> list[str]:
    """The files under ``where`` this process holds open (unlinked ones end in ``(deleted)``)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(where)):
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the open files from /proc")
def test_branches_and_embeddings_live_in_scratch_files_that_are_removed(digits, tmp_path, monkeypatch):
    """The branch parameters/moments go to scratch files given back when ``v_k`` is done; ``v_k`` itself is read from
    a scratch file (equal to the in-memory computation) that goes with the embeddings. Every file is unlinked as soon
    as it is open: the directory stays empty throughout, so a killed run leaves nothing behind."""
    import gc
    import tempfile

    pipe = digits["hf"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(pr, "IN_MEMORY_BYTES", 0)  # the digits MLP is small enough to stay in RAM otherwise
    pr._MEMO.clear()
    gc.collect()
    stages = list(pipe.ledger.stages)
    emb = pr.partial_replay_embeddings(pipe.ledger, pipe.model, stages, budget=0.5, stage_fns=pipe.stage_fns)
    k = min(emb.vectors)
    assert isinstance(emb.vectors[k], pr.ScratchTensors)
    held = _open_scratch_files(tmp_path)
    assert list(tmp_path.iterdir()) == [] and held, held
    assert all("hfsa-partial-replay-v-" in t and t.endswith("(deleted)") for t in held), held  # no branch file left
    assert len(held) == len(emb.vectors)
    plan = pr.plan_partial_replay(pipe.ledger, k, 0.5)
    in_memory = pr.partial_embedding(pipe.ledger, pipe.model, plan, pipe.stage_fns, set())
    assert sorted(in_memory) == sorted(emb.names(k))
    for name, v in in_memory.items():
        assert torch.equal(emb.get(k, name), v), name
    assert dict(emb.items(k)).keys() == in_memory.keys()
    assert emb.norm(k) == pytest.approx(math.sqrt(sum(float(v.double().pow(2).sum()) for v in in_memory.values())))
    pr._MEMO.clear()
    del emb
    gc.collect()
    assert _open_scratch_files(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_a_process_killed_during_partial_replay_leaves_no_scratch_file(tmp_path):
    """A run killed by the kernel for memory (SIGKILL: no cleanup runs) used to leave its branch and ``v_k`` files
    (model-sized each) in the scratch directory."""
    code = (
        "import os, signal, torch\n"
        "from hf_stage_attribution.estimators.partial_replay import ScratchTensors\n"
        "box = ScratchTensors()\n"
        "box.write([('w', torch.ones(1000))])\n"
        "assert float(box.get('w').sum()) == 1000.0\n"
        "print(len(os.listdir(os.environ['HF_STAGE_ATTRIBUTION_SCRATCH_DIR'])), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, SCRATCH_DIR_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "0" and os.listdir(tmp_path) == []


def test_a_scratch_disk_too_small_is_refused_before_any_replay(digits, monkeypatch):
    """Partial replay writes branch parameters, moments and ``v_k`` to scratch files: without the room it stops
    before the first replayed step with a one-line error naming the fix."""
    from hf_stage_attribution.errors import EstimatorMemoryError

    pipe = digits["hf"]
    pr._MEMO.clear()
    calls = []
    monkeypatch.setattr(pr, "scratch_free_bytes", lambda: 1000)
    monkeypatch.setattr(pr, "run_stage", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(EstimatorMemoryError, match="scratch disk.*HF_STAGE_ATTRIBUTION_SCRATCH_DIR.*aa-fd"):
        pr.partial_replay_embeddings(pipe.ledger, pipe.model, list(pipe.ledger.stages), budget=0.5,
                                     stage_fns=pipe.stage_fns)  # fmt: skip
    assert calls == []


def test_replay_and_partial_replay_free_their_models_scanning_only_what_they_made(digits, monkeypatch):
    """Each trained model copy is freed by a collection that scans only the objects made since the estimator began
    (what was alive on entry is frozen: a full scan cost 0.1–0.5 s a time after the Trainer imports); the freeze is
    gone afterwards, and a second run gives identical numbers (garbage collection never changes them)."""
    import gc

    from hf_stage_attribution.estimators import replay as rp

    pipe = digits["hf"]
    first = _estimate("partial-replay", pipe, budget=0.5)
    seen = []
    for module in (pr, rp):
        real = module.release_freed_memory
        monkeypatch.setattr(module, "release_freed_memory", lambda real=real: seen.append(gc.get_freeze_count()) or
                            real())  # fmt: skip
    again = _estimate("partial-replay", pipe, budget=0.5)
    _estimate("replay", pipe)
    assert len(seen) >= 4 and all(count > 0 for count in seen), seen
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    for stage, value in first.per_example.items():
        assert torch.equal(again.per_example[stage], value), stage


@pytest.mark.parametrize("config", ["hf", "decay"])
def test_a_small_model_keeps_the_vectors_in_memory_with_the_same_numbers(digits, config, tmp_path, monkeypatch):
    """Below ``IN_MEMORY_BYTES`` the branches and ``v_k`` stay in RAM (no scratch directory at all); the embeddings
    and the read-out are bit-identical to the scratch-file path, and reading a vector twice gives fresh copies."""
    import tempfile

    pipe = digits[config]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stages = list(pipe.ledger.stages)
    runs = {}
    for limit in (0, pr.IN_MEMORY_BYTES):
        monkeypatch.setattr(pr, "IN_MEMORY_BYTES", limit)
        pr._MEMO.clear()
        before = set(tmp_path.iterdir())
        emb = pr.partial_replay_embeddings(pipe.ledger, pipe.model, stages, budget=0.5, stage_fns=pipe.stage_fns,
                                           reuse=False)  # fmt: skip
        if limit:
            assert set(tmp_path.iterdir()) == before, "nothing written to the scratch directory"
        vectors = {k: dict(emb.items(k)) for k in emb.vectors}
        fd = _estimate("partial-replay", pipe, budget=0.5)
        runs[limit] = (vectors, fd, emb)
    (disk, disk_fd, _), (memory, memory_fd, emb) = runs[0], runs[pr.IN_MEMORY_BYTES]
    assert disk.keys() == memory.keys() and disk
    for k in disk:
        assert disk[k].keys() == memory[k].keys()
        for name, v in disk[k].items():
            assert torch.equal(memory[k][name], v), (k, name)
    for stage, value in disk_fd.per_example.items():
        assert torch.equal(memory_fd.per_example[stage], value), stage
    k, name = next((k, n) for k in memory for n in memory[k])
    first = emb.get(k, name)
    first.add_(1.0)
    assert torch.equal(emb.get(k, name), memory[k][name])  # a caller's in-place change does not reach the store


def _constant_gradient_pipeline(root):
    """Three SGD stages of 8 steps on ``w · c`` (its gradient ``c`` does not depend on ``w``) under a decaying
    learning rate: every trajectory is ``θ_start − c · Σ η``, exactly linear in the learning-rate mass."""
    c = torch.tensor([[1.0, -2.0, 0.5]])
    model, ledger = torch.nn.Linear(3, 1, bias=False), StageLedger(root)

    def make(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    def train(m, opt, sched, steps, rec=None):
        for _ in range(steps):
            opt.zero_grad()
            m(c).sum().backward()
            opt.step()
            if rec is not None:
                rec.step()
            sched.step()
        return m, opt

    for name in ("a", "b", "c"):
        opt, sched = make(model)
        with ledger.record_stage(name, model=model, optimizer=opt, scheduler=sched) as rec:
            train(model, opt, sched, 8, rec)

    def fn(m, max_steps=None):  # the recorded recipe, stopping after max_steps optimizer steps
        return train(m, *make(m), 8 if max_steps is None else max_steps)

    fns = dict.fromkeys(("a", "b", "c"), fn)
    return ledger, model, fns


def test_an_interpolated_factual_branch_is_exact_on_a_straight_trajectory_and_runs_one_branch(tmp_path):
    ledger, model, fns = _constant_gradient_pipeline(tmp_path / "ledger")
    stages = list(ledger.stages)
    replayed = pr.plan_partial_replay(ledger, 0, 6 / 16)  # 6 of 16 later steps: 3 steps of stage b from both starts
    one = pr.plan_partial_replay(ledger, 0, 3 / 16, factual="interpolated")  # 3 steps, counterfactual branch only
    legs = [[(leg.index, leg.steps) for leg in plan.legs] for plan in (replayed, one)]
    assert legs == [[(1, 3)], [(1, 3)]]
    assert (replayed.cost_steps, one.cost_steps) == (6, 3) and "factual: interpolated" in one.describe(ledger)
    for budget, factual in ((6 / 16, "replay"), (3 / 16, "interpolated")):
        pr._MEMO.clear()
        emb = pr.partial_replay_embeddings(ledger, model, stages[:1], budget=budget, stage_fns=fns, factual=factual)
        if factual == "replay":
            reference = emb.get(0, "weight").clone()
        else:
            torch.testing.assert_close(emb.get(0, "weight"), reference, rtol=1e-6, atol=1e-7)
            assert any("interpolated" in a or "learning-rate mass" in a for a in emb.approximations)
    with pytest.raises(BudgetError, match="factual"):
        pr.partial_replay_embeddings(ledger, model, stages[:1], budget=0.25, stage_fns=fns, factual="guess")


@pytest.mark.parametrize("name", ["partial-replay", "strided-replay"])
def test_only_the_stages_left_to_propagation_get_aa_linear_embeddings(digits, name):
    """A replayed stage's ``aa-linear`` embedding is never read: the replay families compute (and cache) those of the
    stages they leave to propagation only (here the last one), and a cache that holds every stage's gives the same
    estimates."""
    from hf_stage_attribution.estimators import strided_replay as sr
    from hf_stage_attribution.estimators.embeddings.cache import StageEmbeddings, stage_embeddings

    pipe = digits["hf"]
    cache = pipe.ledger.embeddings_dir / "aa-linear.safetensors"
    cache.unlink(missing_ok=True)
    sr._MEMO.clear()
    lean = _estimate(name, pipe, budget=0.25)
    assert StageEmbeddings(pipe.ledger, "aa-linear", cache).stage_indices == [len(pipe.ledger.stages) - 1]
    stage_embeddings(pipe.ledger, "aa-linear")  # every stage's, as before
    sr._MEMO.clear()
    full = _estimate(name, pipe, budget=0.25)
    for stage, value in lean.per_example.items():
        assert torch.equal(full.per_example[stage], value), stage


@pytest.mark.parametrize("name", ["partial-replay", "strided-replay"])
def test_a_replay_is_kept_only_within_one_attribution(digits, monkeypatch, name):
    """Outside ``reusing_replays()`` every call replays: a stage function is user code whose behaviour can change
    between calls with the same object (a data-order seed read from a config the user fixed was served the earlier
    replay: partial replay 0.137 off, strided replay of the other sign). Inside it (``StageAttributor.attribute`` opens
    one) the second read-out reads the first one's replay, another option that changes the embedding is another key,
    and the kept result is dropped when the block ends."""
    from hf_stage_attribution.estimators import reusing_replays
    from hf_stage_attribution.estimators import strided_replay as sr

    pipe, module = digits["hf"], (pr if name == "partial-replay" else sr)
    ran = H.count_stage_runs(monkeypatch, module)
    linear = "partial-replay-linear" if name == "partial-replay" else name

    def run(estimator, **options):
        return estimators.get(estimator).estimate(pipe.ledger, pipe.model, H.joint(pipe), stage_fns=pipe.stage_fns,
                                                  **QUIET, **options)  # fmt: skip

    run(name)
    once = len(ran)
    assert once > 0
    run(linear)
    assert len(ran) == 2 * once  # no block open: replayed again
    with reusing_replays():
        run(name)
        run(linear)
        assert len(ran) == 3 * once  # one replay for both read-outs
        run(name, allow_identity_propagation=True)
        assert len(ran) == 4 * once  # another option, another key
    assert not pr._MEMO and not sr._MEMO
