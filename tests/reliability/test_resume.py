"""Resume equivalence for custom loops: a stage killed mid-way and resumed (``resume=True``, ``checkpoint()``,
``truncate()``) gives the same ledger as one recorded without interruption.

The interrupted run is a real (forked) process that saves the model and optimizer, calls ``rec.checkpoint()``,
trains on and is SIGKILLed. The test then resumes in-process from the saved state.
Compared: stage list, learning rates, deltas, optimizer state at start, and every curvature segment's
midpoint delta, second moments and captured examples.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.ledger.recorder import StageRecording

STEPS = 8


def _setup(start: Path | None = None):
    """Model (from the prelude's end state saved at ``start``), AdamW and a decaying schedule."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    if start is not None:
        model.load_state_dict(load_file(str(start)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _batch(t: int):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(4, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen)


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _recording(ledger_dir: Path, model, opt, sched, resume: bool) -> StageRecording:
    return StageRecording(
        StageLedger(ledger_dir), "ft", model=model, optimizer=opt, scheduler=sched, loss_fn=_loss,
        num_steps=STEPS, curvature_segments=2, curvature_examples=8, resume=resume,
    )  # fmt: skip


def _train(rec: StageRecording, model, opt, sched, steps: range, on_step=None) -> None:
    for t in steps:
        opt.zero_grad()
        _loss(model, _batch(t)).backward()
        opt.step()
        rec.step(_batch(t))
        sched.step()
        if on_step is not None:
            on_step(t + 1)


def _prelude(ledger_dir: Path) -> Path:
    """A first stage, so that the resumed stage is not the ledger's first; returns its saved end state."""
    model, _, _ = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with StageLedger(ledger_dir).record_stage("pre", model=model, optimizer=opt) as rec:
        for t in range(3):
            opt.zero_grad()
            _loss(model, _batch(50 + t)).backward()
            opt.step()
            rec.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ledger_dir.parent / "pre.safetensors"))
    return ledger_dir.parent / "pre.safetensors"


def _save(path: Path, model, opt, sched, done: int) -> None:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path / "ckpt.pt")
    (path / "ckpt.json").write_text(json.dumps({"done": done}))


def _interrupted_child(ledger_dir: Path, save_at: int, record_every_step: bool, kill_at: int, signal_fd: int) -> None:
    """In a forked child: train, save the user checkpoint at ``save_at``, signal at ``kill_at`` and wait."""
    model, opt, sched = _setup(ledger_dir.parent / "pre.safetensors")
    rec = _recording(ledger_dir, model, opt, sched, resume=True)
    rec.begin()

    def on_step(done: int) -> None:
        if done == save_at:
            _save(ledger_dir.parent, model, opt, sched, done)
        if done == save_at or record_every_step:
            rec.checkpoint()
        if done == kill_at:
            os.write(signal_fd, b"K")
            time.sleep(600)

    _train(rec, model, opt, sched, range(STEPS), on_step)


def _run_and_kill(*args) -> None:
    """Fork a child that records (see above); SIGKILL it once it reports the kill point."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            _interrupted_child(*args, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"K", "the child died before its kill point"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _resume(ledger_dir: Path, truncate: bool = True) -> StageLedger:
    model, opt, sched = _setup(ledger_dir.parent / "pre.safetensors")
    saved = torch.load(ledger_dir.parent / "ckpt.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    done = json.loads((ledger_dir.parent / "ckpt.json").read_text())["done"]
    rec = _recording(ledger_dir, model, opt, sched, resume=True)
    rec.begin()
    if truncate:
        rec.truncate(done)
    _train(rec, model, opt, sched, range(done, STEPS))
    rec.end()
    return StageLedger.load(ledger_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ledger_dir = tmp_path_factory.mktemp("reference") / "ledger"
    model, opt, sched = _setup(_prelude(ledger_dir))
    rec = _recording(ledger_dir, model, opt, sched, resume=False)
    rec.begin()
    _train(rec, model, opt, sched, range(STEPS))
    rec.end()
    return StageLedger.load(ledger_dir)


def _assert_same(a: StageLedger, b: StageLedger) -> None:
    assert [(s.name, s.kind, s.num_steps, s.optimizer_state_policy) for s in a.stages] == [
        (s.name, s.kind, s.num_steps, s.optimizer_state_policy) for s in b.stages
    ]
    assert a.final_hash == b.final_hash
    for sa, sb in zip(a.stages, b.stages):
        assert sa.learning_rates == sb.learning_rates
        assert sa.trainable_parameters == sb.trainable_parameters and sa.optimizer == sb.optimizer
        da, db = sa.delta(), sb.delta()
        assert set(da) == set(db)
        for name in da:
            torch.testing.assert_close(da[name], db[name], atol=1e-6, rtol=0)
        assert [s.info for s in sa.segments] == [s.info for s in sb.segments]
        for ga, gb in zip(sa.segments, sb.segments):
            for what in ("params_delta", "second_moments"):
                torch.testing.assert_close(getattr(ga, what)(), getattr(gb, what)(), atol=1e-6, rtol=0)
            xa, xb = ga.examples(), gb.examples()
            assert len(xa) == len(xb) > 0, f"segment {ga.index}: {len(xa)} vs {len(xb)} captured batches"
            torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(sa.optimizer_state_at_start(), sb.optimizer_state_at_start())


CASES = {
    # (user checkpoint after step, rec.checkpoint() at every step, killed after step)
    "checkpoint at a segment boundary": (4, False, 6),
    "checkpoint mid-segment": (3, False, 7),
    "checkpoint before the first midpoint": (1, False, 5),
    "killed before the segment's examples were flushed": (1, False, 2),
    "progress ahead of the model checkpoint (truncate)": (3, True, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_stage_equals_an_uninterrupted_one(reference, tmp_path, case):
    save_at, every_step, kill_at = CASES[case]
    ledger_dir = tmp_path / "ledger"
    _prelude(ledger_dir)
    _run_and_kill(ledger_dir, save_at, every_step, kill_at)
    interrupted = StageLedger.load(ledger_dir)
    assert [s.name for s in interrupted.stages] == ["pre"] and interrupted.incomplete_stages()
    _assert_same(reference, _resume(ledger_dir))


def test_a_resume_without_truncate_is_matched_to_the_checkpoint_the_model_was_saved_at(reference, tmp_path):
    """``rec.checkpoint()`` at every step, the model saved at step 3, killed after step 6: resumed without
    ``truncate(3)`` the stage recorded 11 steps (learning rates of steps 3-5 twice) with no warning."""
    ledger_dir = tmp_path / "ledger"
    _prelude(ledger_dir)
    _run_and_kill(ledger_dir, 3, True, 6)
    with pytest.warns(UserWarning, match=r"Resumed from a model at step 3 of the stage, before the recording's last "
                                         r"checkpoint \(step 6\)"):  # fmt: skip
        resumed = _resume(ledger_dir, truncate=False)
    _assert_same(reference, resumed)


def test_a_resume_from_a_model_at_no_checkpoint_is_refused(tmp_path):
    from hf_stage_attribution.errors import LedgerError

    ledger_dir = tmp_path / "ledger"
    _prelude(ledger_dir)
    _run_and_kill(ledger_dir, 3, True, 6)
    model, opt, sched = _setup(ledger_dir.parent / "pre.safetensors")  # the stage's start: no checkpoint saw it
    rec = _recording(ledger_dir, model, opt, sched, resume=True)
    with pytest.raises(LedgerError, match=r"the model is not in the state of any of the recording's checkpoints"):
        rec.begin()
    from hf_stage_attribution.ledger.storage import lock_holder

    assert lock_holder(ledger_dir) is None and StageLedger.load(ledger_dir).incomplete_stages()  # kept for a resume
    _resume(ledger_dir, truncate=False)  # from the saved model (step 3), it goes on
