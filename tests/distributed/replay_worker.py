"""Attribute with replaying estimators on a Trainer-recorded ledger (replay data); launched with 1 or 2 processes by
``tests/distributed/test_replay_ddp.py``.

Usage: replay_worker.py LEDGER_DIR MODEL_DIR OUT_JSON ESTIMATOR [ESTIMATOR ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from hf_stage_attribution import StageAttributor
from hf_stage_attribution._internal.distributed import close_process_group
from hf_stage_attribution.behaviors import PerExample

#: five token sequences (not divisible by 2 processes); the replaying estimators split the stages between them
SEQUENCES = [[1, 5, 9, 12, 7], [3, 4, 8, 2, 6], [2, 2, 7, 9, 1], [6, 1, 3, 5, 11], [4, 10, 2, 8, 3]]


def log_prob(model: torch.nn.Module, batch: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(batch)
    return torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum((1, 2))


def main() -> None:
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    ledger_dir, model_dir, out_json, *names = sys.argv[1:]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    behaviors = {"log-prob": PerExample(log_prob, SEQUENCES, batch_size=8)}
    out: dict = {"processes": world}
    for name in names:
        attributor = StageAttributor(ledger_dir, model, estimator=name, diagnostics=False, show_progress=False)
        report = attributor.attribute(behaviors)
        # the attributor's own state and the process group are intact after the replays
        assert attributor.state.num_processes == world and PartialState().num_processes == world
        assert os.environ.get("WORLD_SIZE", "1") == str(world)
        if world > 1:
            assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == world
            total = torch.ones(1)
            torch.distributed.all_reduce(total)
            assert float(total) == world
        out[name] = {r.stage: {"effect": r.effect, "per_example": r.per_example} for r in report.rows}
    if PartialState().is_main_process:
        with open(out_json, "w") as fh:
            json.dump(out, fh)
    close_process_group()  # a clean shutdown: gloo's threads may abort the process at exit otherwise


if __name__ == "__main__":
    main()
