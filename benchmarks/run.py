"""Run every benchmark of hf-stage-attribution and write ``BENCHMARKS.md`` and ``BENCHMARKS.json``.

    python benchmarks/run.py [--quick] [--output BENCHMARKS.md]

Figures (one module each): fidelity of every estimator against replay on the digits, LM (SFT → LoRA → DPO) and
MiniLM toxicity pipelines, with the exact first-order response beside them (:mod:`benchmarks.fidelity`); cost
against one forward+backward pass and against replay, same run (:mod:`benchmarks.cost`); recording overhead
(:mod:`benchmarks.overhead`); attribution memory for K = 2, 4, 8 stages (:mod:`benchmarks.memory`); 2 processes vs 1
(:mod:`benchmarks.distributed`); the task-vector anchor comparison; scaling the top- and last-ranked stage down in
the spurious-correlation recipes (:mod:`benchmarks.interventions`); the targets, met or missed
(:mod:`benchmarks.targets`); partial replay's fidelity-versus-cost curve
(:mod:`benchmarks.partial_replay`; alone: ``--sections partial-replay``). Offline; ``--quick`` takes minutes, the
full run under 30 minutes on 2 CPU cores.
``--sections`` and ``--pipelines`` restrict a run (the document then holds only what ran); ``--render-only JSON``
writes the markdown again from an earlier run's JSON (no measurement).

Example:
    >>> # python benchmarks/run.py --quick --output /tmp/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (  # noqa: E402
    cost,
    distributed,
    fidelity,
    interventions,
    memory,
    overhead,
    partial_replay,
    pipelines,
    render,
    targets,
)
from benchmarks.common import REPO, SECTIONS, Settings, machine, quiet  # noqa: E402


def log(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def seeds_for(settings: Settings, pipeline: str) -> list[int]:
    if pipeline.startswith("digits"):
        return list(settings.digits_seeds)
    return list(settings.lm_seeds if pipeline == "lm" else settings.toxicity_seeds)


def run_fidelity(settings: Settings, names: list[str], work: Path) -> dict[str, Any]:
    """Every pipeline × seed: build, measure; then the pooled summaries and the per-pipeline information."""
    runs, info = [], {}
    for name in names:
        for seed in seeds_for(settings, name):
            start = time.perf_counter()
            with quiet():
                pipe = pipelines.build(name, seed, settings, work / f"{name}-{seed}")
                run = fidelity.measure(pipe, settings)
            del pipe
            gc.collect()
            runs.append(run)
            seconds = time.perf_counter() - start
            log(f"fidelity {name} seed {seed}: {seconds:.0f} s (replay {run['replay_seconds']:.1f} s)")
            entry = info.setdefault(name, {
                "description": run["description"], "stages": run["stages"], "behaviors": run["behaviors"],
                "default": run["default"], "default_without_loss_fns": run["default_without_loss_fns"],
                "auto": run.get("auto"),
                "notes": run["notes"], "seeds": [], "errors": {}, "replay_gap": run.get("replay_gap"),
            })  # fmt: skip
            entry["seeds"].append(seed)
            entry["errors"].update(run["errors"])
    summary = fidelity.summarise(runs)
    trust = fidelity.trust_calibration(runs)
    serialisable = [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]
    return {"pipelines": info, "summary": summary, "trust": trust, "runs": serialisable, "_runs": runs}


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities become None, floats keep 6 significant digits."""
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings: minutes instead of ~30 minutes")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to write")
    parser.add_argument("--json", type=Path, default=None, help="JSON file (default: beside --output, .json)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--pipelines", default=",".join(pipelines.PIPELINES), help="comma-separated subset")
    parser.add_argument(
        "--render-only", type=Path, default=None, metavar="JSON",
        help="no measurement: write --output again from the BENCHMARKS.json of an earlier run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.render_only is not None:
        results = json.loads(args.render_only.read_text(encoding="utf-8"))
        results["targets"] = targets.evaluate(results)
        args.output.write_text(render.render(results), encoding="utf-8")
        log(f"rendered {args.output} from {args.render_only} (figures of the run of {results['machine']['date']})")
        return 0
    sections = [s for s in args.sections.split(",") if s]
    names = [p for p in args.pipelines.split(",") if p]
    unknown = sorted(set(sections) - set(SECTIONS)) + sorted(set(names) - set(pipelines.PIPELINES))
    if unknown:
        parser.error(f"unknown section(s) or pipeline(s) {unknown}; known: {SECTIONS}, {pipelines.PIPELINES}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    settings = Settings.make(args.quick)
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    results: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "settings": settings.to_dict(),
        "sections_run": sections,
        "pipelines_run": names or list(pipelines.PIPELINES),
    }
    start = time.perf_counter()
    log(f"start: {command}")
    with tempfile.TemporaryDirectory(prefix="hsa-benchmarks-") as tmp:
        work = Path(tmp)
        if "fidelity" in sections:
            fid = run_fidelity(settings, names, work)
            results["cost"] = cost.summarise(fid.pop("_runs"))
            results["fidelity"] = fid
            results["cost_sweep"] = cost.length_sweep(settings, work)
            log(f"cost sweep: {results['cost_sweep']['figure_seconds']:.0f} s")
        if "overhead" in sections:
            results["overhead"] = overhead.run(settings, work)
            log(f"overhead: {results['overhead']['figure_seconds']:.0f} s")
        if "memory" in sections:
            results["memory"] = memory.run(settings, work)
            log(f"memory: {results['memory']['figure_seconds']:.0f} s")
        if "distributed" in sections:
            results["distributed"] = distributed.run(settings, work)
            log(f"distributed: {results['distributed']['figure_seconds']:.0f} s")
        if "interventions" in sections:
            results["interventions"] = interventions.run(settings, work)
            log(f"interventions: {results['interventions']['figure_seconds']:.0f} s")
        if "partial-replay" in sections:
            results["partial_replay"] = partial_replay.run(settings, names, work, seeds_for, log)
            log(f"partial replay: {results['partial_replay']['figure_seconds']:.0f} s")
    results["total_seconds"] = time.perf_counter() - start
    results["load_average_end"] = list(os.getloadavg())
    results["targets"] = targets.evaluate(results)
    json_path = args.json or args.output.with_suffix(".json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render.render(results), encoding="utf-8")
    json_path.write_text(json.dumps(json_safe(results), indent=1, default=str) + "\n", encoding="utf-8")
    log(f"done in {results['total_seconds'] / 60:.1f} min: wrote {args.output} and {json_path}")
    for row in results["targets"]:
        log(f"target {row['target']} [{row['scope']}]: {row['shown']} ({row['margin']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
