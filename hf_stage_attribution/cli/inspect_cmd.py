"""``hf-stage-attribution inspect LEDGER_DIR``: the stages of a ledger as a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._internal.memory import human_bytes
from .._internal.table import fmt_float, render_table
from ..estimators.replay import replay_needs
from ..ledger import StageLedger
from ..ledger.storage import lock_holder
from ..ledger.summary import ledger_summary
from ..report.text import replay_work
from .commands import command_help

HEADERS = [
    "#",
    "name",
    "kind",
    "trainer",
    "steps",
    "optimizer",
    "lr range",
    "wd",
    "trainable tensors",
    "data",
    "|delta|",
    "size (× model)",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help=command_help("inspect"), description="Show the stages recorded in a ledger.")
    p.add_argument("ledger_dir", metavar="LEDGER_DIR", help="directory holding ledger.json")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash θ_0's file and every stage file against ledger.json (prints how many matched)",
    )
    p.add_argument(
        "--remove-incomplete",
        action="store_true",
        help="delete stages and temporary files left by an interrupted recording (only what the package wrote; "
        "refused while one is running, and where ledger.json is missing but stages are present)",
    )
    p.set_defaults(func=run)


def times(ratio: float) -> str:
    """A size ratio with enough digits to be read: two decimals, or two significant digits below 0.01.

    Example:
        >>> times(6.4321), times(0.003143), times(0.0)
        ('6.43×', '0.0031×', '0×')
    """
    if ratio == 0:
        return "0×"
    return f"{ratio:.2f}×" if abs(ratio) >= 0.01 else f"{ratio:.2g}×"


def format_summary(summary: dict) -> str:
    rows = []
    for s in summary["stages"]:
        lr = "-" if s["lr_min"] is None else f"{fmt_float(s['lr_min'])}..{fmt_float(s['lr_max'])}"
        wd = ",".join(fmt_float(w) for w in s["weight_decay"]) or "-"
        rows.append([s["index"], s["name"], s["kind"], s["trainer"], s["steps"], s["optimizer"], lr, wd,
                     s["trainable_parameters"], s["data"], fmt_float(s["delta_norm"], 4),
                     f"{human_bytes(s['bytes'])} ({times(s['bytes'] / summary['model_bytes'])})"])  # fmt: skip
    head = (
        f"Ledger {summary['ledger']} (format {summary['format_version']}, model {summary['model_class']}, "
        f"{summary['num_parameters']:,} parameters, {len(summary['stages'])} stages; "
        f"{human_bytes(summary['ledger_bytes'])} on disk = {times(summary['ledger_bytes'] / summary['model_bytes'])} "
        "the float32 model"
        + (
            f"; embedding cache {human_bytes(summary['embedding_cache_bytes'])}"
            if summary["embedding_cache_bytes"]
            else ""
        )
        + ")"
    )
    text = head + "\n" + render_table(HEADERS, rows)
    early = [f"{s['name']} after {s['early_checkpoint_steps']} steps" for s in summary["stages"]
             if s.get("early_checkpoint_steps")]  # fmt: skip
    if early:
        text += "\nEarly checkpoints (partial replay reads the factual branch from them): " + ", ".join(early)
    replay = summary.get("replay") or {}
    if replay.get("optimizer_steps"):  # what `validate` would re-run to remove every stage, from this ledger alone
        if replay["problems"]:
            text += "\nReplay (validate) cannot run from this ledger alone: " + "; ".join(replay["problems"])
        else:
            text += f"\nReplay (validate) {replay_work(replay)}, from the recorded replay data"
    if summary["incomplete_stages"]:
        text += "\nIncomplete (interrupted) stages: " + ", ".join(summary["incomplete_stages"])
        text += "\n  remove them with: hf-stage-attribution inspect LEDGER_DIR --remove-incomplete"
    return text


def _leftovers_text(ledger) -> str:
    """Temporary files of killed writes, and who is recording right now (the lock's holder), if anyone."""

    lines = []
    leftovers = ledger.leftover_files()
    if leftovers:
        lines.append("Temporary files of interrupted writes: " + ", ".join(p.name for p in leftovers))
        lines.append("  remove them with: hf-stage-attribution inspect LEDGER_DIR --remove-incomplete")
    holder = lock_holder(ledger.dir)
    if holder:
        lines.append(
            f"Locked for writing by pid {holder.get('pid')} on {holder.get('host')} ({holder.get('purpose')}); "
            "a stage being recorded shows as incomplete until it finishes (if that process's train() raised and it "
            "goes on, a notebook say, its StageRecorder's release() frees the lock and keeps the stage for a resume)."
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:

    directory = Path(args.ledger_dir)
    if args.remove_incomplete and directory.is_dir() and not (directory / "ledger.json").exists():
        # a writer killed while creating the ledger: nothing to show, but its leftovers can still go
        for path in StageLedger(directory).remove_incomplete():
            print(f"removed incomplete stage or temporary file {path}")
        print(f"No ledger at {directory} yet (no ledger.json): nothing else to show.")
        return 0
    ledger = StageLedger.load(directory)
    if args.remove_incomplete:
        for path in ledger.remove_incomplete():
            print(f"removed incomplete stage or temporary file {path}")
    verified = ledger.verify() if args.verify else None  # a mismatch raises: the command fails, naming the file
    summary = ledger_summary(ledger)
    summary["replay"] = replay_needs(ledger, [s.index for s in ledger.stages]).to_dict()  # the CLI has no stage_fns
    if args.json:
        summary["leftover_files"] = [p.name for p in ledger.leftover_files()]
        if verified is not None:
            summary["verified_files"] = verified
        print(json.dumps(summary, indent=2))
    else:
        done = None if verified is None else f"verified: {verified} file(s) match the hashes recorded in ledger.json"
        print("\n".join(t for t in (format_summary(summary), _leftovers_text(ledger), done) if t))
    return 0
