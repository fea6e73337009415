"""Peak RSS rise of every estimator (and ``validate``) over the parameter bytes, each in a fresh process.

A GPT-2 built from a config is trained for two AdamW stages of 8 steps with the custom-loop recorder and curvature
material (``curvature_loss={"type": "causal-lm"}``, so a reloaded ledger computes Gauss–Newton products). The stage
functions have the step-limited form (``max_steps``), so ``partial-replay`` replays part of the next stage and
``auto`` (hence ``validate``) resolves to ``partial-replay``, as on a ledger recorded with replay data. Then one fresh
subprocess per estimator loads the model and the ledger, warms up (lazy imports and code pages land in the
baseline), measures one training step of a stage (a fresh model copy, its AdamW, one forward+backward+optimizer
step: the peak rise is ``train_step_rise``), releases it, takes the RSS as the baseline and runs
``StageAttributor(..., estimator=name, diagnostics=False).attribute(...)`` from an empty embedding cache
(``validate`` runs the default estimator with ``validate=True``). With ``--pair-readouts`` (the CI test) ``aa-ggn-fd``
and ``aa-hvp-fd`` run in their base row's process instead, from the embeddings it cached (:func:`measure_pair`).

The figure is ``(VmHWM − baseline) / parameter bytes``; issue 16's bound is 3. Rows that replay (``replay``,
``partial-replay*``, ``validate``) have the bound "what one training step of the stage needs, plus one model copy":
``rise / (train_step_rise + parameter bytes)`` ≤ 1 (column ``over_step_bound``).

    python -m benchmarks.estimator_memory --out /tmp/estimator_memory.json [--n-embd 256 --n-layer 4 --vocab 4096]
    python -m benchmarks.estimator_memory --small --markdown   # the CI model (vocab 2048), a BENCHMARKS.md table

Example:
    >>> # cfg = {"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab": 2048, "positions": 64}
    >>> # rows = measure_all(cfg, Path("/tmp/m"))
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import param_bytes, proc_status, quiet, reset_peak, run_child  # noqa: E402
from benchmarks.memory import _load_case, _model, _tokens  # noqa: E402

ESTIMATORS = (
    "delta-linear", "delta-fd", "aa-linear", "aa-fd", "aa-ggn", "aa-ggn-fd", "aa-hvp", "aa-hvp-fd", "partial-replay",
    "partial-replay-linear", "strided-replay", "replay", "validate",
)  # fmt: skip
REPLAYING = (
    "partial-replay",
    "partial-replay-linear",
    "strided-replay",
    "replay",
    "validate",
)  # bound: one training step + one copy
#: the finite-difference read-outs of the curvature rows and the row whose embeddings they read. With
#: ``pair_readouts`` (CI) each runs in its base row's process right after it, reading the embeddings that run cached:
#: its figure is the larger of the base row's rise and the read-out's rise over the same baseline (the embedding pass
#: is the same computation; what the read-out adds on top is measured, above whatever the first run left resident).
READOUT_OF = {"aa-ggn-fd": "aa-ggn", "aa-hvp-fd": "aa-hvp"}
BOUND = 3.0  # issue 16: peak RSS rise ≤ 3 × the parameter bytes
DEFAULT = {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 4096, "positions": 64, "curvature_examples": 8}  # 4.2M
#: the CI model (3.7M parameters), with half the curvature examples: the curvature rows' products run per example
#: (aa-ggn 74 s with 8 on one thread), while their peak is set by model-sized vectors, not by how many examples
SMALL = {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 2048, "positions": 64, "curvature_examples": 4}
STAGES, STEPS = 2, 8


def _steps(
    model: Any,
    opt: Any,
    cfg: dict[str, int],
    k: int,
    rec: Any = None,
    max_steps: int | None = None,
    grad_every: int = 1,
) -> None:
    """Stage ``k``'s training steps (each given to ``rec`` when recording); the first ``max_steps`` only if given; a
    gradient every ``grad_every`` steps, re-used in between (strided replay's form)."""
    model.train()
    for step in range(STEPS if max_steps is None else min(STEPS, max_steps)):
        ids = _tokens(cfg, 100 * k + step, rows=4, width=16)
        batch = {"input_ids": ids, "labels": ids}
        if step % grad_every == 0:
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        opt.step()
        if rec is not None:
            rec.step(batch)


def _train(
    model: Any, cfg: dict[str, int], k: int, max_steps: int | None = None, grad_every: int = 1
) -> tuple[Any, Any]:
    """Stage ``k`` as recorded (step-limited form: ``max_steps``; gradient-reuse form: ``grad_every``); returns
    ``(model, optimizer)``."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    _steps(model, opt, cfg, k, max_steps=max_steps, grad_every=grad_every)
    model.eval()
    return model, opt


def train_step_rise(model: Any, cfg: dict[str, int]) -> int:
    """Peak RSS rise of one training step of a stage on a fresh copy of ``model``: the copy, its AdamW moments, the
    gradients and the step's activations (what replay needs for a stage, besides the final model)."""
    import copy

    import torch

    from hf_stage_attribution._internal.memory import release_freed_memory

    gc.collect()
    release_freed_memory()
    baseline = proc_status()["VmRSS"]
    reset_peak()
    work = copy.deepcopy(model)
    opt = torch.optim.AdamW(work.parameters(), lr=1e-3, weight_decay=0.01)
    _steps(work, opt, cfg, 0, max_steps=1)
    rise = proc_status()["VmHWM"] - baseline
    del work, opt
    gc.collect()
    release_freed_memory()
    return rise


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
            curvature_loss={"type": "causal-lm"}, curvature_examples=cfg.get("curvature_examples", 8),
        ) as rec:  # fmt: skip
            _steps(model, opt, cfg, k, rec)
    save_file(
        {n: p.detach().contiguous() for n, p in model.state_dict().items() if n != "lm_head.weight"},
        str(root / "model.safetensors"),
    )


def limit_bytes(name: str, parameter_bytes: int, step_rise: int) -> float:
    """The most the row ``name`` may rise: 3 × the parameter bytes, or for a row that replays, one training step's
    rise plus one model copy when that is more."""
    limit = BOUND * parameter_bytes
    return max(limit, step_rise + parameter_bytes) if name in REPLAYING else limit


def _watch(limit: float, baseline: int, row: dict[str, Any], out: Path, start: float) -> None:
    """Stop the process as soon as its peak RSS rise passes ``limit``, writing ``row`` marked ``aborted`` to ``out``:
    the row is over its bound whatever it would have reached (the figure is then a lower bound)."""
    import os

    while not row.get("finished"):  # its run ended within the bound
        rise = proc_status()["VmHWM"] - baseline
        if rise > limit:
            nbytes = row["parameter_bytes"]
            row.update(
                seconds=time.perf_counter() - start, rise=rise, rise_over_parameter_bytes=rise / nbytes,
                over_step_bound=rise / (row["train_step_rise"] + nbytes), aborted=True,
            )  # fmt: skip
            out.write_text(json.dumps(row))
            os._exit(0)
        time.sleep(0.02)


def measure(
    root: Path,
    cfg: dict[str, int],
    name: str,
    abort_to: Path | None = None,
    *,
    baseline: int | None = None,
    cached: bool = False,
) -> dict[str, Any]:
    """In a fresh process: the peak RSS rise of one estimator's attribution over the parameter bytes (and, for the
    rows that replay, over one training step's rise plus one model copy).

    With ``abort_to``, the run stops as soon as the rise passes the row's bound (:func:`limit_bytes`) and the row,
    marked ``aborted``, is written there: the CI test learns "over the bound" without waiting for the whole run.
    ``baseline``: the RSS the rise is measured from (default: this process's after loading; :func:`measure_pair`
    passes its first run's); ``cached``: keep the embeddings an earlier run cached (by default the run starts from an
    empty cache)."""
    import threading

    from hf_stage_attribution import StageAttributor
    from hf_stage_attribution._internal.memory import release_freed_memory

    with quiet():
        model, ledger = _load_case(root, cfg, empty_cache=not cached)
        ids = _tokens(cfg, 7, rows=8, width=16)

        def logprob(m: Any) -> Any:
            logits = m(input_ids=ids).logits[:, :-1]
            return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)

        stage_fns = {
            f"stage-{k}": (lambda m, max_steps=None, grad_every=1, k=k: _train(m, cfg, k, max_steps, grad_every))
            for k in range(STAGES)
        }
        step = train_step_rise(model, cfg)
        nbytes = param_bytes(model)
        gc.collect()
        release_freed_memory()
        if baseline is None:
            baseline = proc_status()["VmRSS"]
        reset_peak()
        start = time.perf_counter()
        if abort_to is not None:
            row = {"estimator": name, "ran": name, "parameter_bytes": nbytes, "train_step_rise": step,
                   "train_step_over_parameter_bytes": step / nbytes}  # fmt: skip
            args = (limit_bytes(name, nbytes, step), baseline, row, abort_to, start)
            threading.Thread(target=_watch, args=args, daemon=True).start()
        estimator = "auto" if name == "validate" else name
        report = StageAttributor(
            ledger, model, estimator=estimator, stage_fns=stage_fns, diagnostics=False, show_progress=False
        ).attribute({"logprob": logprob}, validate=name == "validate")
        if abort_to is not None:
            row["finished"] = True
        rise = proc_status()["VmHWM"] - baseline
        return {
            "estimator": name, "ran": report.estimator, "seconds": time.perf_counter() - start, "rise": rise,
            "parameter_bytes": nbytes, "rise_over_parameter_bytes": rise / nbytes, "train_step_rise": step,
            "train_step_over_parameter_bytes": step / nbytes, "over_step_bound": rise / (step + nbytes),
            "aborted": False, "baseline": baseline,
        }  # fmt: skip


def measure_pair(root: Path, cfg: dict[str, int], names: list[str], abort_to: Path | None = None) -> list[dict]:
    """:func:`measure` of a curvature row and then its finite-difference read-out (:data:`READOUT_OF`) in this
    process, the read-out from the embeddings the first run cached and against the first run's baseline; the
    read-out's row reports the larger of the two rises (``paired_with``: the first row)."""
    first = measure(root, cfg, names[0], abort_to)
    if abort_to is not None:  # kept if the read-out then passes the bound (its row is then written to abort_to)
        _first_row(abort_to).write_text(json.dumps(first))
    gc.collect()
    second = measure(root, cfg, names[1], abort_to, baseline=first["baseline"], cached=True)
    nbytes, step = second["parameter_bytes"], second["train_step_rise"]
    rise = max(first["rise"], second["rise"])
    second.update(
        rise=rise, rise_over_parameter_bytes=rise / nbytes, over_step_bound=rise / (step + nbytes),
        seconds=first["seconds"] + second["seconds"], paired_with=names[0],
    )  # fmt: skip
    return [first, second]


def _first_row(out: Path) -> Path:
    return out.with_name(f"{out.stem}.first.json")


def _groups(names: tuple[str, ...], pair_readouts: bool) -> list[list[str]]:
    """The rows, each alone, or with ``pair_readouts`` each read-out after its base row when both are asked for."""
    paired = {r for r, base in READOUT_OF.items() if pair_readouts and r in names and base in names}
    return [[n, *[r for r in paired if READOUT_OF[r] == n]] for n in names if n not in paired]


def within_bound(row: dict[str, Any]) -> bool:
    """Issue 16's bound for ``row``: ≤ 3 × the parameter bytes, or (rows that replay) ≤ one training step's rise plus
    one model copy."""
    limit = limit_bytes(row["estimator"], row["parameter_bytes"], row["train_step_rise"])
    return not row.get("aborted") and row["rise"] <= limit


def markdown(rows: list[dict[str, Any]], cfg: dict[str, int]) -> str:
    """The rows as a markdown table (BENCHMARKS.md §9)."""
    nbytes = rows[0]["parameter_bytes"] if rows else 0
    step = rows[0]["train_step_rise"] if rows else 0
    lines = [
        f"GPT-2 {nbytes / 4e6:.1f}M parameters ({', '.join(f'{k} {v}' for k, v in cfg.items())}); parameter bytes "
        f"{nbytes / 1e6:.1f} MB; one training step (fresh copy + AdamW + forward/backward/step) rises "
        f"{step / 1e6:.1f} MB = {step / nbytes if nbytes else 0:.2f}× parameter bytes.",
        "",
        "| estimator | ran | peak RSS rise (MB) | ÷ parameter bytes | ÷ (training step + model copy) | seconds | "
        "within bound |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        over = "> " if row.get("aborted") else ""  # stopped once past its bound: a lower bound
        step_col = f"{over}{row['over_step_bound']:.2f}" if row["estimator"] in REPLAYING else "–"
        lines.append(
            f"| {row['estimator']} | {row.get('ran', row['estimator'])} | {over}{row['rise'] / 1e6:.1f} | "
            f"{over}{row['rise_over_parameter_bytes']:.2f}× | {step_col} | {row['seconds']:.1f} | "
            f"{'yes' if within_bound(row) else 'no'} |"
        )
    return "\n".join(lines)


def _cfg_args(cfg: dict[str, int]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def measure_all(
    cfg: dict[str, int],
    root: Path,
    names: tuple[str, ...] = ESTIMATORS,
    *,
    jobs: int = 1,
    abort: bool = False,
    pair_readouts: bool = False,
) -> list[dict[str, Any]]:
    """Build once, then one fresh subprocess per estimator (``jobs`` of them at a time: each measures its own RSS).

    ``abort``: each child stops as soon as its row passes its bound (the row is then marked ``aborted`` and its
    figure is a lower bound), so rows far over the bound cost seconds, not minutes. ``pair_readouts``: the
    finite-difference read-outs of the curvature rows run in their base row's process (:func:`measure_pair`; CI:
    the curvature products dominate the time, and the pair computes them once)."""
    from concurrent.futures import ThreadPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model.safetensors").exists():
        run_child(["-m", "benchmarks.estimator_memory", "--build", str(root), *_cfg_args(cfg)], timeout=900)

    def one(group: list[str]) -> list[dict[str, Any]]:
        case = _case_for(root, group[0])
        out = root / f"{group[0]}.json"
        out.unlink(missing_ok=True)
        _first_row(out).unlink(missing_ok=True)
        run_child(
            ["-m", "benchmarks.estimator_memory", "--measure", str(case), "--estimator", ",".join(group),
             "--out", str(out), *(["--abort"] if abort else []), *_cfg_args(cfg)], timeout=900,
            env={"OMP_NUM_THREADS": "1"},  # one thread each, as the forked children: `jobs` of them share the cores
        )  # fmt: skip
        found = json.loads(out.read_text())
        shutil.rmtree(case, ignore_errors=True)
        if isinstance(found, list):
            return found
        if len(group) == 1:
            return [found]
        # a pair stopped past its bound: the read-out is over it, and the first row too unless it had finished
        first = _first_row(out)
        head = json.loads(first.read_text()) if first.exists() else {**found, "estimator": group[0]}
        return [head, {**found, "estimator": group[1], "paired_with": group[0]}]

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        rows = {row["estimator"]: row for found in pool.map(one, _groups(names, pair_readouts)) for row in found}
    return [rows[name] for name in names]


def _case_for(root: Path, name: str) -> Path:
    """A folder for ``name``'s run with its own ledger (hard links) and model: each run empties its embedding cache."""
    case = root / "runs" / name
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(root / "ledger", case / "ledger", copy_function=os.link)
    os.link(root / "model.safetensors", case / "model.safetensors")
    return case


def measure_forked(
    cfg: dict[str, int], root: Path, names: tuple[str, ...] = ESTIMATORS, *, jobs: int = 2, abort: bool = True
) -> list[dict[str, Any]]:
    """:func:`measure_all` for CI: build and import once in this process, then ``os.fork`` one fresh process per
    estimator (``jobs`` at a time) instead of starting a new interpreter for each.

    Each child is its own process with its own peak-RSS counter: it loads the model and the ledger, takes its
    baseline after loading, and measures as :func:`measure` does; freed heap is handed back to the system before each
    fork so that a child cannot reuse the parent's freed pages without its RSS rising. POSIX only."""
    import traceback

    import torch

    from hf_stage_attribution._internal.memory import release_freed_memory

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model.safetensors").exists():  # built in a child: this process's heap stays small
        run_child(["-m", "benchmarks.estimator_memory", "--build", str(root), *_cfg_args(cfg)], timeout=900)
    from benchmarks.memory import _warm_up

    with quiet():
        _warm_up(cfg)  # imports and code pages once, for every child
    gc.collect()
    release_freed_memory()
    pending, running, rows = list(names), {}, {}
    while pending or running:
        while pending and len(running) < max(1, int(jobs)):
            name = pending.pop(0)
            case, out = _case_for(root, name), root / f"{name}.json"
            out.unlink(missing_ok=True)
            pid = os.fork()
            if pid == 0:  # the child: measure, write the row (or the error), leave without running the parent's code
                code = 1
                try:
                    torch.set_num_threads(1)
                    out.write_text(json.dumps(measure(case, cfg, name, out if abort else None)))
                    code = 0
                except BaseException:  # noqa: BLE001 - reported by the parent
                    out.with_suffix(".err").write_text(traceback.format_exc())
                finally:
                    os._exit(code)
            running[pid] = (name, case, out)
        pid, status = os.waitpid(-1, 0)
        name, case, out = running.pop(pid)
        shutil.rmtree(case, ignore_errors=True)
        if os.waitstatus_to_exitcode(status) != 0 or not out.exists():
            err = out.with_suffix(".err")
            raise RuntimeError(f"{name}: measuring child failed:\n{err.read_text() if err.exists() else status}")
        rows[name] = json.loads(out.read_text())
    return [rows[name] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path)
    parser.add_argument("--measure", type=Path)
    parser.add_argument("--estimator", default="aa-linear")
    parser.add_argument("--estimators", help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--small", action="store_true", help="the CI model (vocab 2048) instead of the 4.2M default")
    parser.add_argument("--markdown", action="store_true", help="print the rows as a markdown table")
    parser.add_argument("--abort", action="store_true", help="stop each run once it passes its bound (CI)")
    parser.add_argument("--jobs", type=int, default=1, help="children measured at a time")
    parser.add_argument("--fork", action="store_true", help="fork the children from one warmed-up process (CI)")
    parser.add_argument(
        "--pair-readouts", action="store_true", help="run aa-ggn-fd / aa-hvp-fd after their base row, in its process"
    )
    parser.add_argument("--out", type=Path)
    base = SMALL if "--small" in sys.argv else DEFAULT
    for key in base:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=base[key])
    a = parser.parse_args()
    cfg = {key: getattr(a, key) for key in base}
    if a.build is not None:
        build(a.build, cfg)
    elif a.measure is not None:
        group = a.estimator.split(",")
        abort_to = a.out if a.abort else None
        found = (
            measure_pair(a.measure, cfg, group, abort_to)
            if len(group) == 2
            else measure(a.measure, cfg, group[0], abort_to)
        )
        a.out.write_text(json.dumps(found))
    else:
        import tempfile

        names = tuple(a.estimators.split(",")) if a.estimators else ESTIMATORS
        unknown = sorted(set(names) - set(ESTIMATORS))
        if unknown:
            parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ESTIMATORS)}")
        with tempfile.TemporaryDirectory() as tmp:
            if a.fork:
                rows = measure_forked(cfg, Path(tmp), names, jobs=a.jobs, abort=a.abort)
            else:
                rows = measure_all(cfg, Path(tmp), names, jobs=a.jobs, abort=a.abort, pair_readouts=a.pair_readouts)
        if a.out is not None:
            a.out.write_text(json.dumps(rows, indent=2))
        if a.markdown:
            print(markdown(rows, cfg))
            return
        for row in rows:
            extra = f"  ÷(step+copy) {row['over_step_bound']:.2f}" if row["estimator"] in REPLAYING else ""
            extra += "  (stopped past its bound: a lower bound)" if row.get("aborted") else ""
            print(
                f"{row['estimator']:22s} rise {row['rise'] / 1e6:8.1f} MB = {row['rise_over_parameter_bytes']:.2f}x"
                f"{extra}  ({row['seconds']:.1f} s)"
            )


if __name__ == "__main__":
    main()
