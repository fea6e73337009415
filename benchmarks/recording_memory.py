"""Peak memory of recording: a ~25M-parameter GPT-2 trained a few Trainer steps with and without StageRecorder.

    python benchmarks/recording_memory.py [--steps 6] [--n-embd 512] [--n-layer 8] [--wide N]

Each configuration runs in its own fresh process and reports its peak resident set size (``VmHWM``, else
``ru_maxrss``). The children run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, unless set
already), so every tensor's pages go back to the system when it is freed and the peak counts live bytes: with the
default, self-adjusting threshold, freed optimizer temporaries stay in the heap for a while or not, and the extra peak
of the same run varied from 0.72 to 1.57 copies between runs (1.02 ± 0.01 with the fixed threshold). The extra peak
of a recorded run over the plain run is compared with the size of one float32 copy of the trainable parameters (what
the recorder is allowed to hold: the stage-start snapshot). Prints a table and a JSON line.

``--wide N`` trains ``N`` parallel 512×512 linear layers instead (same Trainer, same recorder): many parameters in
many tensors for almost no compute, so the one-copy bound is measured in seconds (the fast-tier test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "plain": {},
    "recorder": {"curvature_segments": 0},
    "recorder+curvature": {"curvature_segments": 3, "curvature_examples": 64},
    "recorder+boundary": {"curvature_segments": 3, "curvature_examples": 64, "stage_boundaries": {"late": 3}},
}


def _wide_model_and_data(width: int):
    """``width`` parallel 512×512 linear layers summed (a plain module the Trainer accepts: many tensors, as in a
    real model, for almost no compute) and 16 rows of regression data."""
    import torch

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 512, bias=False) for _ in range(width))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
            out = sum(layer(x) for layer in self.layers)
            return {"loss": torch.nn.functional.mse_loss(out, labels)}

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(512, generator=gen), "labels": torch.randn(512, generator=gen)} for _ in range(16)]
    return Wide(), rows


def _peak_rss_kb() -> int:
    """This process's peak resident set size in KiB. ``VmHWM`` (Linux) belongs to the process image, while
    ``ru_maxrss`` survives ``exec``: a child started from a large process (a long pytest run) would report its
    parent's peak, and every configuration the same number."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_one(config: str, steps: int, n_embd: int, n_layer: int, wide: int | None = None) -> dict:
    """Train in this process (the child); return peak RSS and the trainable float32 bytes."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_stage_attribution import StageRecorder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if wide:
        model, data = _wide_model_and_data(wide)
    else:
        from datasets import Dataset

        from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_gpt2(tok, n_embd=n_embd, n_layer=n_layer, n_head=8)
        rows = [[(7 * i + j) % (len(tok) - 4) + 4 for j in range(16)] for i in range(64)]
        data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    out = tempfile.mkdtemp()
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)  # fmt: skip
    callbacks = []
    if CONFIGS[config]:
        callbacks.append(StageRecorder(Path(out) / "ledger", "stage", **CONFIGS[config]))
    base = _peak_rss_kb()
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    peak = _peak_rss_kb()
    return {
        "config": config,
        "peak_rss_mb": peak / 1024,
        "before_train_mb": base / 1024,
        "trainable_mb": trainable / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure(
    steps: int = 6,
    n_embd: int = 512,
    n_layer: int = 8,
    wide: int | None = None,
    configs: tuple[str, ...] = tuple(CONFIGS),
) -> list[dict]:
    """Run each configuration (``"plain"`` first, always) in a fresh process; returns one row per configuration."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    for config in ["plain", *(c for c in configs if c != "plain")]:
        code = (
            f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import recording_memory as m; "
            f"print('RESULT', json.dumps(m.run_one({config!r}, {steps}, {n_embd}, {n_layer}, {wide!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT ") :]))
    plain = rows[0]["peak_rss_mb"]
    for row in rows:
        row["extra_peak_mb"] = row["peak_rss_mb"] - plain
        row["extra_in_trainable_copies"] = row["extra_peak_mb"] / row["trainable_mb"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument(
        "--wide", type=int, default=None, help="train N parallel 512x512 linear layers instead of GPT-2"
    )
    ns = parser.parse_args()
    rows = measure(ns.steps, ns.n_embd, ns.n_layer, ns.wide)
    what = f"{ns.wide} linear layers" if ns.wide else "GPT-2"
    print(f"{what} with {rows[0]['parameters'] / 1e6:.1f}M parameters; one float32 copy of the trainable parameters = "
          f"{rows[0]['trainable_mb']:.0f} MB")  # fmt: skip
    print(f"{'configuration':<22}{'peak RSS MB':>12}{'extra MB':>10}{'extra / copy':>14}")
    for row in rows:
        print(f"{row['config']:<22}{row['peak_rss_mb']:>12.0f}{row['extra_peak_mb']:>10.0f}"
              f"{row['extra_in_trainable_copies']:>14.2f}")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
