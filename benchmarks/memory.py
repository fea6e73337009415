"""Memory figure (issue 4 acceptance): peak RSS of a linear-estimator attribution above the loaded model and ledger.

A GPT-2 built from a config (≥ 50M parameters in the full run; nothing downloaded) is trained for a few AdamW steps
per stage (weight decay 0.01, so ``aa-linear`` really propagates) with the custom-loop recorder, for
``max(K)`` stages; after stage K of every K asked for, the ledger and the model are copied aside. Then, for each K,
a fresh subprocess loads the model and the K-stage ledger (after a warm-up on a tiny model of the same
architecture, so lazy imports and library code pages are in the baseline), takes the RSS as the baseline, and
measures, resetting the peak counter (``/proc/self/clear_refs``) before each:

1. ``StageAttributor(ledger, model, estimator="aa-linear", diagnostics=False).attribute(...)`` (model check,
   stage-embedding computation, per-example read-out): the headline figure;
2. at K = 4 only, the same work split into phases: embeddings into an empty cache (``prepare``), ``aa-linear``
   per-example (one JVP per stage), ``aa-linear`` means only (one backward + dot products), ``delta-linear``
   per-example (reads the ledger's deltas directly). Later phases may find memory the earlier ones left to the
   allocator.

The rise is ``VmHWM − baseline`` over the model's parameter bytes; a sampling thread splits the peak into anonymous
memory (tensors) and file-backed pages (memory-mapped safetensors), and ``/proc/self/smaps`` gives the resident size
of each ledger file. At K = 4 the measurement is repeated with ``MALLOC_MMAP_THRESHOLD_`` fixed, which stops glibc
from keeping freed buffers in its heap: the difference is allocator retention, not memory the code holds.

Example:
    >>> # python -m benchmarks.memory --build /tmp/mem --ks 2,4,8 --n-embd 128 --n-layer 2 --vocab 2048
    >>> # python -m benchmarks.memory --measure /tmp/mem/K2 --out /tmp/mem/K2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .common import PeakSampler, dir_bytes, param_bytes, proc_status, quiet, reset_peak, run_child

FIXED_THRESHOLD = 131072  # bytes: glibc then returns every freed block above it to the system (no heap retention)


def _config(cfg: dict[str, int]) -> Any:
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=cfg["vocab"],
        n_positions=cfg["positions"],
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"  # forward-mode AD has no rule for the CPU SDPA kernels
    return config  # fmt: skip


def _model(cfg: dict[str, int]) -> Any:
    import torch
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(_config(cfg))


def _tokens(cfg: dict[str, int], seed: int, rows: int, width: int = 32) -> Any:
    import torch

    return torch.randint(4, cfg["vocab"], (rows, width), generator=torch.Generator().manual_seed(seed))


def build(root: Path, cfg: dict[str, int], ks: list[int], steps: int) -> dict[str, Any]:
    """Record ``max(ks)`` stages; copy the ledger and the model aside after stage K for every K in ``ks``."""
    import torch
    from safetensors.torch import save_file

    from hf_stage_attribution import StageLedger

    model = _model(cfg)
    ledger_dir = root / "ledger"
    ledger = StageLedger(ledger_dir)
    seconds = {}
    for k in range(1, max(ks) + 1):
        start = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        with ledger.record_stage(f"stage-{k}", kind="fine-tuning", model=model, optimizer=opt,
                                 curvature_segments=0) as rec:  # fmt: skip
            for step in range(steps):
                ids = _tokens(cfg, 100 * k + step, rows=2)
                opt.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                rec.step()
        del opt
        if k in ks:
            target = root / f"K{k}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            shutil.copytree(ledger_dir, target / "ledger")
            save_file({n: p.detach().contiguous() for n, p in model.state_dict().items() if n != "lm_head.weight"},
                      str(target / "model.safetensors"))  # fmt: skip
        seconds[f"stage-{k}"] = time.perf_counter() - start
    return {
        "parameter_bytes": param_bytes(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "stage_seconds": seconds,
        "ledger_bytes": {f"K{k}": dir_bytes(root / f"K{k}" / "ledger") for k in ks},
    }


def _behavior(cfg: dict[str, int]) -> Any:
    """Per-sequence mean token log-probability of 8 fixed random sequences of 32 tokens."""
    ids = _tokens(cfg, 7, rows=8)

    def logprob(model: Any) -> Any:
        logits = model(input_ids=ids).logits[:, :-1]
        return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)

    return logprob


def _phase(fn: Any, baseline: int, case: Path) -> dict[str, Any]:
    gc.collect()
    reset_peak()
    start = time.perf_counter()
    with PeakSampler(files_under=case.resolve()) as sampler:
        fn()
    status = proc_status()
    by_kind: dict[str, int] = {}
    for path, size in sampler.file_peaks.items():
        by_kind[_file_kind(path)] = by_kind.get(_file_kind(path), 0) + size
    return {"seconds": time.perf_counter() - start, "rise": status["VmHWM"] - baseline,
            "rise_anon_sampled": sampler.peaks["RssAnon"] - _BASE["RssAnon"],
            "rise_file_sampled": sampler.peaks["RssFile"] - _BASE["RssFile"],
            "ledger_files_resident_peak": sampler.files_total_peak,
            "ledger_files_resident_by_kind": by_kind}  # fmt: skip


def _file_kind(path: str) -> str:
    """Which part of the ledger a memory-mapped file is: θ_0, a stage's delta, the embedding cache."""
    if "/embeddings/" in path:
        return "embedding cache"
    if "/stages/" in path:
        return "stage deltas"
    return "θ_0 (start.safetensors)" if path.endswith("start.safetensors") else "other ledger files"


_BASE: dict[str, int] = {}


def _warm_up(cfg: dict[str, int]) -> None:
    """Import and run once, on a tiny model of the same architecture, everything the attribution touches, so that
    library code pages and lazy imports land in the baseline, not in the attribution's peak."""
    import torch
    from accelerate import PartialState

    import hf_stage_attribution.estimators.embeddings.write  # noqa: F401
    import hf_stage_attribution.report  # noqa: F401
    from hf_stage_attribution.estimators.linear import _math_attention

    PartialState()
    tiny = _model({**cfg, "n_embd": 16, "n_layer": 1, "n_head": 2, "vocab": 64})
    params = {n: p.detach() for n, p in tiny.named_parameters()}
    ids = torch.randint(0, 64, (2, 8))
    with _math_attention():
        torch.func.jvp(lambda p: torch.func.functional_call(tiny, p, (ids,)).logits, (params,),
                       ({n: torch.ones_like(t) for n, t in params.items()},))  # fmt: skip
    tiny(input_ids=ids).logits.sum().backward()


def _load_case(case: Path, cfg: dict[str, int], empty_cache: bool = True) -> tuple[Any, Any]:
    """Warm up, then the saved model (eval mode, tied weights) and the ledger of ``case``, its embedding cache
    emptied (unless not ``empty_cache``)."""
    from safetensors.torch import load_file

    from hf_stage_attribution import StageLedger

    _warm_up(cfg)
    model = _model(cfg)
    model.load_state_dict(load_file(str(case / "model.safetensors")), strict=False)
    model.tie_weights()
    model.eval()
    ledger = StageLedger.load(case / "ledger")
    if empty_cache:
        shutil.rmtree(ledger.embeddings_dir, ignore_errors=True)
    return model, ledger


def measure(case: Path, cfg: dict[str, int], split_phases: bool = True) -> dict[str, Any]:
    """In a fresh process: load the model and the ledger; the peak of the attribution, then (``split_phases``) of its
    phases one by one."""
    from hf_stage_attribution import StageAttributor, estimators

    with quiet():
        model, ledger = _load_case(case, cfg)
        behavior = _behavior(cfg)
        gc.collect()
        _BASE.update(proc_status())
        baseline = _BASE["VmRSS"]
        out: dict[str, Any] = {"K": len(ledger.stages), "baseline": baseline, "parameter_bytes": param_bytes(model),
                               "reset_supported": reset_peak()}  # fmt: skip

        def attribute() -> None:
            attributor = StageAttributor(ledger, model, estimator="aa-linear", diagnostics=False, show_progress=False)
            attributor.attribute({"logprob": behavior})

        out["phases"] = {"attributor (aa-linear, embeddings computed)": _phase(attribute, baseline, case)}
        if not split_phases:
            return out
        shutil.rmtree(ledger.embeddings_dir, ignore_errors=True)
        lin, delta = estimators.get("aa-linear"), estimators.get("delta-linear")
        phases = out["phases"]
        phases["embeddings only (prepare)"] = _phase(lambda: lin.prepare(ledger, model=model), baseline, case)
        phases["aa-linear per-example (cached)"] = _phase(
            lambda: lin.estimate(ledger, model, behavior, check_model=False), baseline, case
        )
        phases["aa-linear means only (cached)"] = _phase(
            lambda: lin.estimate(ledger, model, behavior, check_model=False, per_example=False), baseline, case
        )
        phases["delta-linear per-example"] = _phase(
            lambda: delta.estimate(ledger, model, behavior, check_model=False), baseline, case
        )
    return out


def _cfg_args(cfg: dict[str, int]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def run(settings: Any, work: Path) -> dict[str, Any]:
    """Build once, then one fresh subprocess per K and mode; rises over parameter bytes."""
    cfg, ks = dict(settings.memory_model), list(settings.memory_ks)
    root = work / "memory"
    start = time.perf_counter()
    info_path = root / "build.json"
    root.mkdir(parents=True, exist_ok=True)
    ks_arg = ",".join(map(str, ks))
    args = ["--build", str(root), "--ks", ks_arg, "--steps", str(settings.memory_steps), "--out", str(info_path)]
    run_child(["-m", "benchmarks.memory", *args, *_cfg_args(cfg)], timeout=1800)
    info = json.loads(info_path.read_text())
    cases = []
    phase_k = 4 if 4 in ks else ks[len(ks) // 2]
    for k in ks:
        runs = [("glibc default", {})]
        if k == phase_k:
            runs.append(
                (f"MALLOC_MMAP_THRESHOLD_={FIXED_THRESHOLD}", {"MALLOC_MMAP_THRESHOLD_": str(FIXED_THRESHOLD)})
            )
        for label, env in runs:
            path = root / f"K{k}-{len(cases)}.json"
            split = [] if k == phase_k else ["--no-phases"]
            run_child(["-m", "benchmarks.memory", "--measure", str(root / f"K{k}"), "--out", str(path), *split,
                       *_cfg_args(cfg)], timeout=1800, env=env)  # fmt: skip
            case = json.loads(path.read_text())
            case["malloc"] = label
            for phase in case["phases"].values():
                phase["rise_over_parameter_bytes"] = phase["rise"] / case["parameter_bytes"]
            cases.append(case)
        shutil.rmtree(root / f"K{k}", ignore_errors=True)
    shutil.rmtree(root / "ledger", ignore_errors=True)
    return {"config": cfg, "build": info, "cases": cases, "figure_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path)
    parser.add_argument("--measure", type=Path)
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-phases", action="store_true", help="only the whole attribution, not its phases")
    parser.add_argument("--out", type=Path, required=True)
    for key, default in (("n-embd", 128), ("n-layer", 2), ("n-head", 2), ("vocab", 2048), ("positions", 64)):
        parser.add_argument(f"--{key}", type=int, default=default)
    a = parser.parse_args()
    cfg = {"n_embd": a.n_embd, "n_layer": a.n_layer, "n_head": a.n_head, "vocab": a.vocab, "positions": a.positions}
    if a.build is not None:
        result = build(a.build, cfg, [int(k) for k in a.ks.split(",")], a.steps)
    else:
        result = measure(a.measure, cfg, split_phases=not a.no_phases)
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
