"""``hf-stage-attribution import-checkpoints SPEC --output LEDGER_DIR``: a ledger from published checkpoints.

SPEC is a YAML or JSON file with the ordered boundaries under ``stages`` (the first is the start θ_0)::

    stages:
      - {model: org/model, revision: base}
      - {model: org/model, revision: sft, name: sft, kind: sft,
         optimizer: {type: AdamW, weight_decay: 0.01, lr: 2.0e-5, lr_scheduler_type: linear, warmup_steps: 100,
                     num_steps: 3000}}
      - {model: runs/dpo, name: dpo, kind: dpo}           # a Trainer output directory with checkpoint-* folders

Warnings of the import (rates hidden by ``logging_steps``, pickles not read) are printed as one line each,
``hf-stage-attribution import-checkpoints: warning: ...``, like the command's errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from .._internal.table import render_table
from ..checkpoints.importer import import_checkpoints
from ..checkpoints.spec import load_spec
from .commands import command_help

HEADERS = ["#", "name", "kind", "from", "steps", "optimizer", "estimators"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-checkpoints",
        help=command_help("import-checkpoints"),
        description=(
            "Build a ledger from an ordered list of checkpoints: Hub repos/revisions (online, or from the local cache "
            "with HF_HUB_OFFLINE=1), local folders, Trainer output directories and PEFT adapters. The first entry "
            "of SPEC's `stages` is the start; each later one ends the stage it names. Tensors are streamed one at a "
            "time; on any error nothing is written."
        ),
    )
    p.add_argument("spec", metavar="SPEC", help="YAML/JSON file with the list of boundaries under `stages`")
    p.add_argument("--output", required=True, metavar="LEDGER_DIR", help="new (or empty) ledger directory")
    p.add_argument("--cache-dir", metavar="DIR", help="Hugging Face hub cache (default: HF_HUB_CACHE / HF_HOME/hub)")
    p.add_argument("--offline", action="store_true", help="only use the local cache (as HF_HUB_OFFLINE=1)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model.bin weights and read Trainer optimizer.pt/scheduler.pt "
        "(all with torch.load(weights_only=True) only)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace LEDGER_DIR if it holds a ledger (after success); a file or any other folder is never replaced",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=run)


def summarize(ledger) -> dict:
    """What the command prints: each stage's provenance, steps, optimizer and the estimators it supports."""
    stages = []
    for stage in ledger.stages:
        source = stage.info.get("source") or {}
        where = source.get("model", "?")
        if source.get("revision"):
            where += f"@{source['revision']}"
        if source.get("commit"):
            where += f" ({source['commit'][:8]})"
        availability = source.get("estimator_availability") or {}
        stages.append({
            "index": stage.index, "name": stage.name, "kind": stage.kind, "from": where,
            "num_steps": stage.num_steps, "optimizer": (stage.optimizer or {}).get("type"),
            "estimators": availability.get("available", []), "reason": availability.get("reason"),
            "source_num_steps": source.get("num_steps"), "notes": stage.info.get("notes", []),
        })  # fmt: skip
    start = (ledger.manifest["model"].get("source") or {}).get("start", {})
    return {"ledger": str(ledger.dir), "start": start, "num_parameters": len(ledger.parameter_names), "stages": stages}


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """``warnings.showwarning`` for the command: one line on stderr, without the source file and line."""
    print(f"hf-stage-attribution import-checkpoints: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    boundaries = load_spec(args.spec)
    with warnings.catch_warnings():  # the filters stay as they are; only how a warning is shown changes
        warnings.showwarning = _show_warning
        ledger = import_checkpoints(
            boundaries, args.output, allow_pickle=args.allow_pickle, cache_dir=args.cache_dir,
            local_files_only=True if args.offline else None, overwrite=args.overwrite,
            progress=not args.no_progress,
        )  # fmt: skip
    summary = summarize(ledger)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = []
    for s in summary["stages"]:
        steps = s["num_steps"] or s["source_num_steps"] or "-"  # optimizer unknown: the ledger records 0 steps
        estimators = ", ".join(s["estimators"])
        rows.append([s["index"], s["name"], s["kind"], s["from"], steps, s["optimizer"], estimators])
    start = summary["start"]
    print(f"Imported {len(rows)} stage(s) into {summary['ledger']} (start: {start.get('model')})")
    print(render_table(HEADERS, rows))
    for s in summary["stages"]:
        print(f"  {s['name']}: {s['reason']}")
    return 0
