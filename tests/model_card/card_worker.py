"""Write a model card from every process of a torchrun world; each rank records what it wrote and got back.

    torchrun --nproc_per_node 2 tests/model_card/card_worker.py OUT_DIR

First with the launcher's environment only (no process group: accelerate's plain state sees one process on every
rank of a CPU world), then inside a gloo process group with ``RANK``/``LOCAL_RANK`` hidden. Results go to
``OUT_DIR/rank<R>.json``; ``OUT_DIR/env`` and ``OUT_DIR/process_group`` must exist.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch.distributed

    from hf_stage_attribution._internal.distributed import close_process_group
    from hf_stage_attribution.model_card import write_model_card, writer
    from hf_stage_attribution.report import AttributionReport

    rank = os.environ["RANK"]
    written: list[str] = []
    real_write = writer.atomic_write_bytes

    def logged_write(path, data, error):
        written.append(Path(path).name)
        real_write(path, data, error)

    writer.atomic_write_bytes = logged_write
    report = AttributionReport.build({"toxicity": {"sft": [0.5, 0.7]}}, estimator="aa-linear", versions={})
    returned = {}
    files = write_model_card(report, out / "env", plot=False)
    returned["env"] = files and files.readme.name
    created = torch.distributed.is_initialized()  # the writer must not set up a distributed state itself
    if not created:
        torch.distributed.init_process_group("gloo")
    hidden = {name: os.environ.pop(name) for name in ("RANK", "LOCAL_RANK")}
    try:
        files = write_model_card(report, out / "process_group", plot=False)
        returned["process_group"] = files and files.readme.name
    finally:
        os.environ.update(hidden)
        close_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps({"returned": returned, "written": written, "created": created}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
