"""``hf-stage-attribution demo``: the whole idea on a laptop, offline, in a few minutes.

Two pipelines are trained on the spot and recorded: a language model (pretraining → SFT → LoRA → DPO on a
tiny GPT-2) and a digits classifier (3 stages, one of which introduces a spurious corner patch). Their behaviors
are attributed to stages with the default estimator, checked against replayed training, and written into
model cards. The console stays quiet: one progress bar (or, off a terminal, one line) per phase, the two effect
tables, the fidelity tables and where the cards are; ``--verbose`` shows the libraries' own logs too.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from ..attributor import StageAttributor
from ..errors import LedgerError
from ..model_card import write_model_card
from ..report.attribution import AttributionReport
from ..report.text import render_fidelity_table
from .commands import command_help
from .console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help=command_help("demo"),
        description="Run the offline demo: an LM pipeline and a digits classifier with a spurious feature.",
    )
    p.add_argument(
        "--output-dir",
        default="demo_output",
        help="where ledgers, models, reports and cards go (default: demo_output)",
    )
    p.add_argument("--size", choices=["tiny", "demo"], default="tiny", help="LM pipeline size (default: tiny)")
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="skip replay: no fidelity figures; the trust verdicts check the estimates against task-vector negation",
    )
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


def write_behavior_specs(specs: list[dict[str, Any]], path: Path) -> Path:
    """Write ``{"behaviors": specs}`` to ``path`` (the file ``attribute --behaviors`` reads), with tokenizer folders
    relative to it, so that the demo's output can be attributed again from the command line, and moved.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "model").mkdir()
        >>> spec = {"name": "t", "kind": "lm-toxicity-teacher-forced", "tokenizer": str(folder / "model"), "data": []}
        >>> written = write_behavior_specs([spec], folder / "behaviors.json")
        >>> json.loads(written.read_text())["behaviors"][0]["tokenizer"]
        'model'
    """
    portable = []
    for spec in specs:
        spec = dict(spec)
        tokenizer = spec.get("tokenizer")
        if isinstance(tokenizer, str) and Path(tokenizer).is_dir():  # resolved against the spec's folder when read
            spec["tokenizer"] = os.path.relpath(Path(tokenizer).resolve(), path.parent.resolve())
        portable.append(spec)
    lines = ",\n".join(" " + json.dumps(spec) for spec in portable)  # one behavior per line
    path.write_text('{"behaviors": [\n' + lines + "\n]}\n", encoding="utf-8")
    return path


def _next_commands(part: Path, ledger: Path, model: Path, spec: Path, how: str, extra: str = "") -> None:
    print(
        f"Run it again from the command line ({how}):\n"
        f"  hf-stage-attribution attribute {ledger} --model {model} --behaviors {spec} "
        f"--output-dir {part / 'report-cli'}{extra}",
        flush=True,
    )


#: The digits pipeline the demo builds (``build_spurious_digits(..., size="small")``, seed 0).
DIGITS_SIZE, DIGITS_SEED = "small", 0


@functools.lru_cache(maxsize=1)
def _digits_stages() -> dict[str, Any]:
    from ..examples.spurious_digits import make_stages  # the pipelines import transformers: not for `demo --help`

    return {s.name: s for s in make_stages(DIGITS_SIZE, DIGITS_SEED)[0]}


def _replay_digits(name: str, model: Any, max_steps: int | None, grad_every: int) -> tuple[Any, Any]:
    from ..examples.spurious_digits import train_stage

    return model, train_stage(model, _digits_stages()[name], max_steps=max_steps, grad_every=grad_every)


def digits_pretraining(model: Any, max_steps: int | None = None, grad_every: int = 1) -> tuple[Any, Any]:
    """The demo digits pipeline's stage ``pretraining`` as a stage function (``--stage-fn pretraining=...``)."""
    return _replay_digits("pretraining", model, max_steps, grad_every)


def digits_patch(model: Any, max_steps: int | None = None, grad_every: int = 1) -> tuple[Any, Any]:
    """The demo digits pipeline's stage ``patch`` as a stage function (``--stage-fn patch=...``)."""
    return _replay_digits("patch", model, max_steps, grad_every)


def digits_finetune(model: Any, max_steps: int | None = None, grad_every: int = 1) -> tuple[Any, Any]:
    """The demo digits pipeline's stage ``finetune`` as a stage function (``--stage-fn finetune=...``)."""
    return _replay_digits("finetune", model, max_steps, grad_every)


def digits_stage_fn_options() -> str:
    """The ``--trust-code --stage-fn STAGE=MODULE:FUNCTION`` options that give the command line the digits stages'
    training functions (the demo passes them in Python as ``stage_fns``).

    Example:
        >>> digits_stage_fn_options().split()[:2]
        ['--trust-code', '--stage-fn']
    """
    module = __name__
    fns = {"pretraining": "digits_pretraining", "patch": "digits_patch", "finetune": "digits_finetune"}
    return " --trust-code" + "".join(f" --stage-fn {stage}={module}:{fn}" for stage, fn in fns.items())


def _attribute(console: Console, attributor: StageAttributor, behaviors: dict, validate: bool) -> AttributionReport:
    what = "estimates and replay" if validate else "estimates"
    with console.phase(f"attributing {len(behaviors)} behaviors ({what})") as phase:
        report = attributor.attribute(behaviors, validate=validate)
        phase.note = f"estimator {report.estimator}"
    return report


def run_lm(out: Path, size: str, validate: bool, console: Console | None = None) -> Path:
    from ..examples.lm_pipeline import build_lm_pipeline

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
    spec = write_behavior_specs(pipe.behavior_specs, out / "lm" / "behaviors.json")
    _next_commands(out / "lm", pipe.ledger_dir, pipe.model_dir, spec, "`validate` with the same arguments adds replay")
    return readme


def run_digits(out: Path, size: str, validate: bool, console: Console | None = None) -> Path:
    from ..examples.spurious_digits import build_spurious_digits, demo_behaviors

    console = console or Console()
    _section("Digits classifier: pretraining -> patch (a spurious corner patch on every 7) -> finetune")
    with console.phase("training 3 stages", total=3) as phase:
        pipe = build_spurious_digits(
            out / "digits", size=DIGITS_SIZE, seed=DIGITS_SEED, on_stage_end=lambda stage: phase.update()
        )
        phase.note = f"ledger: {pipe.ledger_dir}"
    behaviors = demo_behaviors(pipe)
    # with these stage functions the default check of the estimate is replay itself: without validate, the cheap one
    second_opinion = "auto" if validate else "delta-fd"
    attributor = StageAttributor(
        pipe.ledger_dir, pipe.model, stage_fns=pipe.stage_fns, show_progress=False, second_opinion=second_opinion
    )
    report = _attribute(console, attributor, behaviors, validate)
    readme = pipe.model_dir / "README.md"
    _publish(report, out / "digits" / "report", readme)
    spec = write_behavior_specs([b.to_spec() for b in behaviors.values()], out / "digits" / "behaviors.json")
    how = (
        "these stages have no replay data: --stage-fn passes their training functions, as the demo did in Python, "
        "so the estimates match the demo's; with them `attribute` checks the estimates against replay itself, as "
        "`validate` does (`--second-opinion delta-fd`: the cheap check, without replay)"
    )
    _next_commands(out / "digits", pipe.ledger_dir, pipe.model_dir, spec, how, digits_stage_fn_options())
    return readme


def check_fresh_output(out: Path, parts: list[str]) -> None:
    """LedgerError, before any training, when ``out`` is a file or already holds a demo run (``out/lm`` or
    ``out/digits`` not empty): the demo never writes over nor deletes earlier output.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_fresh_output(folder, ["lm", "digits"])  # an empty folder is fine
        >>> (folder / "digits").mkdir(); _ = (folder / "digits" / "x").write_text("")
        >>> check_fresh_output(folder, ["lm"])  # only the parts that will run are checked
    """
    if out.exists() and not out.is_dir():
        raise LedgerError(
            f"Expected --output-dir to be a directory (new or empty), found a file at {out}. Pass another "
            "--output-dir; nothing was trained."
        )
    used = [
        part for part in parts if (out / part).exists() and (not (out / part).is_dir() or any((out / part).iterdir()))
    ]
    if used:
        found = " and ".join(f"{out / part}" for part in used)
        raise LedgerError(
            f"Expected --output-dir {out} to hold no earlier demo run, found {found} from a previous run. Pass a new "
            f"--output-dir (e.g. --output-dir {out}-2), or delete {found} yourself to run it again there; nothing "
            "was trained or changed."
        )


def process_start() -> float | None:
    """When this process started (seconds since the epoch; Linux ``/proc``), so that "Done in" counts the start-up
    and imports too; None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started_ago = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - started_ago


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    check_fresh_output(out, [part for part in ("lm", "digits") if args.only in (None, part)])
    console = Console(verbose=getattr(args, "verbose", False))
    t0 = process_start() or time.time()
    cards = []
    if args.only in (None, "lm"):
        cards.append(run_lm(out, args.size, not args.no_validate, console))
    if args.only in (None, "digits"):
        cards.append(run_digits(out, args.size, not args.no_validate, console))
    _section(f"Done in {time.time() - t0:.0f}s")
    for card in cards:
        print(f"model card: {card}")
    return 0
