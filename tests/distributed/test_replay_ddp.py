"""Replaying estimators under ``torchrun`` (2 processes, CPU, gloo) give the answer of 1 process on a ledger
recorded by the Trainer callback in one process: each process replays its share of the stages whole, as a
single-process run (``integrations.replay.replay_world``), never with DDP or its data split across the processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.replaying import trainer_stages

WORKER = Path(__file__).parent / "replay_worker.py"
ESTIMATORS = ("replay", "partial-replay", "strided-replay")


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run_worker(nproc: int, root: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent.parent))
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _free_port()]
    args = [str(WORKER), str(root / "ledger"), str(root / "model"), str(out), *ESTIMATORS]
    proc = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_two_processes_replay_a_one_process_recording_as_one_process(tmp_path):
    ledger, model, _ = trainer_stages(tmp_path, ("first", "second"))
    assert [s.info["world_size"] for s in ledger.stages] == [1, 1]
    model.save_pretrained(str(tmp_path / "model"))
    two = _run_worker(2, tmp_path, tmp_path / "two.json")
    one = _run_worker(1, tmp_path, tmp_path / "one.json")
    assert (two["processes"], one["processes"]) == (2, 1)
    for name in ESTIMATORS:
        assert one[name].keys() == two[name].keys() == {"first", "second"}
        for stage, row in one[name].items():
            assert len(row["per_example"]) == 5
            # the replayed stage's trajectory is the recorded one in both: equal up to evaluation rounding
            torch.testing.assert_close(
                torch.tensor(two[name][stage]["per_example"]), torch.tensor(row["per_example"]), rtol=1e-5, atol=1e-5
            )
