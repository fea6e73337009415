"""Distributed figure: the attributor on 2 processes (``torchrun`` on CPU, gloo) against 1 process.

The digits pipeline (Hugging Face defaults, first digits seed) is recorded once; its final model is saved. Then, for
each estimator, the embedding cache is deleted and the attributor runs in a fresh launch with 1 process (plain
``python``) and with 2 (``python -m torch.distributed.run --nproc_per_node 2``). Each process first initialises
``PartialState(cpu=True)``, as the attributor itself does on a machine without an accelerator; one extra launch
initialises a plain ``PartialState()`` first instead, which does not see torchrun's processes there, and the
attributor then reuses that single-process state (``plain_partial_state_processes_seen``).
``partial-replay`` is ``auto`` given the stage functions, with its diagnostics (the default: replay checks it), whose
replays are split between the processes by stage rather than by example.
Behaviors are splittable (``behaviors.PerExample``) with example counts that do not divide by 2. Reported: the
largest relative difference of per-example and mean effects (2 vs 1), the wall time of the ``attribute`` call on the
main process and of the whole launch (start-up included), and their ratios.

Example:
    >>> # python -m benchmarks.distributed --worker /tmp/dist /tmp/dist/out.json aa-linear
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .common import child_env, quiet

#: ``partial-replay``: ``auto`` given the stage functions (rebuilt in each process from the recorded settings), so
#: the replaying default, checked by replay: its work is split by stage, not by example
ESTIMATORS = ("aa-linear", "auto", "partial-replay")
N_EXAMPLES = 61  # per behavior: odd, so 2 processes get unequal shares


def prepare(root: Path, settings: Any) -> dict[str, Any]:
    """Record the digits pipeline into ``root/ledger`` and save its final model beside it."""
    from safetensors.torch import save_file

    from hf_stage_attribution.testing.digits import build_digits_pipeline

    scale = settings.digits_steps_scale
    p = build_digits_pipeline("hf", root / "ledger", seed=settings.distributed_seed, steps_scale=scale,
                              base_steps_scale=scale)  # fmt: skip
    save_file({k: v.contiguous() for k, v in p.model.state_dict().items()}, str(root / "model.safetensors"))
    info = {"seed": settings.distributed_seed, "stages": [s.name for s in p.ledger.stages], "steps_scale": scale}
    (root / "info.json").write_text(json.dumps(info))
    return info


def _behaviors(seed: int) -> dict[str, Any]:
    import torch

    from hf_stage_attribution.behaviors import PerExample
    from hf_stage_attribution.testing.digits import PATCH_CLASS, add_patch, digits_data

    data = digits_data(seed)
    x, y = data.x_test, data.y_test

    def margin(logits: torch.Tensor, cls: int) -> torch.Tensor:
        others = torch.cat([logits[:, :cls], logits[:, cls + 1 :]], dim=1)
        return logits[:, cls] - others.max(dim=1).values

    def class_margin(cls: int) -> Any:
        rows = [x[i] for i in torch.nonzero(y == cls).flatten()[:N_EXAMPLES]]
        return PerExample(lambda m, batch: margin(m(torch.stack(batch)), cls), rows, batch_size=16,
                          name=f"margin_{cls}")  # fmt: skip

    other = [x[i] for i in torch.nonzero(y != PATCH_CLASS).flatten()[:N_EXAMPLES]]

    def gap(m: Any, batch: list) -> torch.Tensor:
        clean = torch.stack(batch)
        return margin(m(add_patch(clean)), PATCH_CLASS) - margin(m(clean), PATCH_CLASS)

    pairs = [(x[i], y[i]) for i in range(N_EXAMPLES)]

    def loss(m: Any, batch: list) -> torch.Tensor:
        inputs, labels = torch.stack([r[0] for r in batch]), torch.stack([r[1] for r in batch])
        return torch.nn.functional.cross_entropy(m(inputs), labels, reduction="none")

    return {
        "margin_0": class_margin(0), "margin_7": class_margin(7),
        "patch_gap": PerExample(gap, other, batch_size=16, name="patch_gap"),
        "loss": PerExample(loss, pairs, batch_size=16, name="loss"),
    }  # fmt: skip


def worker(root: Path, out: Path, estimator: str, cpu_state: bool = True) -> None:
    """One process of a launch: attribute and (main process) write per-example effects and the time.

    ``cpu_state``: initialise Accelerate's shared state with ``PartialState(cpu=True)`` before the attributor does.
    With ``cpu_state=False`` a plain ``PartialState()`` is initialised first: on a machine without an accelerator it
    ignores torchrun's ``WORLD_SIZE`` (accelerate only detects multi-CPU with ``cpu=True``), the attributor reuses
    that shared state, and every process attributes everything alone (the attributor warns)."""
    import torch
    from accelerate import PartialState
    from safetensors.torch import load_file

    from hf_stage_attribution import StageAttributor
    from hf_stage_attribution.testing.digits import (
        digits_data,
        digits_mlp,
        digits_stage_fns,
        forward,
        loss,
        stage_specs,
    )

    torch.set_num_threads(1)
    info = json.loads((root / "info.json").read_text())
    with quiet():
        model = digits_mlp(info["seed"])
        model.load_state_dict(load_file(str(root / "model.safetensors")))
        state = PartialState(cpu=True) if cpu_state else PartialState()
        fns = {}  # with them (and its diagnostics, as users run it) auto is partial replay checked by replay
        if estimator == "partial-replay":
            scale = info["steps_scale"]
            specs = stage_specs("hf", steps_scale=scale, base_steps_scale=scale)
            fns, estimator = digits_stage_fns(specs, digits_data(info["seed"]), info["seed"]), "auto"
        state.wait_for_everyone()
        start = time.perf_counter()
        report = StageAttributor(
            root / "ledger", model, estimator=estimator, diagnostics=bool(fns), show_progress=False,
            loss_fns={name: (forward, loss) for name in info["stages"]}, stage_fns=fns,
        ).attribute(_behaviors(info["seed"]))  # fmt: skip
        state.wait_for_everyone()
        seconds = time.perf_counter() - start
    if state.is_main_process:
        rows = {f"{r.behavior}/{r.stage}": {"effect": r.effect, "per_example": r.per_example} for r in report.rows}
        out.write_text(json.dumps({"rows": rows, "estimator": report.estimator, "seconds": seconds,
                                   "processes": state.num_processes}))  # fmt: skip


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(root: Path, nproc: int, estimator: str, cpu_state: bool = True) -> dict[str, Any]:
    """A fresh launch with ``nproc`` processes (cache deleted first); its result and wall time."""
    import subprocess

    shutil.rmtree(root / "ledger" / "embeddings", ignore_errors=True)
    out = root / f"out-{nproc}-{estimator}.json"
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _free_port()]
    cmd = [*prefix, "-m", "benchmarks.distributed", "--worker", str(root), str(out), estimator]
    cmd += [] if cpu_state else ["--plain-state"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=child_env(), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"launch {cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "launch_seconds": wall}


def _max_rel(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=0.0)


def run(settings: Any, work: Path) -> dict[str, Any]:
    """Prepare once, then 1 vs 2 processes per estimator."""
    root = work / "distributed"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare(root, settings)
    results = {}
    for estimator in ESTIMATORS:
        one, two = launch(root, 1, estimator), launch(root, 2, estimator)
        same_keys = one["rows"].keys() == two["rows"].keys()
        per_example = max(_max_rel(two["rows"][k]["per_example"], r["per_example"]) for k, r in one["rows"].items())
        means = max(_max_rel([two["rows"][k]["effect"]], [r["effect"]]) for k, r in one["rows"].items())
        sizes = sorted({len(r["per_example"]) for r in one["rows"].values()})
        results[estimator] = {
            "processes_seen": {"1": one["processes"], "2": two["processes"]},
            "estimator_used": one["estimator"], "same_rows": same_keys, "max_rel_diff_per_example": per_example,
            "max_rel_diff_means": means, "equal_to_1e-5": same_keys and per_example <= 1e-5 and means <= 1e-5,
            "examples_per_behavior": sizes, "attribute_seconds": {"1": one["seconds"], "2": two["seconds"]},
            "launch_seconds": {"1": one["launch_seconds"], "2": two["launch_seconds"]},
            "attribute_ratio_2_over_1": two["seconds"] / one["seconds"],
            "launch_ratio_2_over_1": two["launch_seconds"] / one["launch_seconds"],
        }  # fmt: skip
    plain = launch(root, 2, "aa-linear", cpu_state=False)  # what the attributor does on its own under torchrun
    shutil.rmtree(root, ignore_errors=True)
    return {"estimators": results, "plain_partial_state_processes_seen": plain["processes"],
            "figure_seconds": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("DIR", "OUT", "ESTIMATOR"), required=True)
    parser.add_argument("--plain-state", action="store_true", help="do not pre-initialise PartialState(cpu=True)")
    a = parser.parse_args()
    worker(Path(a.worker[0]), Path(a.worker[1]), a.worker[2], cpu_state=not a.plain_state)


if __name__ == "__main__":
    main()
