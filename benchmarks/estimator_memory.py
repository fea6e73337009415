"""Peak RSS rise of every estimator (and ``validate``) over the parameter bytes, each in a fresh process.

A GPT-2 built from a config is trained for two AdamW stages with the custom-loop recorder and curvature material
(``curvature_loss={"type": "causal-lm"}``, so a reloaded ledger computes Gauss–Newton products). Then one fresh
subprocess per estimator loads the model and the ledger, warms up (lazy imports and code pages land in the
baseline), takes the RSS as the baseline and runs ``StageAttributor(..., estimator=name, diagnostics=False)
.attribute(...)`` from an empty embedding cache (``validate`` runs the default estimator with ``validate=True``).
The figure is ``(VmHWM − baseline) / parameter bytes``; the issue's bound is 3.

    python -m benchmarks.estimator_memory --out /tmp/estimator_memory.json [--n-embd 256 --n-layer 4 --vocab 4096]

Example:
    >>> # cfg = {"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab": 2048, "positions": 64}
    >>> # rows = measure_all(cfg, Path("/tmp/m"))
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import param_bytes, proc_status, quiet, reset_peak, run_child  # noqa: E402
from benchmarks.memory import _load_case, _model, _tokens  # noqa: E402

ESTIMATORS = (
    "delta-linear", "delta-fd", "aa-linear", "aa-fd", "aa-ggn", "aa-ggn-fd", "aa-hvp", "aa-hvp-fd", "replay",
    "validate",
)  # fmt: skip
STAGES, STEPS = 2, 3


def _steps(model: Any, opt: Any, cfg: dict[str, int], k: int, rec: Any = None) -> None:
    """Stage ``k``'s training steps (each given to ``rec`` when recording)."""
    model.train()
    for step in range(STEPS):
        ids = _tokens(cfg, 100 * k + step, rows=4, width=16)
        batch = {"input_ids": ids, "labels": ids}
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
        if rec is not None:
            rec.step(batch)


def _train(model: Any, cfg: dict[str, int], k: int) -> None:
    import torch

    _steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01), cfg, k)
    model.eval()


def build(root: Path, cfg: dict[str, int]) -> None:
    import torch
    from safetensors.torch import save_file

    from hf_stage_attribution import StageLedger

    model = _model(cfg)
    ledger = StageLedger(root / "ledger")
    for k in range(STAGES):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        with ledger.record_stage(
            f"stage-{k}", kind="fine-tuning", model=model, optimizer=opt, num_steps=STEPS,
            curvature_loss={"type": "causal-lm"}, curvature_examples=8,
        ) as rec:  # fmt: skip
            _steps(model, opt, cfg, k, rec)
    save_file(
        {n: p.detach().contiguous() for n, p in model.state_dict().items() if n != "lm_head.weight"},
        str(root / "model.safetensors"),
    )


def measure(root: Path, cfg: dict[str, int], name: str) -> dict[str, Any]:
    """In a fresh process: the peak RSS rise of one estimator's attribution over the parameter bytes."""
    from hf_stage_attribution import StageAttributor

    with quiet():
        model, ledger = _load_case(root, cfg)
        ids = _tokens(cfg, 7, rows=8, width=16)

        def logprob(m: Any) -> Any:
            logits = m(input_ids=ids).logits[:, :-1]
            return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)

        stage_fns = {f"stage-{k}": (lambda m, k=k: _train(m, cfg, k)) for k in range(STAGES)}
        gc.collect()
        baseline = proc_status()["VmRSS"]
        reset_peak()
        start = time.perf_counter()
        estimator = "auto" if name == "validate" else name
        StageAttributor(
            ledger, model, estimator=estimator, stage_fns=stage_fns, diagnostics=False, show_progress=False
        ).attribute({"logprob": logprob}, validate=name == "validate")
        rise = proc_status()["VmHWM"] - baseline
        return {
            "estimator": name, "seconds": time.perf_counter() - start, "rise": rise,
            "parameter_bytes": param_bytes(model), "rise_over_parameter_bytes": rise / param_bytes(model),
        }  # fmt: skip


def _cfg_args(cfg: dict[str, int]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def measure_all(cfg: dict[str, int], root: Path, names: tuple[str, ...] = ESTIMATORS) -> list[dict[str, Any]]:
    """Build once, then one fresh subprocess per estimator."""
    root.mkdir(parents=True, exist_ok=True)
    run_child(["-m", "benchmarks.estimator_memory", "--build", str(root), *_cfg_args(cfg)], timeout=900)
    rows = []
    for name in names:
        out = root / f"{name}.json"
        run_child(
            ["-m", "benchmarks.estimator_memory", "--measure", str(root), "--estimator", name, "--out", str(out),
             *_cfg_args(cfg)], timeout=900,
        )  # fmt: skip
        rows.append(json.loads(out.read_text()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path)
    parser.add_argument("--measure", type=Path)
    parser.add_argument("--estimator", default="aa-linear")
    parser.add_argument("--out", type=Path)
    for key, default in (("n-embd", 256), ("n-layer", 4), ("n-head", 4), ("vocab", 4096), ("positions", 64)):
        parser.add_argument(f"--{key}", type=int, default=default)
    a = parser.parse_args()
    cfg = {"n_embd": a.n_embd, "n_layer": a.n_layer, "n_head": a.n_head, "vocab": a.vocab, "positions": a.positions}
    if a.build is not None:
        build(a.build, cfg)
    elif a.measure is not None:
        a.out.write_text(json.dumps(measure(a.measure, cfg, a.estimator)))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = measure_all(cfg, Path(tmp))
        text = json.dumps(rows, indent=2)
        if a.out is not None:
            a.out.write_text(text)
        for row in rows:
            print(f"{row['estimator']:14s} rise {row['rise'] / 1e6:8.1f} MB = {row['rise_over_parameter_bytes']:.2f}x")


if __name__ == "__main__":
    main()
