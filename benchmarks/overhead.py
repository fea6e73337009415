"""Recording-overhead figure: ``Trainer`` training with the ``StageRecorder`` callback divided by without.

A GPT-2 (``testing.lm.tiny_gpt2`` at the configured width/depth) trains as a causal LM on the toy corpus with
``transformers.Trainer``. Modes: ``none`` (no callback), ``recorder`` (``StageRecorder`` with its defaults: 3
curvature segments × 256 examples) and ``recorder+replay`` (``save_replay_data=True``). Time: ``trainer.train()``
only (the model and trainer are built outside the timer), wall clock and CPU time of this process (single-threaded
training, so CPU time is the less noisy measure on a shared machine), modes interleaved in a rotating order for
every repetition after one short warm-up run with the recorder, in this process; the ratio is the median of the
per-repetition ratios with their min–max. Memory: one fresh subprocess per mode resets the peak-RSS counter after
building the trainer and reads ``VmHWM`` after training; the extra peak is the recorder's rise minus the plain rise.
Ledger size: bytes on disk of the recorded ledger over the model's parameter bytes.

Example:
    >>> # python -m benchmarks.overhead --child recorder --out /tmp/o.json --n-embd 64 --n-layer 2 --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import dir_bytes, median_spread, param_bytes, proc_status, quiet, reset_peak, run_child

MODES = ("none", "recorder", "recorder+replay")


def _setup(cfg: dict[str, int], mode: str, work: Path) -> tuple[Any, Any, Path | None]:
    """A fresh model and ``Trainer`` for ``mode`` (nothing trained yet); the ledger directory it records into."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer, toy_corpus

    tok = tiny_tokenizer()
    model = tiny_gpt2(tok, n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=4 if cfg["n_embd"] % 4 == 0 else 2)
    texts = [t + tok.eos_token for t in toy_corpus(0).clean]
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(work / "out"), max_steps=cfg["steps"], per_device_train_batch_size=16, learning_rate=1e-3,
        lr_scheduler_type="linear", warmup_steps=max(1, cfg["steps"] // 10), seed=0, data_seed=0, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=cfg["steps"], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    ledger = work / "ledger" if mode != "none" else None
    callbacks = [] if ledger is None else [StageRecorder(ledger, "train", save_replay_data=mode == "recorder+replay")]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok, callbacks=callbacks,
    )  # fmt: skip
    return model, trainer, ledger


def time_modes(cfg: dict[str, int], reps: int) -> dict[str, Any]:
    """Interleaved repetitions of every mode in this process: wall and CPU seconds per run, ratios, ledger sizes."""
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    sizes: dict[str, float] = {}
    model_bytes = 0
    with quiet():
        with tempfile.TemporaryDirectory(prefix="hsa-bench-overhead-") as tmp:  # warm-up: every code path, short
            _setup({**cfg, "steps": 8}, MODES[-1], Path(tmp))[1].train()
        for rep in range(reps):
            for mode in MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]:  # rotating order
                with tempfile.TemporaryDirectory(prefix="hsa-bench-overhead-") as tmp:
                    model, trainer, ledger = _setup(cfg, mode, Path(tmp))
                    model_bytes = param_bytes(model)
                    gc.collect()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    trainer.train()
                    seconds[mode].append(time.perf_counter() - start)
                    cpu[mode].append(time.process_time() - start_cpu)
                    if ledger is not None:
                        sizes[mode] = dir_bytes(ledger) / model_bytes
    out: dict[str, Any] = {
        "seconds": {m: median_spread(v) for m, v in seconds.items()},
        "cpu_seconds": {m: median_spread(v) for m, v in cpu.items()},
        "raw_seconds": seconds,
        "raw_cpu_seconds": cpu,
    }
    for mode in MODES[1:]:
        out[f"ratio/{mode}"] = median_spread([w / n for w, n in zip(seconds[mode], seconds["none"])])
        out[f"cpu_ratio/{mode}"] = median_spread([w / n for w, n in zip(cpu[mode], cpu["none"])])
    out["ledger_over_model"] = sizes
    out["model_parameter_bytes"] = model_bytes
    return out


def child(mode: str, cfg: dict[str, int], out: Path) -> None:
    """In a fresh process: build, reset the peak counter, train, report the rise of peak RSS."""
    with quiet(), tempfile.TemporaryDirectory(prefix="hsa-bench-overhead-") as tmp:
        model, trainer, _ = _setup(cfg, mode, Path(tmp))
        gc.collect()
        baseline = proc_status()["VmRSS"]
        reset = reset_peak()
        trainer.train()
        peak = proc_status()["VmHWM"]
    out.write_text(json.dumps({"mode": mode, "baseline": baseline, "peak": peak, "reset": reset,
                               "model_parameter_bytes": param_bytes(model)}))  # fmt: skip


def memory_modes(cfg: dict[str, int], work: Path) -> dict[str, Any]:
    """Peak-RSS rise while training, per mode, each in a fresh subprocess."""
    rises = {}
    for mode in MODES:
        path = work / f"overhead-{mode.replace('+', '-')}.json"
        run_child(["-m", "benchmarks.overhead", "--child", mode, "--out", str(path), *_cfg_args(cfg)])
        info = json.loads(path.read_text())
        rises[mode] = {**info, "rise": info["peak"] - info["baseline"]}
    base = rises["none"]["rise"]
    extra = {m: rises[m]["rise"] - base for m in MODES[1:]}
    return {"per_mode": rises, "extra_peak_bytes": extra}


def _cfg_args(cfg: dict[str, int]) -> list[str]:
    return ["--n-embd", str(cfg["n_embd"]), "--n-layer", str(cfg["n_layer"]), "--steps", str(cfg["steps"])]


def run(settings: Any, work: Path) -> dict[str, Any]:
    """The whole figure: interleaved timings, then the per-mode memory subprocesses."""
    cfg = dict(settings.overhead_model)
    start = time.perf_counter()
    timing = time_modes(cfg, settings.overhead_reps)
    memory = memory_modes(cfg, work)
    per_step = statistics.median(timing["raw_seconds"]["none"]) / cfg["steps"]
    return {"config": cfg, "timing": timing, "memory": memory, "seconds_per_step": per_step,
            "figure_seconds": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=MODES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    child(a.child, {"n_embd": a.n_embd, "n_layer": a.n_layer, "steps": a.steps}, a.out)


if __name__ == "__main__":
    main()
