"""``hf-stage-attribution intervene``: scale a stage's contribution down over a sweep of α, measure the trade-off,
save the chosen model with its card section and the sweep plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._internal.distributed import is_main_process
from ..behaviors.loading import load_tokenizer
from ..errors import InterventionError
from ..interventions.folder import SWEEP_JSON, SWEEP_PLOT, check_output_folder
from ..interventions.metrics import Constraint, load_target, load_utilities
from ..interventions.save import save_sweep
from ..interventions.sweep import check_alphas, resolve_stage, scale_stage
from ..ledger import StageLedger
from ..model_card import derived_card_text
from .attribute_cmd import check_output_dir, load_cli_model
from .commands import command_help
from .console import Console

DEFAULT_ALPHAS = "0.25,0.5,0.75,1.0"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "intervene",
        help=command_help("intervene"),
        description=(
            "For the stage --stage, evaluate θ_K − α·v_k for each α (and θ_K − α·Δ_k for comparison, and the "
            "replay-without-stage model when the ledger holds replay data) on the target behavior and the utility "
            "metrics, pick α in [0, 1] under the constraint, and save the chosen model (save_pretrained), a README "
            "section, intervention.json and intervention_sweep.png in --output-dir. When no α meets the constraint "
            "or improves the objective on the original model (or with --no-save), no model is saved: only "
            "intervention.json and intervention_sweep.png are written, the reason is printed, and the exit code is "
            "0. An --output-dir that already holds a model, a card or an earlier sweep is refused before any work "
            "unless --overwrite is given."
        ),
    )
    p.add_argument("ledger_dir", metavar="LEDGER_DIR", help="directory holding ledger.json")
    p.add_argument("--model", required=True, help="the final model's directory (save_pretrained output or adapter)")
    p.add_argument("--stage", required=True, help="the stage to scale down (name or index)")
    p.add_argument("--target", required=True, metavar="SPEC", help="YAML/JSON file with one behavior spec to lower")
    p.add_argument(
        "--utility",
        required=True,
        metavar="SPEC",
        help="YAML/JSON file listing utilities under 'utilities': behavior specs (mean) or kind 'accuracy' "
        "(data, label, optional group_key for worst-group accuracy, tokenizer)",
    )
    p.add_argument("--output-dir", required=True, help="where the chosen model and the sweep files are written")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier intervention saved in --output-dir (its model, tokenizer, card and sweep files, as "
        "a whole); a README.md there without this package's intervention section is still refused",
    )
    p.add_argument(
        "--alphas",
        default=DEFAULT_ALPHAS,
        help=f"comma-separated α values in [0, 1]: 0 keeps the stage, 1 removes it (default {DEFAULT_ALPHAS})",
    )
    p.add_argument("--kind", default="aa-linear", help="aa-linear (default), delta, aa-ggn or aa-hvp")
    p.add_argument("--max-drop", metavar="METRIC=VALUE", help="constraint: METRIC may drop by at most VALUE")
    p.add_argument("--min-value", metavar="METRIC=VALUE", help="constraint: METRIC must stay at least VALUE")
    p.add_argument("--lower-is-better", action="store_true", help="the constraint metric is a loss (lower is better)")
    p.add_argument("--objective", default="target", help="'target' (default) or a utility metric to optimise")
    p.add_argument(
        "--target-direction",
        choices=("decrease", "increase"),
        default="decrease",
        help="whether the intervention should lower the target behavior (default: decrease) or raise it (increase); "
        "α is chosen to move the target's mean that way",
    )
    p.add_argument(
        "--no-compare-delta",
        action="store_true",
        help="skip the θ_K − α·Δ_k comparison sweep (skipped anyway where v_k = Δ_k: the card says so)",
    )
    p.add_argument("--no-replay", action="store_true", help="skip the replay-without-stage model")
    p.add_argument("--no-save", action="store_true", help="only evaluate the sweep; save no model")
    p.add_argument(
        "--allow-identity-propagation",
        action="store_true",
        help="pass deltas unchanged through stages whose optimizer the propagation rules do not know",
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow code to run: spec files that import Python functions or evaluate modules, and models/tokenizers "
        "whose config names custom code (auto_map)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run)


def _pair(text: str | None, flag: str) -> tuple[str, float] | None:

    if text is None:
        return None
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise InterventionError(f"{flag} expects METRIC=VALUE (e.g. accuracy=1.0), got {text!r}.") from None


def _alphas(text: str) -> list[float]:

    parts = [t for t in text.replace(" ", "").split(",") if t]
    try:
        return [float(t) for t in parts]
    except ValueError:
        raise InterventionError(f"--alphas expects comma-separated numbers (e.g. 0.25,0.5,1), got {text!r}.") from None


def constraint_from_args(args: argparse.Namespace):

    drop, floor = _pair(args.max_drop, "--max-drop"), _pair(args.min_value, "--min-value")
    if drop is None and floor is None:
        return None
    if drop and floor and drop[0] != floor[0]:
        raise InterventionError(f"--max-drop and --min-value must name one metric, got {drop[0]!r} and {floor[0]!r}.")
    metric = (drop or floor)[0]
    return Constraint(
        metric,
        max_drop=drop[1] if drop else None,
        min_value=floor[1] if floor else None,
        higher_is_better=not args.lower_is_better,
    )


def _tokenizer(path: str, trust_code: bool = False):
    if not (Path(path) / "tokenizer_config.json").exists():
        return None
    return load_tokenizer(path, trust_code=trust_code)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output_dir)  # before the sweep: a file there would only fail at the end
    check_output_folder(Path(args.output_dir), args.overwrite, option="--overwrite")  # an earlier save, a foreign card
    alphas = check_alphas(_alphas(args.alphas))
    constraint = constraint_from_args(args)
    ledger = StageLedger.load(args.ledger_dir)
    resolve_stage(ledger, args.stage)  # a clear error before the (slow) model and data loading
    card_text = derived_card_text(args.model)  # a broken card fails here, not after the sweep
    trust = args.trust_code
    target, utilities = load_target(args.target, trust_code=trust), load_utilities(args.utility, trust_code=trust)
    model = load_cli_model(args.model, trust)
    options = {"allow_identity_propagation": True} if args.allow_identity_propagation else None
    console = Console(verbose=getattr(args, "verbose", False))
    main_process = is_main_process()  # rank 0 also on CPU under torchrun (a plain PartialState() saw one process)
    phase = console.phase(f"sweeping stage {args.stage} over {len(alphas)} scales") if main_process else None
    with phase or console.captured():  # a replayed Trainer's log dicts must not mix into the table or the JSON
        result = scale_stage(
            ledger, model, args.stage, alphas, args.kind, target=target, utilities=utilities, constraint=constraint,
            objective=args.objective, target_direction=args.target_direction, compare_delta=not args.no_compare_delta,
            replay=False if args.no_replay else None, embedding_options=options,
        )  # fmt: skip
    if not main_process:
        return 0
    out = Path(args.output_dir)
    saved = None
    if result.chosen is not None and not args.no_save:
        saved = result.save(
            out,
            tokenizer=_tokenizer(args.model, args.trust_code),
            card_text=card_text,
            derived_from=Path(args.model).resolve(),
            overwrite=args.overwrite,
        )
    else:
        save_sweep(result, out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({**result.to_dict(), "saved": saved.to_dict() if saved else None}, indent=2))
        return 0
    print(result.table())
    if saved is not None:
        check = f"; reloaded, max difference {saved.max_difference:.2g}" if saved.max_difference is not None else ""
        print(f"\nSaved the {saved.form} model (α={saved.alpha:g}, {saved.variant}) to {out}{check}.")
        for note in saved.notes:
            print(f"Note: {note}")
    else:
        why = "--no-save was given" if args.no_save and result.chosen is not None else "no α was chosen (see above)"
        print(f"\nNo model saved: {why}. The sweep is in {out / SWEEP_JSON} and {out / SWEEP_PLOT}.")
    return 0
