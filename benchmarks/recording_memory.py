"""Peak memory of recording: a ~25M-parameter GPT-2 trained a few Trainer steps with and without StageRecorder.

    python benchmarks/recording_memory.py [--steps 6] [--n-embd 512] [--n-layer 8]

Each configuration runs in its own fresh process and reports its peak resident set size (``ru_maxrss``); the extra
peak of a recorded run over the plain run is compared with the size of one float32 copy of the trainable
parameters (what the recorder is allowed to hold: the stage-start snapshot). Prints a table and a JSON line.
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


def run_one(config: str, steps: int, n_embd: int, n_layer: int) -> dict:
    """Train in this process (the child); return peak RSS and the trainable float32 bytes."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok, n_embd=n_embd, n_layer=n_layer, n_head=8)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    rows = [[(7 * i + j) % (len(tok) - 4) + 4 for j in range(16)] for i in range(64)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    out = tempfile.mkdtemp()
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)  # fmt: skip
    callbacks = []
    if CONFIGS[config]:
        callbacks.append(StageRecorder(Path(out) / "ledger", "stage", **CONFIGS[config]))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": config,
        "peak_rss_mb": peak / 1024,
        "before_train_mb": base / 1024,
        "trainable_mb": trainable / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure(steps: int = 6, n_embd: int = 512, n_layer: int = 8) -> list[dict]:
    """Run every configuration in a fresh process; returns one row per configuration."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    for config in CONFIGS:
        code = (
            f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import recording_memory as m; "
            f"print('RESULT', json.dumps(m.run_one({config!r}, {steps}, {n_embd}, {n_layer})))"
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
    ns = parser.parse_args()
    rows = measure(ns.steps, ns.n_embd, ns.n_layer)
    print(f"GPT-2 with {rows[0]['parameters'] / 1e6:.1f}M parameters; one float32 copy of the trainable parameters = "
          f"{rows[0]['trainable_mb']:.0f} MB")  # fmt: skip
    print(f"{'configuration':<22}{'peak RSS MB':>12}{'extra MB':>10}{'extra / copy':>14}")
    for row in rows:
        print(f"{row['config']:<22}{row['peak_rss_mb']:>12.0f}{row['extra_peak_mb']:>10.0f}"
              f"{row['extra_in_trainable_copies']:>14.2f}")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
