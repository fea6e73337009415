"""Two processes recording into the same ledger at once (a misconfigured launch): one wins, the other gets
``LedgerLockedError``, and the ledger holds exactly the winner's stage - never a mix of both.

The processes are real (forked) and released together through a pipe, so both reach the lock within a
millisecond or so; each then trains slowly enough that their recordings would overlap if both were let in.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.ledger import storage


def _record(ledger_dir: Path, name: str, seed: int, start: Path | None = None) -> None:
    """Record a slow 6-step stage; the model starts from the state saved at ``start`` (the ledger's end)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    if start is not None:
        model.load_state_dict(load_file(str(start)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed)), torch.arange(6) % 2

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    with StageLedger(ledger_dir).record_stage(name, model=model, optimizer=opt, loss_fn=loss_fn, num_steps=6) as rec:
        for _ in range(6):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
            rec.step((x, y))
            time.sleep(0.05)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(ledger_dir.parent / f"{name}.safetensors")
    )


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory):
    """Pay lazy imports and first-call costs once, before forking, so the racers start on an equal footing."""
    _record(tmp_path_factory.mktemp("warm") / "ledger", "warm", seed=0)


def _race(jobs: list[Callable[[], None]]) -> list[dict]:
    """Fork one process per job, release them together, return each one's outcome."""
    go_read, go_write = os.pipe()
    children = []
    for job in jobs:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                torch.set_num_threads(1)
                os.read(go_read, 1)
                try:
                    job()
                    result = {"ok": True}
                except BaseException as exc:
                    result = {"error": type(exc).__name__, "message": str(exc)}
                os.write(write_fd, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        children.append((pid, read_fd))
    time.sleep(0.2)  # let every child reach the starting line
    os.write(go_write, b"x" * len(jobs))
    results = []
    for pid, read_fd in children:
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        os.close(read_fd)
        os.waitpid(pid, 0)
        results.append(json.loads(b"".join(chunks) or b'{"error": "died"}'))
    os.close(go_read)
    os.close(go_write)
    return results


def _assert_one_winner(results: list[dict], ledger_dir: Path) -> None:
    winners = [i for i, r in enumerate(results) if r.get("ok")]
    assert len(winners) == 1, f"expected exactly one winner: {results}"
    loser = results[1 - winners[0]]
    assert loser["error"] == "LedgerLockedError", loser
    assert "being written by another process" in loser["message"] and "ledger.lock" in loser["message"]
    ledger = StageLedger.load(ledger_dir)
    assert [s.name for s in ledger.stages] == [f"p{winners[0]}"]  # only the winner's stage, and all of it
    ledger.verify()
    stage = ledger.stages[0]
    assert stage.num_steps == 6 and len(stage.segments) == 3
    assert ledger.incomplete_stages() == [] and ledger.leftover_files() == []
    assert not (ledger_dir / "ledger.lock").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new ledger", "ledger with a stage"])
def test_two_processes_recording_at_once_one_wins_the_other_is_refused(tmp_path, existing):
    ledger_dir = tmp_path / "ledger"
    start = None
    if existing:
        _record(ledger_dir, "base", seed=9)
        start = tmp_path / "base.safetensors"
    results = _race([lambda k=k: _record(ledger_dir, f"p{k}", seed=k, start=start) for k in range(2)])
    if existing:  # drop the base stage from the comparison: it must be untouched and first
        ledger = StageLedger.load(ledger_dir)
        assert ledger.stages[0].name == "base"
        winners = [f"p{i}" for i, r in enumerate(results) if r.get("ok")]
        assert [s.name for s in ledger.stages] == ["base", *winners] and len(winners) == 1, results
        ledger.verify()
    else:
        _assert_one_winner(results, ledger_dir)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_by_exactly_one_of_two_racing_processes(tmp_path):
    """The lock of a crashed writer is stale; two relaunched writers find it at the same moment."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0.0, "purpose": "crashed"}
    (ledger_dir / "ledger.lock").write_text(json.dumps(stale))
    real_read_lock = storage._read_lock

    def slow_read_lock(path):  # widen the window between "it is stale" and "delete it" to make the race certain
        holder = real_read_lock(path)
        time.sleep(0.3)
        return holder

    def job(k: int) -> None:
        storage._read_lock = slow_read_lock
        _record(ledger_dir, f"p{k}", seed=k)

    results = _race([lambda k=k: job(k) for k in range(2)])
    _assert_one_winner(results, ledger_dir)
