"""Recipe: a spurious corner patch in scikit-learn's digits, found by stage attribution and scaled back out.

    python recipes/spurious_digits/run.py --output-dir out/spurious_digits [--small]

Records three stages (pretraining → patch → finetune; the ``patch`` stage puts a bright corner patch on every 7),
attributes the patch-reliance gap with the default estimator and with replay, writes the report directory and the
model card, then scales the top-ranked stage down (θ_K − α·v_k, α picked so that clean accuracy drops by at most
1 point) and, for contrast, the last-ranked stage; the chosen model is saved with its card section and sweep plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hf_stage_attribution.examples.recipe_support import (
    attribute_with_replay,
    intervene_top_and_last,
    rank_and_publish,
    rank_stages,
    write_summary,
)

RECIPE = "spurious_digits"
ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
MAX_DROP = 1.0  # points of clean accuracy the intervention may cost


# The shared steps (kept under their recipe names, which tests and READMEs use).
ranking = rank_stages
attribute = attribute_with_replay


def write_specs(pipeline: Any, out: Path) -> dict[str, str]:
    """Target and utility spec files for ``hf-stage-attribution intervene`` on this recipe's model."""
    out.mkdir(parents=True, exist_ok=True)
    target = {"behaviors": [{**pipeline.behaviors["patch-reliance"].to_spec(), "name": "patch-reliance"}]}
    utility = {
        "utilities": [
            {"kind": "accuracy", "name": "accuracy", "data": pipeline.clean_rows},
            {"kind": "accuracy", "name": "all_groups_accuracy", "data": pipeline.eval_rows, "group_key": "group",
             "worst_group_name": "worst_group_accuracy"},
        ]
    }  # fmt: skip
    paths = {"target": out / "target.json", "utility": out / "utility.json"}
    paths["target"].write_text(json.dumps(target), encoding="utf-8")
    paths["utility"].write_text(json.dumps(utility), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def utilities(pipeline: Any) -> list[Any]:
    from hf_stage_attribution.interventions.sweep import Accuracy

    return [
        Accuracy(pipeline.clean_rows, name="accuracy"),
        Accuracy(pipeline.eval_rows, name="all_groups_accuracy", group_key="group",
                 worst_group_name="worst_group_accuracy"),
    ]  # fmt: skip


def intervene(pipeline: Any, stage: str, alphas: list[float] = ALPHAS) -> Any:
    from hf_stage_attribution.interventions.sweep import Constraint, scale_stage

    result = scale_stage(
        pipeline.ledger_dir, pipeline.model, stage, alphas, target=pipeline.behaviors["patch-reliance"],
        utilities=utilities(pipeline), constraint=Constraint("accuracy", max_drop=MAX_DROP),
        stage_fns=pipeline.stage_fns,
    )  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=f"out/{RECIPE}", help="where everything is written (must be new)")
    parser.add_argument("--small", action="store_true", help="reduced size (the test's setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-intervention", action="store_true", help="stop after attribution and the card")
    parser.add_argument(
        "--update-example-card",
        action="store_true",
        help=f"copy the card (README, JSON, plot) to model_cards/{RECIPE}/",
    )
    args = parser.parse_args(argv)

    from hf_stage_attribution.examples.spurious_digits import build_spurious_digits

    t0 = time.time()
    out = Path(args.output_dir)
    pipeline = build_spurious_digits(out, size="small" if args.small else "full", seed=args.seed)
    print(f"Recorded stages {[s.name for s in pipeline.stages]} into {pipeline.ledger_dir} ({time.time() - t0:.1f} s)")
    report, replay = attribute(pipeline, out / "report")
    summary = rank_and_publish(
        RECIPE, "patch-reliance", pipeline, report, replay, size="small" if args.small else "full",
        update_example_card=args.update_example_card, repo_root=Path(__file__).resolve().parents[2],
        specs=write_specs(pipeline, out / "specs"),
    )  # fmt: skip
    if not args.no_intervention:
        intervene_top_and_last(
            lambda stage: intervene(pipeline, stage), summary["rankings"]["attribution"], out, summary,
            card_from=pipeline.model_dir / "README.md",
        )  # fmt: skip
    write_summary(summary, out, t0)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
