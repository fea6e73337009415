"""``hf-stage-attribution demo``: the whole idea on a laptop, offline, in a few minutes.

Two pipelines are trained on the spot and recorded: a language model (pretraining → SFT → LoRA → DPO on a
tiny GPT-2) and a digits classifier (3 stages, one of which introduces a spurious corner patch). Their behaviors
are attributed to stages with the default estimator, checked against replayed training, and written into
model cards.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..attributor import StageAttributor
from ..behaviors import get as behavior_kind
from ..examples.lm_pipeline import build_lm_pipeline
from ..examples.spurious_digits import build_spurious_digits
from ..model_card import write_model_card


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
    print(f"\n=== {title} ===")


def _publish(report, out: Path, readme: Path) -> None:

    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    report.plot(out / "plot.png")
    write_model_card(report, readme)
    print(report.table())
    if report.fidelity:
        print("\nFidelity against replay (non-terminal pairs):")
        print(json.dumps(report.fidelity.get("non_terminal", report.fidelity), indent=2))
    print(f"\nModel card: {readme}")


def run_lm(out: Path, size: str, validate: bool) -> Path:

    _section("Language model: pretraining -> SFT (half toxic) -> LoRA -> DPO (tiny GPT-2)")
    t0 = time.time()
    # No curvature material for the LM here: at this size Gauss–Newton products cost more than replaying the stages
    # (see BENCHMARKS.md), so the default rule picks aa-linear; the recipe lm_sft_lora_dpo records them.
    pipe = build_lm_pipeline(out / "lm", size=size, curvature_segments=0)
    print(f"trained and recorded 4 stages in {time.time() - t0:.1f}s; ledger: {pipe.ledger_dir}")
    report = StageAttributor(pipe.ledger_dir, pipe.model).attribute(pipe.behaviors, validate=validate)
    readme = pipe.model_dir / "README.md"
    _publish(report, out / "lm" / "report", readme)
    return readme


def run_digits(out: Path, size: str, validate: bool) -> Path:

    _section("Digits classifier: pretraining -> patch (a spurious corner patch on every 7) -> finetune")
    t0 = time.time()
    pipe = build_spurious_digits(out / "digits", size="small")
    print(f"trained and recorded {len(pipe.stages)} stages in {time.time() - t0:.1f}s; ledger: {pipe.ledger_dir}")
    held_out = pipe.clean_rows[:: max(1, len(pipe.clean_rows) // 120)]
    behaviors = {
        **pipe.behaviors,
        "label-margin": behavior_kind("classification")(held_out, measure="margin", name="label-margin"),
        "cross-entropy": behavior_kind("classification")(held_out, measure="cross-entropy", name="cross-entropy"),
    }
    attributor = StageAttributor(pipe.ledger_dir, pipe.model, stage_fns=pipe.stage_fns)
    report = attributor.attribute(behaviors, validate=validate)
    readme = pipe.model_dir / "README.md"
    _publish(report, out / "digits" / "report", readme)
    return readme


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    t0 = time.time()
    cards = []
    if args.only in (None, "lm"):
        cards.append(run_lm(out, args.size, not args.no_validate))
    if args.only in (None, "digits"):
        cards.append(run_digits(out, args.size, not args.no_validate))
    _section(f"Done in {time.time() - t0:.0f}s")
    for card in cards:
        print(f"model card: {card}")
    return 0
