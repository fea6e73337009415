"""Under ``torchrun --nproc_per_node 2`` on CPU, ``write_model_card`` called on its own writes from rank 0 only;
the other rank gets None (accelerate's plain ``PartialState()`` sees one process there, so both used to write)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_attributor import _free_port

WORKER = Path(__file__).parent / "card_worker.py"


@pytest.mark.distributed
def test_only_rank_0_writes_the_card_under_torchrun(tmp_path):
    for case in ("env", "process_group"):
        (tmp_path / case).mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port()]
    done = subprocess.run([*cmd, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["returned"] == {"env": "README.md", "process_group": "README.md"}
    assert sorted(rank0["written"]) == sorted(["stage_attribution.json", "README.md"] * 2)
    assert rank1 == {"returned": {"env": None, "process_group": None}, "written": [], "created": False}
    assert rank0["created"] is False  # no process group (or accelerate state) set up as a side effect
    for case in ("env", "process_group"):
        assert sorted(p.name for p in (tmp_path / case).iterdir()) == ["README.md", "stage_attribution.json"]
