"""``write_model_card``: the stage-attribution section, YAML keys, sidecar JSON and plot of a model card.

The section is rendered from ``section.md.jinja`` (package data) and placed between stable HTML-comment markers;
the YAML key ``stage_attribution`` is read and checked with huggingface_hub's ``ModelCard``/``ModelCardData``.
All files are computed in memory and validated before anything is written; each write is atomic.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import yaml

from .._internal.distributed import is_main_process
from .._internal.notices import harmless_log_messages_dropped
from ..errors import ModelCardError, ReportError
from ..report.attribution import AttributionReport
from ..report.files import atomic_write_bytes
from ..report.plot import plot_png_bytes
from ..report.schema import REPORT_FORMAT
from ..report.text import (
    SIGN_CONVENTION,
    behavior_view,
    claimed_top_stage,
    coverage_note,
    data_label,
    direction_word,
    escape_markdown,
    fidelity_view,
    fmt_lr,
    has_interval,
    interval_label,
    replay_checked,
    replay_hint,
    replay_note,
    replay_tie,
    stage_coverage,
    unsettled_sign_reasons,
)
from .card_text import (
    METADATA_KEY,
    SECTION_BEGIN,
    SECTION_END,
    splice_metadata,
    splice_section,
    split_card,
    strip_attribution,
)
from .weights import WeightsCheck, check_card_weights, require_attributed_weights, weights_note

SIDECAR_NAME = "stage_attribution.json"
PLOT_NAME = "stage_attribution.png"
TEMPLATE_NAME = "section.md.jinja"


@dataclass
class ModelCardFiles:
    """What :func:`write_model_card` wrote (``plot`` is None with ``plot=False``) and where it pushed.

    Example:
        >>> ModelCardFiles(Path("m/README.md"), Path("m/stage_attribution.json"), None).pushed is None
        True
    """

    readme: Path
    sidecar: Path
    plot: Path | None
    pushed: str | None = None
    #: what the weights beside the card were found to be (None: no weight file there, or a report without digests)
    weights: WeightsCheck | None = None


def read_card(path: str | Path) -> str:
    """The text of the card at ``path``, read as bytes so that its line endings stay as they are;
    :class:`ModelCardError` when it is not UTF-8 (nothing is changed)."""
    readme = Path(path)
    try:
        return readme.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelCardError(
            f"Expected {readme} to be UTF-8 text, it is not ({exc}); the README was not changed."
        ) from exc


def derived_card_text(model_dir: str | Path) -> str | None:
    """The card of ``model_dir`` (its ``README.md``, or the card file itself when a file is given) for a model derived
    from it (an intervention): the user's own text and YAML kept
    byte for byte, the stage-attribution section and its ``stage_attribution`` key removed (they describe the source
    model's weights, and their sidecar files are not copied). None without a README, or when nothing but ours was in
    it (the derived model then keeps the card ``save_pretrained`` wrote, if any).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "README.md").write_text("---\\nlicense: mit\\nstage_attribution: {}\\n---\\n# Mine\\n")
        >>> derived_card_text(folder)
        '---\\nlicense: mit\\n---\\n# Mine\\n'
    """
    card = Path(model_dir) if Path(model_dir).is_file() else Path(model_dir) / "README.md"
    return (strip_attribution(read_card(card)) or None) if card.is_file() else None


def _safe_code(text: Any) -> str:
    value = str(text)
    return f"`{value}`" if value and all(c.isalnum() or c in "._:-" for c in value) else escape_markdown(value)


def model_link(source: dict[str, Any] | None) -> str:
    """Escaped markdown naming a stage's source model: a link to the Hub repo (at its revision) or the local path.

    Example:
        >>> model_link({"model": "org/base", "location": "hub", "revision": "v1"})
        '[org/base](https://huggingface.co/org/base/tree/v1) (revision v1)'
        >>> model_link(None)
        ''
    """
    if not source or not source.get("model"):
        return ""
    model, revision = str(source["model"]), source.get("revision")
    if source.get("location") == "hub" and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        url = f"https://huggingface.co/{model}" + (f"/tree/{quote(str(revision), safe='')}" if revision else "")
        text = f"[{escape_markdown(model)}]({url})"
    else:
        text = f"local folder {_safe_code(model)}"
    return text + (f" (revision {escape_markdown(revision)})" if revision else "")


def render_section(
    report: AttributionReport, plot_name: str | None = PLOT_NAME, sidecar: str = SIDECAR_NAME,
    weights_note: str | None = None,
) -> str:  # fmt: skip
    """The card section (markers included, ``\\n`` line breaks) rendered from the package's Jinja template;
    ``weights_note`` (:func:`~.weights.weights_note`) is shown under the heading, in bold."""
    from importlib.resources import files

    source = files("hf_stage_attribution.model_card").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    stages = [
        {
            "index": s.index,
            "name": escape_markdown(s.name),
            "kind": escape_markdown(s.kind),
            "steps": "n/a" if s.num_steps is None else str(s.num_steps),
            "optimizer": escape_markdown(s.optimizer or "not recorded"),
            "lr": fmt_lr(s.lr_min, s.lr_max),
            "data": escape_markdown(data_label(s.data)),
            "source": model_link(s.source),
        }
        for s in sorted(report.stages, key=lambda s: s.index)
    ]
    led = report.ledger or {}
    ledger = ", ".join(
        f"{label} {_safe_code(led[key])}"
        for key, label in (
            ("name", "directory"),
            ("fingerprint", "fingerprint"),
            ("final_hash", "final parameters hash"),
        )
        if led.get(key)
    )
    versions = ", ".join(f"{escape_markdown(k)} {escape_markdown(v)}" for k, v in report.versions.items())
    text = env.from_string(source).render(
        sign_convention=SIGN_CONVENTION,
        coverage=coverage_note(report),
        stages=stages,
        stage_sources=any(s["source"] for s in stages),
        start=model_link(led.get("start_source")),
        ledger=ledger or "not recorded",
        estimator=_safe_code(report.estimator),
        reason=escape_markdown(report.estimator_reason),
        interval=escape_markdown(interval_label(report)),
        behaviors=[behavior_view(report, b.name) for b in report.behaviors],
        approximations=[escape_markdown(a) for a in report.approximations],
        fidelity=fidelity_view(report),
        replay_hint=replay_hint(report),
        replay_note=replay_note(report),
        plot=plot_name,
        confidence=f"{float((report.interval or {}).get('confidence', 0.95)) * 100:g} %",
        sidecar=sidecar,
        versions=versions or "versions not recorded",
        weights_note=escape_markdown(weights_note) if weights_note else None,
    )
    lines = [line.rstrip() for line in text.strip().split("\n")]
    return "\n".join([SECTION_BEGIN, *lines, SECTION_END])


def card_metadata(report: AttributionReport, plot_name: str | None = PLOT_NAME) -> dict[str, Any]:
    """The ``stage_attribution`` YAML value: estimator, ledger identity, the stages (machine-readable, with the
    Hub/local model each was imported from), top stage per behavior with its direction, file names.

    Where replay ran for every stage, ``top_stage`` and ``direction`` are replay's (the measured answer) and
    ``estimated_top_stage`` names the estimate's when it differs, ``top_stage_tied_with`` replay's runner-up where
    replay's own examples do not separate it from ``top_stage``; ``top_stage_effect``, ``ci_low``/``ci_high`` are the
    estimate for that stage (no interval keys for one example). A behavior no stage moved has no ``top_stage``.
    ``direction`` is ``not settled`` (``direction_not_settled_because`` says why) where the prose withholds the sign:
    no replay value, and another estimator gives the other sign or a size more than 2-fold off, or the interval
    includes 0.
    Where only some of the ledger's stages were attributed, ``stages_not_attributed`` names the others and each
    behavior's ``top_stage_not_compared_with`` those its top stage was not compared with.

    Counterfactual effects are not results of the model, so none of them goes into ``model-index``."""
    behaviors = []
    for summary in report.behaviors:
        entry: dict[str, Any] = {"name": summary.name, "unit": summary.unit}
        top = claimed_top_stage(report, summary.name)
        if top is None:
            entry["direction"] = direction_word(0.0)
            entry["top_stage_trust"] = report.trust(summary.name)["verdict"]
            behaviors.append(entry)
            continue
        row = next(r for r in report.rows_for(summary.name) if r.stage == top)
        entry.update({"top_stage": top, "top_stage_effect": row.effect})
        estimated = report.top_stage(summary.name)
        if estimated != top:
            entry["estimated_top_stage"] = estimated
        entry["direction"] = direction_word(row.effect if row.replay_effect is None else row.replay_effect)
        unsettled = unsettled_sign_reasons(report, summary.name).get(top)  # replay's sign is settled
        if unsettled:  # the prose withholds the sign (another estimator's sign or size, an interval across 0)
            entry.update({"direction": "not settled", "direction_not_settled_because": unsettled})
        if has_interval(row):
            entry.update({"ci_low": row.ci_low, "ci_high": row.ci_high})
        entry["top_stage_trust"] = report.trust(summary.name)["verdict"]
        if row.replay_effect is not None:
            entry["top_stage_replay_effect"] = row.replay_effect
        tie = replay_tie(report, summary.name)
        if tie is not None:  # replay's own examples do not separate its top two: the other one moved it about as much
            entry["top_stage_tied_with"] = tie[1]
        cover = stage_coverage(report, summary.name)
        if cover is not None:  # the top stage is the top of the attributed stages only
            entry["top_stage_not_compared_with"] = cover["left_out"]
        behaviors.append(entry)
    stages = []
    for s in sorted(report.stages, key=lambda s: s.index):
        stage: dict[str, Any] = {"index": s.index, "name": s.name, "kind": s.kind}
        if s.num_steps is not None:
            stage["num_steps"] = s.num_steps
        if s.source:
            stage["source"] = dict(s.source)
        stages.append(stage)
    ledger = report.ledger or {}
    meta = {
        "library_version": report.versions.get("hf-stage-attribution"),
        "estimator": report.estimator,
        "ledger_fingerprint": ledger.get("fingerprint"),
        "ledger_final_hash": ledger.get("final_hash"),
        "start_source": dict(ledger["start_source"]) if ledger.get("start_source") else None,
        "stages": stages,
        "stages_not_attributed": (stage_coverage(report) or {}).get("left_out"),
        "behaviors": behaviors,
        "replay_validated": replay_checked(report),  # fidelity figures, or replay values beside every estimate
        "report": SIDECAR_NAME,
        "plot": plot_name,
    }
    for entry in behaviors:
        if not entry["unit"]:
            del entry["unit"]
    return {k: v for k, v in meta.items() if v is not None}


#: The values the Hub accepts for ``base_model_relation``.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def hub_provenance(report: AttributionReport) -> dict[str, str]:
    """``{"base_model", "base_model_relation": "finetune"}`` when the ledger's start (θ_0) was imported from a Hub
    repo (every stage trained from it), else ``{}``. A local start is named in the card text instead (the Hub only
    links Hub repos). The writer adds these keys only to a card that has no ``base_model`` yet.

    Example:
        >>> from hf_stage_attribution.report import AttributionReport
        >>> r = AttributionReport.build({"b": {"sft": [1.0]}}, estimator="x", versions={},
        ...     ledger={"start_source": {"model": "org/base", "location": "hub", "revision": "main"}})
        >>> hub_provenance(r)
        {'base_model': 'org/base', 'base_model_relation': 'finetune'}
    """
    start = (report.ledger or {}).get("start_source") or {}
    if start.get("location") != "hub" or not start.get("model"):
        return {}
    return {"base_model": str(start["model"]), "base_model_relation": "finetune"}


def _other_ledger(recorded: Any, report: AttributionReport) -> tuple[str, Any, Any] | None:
    """``(key, recorded value, this report's)`` for the first of ``fingerprint``/``final_hash`` that ``recorded``
    (a ``{key: value}`` of a card or a report written earlier) gives and the report's ledger does not match."""
    if not isinstance(recorded, dict):
        return None
    ours = report.ledger or {}
    for key in ("fingerprint", "final_hash"):
        theirs = recorded.get(key)
        if theirs and theirs != ours.get(key):
            return key, theirs, ours.get(key)
    return None


def _check_same_ledger(existing: Any, report: AttributionReport, readme: Path) -> None:
    if not isinstance(existing, dict):
        return
    found = _other_ledger({k: existing.get(f"ledger_{k}") for k in ("fingerprint", "final_hash")}, report)
    if found:
        key, theirs, ours = found
        raise ReportError(
            f"The card {readme} records {METADATA_KEY}.ledger_{key} = {theirs!r}, but the report is for {ours!r}: the "
            "report belongs to a different ledger/model. Use the report of this model's ledger, or pass "
            "`overwrite=True` (CLI: --overwrite) to replace it; the card was not changed."
        )


def _check_sidecars(folder: Path, report: AttributionReport, plot: bool, readme: Path) -> None:
    """ModelCardError (unless ``overwrite``, checked by the caller) when ``stage_attribution.json`` or ``.png`` in
    ``folder`` would replace a file the writer did not write for this ledger: a JSON that is not a stage-attribution
    report, the report of another ledger (another card in the same folder links to it), or a plot without our
    report beside it. The plot is always written with the report, so a report of this ledger vouches for it."""
    sidecar, png = folder / SIDECAR_NAME, folder / PLOT_NAME
    ours = False
    if sidecar.exists():
        try:
            existing = json.loads(sidecar.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            existing = None
        if not isinstance(existing, dict) or existing.get("format") != REPORT_FORMAT:
            raise ModelCardError(
                f"Expected {sidecar} to be absent or a stage-attribution report written by this package (the card "
                f"links its report under that name), found another file there. Move it away, or pass "
                f"`overwrite=True` (CLI: --overwrite) to replace it; nothing was written."
            )
        found = _other_ledger(existing.get("ledger"), report)
        if found:
            key, theirs, ours_value = found
            raise ModelCardError(
                f"Expected {sidecar} to be absent or this ledger's report, found the report of another ledger "
                f"(ledger {key} {theirs!r}, this report's {ours_value!r}): another card in {folder} may link to it. "
                f"Write {readme.name} in its own folder, or pass `overwrite=True` (CLI: --overwrite) to replace the "
                "report and plot; nothing was written."
            )
        ours = True
    if plot and png.exists() and not ours:
        raise ModelCardError(
            f"Expected {png} to be absent or the plot of this ledger's report, found a plot with no "
            f"{SIDECAR_NAME} of this package beside it. Move it away, or pass `overwrite=True` (CLI: --overwrite) "
            "to replace it; nothing was written."
        )


def _model_card(text: str) -> Any:
    """huggingface_hub's ``ModelCard(text)``, without its log line about a README that has no front matter yet."""
    from huggingface_hub import ModelCard

    with harmless_log_messages_dropped():
        return ModelCard(text)


def _parse_card(content: str, readme: Path) -> dict[str, Any]:
    """The YAML of a valid card, checked with huggingface_hub's ModelCard; ModelCardError otherwise."""
    parts = split_card(content)
    try:
        _model_card(content[len(parts.bom) :])
        data = yaml.safe_load(parts.yaml_text) if parts.yaml_start is not None else {}
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise ModelCardError(
            f"Expected {readme} to be a model card (markdown with optional valid YAML front matter), but its front "
            f"matter does not parse: {str(exc).splitlines()[0]}. Fix the YAML; the README was not changed."
        ) from exc
    return data or {}


_SECTION_HEADING = re.compile(
    r"^[ \t]{0,3}#{1,6}[ \t]+Accountability:[ \t]*training-stage attribution[ \t#]*$", re.M | re.I
)


def _check_no_unmarked_section(body: str, readme: Path) -> None:
    """ModelCardError when the body has our heading but none of our markers (written by hand, or the markers were
    removed): appending a second section would show the heading twice, and replacing text we did not write could
    lose the author's words, so the writer refuses and says how to go on."""
    if SECTION_BEGIN in body or SECTION_END in body:
        return
    match = _SECTION_HEADING.search(body)
    if match:
        line = body.count("\n", 0, match.start()) + 1
        raise ModelCardError(
            f"Expected {readme} to have no 'Accountability: training-stage attribution' heading outside the "
            f"writer's markers, found one without them (line {line} of the body: {match.group(0).strip()!r}). "
            f"Delete or rename that section, or put '{SECTION_BEGIN}' before it and '{SECTION_END}' after it so "
            "the writer replaces it; the README was not changed."
        )


def compose_card(
    content: str, report: AttributionReport, plot_name: str | None = PLOT_NAME, readme: Path | None = None,
    overwrite: bool = False, weights_note: str | None = None,
) -> str:  # fmt: skip
    """The README text ``content`` with our YAML key and section replaced (or added); everything else kept.

    Raises ModelCardError for an invalid card and ReportError for a report of another ledger (unless
    ``overwrite``). The result is parsed back with huggingface_hub and checked before it is returned.
    """
    where = readme if readme is not None else Path("README.md")
    original = _parse_card(content, where)
    if not isinstance(original, dict):
        raise ModelCardError(f"Expected the YAML front matter of {where} to be a mapping, found {type(original)}.")
    if not overwrite:
        _check_same_ledger(original.get(METADATA_KEY), report, where)
    parts = split_card(content)
    _check_no_unmarked_section(parts.body, where)
    meta = card_metadata(report, plot_name)
    block = _dump_metadata(meta, parts.line_break)
    links = {} if "base_model" in original else hub_provenance(report)  # never replace the author's own links
    if links:
        block += parts.line_break + yaml.safe_dump(links, sort_keys=False, line_break=parts.line_break).rstrip("\r\n")
    section = render_section(report, plot_name, weights_note=weights_note).replace("\n", parts.line_break)
    new = parts.bom + splice_metadata(parts, block) + splice_section(parts.body, section, parts.line_break)
    parsed = _parse_card(new, where)
    if (
        parsed != {**original, METADATA_KEY: meta, **links}
        or _model_card(new[len(parts.bom) :]).text.count(SECTION_BEGIN) != 1
    ):
        raise ModelCardError(
            f"Updating {where} would change YAML keys other than {METADATA_KEY!r} (unusual front matter layout, e.g. "
            f"a flow-style mapping or anchors). Move {METADATA_KEY!r} to a block-style top-level key or remove it; "
            "the README was not changed."
        )
    return new


def _dump_metadata(meta: dict[str, Any], line_break: str) -> str:
    """Our YAML key as huggingface_hub dumps card data; where that would not read back identically (PyYAML writes
    some line-separator characters raw), the same data dumped with every non-ASCII character escaped."""
    from huggingface_hub import ModelCardData

    block = ModelCardData(**{METADATA_KEY: meta}).to_yaml(line_break=line_break)
    if yaml.safe_load(block) != {METADATA_KEY: meta}:
        data = {METADATA_KEY: meta}
        block = yaml.safe_dump(data, sort_keys=False, allow_unicode=False, line_break=line_break).rstrip("\r\n")
    return block


def _readme_path(readme_path: str | Path) -> Path:
    """The README to write: ``readme_path`` itself when its name ends in ``.md`` (any case), ``README.md`` inside
    it when it is a directory (or a path without suffix that does not exist yet); ModelCardError otherwise, before
    anything is written, so that ``--readme model/config.json`` cannot replace a model file by a card."""
    readme = Path(readme_path)
    if readme.is_dir() or str(readme_path).endswith(("/", os.sep)) or (not readme.exists() and not readme.suffix):
        readme = readme / "README.md"
    elif not readme.name.lower().endswith(".md"):
        found = "an existing file" if readme.exists() else "a new file"
        raise ModelCardError(
            f"Expected the model card to be a markdown file (a name ending in .md, e.g. README.md) or a model "
            f"directory, found {found} named {readme.name!r}: {readme}. Pass the model directory or its README.md; "
            "nothing was written."
        )
    if not readme.parent.is_dir():
        raise ModelCardError(
            f"Expected the model directory {readme.parent} to exist, found nothing there. Save the model first "
            "(`save_pretrained`) or pass the path of an existing README.md."
        )
    if readme.is_dir():
        raise ModelCardError(
            f"Expected {readme} to be a markdown file, found a directory. Pass the model directory that holds it "
            "(its README.md is written there) or the path of a README file; nothing was written."
        )
    return readme


def _write_target(readme: Path) -> Path:
    """Where the README's bytes go: a symlinked README is written through to its target (atomically there), so
    the link itself is kept."""
    if not readme.is_symlink():
        return readme
    target = readme.resolve()
    if target.is_dir() or not target.parent.is_dir():
        raise ModelCardError(
            f"Expected the symlink {readme} to point to a markdown file (or a new one in an existing directory), "
            f"found it points to {target}, which is "
            f"{'a directory' if target.is_dir() else 'in a directory that does not exist'}. Fix the link or pass "
            "another README; nothing was written."
        )
    return target


def write_model_card(
    report: AttributionReport | str | Path,
    readme_path: str | Path,
    push_to_hub: str | None = None,
    create_pr: bool = False,
    plot: bool = True,
    overwrite: bool = False,
    token: str | None = None,
    allow_other_weights: bool = False,
) -> ModelCardFiles | None:
    """Write the "Accountability: training-stage attribution" section into a model card.

    ``report`` is an :class:`AttributionReport` or the path of its JSON. The README (created if missing) gets the
    section between stable markers and a ``stage_attribution`` YAML key; ``stage_attribution.json`` (the whole
    report) and ``stage_attribution.png`` (with ``plot=True``) are written beside it. Re-running replaces our
    section and key and changes nothing else. Those two names are shared by every card in one folder: a
    ``stage_attribution.json`` that is not this ledger's report (another file, or another ledger's report), or a
    plot without this ledger's report beside it, raises ModelCardError unless ``overwrite``.
    ``push_to_hub="user/repo"`` then uploads the three files in one commit (a pull request with ``create_pr=True``).
    Only the main process writes; others return None.

    ``readme_path`` is the model directory (its ``README.md`` is used) or a file whose name ends in ``.md`` (any
    case); anything else (``config.json``, ``notes.txt``) raises ModelCardError before anything is written. A
    symlinked README is written through to its target (the link is kept). A card that already has an
    "Accountability: training-stage attribution" heading without the writer's markers raises ModelCardError
    (``overwrite`` does not change that): wrap the old section in the markers, or delete it, first.

    The weights beside the card (``model.safetensors`` or its shards in the README's folder) must be the model the
    report attributes: every tensor the report's ledger recorded a digest for is hashed and compared
    (:func:`~.weights.check_card_weights`; ``files.weights`` says what was found). Weights that differ (the model was
    trained or edited after it was recorded, or the report is of another run) raise ModelCardError before anything
    is written, unless ``allow_other_weights``: the section then says, in bold under its heading, that the weights
    published with it are not the model it describes. Half-precision weights that do not hash as recorded (a
    rounded save of float32 weights) and folders holding only an adapter or pickled weights cannot be compared;
    ``files.weights`` says so and the card is written.

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.report import AttributionReport
        >>> report = AttributionReport.build({"toxicity": {"pretraining": [0.1, 0.2], "sft": [0.9, 1.2]}},
        ...                                  estimator="aa-linear", versions={})
        >>> files = write_model_card(report, tempfile.mkdtemp(), plot=False)
        >>> "## Accountability: training-stage attribution" in files.readme.read_text()
        True
    """
    if isinstance(report, str | Path):
        report = AttributionReport.from_json(report)
    if not isinstance(report, AttributionReport):
        raise ReportError(f"Expected an AttributionReport or the path of its JSON, got {type(report).__name__}.")
    if not is_main_process():
        return None
    readme = _readme_path(readme_path)
    _write_target(readme)  # a broken symlink is refused before anything is written
    content = read_card(readme) if readme.exists() else ""
    plot_name = PLOT_NAME if plot else None
    weights = check_card_weights(readme.parent, report.ledger)
    require_attributed_weights(weights, allow_other_weights)
    new_content = compose_card(content, report, plot_name, readme, overwrite, weights_note(weights))
    if not overwrite:
        _check_sidecars(readme.parent, report, plot, readme)
    png = None
    if plot:
        png = plot_png_bytes(report)
    files = ModelCardFiles(
        readme, readme.parent / SIDECAR_NAME, readme.parent / PLOT_NAME if plot else None, weights=weights
    )
    if png is not None and files.plot is not None:
        atomic_write_bytes(files.plot, png, ModelCardError)
    atomic_write_bytes(files.sidecar, report.to_json().encode("utf-8"), ModelCardError)
    atomic_write_bytes(_write_target(readme), new_content.encode("utf-8"), ModelCardError)
    if push_to_hub:
        files.pushed = push_card(files, push_to_hub, create_pr=create_pr, token=token)
    return files


def push_card(files: ModelCardFiles, repo_id: str, create_pr: bool = False, token: str | None = None) -> str:
    """Upload the README, the sidecar and the plot to ``repo_id`` in one commit; returns the commit or PR URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    paths = {"README.md": files.readme, SIDECAR_NAME: files.sidecar}
    if files.plot is not None:
        paths[PLOT_NAME] = files.plot
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in paths.items()]
    try:
        info = HfApi(token=token).create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message="Add training-stage attribution (hf-stage-attribution)",
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as exc:  # network, auth, offline mode, missing repo: all mean the push did not happen
        raise ModelCardError(
            f"The card was written to {files.readme}, but pushing it to {repo_id!r} failed: {exc}. Check the repo id, "
            "your token (`hf auth login`) and network access (HF_HUB_OFFLINE), then push again."
        ) from exc
    return str(info.pr_url or info.commit_url)
