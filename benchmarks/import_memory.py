"""Peak memory of ``import-checkpoints`` against model size: tensors are streamed one at a time.

    python benchmarks/import_memory.py                      # GPT-2 shape, ~33M parameters (~133 MB float32)
    python benchmarks/import_memory.py --hidden 768 --layers 12 --vocab 50257 --shard-size 50MB   # GPT-2 small

Builds a GPT-2-shaped model, saves two revisions (the second perturbed) as sharded (``--shard-size``) and as
single-file safetensors, and imports each pair in a fresh process. The child resets its peak-RSS counter
(``/proc/self/clear_refs``) after imports, so the figure is the import's own peak above the baseline; it prints
that peak against the model size and against the largest tensor (the streaming bound is a few tensors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(base: str, other: str, out: str) -> None:
    import torch  # noqa: F401  (imports belong to the baseline, not to the import's peak)
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from hf_stage_attribution.checkpoints.importer import import_checkpoints

    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    baseline = _status("VmRSS")
    start = time.perf_counter()
    import_checkpoints([{"model": base}, {"model": other, "name": "perturbed"}], out, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "peak": _status("VmHWM"), "reset": reset, "seconds": seconds}))


def build(root: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=max(1, args.hidden // 64)
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    sizes = [p.numel() * 4 for p in model.parameters()]
    for layout, shard in (("sharded", args.shard_size), ("single", "100GB")):
        model.save_pretrained(root / layout / "base", max_shard_size=shard)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for layout, shard in (("sharded", args.shard_size), ("single", "100GB")):
        model.save_pretrained(root / layout / "perturbed", max_shard_size=shard)
    shards = len(list((root / "sharded" / "base").glob("*.safetensors")))
    return {"model_bytes": sum(sizes), "largest_bytes": max(sizes), "params": sum(sizes) // 4, "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-size", default="10MB")
    parser.add_argument("--child", nargs=3, metavar=("BASE", "OTHER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = build(root, args)
        mb = 1 / 2**20
        print(
            f"model: {info['params']:,} parameters, {info['model_bytes'] * mb:.1f} MB float32, largest tensor "
            f"{info['largest_bytes'] * mb:.1f} MB, {info['shards']} shards of <= {args.shard_size}"
        )
        print(
            f"{'layout':8} {'peak RSS above baseline':>24} {'/ model size':>13} {'/ largest tensor':>17} {'time':>7}"
        )
        for layout in ("sharded", "single"):
            cmd = [sys.executable, __file__, "--child", str(root / layout / "base"), str(root / layout / "perturbed"),
                   str(root / f"ledger-{layout}")]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            data = json.loads(result.stdout.strip().splitlines()[-1])
            extra = data["peak"] - data["baseline"]
            note = "" if data["reset"] else "  (peak counter not resettable: includes start-up)"
            print(
                f"{layout:8} {extra * mb:>21.1f} MB {extra / info['model_bytes']:>13.3f} "
                f"{extra / info['largest_bytes']:>17.2f} {data['seconds']:>6.1f}s{note}"
            )


if __name__ == "__main__":
    main()
