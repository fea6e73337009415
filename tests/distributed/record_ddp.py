"""Record a small Trainer run (two stages inside one run) under torchrun, or in one process.

    torchrun --nproc_per_node 2 tests/distributed/record_ddp.py --out DIR --ledger DIR --per-device-batch 4

The same global batch (per-device batch × processes) gives the same ledger: ``test_integrations_distributed.py``
compares a 2-process run against a 1-process one.
"""

from __future__ import annotations

import argparse

import tests.helpers.recording as F
from hf_stage_attribution._internal.distributed import close_process_group

MAX_STEPS = 6
BOUNDARY = 4


def record(out: str, ledger: str, per_device_batch: int) -> None:
    from transformers import Trainer

    from hf_stage_attribution import StageRecorder

    model = F.gpt2()
    args = F.training_args(
        out,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
    )
    recorder = StageRecorder(
        ledger, "main", curvature_segments=2, curvature_examples=8, stage_boundaries={"anneal": BOUNDARY}
    )
    Trainer(model=model, args=args, train_dataset=F.lm_dataset(), callbacks=[recorder]).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    ns = parser.parse_args()
    record(ns.out, ns.ledger, ns.per_device_batch)
    close_process_group()  # a clean shutdown: gloo's threads may abort the process at exit otherwise


if __name__ == "__main__":
    main()
