"""Fidelity cost of compact curvature material: ``aa-ggn`` against replay on the same recorded pipelines, with the
material stored four ways.

Each pipeline is recorded once with ``curvature_material="full"`` (format 1: a float32 θ_mid snapshot and the full
second moments per segment). Copies of the ledger then drop the snapshot (θ_mid interpolated from the stage's Δ by
learning-rate mass), factor the second moments (Adafactor row/column means), or both (``compact``, the default since
format 2). ``aa-ggn`` (and its cheap configuration) runs on every copy against the same replay truth; the curvature
material's size is reported beside it.

    python benchmarks/ledger_material.py [--quick] [--output ledger_material.json]

Example:
    >>> # python benchmarks/ledger_material.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "full (format 1)": {"params": "snapshot", "moments": "full"},
    "interpolated θ_mid": {"params": "interpolated", "moments": "full"},
    "factored moments": {"params": "snapshot", "moments": "factored"},
    "compact (default)": {"params": "interpolated", "moments": "factored"},
}


def convert(src: Path, dst: Path, material: dict[str, str]) -> int:
    """Copy the ledger at ``src`` to ``dst`` storing its segments as ``material``; return the segment files' bytes
    (examples excluded)."""
    import torch

    from hf_stage_attribution.ledger.segments import factor_moments
    from hf_stage_attribution.ledger.storage import open_safetensors, write_safetensors_stream

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("embeddings"))
    size = 0
    for stage_json in sorted(dst.glob("stages/*/stage.json")):
        info = json.loads(stage_json.read_text())
        for seg in info.get("segments", []):
            d = stage_json.parent / seg["dir"]
            seg.update(material)
            if material["params"] == "interpolated":
                (d / "params_delta.safetensors").unlink(missing_ok=True)
            moments = d / "second_moments.safetensors"
            if material["moments"] == "factored" and moments.exists():
                handle = open_safetensors(moments)
                keys = list(handle.keys())
                tensors = [(k, handle.get_tensor(k).to(torch.float32)) for k in keys]
                specs = [(k, torch.float32, tuple(t.shape)) for k, t in tensors]
                tmp = d / "second_moments.factored"
                write_safetensors_stream(tmp, *factor_moments(specs, iter(tensors)))
                tmp.replace(moments)
            size += sum(p.stat().st_size for p in d.glob("*.safetensors") if p.name != "examples.safetensors")
        stage_json.write_text(json.dumps(info, indent=2))
    return size


def measure(config: str, seed: int, steps_scale: float, root: Path) -> dict[str, Any]:
    from hf_stage_attribution.ledger.ledger import StageLedger
    from hf_stage_attribution.testing.digits import build_digits_pipeline, fidelity_rows, replay_truth

    pipe = build_digits_pipeline(
        config, root / "full", seed=seed, steps_scale=steps_scale, base_steps_scale=steps_scale,
        curvature_material="full",
    )  # fmt: skip
    truth, _ = replay_truth(pipe)
    model_bytes = 4 * sum(p.numel() for p in pipe.model.parameters())
    out: dict[str, Any] = {"model_bytes": model_bytes, "variants": {}}
    loss_fns = {s.name: s.loss_fn for s in pipe.ledger.stages}
    for label, material in VARIANTS.items():
        target = root / f"variant-{list(VARIANTS).index(label)}"
        size = convert(root / "full", target, material)
        pipe.ledger = StageLedger.load(target)
        for stage in pipe.ledger.stages:
            stage.loss_fn = loss_fns[stage.name]
        t0 = time.perf_counter()
        rows = fidelity_rows(pipe, ("aa-ggn",), truth=truth, recompute_embeddings=True)
        cheap = {"curvature_options": {"preset": "cheap"}, "recompute_embeddings": True}
        rows["aa-ggn (cheap)"] = fidelity_rows(pipe, ("aa-ggn",), truth=truth, **cheap)["aa-ggn"]
        out["variants"][label] = {
            "segment_bytes": size, "segment_bytes_over_model": size / model_bytes,
            "seconds": time.perf_counter() - t0,
            **{name: {k: r[k]["spearman"] if isinstance(r[k], dict) else r[k] for k in ("all", "non_terminal")}
               for name, r in rows.items()},
            "sign_non_terminal": {name: r["non_terminal"]["sign_agreement"] for name, r in rows.items()},
            "scale_free_error_all": {name: r["all"]["scale_free_error"] for name, r in rows.items()},
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("ledger_material.json"))
    args = parser.parse_args()
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    scale = 0.5 if args.quick else 1.0
    results: dict[str, Any] = {}
    for config in ("hf", "decay"):
        runs = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(measure(config, seed, scale, Path(tmp)))
                print(f"digits-{config} seed {seed}: done", flush=True)
        summary = {}
        for label in VARIANTS:
            per = [r["variants"][label] for r in runs]
            summary[label] = {
                "segment_bytes_over_model": statistics.mean(p["segment_bytes_over_model"] for p in per),
                **{
                    f"{est} {block}": statistics.mean(
                        p[est][block] for p in per if not math.isnan(p[est][block])
                    ) if any(not math.isnan(p[est][block]) for p in per) else float("nan")
                    for est in ("aa-ggn", "aa-ggn (cheap)") for block in ("all", "non_terminal")
                },
                "aa-ggn sign non_terminal": statistics.mean(p["sign_non_terminal"]["aa-ggn"] for p in per),
                "aa-ggn scale-free error (all)": statistics.mean(p["scale_free_error_all"]["aa-ggn"] for p in per),
            }  # fmt: skip
        results[f"digits-{config}"] = {"seeds": seeds, "summary": summary, "runs": runs}
    args.output.write_text(json.dumps(results, indent=2))
    for pipeline, r in results.items():
        print(f"\n{pipeline} (seeds {r['seeds']}): Spearman against replay")
        for label, row in r["summary"].items():
            print(f"  {label:22s} " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
