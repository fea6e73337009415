"""Turning an intervention into a model on disk: ``θ_K − α · v_k`` materialised, saved with ``save_pretrained``,
reloaded and re-evaluated, with a card section, the sweep JSON and its plot beside it.

When the final model is a ``PeftModel`` and the edit only touches what the adapter holds (``v_k`` equals the
adapter's own delta on every LoRA-targeted weight, plus ``modules_to_save`` copies), the edit is written *as an
adapter*: LoRA ``B`` factors scaled by ``1 − α``. Any other edit is a dense change of the base weights, so the
adapter is merged and the full model is saved.

Example, with the result of :func:`~hf_stage_attribution.interventions.sweep.scale_stage` on a Hugging Face model::

    saved = save_intervention(result, "out/intervened", tokenizer=tokenizer)
    saved.form, saved.max_difference     # "full" or "adapter"; reloaded vs. evaluated figures
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._internal.model_state import clean_copy
from .._internal.params import is_peft_model, lora_layers
from .._internal.precision import subtract_
from ..errors import InterventionError
from ..estimators.linear import parameter_paths
from .card import write_card_section
from .folder import README, SWEEP_JSON, SWEEP_PLOT, check_output_folder, install, leftover_partials, staged
from .metrics import evaluate_metrics, mean_value
from .vectors import stage_vectors


@dataclass
class SavedIntervention:
    """Where the intervened model went and whether it reproduces the evaluated figures after reloading.

    Example:
        >>> s = SavedIntervention(Path("out"), "full", "aa-linear", 0.5, {"target": 1.0}, {"target": 1.0}, 0.0)
        >>> s.to_dict()["form"], s.max_difference
        ('full', 0.0)
    """

    directory: Path
    form: str  # "full" or "adapter"
    variant: str
    alpha: float
    figures: dict[str, float]
    reloaded: dict[str, float] | None = None
    max_difference: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory), "form": self.form, "variant": self.variant, "alpha": self.alpha,
            "figures": self.figures, "reloaded": self.reloaded, "max_difference": self.max_difference,
            "files": self.files, "notes": self.notes,
        }  # fmt: skip


def _relative_close(v: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = float(ref.double().norm())
    return float((v.double() - ref.double()).norm()) <= 1e-5 * scale + 1e-10


def apply_scaling(model: torch.nn.Module, emb: Any, k: int, alpha: float) -> tuple[torch.nn.Module, str]:
    """A deep copy of ``model`` holding ``θ − α · v_k`` and its form (``"adapter"`` or ``"full"``).

    Every tensor of ``v_k`` must be a parameter of ``model`` (by base name), and there must be at least one: an
    :class:`~hf_stage_attribution.errors.InterventionError` otherwise, not a partial (or empty, "adapter") edit.
    """

    edited = clean_copy(model)
    paths = parameter_paths(edited)
    names = list(emb.names(k))
    missing = [n for n in names if n not in paths]
    if missing or not names:
        found = f"{len(missing)} the model does not hold (e.g. {missing[0]!r})" if missing else "no tensor at all"
        raise InterventionError(
            f"Expected stage {k}'s vector to name parameters of the model, found {found}: scaling "
            f"{'the others' if missing else 'nothing'} would not edit the stage out. Pass the model the ledger was "
            "recorded from (a stage on a tied duplicate of a weight cannot be scaled)."
        )
    if is_peft_model(edited):
        lora = lora_layers(edited)
        adapter_only = all(
            (n in lora and lora[n].factors() is not None and _relative_close(emb.get(k, n), lora[n].delta()))
            or "modules_to_save" in paths[n][0].split(".")
            for n in names
        )
        if adapter_only:
            with torch.no_grad():
                for n in names:
                    if n in lora:
                        lora[n].factors()[1].mul_(1.0 - alpha)
                    else:
                        subtract_(paths[n][1], alpha * emb.get(k, n).double())
            return edited, "adapter"
    with torch.no_grad():
        for n in names:
            subtract_(paths[n][1], alpha * emb.get(k, n).double())  # a half-precision parameter rounded once
    if is_peft_model(edited):
        edited = edited.merge_and_unload()
    return edited, "full"


def _resolve_point(result: Any, alpha: float | None, variant: str | None):
    if variant == "replay":
        if result.replay is None or result.replay_model is None:
            raise InterventionError(f"No replay-without-stage model to save: {result.replay_note}.")
        return result.replay
    if alpha is None:
        if result.chosen is None:
            raise InterventionError(f"{result.message} Nothing was saved; pass alpha=... to save a model anyway.")
        if variant is None or variant == result.chosen.variant:
            return result.chosen
        alpha = result.chosen.alpha
    if float(alpha) == 0.0:
        raise InterventionError(
            "Expected an α in (0, 1] to save, got α=0: that is the original model itself, with no stage scaled down. "
            "Nothing was saved; pass one of the sweep's other α values."
        )
    return result.point(alpha, variant)


def materialize(result: Any, alpha: float | None = None, variant: str | None = None) -> tuple[torch.nn.Module, str]:
    """The model of one evaluated point of ``result`` (default: the chosen one), as a new object, and its form."""

    if result.model is None or result.ledger is None:
        raise InterventionError("This result was read from JSON and holds no model; re-run scale_stage to save one.")
    point = _resolve_point(result, alpha, variant)
    if point.variant == "replay":
        model = clean_copy(result.replay_model)
        model.eval()
        return model, "full"
    stage = result.ledger.stage(result.stage_index)
    emb = stage_vectors(result.ledger, result.model, stage, point.variant, result.embedding_options)
    model, form = apply_scaling(result.model, emb, stage.index, point.alpha)
    model.eval()
    return model, form


def _figures(result: Any, model: torch.nn.Module) -> dict[str, float]:

    out = {"target": mean_value(result.target_behavior, model, result.target_name)}
    out.update(evaluate_metrics(model, result.utility_metrics))
    return out


def _reload(directory: Path, form: str, saved: torch.nn.Module, result: Any, notes: list[str]) -> torch.nn.Module:
    if form == "full":
        return type(saved).from_pretrained(directory, use_safetensors=True)
    from peft import PeftModel

    base_ref = saved.peft_config[saved.active_adapter].base_model_name_or_path
    base_cls = type(saved.get_base_model())
    if base_ref and Path(base_ref).is_dir() and hasattr(base_cls, "from_pretrained"):
        base = base_cls.from_pretrained(base_ref, use_safetensors=True)
    else:
        notes.append(
            f"The adapter's base model {base_ref!r} is not a local directory; the reload check used the in-memory "
            "base model."
        )
        base = clean_copy(result.model).unload()
    return PeftModel.from_pretrained(base, directory)


def save_intervention(
    result: Any,
    output_dir: str | Path,
    *,
    alpha: float | None = None,
    variant: str | None = None,
    tokenizer: Any = None,
    card_from: str | Path | None = None,
    card_text: str | None = None,
    derived_from: str | Path | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> SavedIntervention:
    """Save the chosen model (or ``alpha``/``variant``) with ``save_pretrained`` into ``output_dir``.

    Also writes ``README.md`` (``card_text``, else the card file ``card_from`` as it is, else the one
    ``save_pretrained`` wrote, with an intervention section between markers that names ``derived_from``, default
    the folder of ``card_from``), ``intervention.json`` (the sweep, the choice, the saved figures) and
    ``intervention_sweep.png``. The source model's attribution section does not describe the edited weights: pass
    ``card_text=hf_stage_attribution.model_card.derived_card_text(source_model_dir)`` rather than ``card_from`` for
    a card that has one (the ``intervene`` command and the recipes do). With ``verify`` the model is reloaded from
    disk and re-evaluated; the largest difference to the evaluated figures is recorded. A ``PeftModel`` with several
    adapters saves its active one only, into ``output_dir`` itself.

    An :class:`InterventionError`, nothing written: no model was chosen (no α met the constraint or improved on the
    original model) and no ``alpha`` given; ``alpha=0`` (the original model itself); an ``output_dir`` holding a saved
    model's or an intervention's files (``README.md``, ``*.safetensors``, ``*.bin``, ``config.json``, tokenizer
    files, ``intervention.json``…) without ``overwrite``. With ``overwrite`` the earlier intervention's files are
    replaced as a whole, but a ``README.md`` this package did not write (no intervention section) is still refused;
    an earlier card of ours keeps its own text when neither ``card_text`` nor ``card_from`` is given. Everything is
    written into a hidden ``.<name>.partial-*`` folder beside ``output_dir`` and moved into place at the end: a save
    that fails (or is killed) part way leaves ``output_dir`` as it was.
    """

    if card_from is not None and card_text is not None:
        raise InterventionError("Pass card_from (a card file) or card_text (its text), not both.")
    point = _resolve_point(result, alpha, variant)
    out = Path(output_dir)
    check_output_folder(out, overwrite)
    model, form = materialize(result, point.alpha, point.variant)
    _check_savable(model, form)
    if card_from:
        card_text = Path(card_from).read_bytes().decode("utf-8")  # bytes: its line endings are kept
        derived_from = derived_from if derived_from is not None else Path(card_from).parent
    with staged(out) as partial:
        saved = _write(result, out, partial, point, model, form, tokenizer, card_text, derived_from, verify)
        install(partial, out)
    saved.notes += _leftover_note(out)
    return saved


def save_sweep(result: Any, output_dir: str | Path, *, overwrite: bool = False) -> dict[str, str]:
    """Write only ``intervention.json`` and ``intervention_sweep.png`` (no model) into ``output_dir``, under the rules
    of :func:`save_intervention`: a folder holding a saved model's or an intervention's files is refused without
    ``overwrite``; with it, the earlier intervention's files (its model and card included) are replaced, so that the
    folder never holds a model and a sweep of two different interventions."""

    out = Path(output_dir)
    check_output_folder(out, overwrite)
    with staged(out) as partial:
        result.to_json(partial / SWEEP_JSON)
        result.plot(partial / SWEEP_PLOT)
        install(partial, out)
    return {"json": str(out / SWEEP_JSON), "plot": str(out / SWEEP_PLOT)}


def _leftover_note(out: Path) -> list[str]:
    left = leftover_partials(out)
    if not left:
        return []
    names = ", ".join(p.name for p in left[:3]) + (" …" if len(left) > 3 else "")
    return [
        f"{len(left)} folder(s) beside {out} were left by an interrupted save ({names}); nothing reads them: delete "
        "them to free the space."
    ]


def _check_savable(model: torch.nn.Module, form: str) -> None:
    """Refuse (before anything is written) an adapter with more than one active adapter: which one to save?"""
    if form == "adapter" and is_peft_model(model) and len(_active(model)) != 1:
        raise InterventionError(
            f"Expected one active adapter to save, found {_active(model)!r}. Activate the one the stage trained "
            "(model.set_adapter(name)) and scale the stage again."
        )


def _active(model: torch.nn.Module) -> list[str]:
    active = getattr(model, "active_adapters", None) or getattr(model, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _save_model(model: torch.nn.Module, out: Path, form: str) -> None:
    """``save_pretrained`` into ``out``; a PeftModel with several adapters saves only its active one, into ``out``
    itself (where PEFT would write a subfolder per adapter not named ``default``), so that it reloads from there."""
    if form != "adapter" or not is_peft_model(model) or list(model.peft_config) == ["default"]:
        model.save_pretrained(out)
        return
    (active,) = _active(model)
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[active])
        staged = [p for p in Path(tmp).iterdir() if p.is_file()]
        if active != "default":
            staged += [p for p in (Path(tmp) / active).iterdir() if p.is_file()]
        for path in staged:
            os.replace(path, out / path.name)


def _write(
    result: Any,
    out: Path,
    partial: Path,
    point: Any,
    model: torch.nn.Module,
    form: str,
    tokenizer: Any,
    card_text: str | None,
    derived_from: str | Path | None,
    verify: bool,
) -> SavedIntervention:
    """The files of :func:`save_intervention` (model, tokenizer, figures, reload check, plot, JSON, card), written
    into ``partial``; the returned record names them as they will be in ``out``."""
    notes: list[str] = []
    _save_model(model, partial, form)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
        _drop_loading_options(partial / "tokenizer_config.json")
    figures = _figures(result, model)
    saved = SavedIntervention(out, form, point.variant, point.alpha, figures, notes=notes)
    if verify:
        reloaded = _reload(partial, form, model, result, notes)
        reloaded.eval()
        saved.reloaded = _figures(result, reloaded)
        evaluated = {"target": point.target, **point.metrics}
        saved.max_difference = max(abs(saved.reloaded[k] - evaluated[k]) for k in evaluated)
    result.plot(partial / SWEEP_PLOT)
    saved.files["plot"] = str(out / SWEEP_PLOT)
    saved.files["json"] = str(out / SWEEP_JSON)
    saved.files["readme"] = str(out / README)
    payload = {**result.to_dict(), "saved": saved.to_dict()}
    (partial / SWEEP_JSON).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if card_text is None and not (partial / README).exists() and (out / README).exists():
        card_text = (out / README).read_bytes().decode("utf-8")  # our earlier card (checked): its own text is kept
    source = str(derived_from) if derived_from is not None else None
    write_card_section(partial / README, result, saved, base_text=card_text, derived_from=source)
    return saved


def _drop_loading_options(path: Path) -> None:
    """Remove the loading options (``local_files_only``) that ``from_pretrained`` keeps in a tokenizer's init
    arguments and ``save_pretrained`` writes back: they describe how this package loaded it, not the tokenizer."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config, dict) and any(key in config for key in _LOADING_OPTIONS):
        kept = {k: v for k, v in config.items() if k not in _LOADING_OPTIONS}
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_LOADING_OPTIONS = ("local_files_only",)


__all__ = [
    "SWEEP_JSON",
    "SWEEP_PLOT",
    "SavedIntervention",
    "apply_scaling",
    "materialize",
    "save_intervention",
    "save_sweep",
]
