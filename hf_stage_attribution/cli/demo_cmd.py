"""``hf-stage-attribution demo``: the whole idea on a laptop, offline, in a few minutes.

Two pipelines are trained on the spot and recorded: a language model (pretraining → SFT → LoRA → DPO on a
tiny GPT-2) and a digits classifier (3 stages, one of which introduces a spurious corner patch). Their behaviors
are attributed to stages with the default estimator, checked against replayed training, and written into
model cards. The console stays quiet: one progress bar (or, off a terminal, one line) per phase, the two effect
tables, the fidelity tables and where the cards are; ``--verbose`` shows the libraries' own logs too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..attributor import StageAttributor
from ..behaviors import get as behavior_kind
from ..examples.lm_pipeline import build_lm_pipeline
from ..examples.spurious_digits import build_spurious_digits
from ..model_card import write_model_card
from ..report.attribution import AttributionReport
from ..report.text import render_fidelity_table
from .console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Train, record, attribute, validate and publish two tiny pipelines (offline).",
        description="Run the offline demo: an LM pipeline and a digits classifier with a spurious feature.",
    )
    p.add_argument("--output-dir", default="demo_output", help="where ledgers, models, reports and cards go")
    p.add_argument("--size", choices=["tiny", "demo"], default="tiny", help="LM pipeline size (default: tiny)")
    p.add_argument("--no-validate", action="store_true", help="skip replay (no fidelity figures)")
    p.add_argument("--only", choices=["lm", "digits"], default=None, help="run one pipeline only")
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _publish(report: AttributionReport, out: Path, readme: Path) -> None:

    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    report.plot(out / "plot.png")
    write_model_card(report, readme)
    print(report.table())
    if report.fidelity:
        print("Fidelity against replay:\n" + render_fidelity_table(report))
    print(f"model card: {readme}", flush=True)


def _attribute(console: Console, attributor: StageAttributor, behaviors: dict, validate: bool) -> AttributionReport:
    what = "estimates and replay" if validate else "estimates"
    with console.phase(f"attributing {len(behaviors)} behaviors ({what})") as phase:
        report = attributor.attribute(behaviors, validate=validate)
        phase.note = f"estimator {report.estimator}"
    return report


def run_lm(out: Path, size: str, validate: bool, console: Console | None = None) -> Path:

    console = console or Console()
    _section("Language model: pretraining -> SFT (half toxic) -> LoRA -> DPO (tiny GPT-2)")
    # No curvature material for the LM here: at this size Gauss–Newton products cost more than replaying the stages
    # (see BENCHMARKS.md), so the default rule picks aa-linear; the recipe lm_sft_lora_dpo records them.
    with console.captured():
        pipe = build_lm_pipeline(
            out / "lm",
            size=size,
            curvature_segments=0,
            stage_callbacks=lambda name: [console.callback(f"training {name}")],
        )
    print(f"ledger: {pipe.ledger_dir}", flush=True)
    attributor = StageAttributor(pipe.ledger_dir, pipe.model, show_progress=False)
    report = _attribute(console, attributor, pipe.behaviors, validate)
    readme = pipe.model_dir / "README.md"
    _publish(report, out / "lm" / "report", readme)
    return readme


def run_digits(out: Path, size: str, validate: bool, console: Console | None = None) -> Path:

    console = console or Console()
    _section("Digits classifier: pretraining -> patch (a spurious corner patch on every 7) -> finetune")
    with console.phase("training 3 stages", total=3) as phase:
        pipe = build_spurious_digits(out / "digits", size="small", on_stage_end=lambda stage: phase.update())
        phase.note = f"ledger: {pipe.ledger_dir}"
    held_out = pipe.clean_rows[:: max(1, len(pipe.clean_rows) // 120)]
    behaviors = {
        **pipe.behaviors,
        "label-margin": behavior_kind("classification")(held_out, measure="margin", name="label-margin"),
        "cross-entropy": behavior_kind("classification")(held_out, measure="cross-entropy", name="cross-entropy"),
    }
    attributor = StageAttributor(pipe.ledger_dir, pipe.model, stage_fns=pipe.stage_fns, show_progress=False)
    report = _attribute(console, attributor, behaviors, validate)
    readme = pipe.model_dir / "README.md"
    _publish(report, out / "digits" / "report", readme)
    return readme


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    console = Console(verbose=getattr(args, "verbose", False))
    t0 = time.time()
    cards = []
    if args.only in (None, "lm"):
        cards.append(run_lm(out, args.size, not args.no_validate, console))
    if args.only in (None, "digits"):
        cards.append(run_digits(out, args.size, not args.no_validate, console))
    _section(f"Done in {time.time() - t0:.0f}s")
    for card in cards:
        print(f"model card: {card}")
    return 0
