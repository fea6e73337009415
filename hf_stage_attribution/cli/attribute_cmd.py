"""``hf-stage-attribution attribute`` and ``validate``: ledger + model + behavior spec → report directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..attributor import HALF_PRECISION_MODES, StageAttributor
from ..behaviors import load_specs
from ..behaviors.custom import import_callable
from ..errors import ReplayError, ReportError
from ..estimators import names as estimator_names
from ..estimators.curvature.config import CurvatureConfig
from ..estimators.second_opinion import SECOND_OPINIONS
from ..integrations.model_loading import load_model, model_load_errors
from ..ledger import StageLedger
from ..report import REPORT_FORMAT
from ..report.files import atomic_write_bytes
from ..report.text import render_fidelity_table
from .commands import command_help
from .console import Console


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledger_dir", metavar="LEDGER_DIR", help="directory holding ledger.json")
    p.add_argument("--model", required=True, help="the final model's directory (save_pretrained output or adapter)")
    p.add_argument("--behaviors", required=True, metavar="SPEC", help="YAML/JSON file with a list under 'behaviors'")
    p.add_argument("--output-dir", required=True, help="where report.json, report.md and plot.png are written")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace report.json, report.md and plot.png in --output-dir even when they are not an earlier "
        "report of this package (an earlier report there is always replaced)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument(
        "--stages",
        nargs="*",
        default=None,
        metavar="STAGE",
        help="only these stages (names or indices), space- or comma-separated: '--stages sft,dpo' or "
        "'--stages sft dpo'; the space-separated form takes every word after it, so put it after LEDGER_DIR",
    )
    p.add_argument("--no-diagnostics", action="store_true", help="skip f(θ_0) and the linearisation gap")
    p.add_argument(
        "--second-opinion",
        default="auto",
        choices=list(SECOND_OPINIONS),
        help="what the trust verdicts check the estimate against: 'auto' (replay itself for a replaying estimate "
        "where every later stage can be re-run, as 'validate' does; else task-vector negation), 'delta-fd' (the "
        "cheap check, no replay), 'replay' (wherever it can run), or a replay family at the same budget (as long "
        "as replay itself or longer)",
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow code to run: behavior specs that import Python functions ('custom' kind, callable scorers) "
        "or evaluate modules, and models/tokenizers whose config names custom code (auto_map)",
    )
    p.add_argument(
        "--curvature-preset",
        default=None,
        choices=["default", "cheap"],
        help="settings of aa-ggn/aa-hvp: 'cheap' = one curvature segment per later stage and 8 Krylov vectors",
    )
    p.add_argument(
        "--krylov-size",
        type=int,
        default=None,
        help="Krylov vectors per curvature segment of aa-ggn/aa-hvp (memory: one float64 model-sized vector each)",
    )
    p.add_argument("--curvature-segments", type=int, default=None, help="aa-ggn/aa-hvp: segments used per later stage")
    p.add_argument(
        "--curvature-sample-size", type=int, default=None, help="aa-ggn/aa-hvp: examples per segment's products"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="partial-replay (auto's choice where stages can be replayed) and strided-replay: fraction of replay's "
        "optimizer steps (strided-replay: forward/backward passes) to spend, in [0, 1] (default 0.25; 0 = aa-fd, "
        "1 = replay)",
    )
    p.add_argument(
        "--factual",
        choices=["replay", "interpolated"],
        default=None,
        help="partial-replay: replay the factual branch too (default), or read it off the recorded stage delta "
        "scaled by the learning-rate mass of the replayed steps and spend the whole budget on the counterfactual "
        "branch (opt-in: better on some pipelines, worse on others, BENCHMARKS.md section 8)",
    )
    p.add_argument(
        "--ref-model",
        action="append",
        default=[],
        metavar="STAGE=PATH",
        help="the reference model a DPO/KTO stage trained against (a distillation stage: its teacher), where "
        "replay cannot rebuild it (repeatable)",
    )
    p.add_argument(
        "--half-precision",
        choices=list(HALF_PRECISION_MODES),
        default="float32-copy",
        help="a model with bf16/fp16 weights: evaluate it on a float32 copy (default; one float32 model of memory "
        "more) or in its own dtype ('native': no copy, rounding noise in the estimates, said in the report)",
    )
    p.add_argument(
        "--stage-fn",
        action="append",
        default=[],
        metavar="STAGE=MODULE:FUNCTION",
        help="a function that re-trains a stage as it was trained (Python API: stage_fns; the forms are in the "
        "README), for replay and partial replay of a stage without replay data; needs --trust-code (repeatable, one "
        "per stage)",
    )
    p.add_argument(
        "--reward-func",
        action="append",
        default=[],
        metavar="STAGE=MODULE:FUNCTION",
        help="a reward function of a GRPO/RLOO/OnlineDPO stage, which replay needs and no ledger holds: an importable "
        "function (needs --trust-code) or STAGE=PATH of a reward model folder; repeat it for each of the stage's "
        "reward functions, in the order its trainer took them",
    )
    p.add_argument(
        "--loss-fn",
        action="append",
        default=[],
        metavar="STAGE=MODULE:FORWARD,LOSS",
        help="a stage's training loss for the curvature estimators (aa-ggn, aa-hvp), which a custom loop's ledger "
        "does not keep: MODULE:FORWARD,LOSS names forward(model, batch) -> outputs and loss(outputs, batch) -> scalar "
        "(Gauss-Newton needs the pair), MODULE:FUNCTION one f(model, batch) -> scalar (aa-hvp only); it replaces a "
        "recorded loss; needs --trust-code (Python API: loss_fns; repeatable, one per stage)",
    )
    p.add_argument(
        "--allow-identity-propagation",
        action="store_true",
        help="pass deltas unchanged through stages whose optimizer the propagation rules do not know",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attribute",
        help=command_help("attribute"),
        description="Estimate each stage's effect on each behavior (positive = the stage raised it).",
    )
    _common(p)
    p.add_argument(
        "--estimator",
        default="auto",
        help=f"estimator name, one of: {', '.join(estimator_names())} (default: auto, which picks one and says why)",
    )
    p.set_defaults(func=run, validate=False)
    v = sub.add_parser(
        "validate",
        help=command_help("validate"),
        description="Run the estimator and replay (the ground truth) and print fidelity figures.",
    )
    _common(v)
    v.add_argument(
        "--estimator",
        default="auto",
        help=f"estimator to validate, one of: {', '.join(estimator_names())} (default: auto)",
    )
    v.set_defaults(func=run, validate=True)


def curvature_config(args: argparse.Namespace) -> CurvatureConfig | None:
    """The ``CurvatureConfig`` the curvature flags ask for (``None`` when none is given: the estimator's default)."""
    flags = {
        "krylov_size": args.krylov_size,
        "max_segments": args.curvature_segments,
        "sample_size": args.curvature_sample_size,
    }
    if args.curvature_preset is None and all(v is None for v in flags.values()):
        return None
    return CurvatureConfig.from_preset(args.curvature_preset or "default", **flags)


def _stages(values: list[str] | None) -> list[int | str] | None:
    """``--stages`` as names and indices: space- and comma-separated words, in order, without empty items.

    Example:
        >>> _stages(["sft,dpo", "3"])
        ['sft', 'dpo', 3]
    """
    if values is None:
        return None
    words = [w.strip() for v in values for w in v.split(",") if w.strip()]
    if not words:
        raise ReportError(
            "Expected --stages to name at least one stage (names or indices, e.g. --stages sft,dpo), found none. "
            "Name the stages, or leave --stages out to attribute every stage."
        )
    return [int(w) if w.isdigit() else w for w in words]


def check_output_dir(path: str | Path) -> Path:
    """``--output-dir`` as a Path, refused before any work when it (or a folder above it) is an existing file.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_output_dir(folder / "new" / "report") == folder / "new" / "report"
        True
    """
    out = Path(path)
    for candidate in (out, *out.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "is" if candidate == out else f"is under {candidate}, which is"
            raise ReportError(
                f"Expected --output-dir to be a directory (existing or new), but {out} {where} an existing file. "
                "Pass another --output-dir; nothing was computed or written."
            )
        if candidate.is_dir():
            break
    return out


#: what ``attribute``/``validate`` write into ``--output-dir``
REPORT_FILES = ("report.json", "report.md", "plot.png")


def check_report_files(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``--output-dir`` whose ``report.json``/``report.md``/``plot.png`` are not an earlier
    report of this package (its ``report.json`` has the package's report format): a rerun replaces its own report,
    never files someone else wrote there, unless ``overwrite``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()); _ = (folder / "report.md").write_text("my notes")
        >>> try:
        ...     check_report_files(folder)
        ... except ReportError as err:
        ...     print(str(err).split(":")[0])
        Expected --output-dir to hold no report files or an earlier hf-stage-attribution report
        >>> check_report_files(folder, overwrite=True)
    """
    if overwrite or not out.is_dir():
        return
    present = [name for name in REPORT_FILES if (out / name).exists()]
    if not present:
        return
    why = _not_a_report(out / "report.json")
    if why is None:
        return  # an earlier run of attribute/validate: replaced as a whole
    raise ReportError(
        "Expected --output-dir to hold no report files or an earlier hf-stage-attribution report: "
        f"{out} holds {', '.join(present)}, and {why}. Pass another --output-dir, or --overwrite to replace "
        f"{', '.join(present)}; nothing was computed or written."
    )


def _not_a_report(path: Path) -> str | None:
    """Why ``path`` is not a report.json this package wrote (``None`` when it is one)."""
    if not path.exists():
        return "no report.json says they are an earlier report"
    if not path.is_file():
        return "report.json there is not a file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "its report.json is not JSON"
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        return "its report.json is not an hf-stage-attribution report"
    return None


def load_cli_model(path: str | Path, trust_code: bool = False) -> Any:
    """The final model of ``--model``: what :func:`~hf_stage_attribution.integrations.model_loading.load_model`
    reads (a transformers or PEFT folder), or the package's example ``DigitsMLP`` (``demo``, the ``spurious_digits``
    recipe), which is not a transformers class; an unreadable folder raises the one-line ModelMismatchError."""
    from ..examples.spurious_digits_model import MODEL_TYPE, DigitsMLP  # transformers: not for `attribute --help`

    config = Path(path) / "config.json"
    with model_load_errors(path):
        if config.exists() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE:
            return DigitsMLP.from_pretrained(path, use_safetensors=True)
        return load_model(path, trust_code=trust_code)


def stage_item(item: str, form: str, need: str = "") -> tuple[str, str]:
    """``(stage, value)`` of a ``STAGE=VALUE`` option (``--ref-model``, ``--reward-func``, ``--stage-fn``,
    ``--loss-fn``); a ReplayError naming ``form`` (the option and what it takes) when either side is empty or ``need``
    is not in the value.

    Example:
        >>> stage_item("dpo=models/ref", "--ref-model STAGE=PATH")
        ('dpo', 'models/ref')
    """
    stage, sep, value = item.partition("=")
    if not sep or not stage or not value or need not in value:
        raise ReplayError(f"Expected {form}, got {item!r}.")
    return stage, value


def reward_functions(items: list[str], trust_code: bool = False) -> dict[str, list[Any]]:
    """``{stage: [reward function, ...]}`` from ``--reward-func STAGE=MODULE:FUNCTION`` (imported, with
    ``trust_code``) or ``STAGE=PATH`` of a reward model folder (passed on as its path, which the TRL trainer loads as
    it loads a reward model named by path), in the order given.

    Example:
        >>> reward_functions(["rl=operator:length_hint", "rl=operator:not_"], trust_code=True)
        {'rl': [<built-in function length_hint>, <built-in function not_>]}
    """
    out: dict[str, list[Any]] = {}
    for item in items:
        stage, value = stage_item(item, "--reward-func STAGE=MODULE:FUNCTION (or STAGE=PATH of a reward model folder)")
        if Path(value).is_dir():
            out.setdefault(stage, []).append(str(Path(value)))
            continue
        if ":" not in value:
            raise ReplayError(
                f"--reward-func {item!r}: {value!r} is neither a folder here nor an importable "
                "'package.module:function'. Give the function's import path, or the reward model's folder."
            )
        source = f"--reward-func {item!r}"
        out.setdefault(stage, []).append(import_callable(value, trust_code, what="reward function", source=source))
    return out


def stage_functions(items: list[str], trust_code: bool = False) -> dict[str, Any]:
    """``{stage: function}`` from ``--stage-fn STAGE=MODULE:FUNCTION`` (imported, only with ``trust_code``).

    Example:
        >>> fns = stage_functions(["sft=copy:deepcopy"], trust_code=True)
        >>> {name: fn.__name__ for name, fn in fns.items()}
        {'sft': 'deepcopy'}
    """
    out: dict[str, Any] = {}
    for item in items:
        stage, value = stage_item(item, "--stage-fn STAGE=MODULE:FUNCTION", need=":")
        if stage in out:
            raise ReplayError(f"--stage-fn names stage {stage!r} twice; give each stage one function.")
        out[stage] = import_callable(value, trust_code, what="stage function", source=f"--stage-fn {item!r}")
    return out


def loss_functions(items: list[str], trust_code: bool = False) -> dict[str, Any]:
    """``{stage: (forward, loss)}`` from ``--loss-fn STAGE=MODULE:FORWARD,LOSS``, or ``{stage: f}`` from
    ``STAGE=MODULE:FUNCTION`` (imported, only with ``trust_code``).

    Example:
        >>> fns = loss_functions(["sft=operator:getitem,truediv", "dpo=operator:sub"], trust_code=True)
        >>> [f.__name__ for f in fns["sft"]], fns["dpo"].__name__
        (['getitem', 'truediv'], 'sub')
    """
    form = "--loss-fn STAGE=MODULE:FORWARD,LOSS (or STAGE=MODULE:FUNCTION)"
    out: dict[str, Any] = {}
    for item in items:
        stage, value = stage_item(item, form, need=":")
        module, _, names = value.partition(":")
        parts = names.split(",")
        if len(parts) > 2 or not all(parts):
            raise ReplayError(f"Expected {form}, got {item!r}.")
        if stage in out:
            raise ReplayError(f"--loss-fn names stage {stage!r} twice; give each stage one loss.")
        source = f"--loss-fn {item!r}"
        fns = tuple(import_callable(f"{module}:{n}", trust_code, what="loss function", source=source) for n in parts)
        out[stage] = fns if len(fns) == 2 else fns[0]
    return out


def run(args: argparse.Namespace) -> int:
    out = check_output_dir(args.output_dir)  # before the ledger, the model and the (long) attribution
    check_report_files(out, overwrite=args.overwrite)
    stages = _stages(args.stages)
    ledger = StageLedger.load(args.ledger_dir)
    behaviors = load_specs(args.behaviors, trust_code=args.trust_code)
    model = load_cli_model(args.model, trust_code=args.trust_code)
    options: dict = {"allow_identity_propagation": True} if args.allow_identity_propagation else {}
    if args.budget is not None:
        options["budget"] = args.budget
    if args.factual is not None:
        options["factual"] = args.factual
    ref_models = {}
    for item in args.ref_model:
        stage, path = stage_item(item, "--ref-model STAGE=PATH")
        ref_models[stage] = load_model(path, trust_code=args.trust_code)
    reward_funcs = reward_functions(args.reward_func, trust_code=args.trust_code)
    stage_fns = stage_functions(args.stage_fn, trust_code=args.trust_code)
    loss_fns = loss_functions(args.loss_fn, trust_code=args.trust_code)
    console = Console(verbose=getattr(args, "verbose", False))
    attributor = StageAttributor(
        ledger,
        model,
        estimator=args.estimator,
        stage_fns=stage_fns,
        diagnostics=not args.no_diagnostics,
        estimator_options=options,
        curvature=curvature_config(args),
        show_progress=False,
        ref_models=ref_models,
        second_opinion=args.second_opinion,
        reward_funcs=reward_funcs,
        loss_fns=loss_fns,
        half_precision=args.half_precision,
    )
    what = "estimates and replay" if args.validate else "estimates"
    main_process = attributor.state.is_main_process
    phase = console.phase(f"attributing {len(behaviors)} behaviors ({what})") if main_process else console.captured()
    with phase as progress:
        report = attributor.attribute(behaviors, stages=stages, validate=args.validate)
        if main_process and report.fidelity and not args.validate:  # the default check of a replaying estimate
            progress.note = "replay ran as the check of the estimates (--second-opinion delta-fd: the cheap check)"
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        report.to_json(out / "report.json")
        atomic_write_bytes(out / "report.md", report.to_markdown().encode("utf-8"))
        report.plot(out / "plot.png")
        if args.json:
            print(report.to_json())  # every row carries its replay value (replay_effect) where replay ran
        else:
            print(report.table())
            if report.fidelity:  # validate, or replay as the default check of a replaying estimate
                print("\nFidelity against replay:\n" + render_fidelity_table(report))
            print(f"\nReport written to {out}/report.json (markdown: report.md, plot: plot.png)")
    return 0
