"""``hf-stage-attribution card REPORT_DIR --readme PATH``: write the accountability section into a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ReportError
from ..model_card import write_model_card
from ..report.attribution import AttributionReport
from .commands import command_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card",
        help=command_help("card"),
        description="Write the 'Accountability: training-stage attribution' section of README.md from a report, "
        "with the whole report (stage_attribution.json) and its plot (stage_attribution.png) beside the card.",
    )
    p.add_argument("report_dir", metavar="REPORT_DIR", help="directory holding report.json (or the file itself)")
    p.add_argument(
        "--readme",
        required=True,
        help="the model card to update or create: the model directory (its README.md) or a file ending in .md",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also push the card to this Hub repo")
    p.add_argument("--create-pr", action="store_true", help="with --push-to-hub, open a pull request")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a section written for another ledger, and a "
        "stage_attribution.json/.png beside the card that is not this ledger's report",
    )
    p.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="write the card even where the weights beside it (model.safetensors) are not the model the report "
        "attributes; the section then says so in bold",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    path = Path(args.report_dir)
    report_path = path / "report.json" if path.is_dir() else path
    if not report_path.exists():
        raise ReportError(f"Expected a report at {report_path}; run `hf-stage-attribution attribute` first.")
    report = AttributionReport.from_json(report_path)
    files = write_model_card(
        report,
        args.readme,
        push_to_hub=args.push_to_hub,
        create_pr=args.create_pr,
        overwrite=args.overwrite,
        allow_other_weights=args.allow_other_weights,
    )
    print(f"Accountability section written to {files.readme if files is not None else args.readme}")
    if files is not None and files.weights is not None:
        print(f"Weights: {files.weights.summary()}.")
    return 0
