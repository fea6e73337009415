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
from tests.helpers.attributor import behaviors_for, forward, loss, make_mlp, stage_fns


def main() -> None:
    ledger_dir, model_file, out_json, estimator = sys.argv[1:5]
    torch.set_num_threads(1)
    model = make_mlp()
    model.load_state_dict(load_file(model_file))
    loss_fns = {f"stage{k}": (forward, loss) for k in range(3)}  # custom-loop losses are not stored in the ledger
    mode = os.environ.get("HSA_TEST_BEHAVIORS", "")
    fns, runs = {}, []
    if mode in ("replay", "failing"):  # step-limited stage functions: auto chooses partial replay, checked by replay
        fns = {name: _counted(name, fn, runs) for name, fn in stage_fns().items()}
    if mode == "failing":  # re-running stage2 without stage1 fails: only in the process that attributes stage1
        fns["stage2"] = _failing_without_stage1(fns["stage2"])
    attributor = StageAttributor(
        ledger_dir, model, estimator=estimator, loss_fns=loss_fns, stage_fns=fns, show_progress=False
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert attributor.state.num_processes == world, (attributor.state.num_processes, world)
    behaviors = behaviors_for()
    if mode == "bare":  # a bare f(model): not split between processes, evaluated whole in each
        x = torch.linspace(-1, 1, 24).reshape(6, 4)
        behaviors["bare"] = lambda m: m(x)[:, 1]
    if mode == "mismatch" and os.environ.get("RANK") == "1":  # one process given other examples
        behaviors["logit-0"] = behaviors["logit-0"].select([0, 1, 2])
    try:
        report = attributor.attribute(behaviors)
    except Exception as exc:  # what each process raised
        with open(f"{out_json}.error{os.environ.get('RANK', '0')}", "w") as fh:
            fh.write(f"{type(exc).__name__}: {exc}")
        raise
    with open(f"{out_json}.runs{os.environ.get('RANK', '0')}", "w") as fh:  # the stage runs this process made
        json.dump(runs, fh)
    if attributor.state.is_main_process:
        rows = {
            f"{r.behavior}/{r.stage}": {
                "effect": r.effect,
                "per_example": r.per_example,
                "ci": [r.ci_low, r.ci_high],
                "replay": r.replay_effect,
            }
            for r in report.rows
        }
        totals = {b: d.total_change for b, d in report.diagnostics.items()}
        notes = {b: d.notes for b, d in report.diagnostics.items()}
        verdicts = {b: report.trust(b)["verdict"] for b in behaviors}
        out = {"rows": rows, "totals": totals, "estimator": report.estimator, "processes": world}
        with open(out_json, "w") as fh:
            json.dump({**out, "notes": notes, "verdicts": verdicts, "approximations": report.approximations}, fh)
    close_process_group()  # a clean shutdown: gloo's threads may abort the process at exit otherwise


def _counted(name: str, fn, runs: list):
    """``fn`` that also notes each run: ``[stage name, max_steps]``."""

    def counted(model, max_steps=None):
        runs.append([name, max_steps])
        return fn(model, max_steps=max_steps)

    return counted


def _failing_without_stage1(fn):
    """``fn`` that raises when the replay it is part of removed stage 1."""

    def failing(model, info, max_steps=None):
        if info.get("removed") == 1:
            raise RuntimeError("stage2 cannot be re-run without stage1")
        return fn(model, max_steps=max_steps)

    return failing


if __name__ == "__main__":
    main()
