"""Run the attributor on a prepared ledger; launched with 1 or 2 processes by tests/test_attributor.py.

Usage: attribute_worker.py LEDGER_DIR MODEL_FILE OUT_JSON ESTIMATOR
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file

from hf_stage_attribution import StageAttributor  # noqa: E402
from hf_stage_attribution._internal.distributed import close_process_group
from tests.helpers.attributor import behaviors_for, forward, loss, make_mlp


def main() -> None:
    ledger_dir, model_file, out_json, estimator = sys.argv[1:5]
    torch.set_num_threads(1)
    model = make_mlp()
    model.load_state_dict(load_file(model_file))
    loss_fns = {f"stage{k}": (forward, loss) for k in range(3)}  # custom-loop losses are not stored in the ledger
    attributor = StageAttributor(ledger_dir, model, estimator=estimator, loss_fns=loss_fns, show_progress=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert attributor.state.num_processes == world, (attributor.state.num_processes, world)
    behaviors = behaviors_for()
    mode = os.environ.get("HSA_TEST_BEHAVIORS", "")
    if mode == "bare":  # a bare f(model): not split between processes, evaluated whole in each
        x = torch.linspace(-1, 1, 24).reshape(6, 4)
        behaviors["bare"] = lambda m: m(x)[:, 1]
    if mode == "mismatch" and os.environ.get("RANK") == "1":  # one process given other examples
        behaviors["logit-0"] = behaviors["logit-0"].select([0, 1, 2])
    report = attributor.attribute(behaviors)
    if attributor.state.is_main_process:
        rows = {
            f"{r.behavior}/{r.stage}": {"effect": r.effect, "per_example": r.per_example, "ci": [r.ci_low, r.ci_high]}
            for r in report.rows
        }
        totals = {b: d.total_change for b, d in report.diagnostics.items()}
        with open(out_json, "w") as fh:
            json.dump({"rows": rows, "totals": totals, "estimator": report.estimator, "processes": world}, fh)
    close_process_group()  # a clean shutdown: gloo's threads may abort the process at exit otherwise


if __name__ == "__main__":
    main()
