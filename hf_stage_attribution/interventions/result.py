"""The result of an intervention sweep: one :class:`SweepPoint` per (variant, α), the choice, tables, JSON, plot.

Example:
    >>> base = SweepPoint("original", 0.0, 2.0, {"accuracy": 95.0})
    >>> pts = [SweepPoint("aa-linear", 0.5, 1.0, {"accuracy": 94.5}, True)]
    >>> r = InterventionResult("patch", 1, "aa-linear", "reliance", "", "decrease", base, pts, chosen=pts[0])
    >>> r.change("accuracy")
    -0.5
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._internal.table import render_table
from ..errors import InterventionError
from ..ledger.core import LedgerCore
from ..ledger.storage import atomic_write_bytes
from ..report.text import md_table
from .card import plot_sweep
from .folder import RESULT_FORMAT
from .metrics import Constraint
from .save import materialize, save_intervention

RESULT_FORMAT_VERSION = 1


@dataclass
class SweepPoint:
    """One evaluated model: ``variant`` (``original``, an embedding kind such as ``aa-linear`` or ``delta``, or
    ``replay``), its ``alpha``, the target behavior's mean and the utility metrics; ``feasible`` says whether it
    meets the constraint (None: no constraint, or not a candidate).

    Example:
        >>> p = SweepPoint("aa-linear", 0.5, 1.25, {"accuracy": 96.0}, True)
        >>> SweepPoint.from_dict(p.to_dict()) == p
        True
    """

    variant: str
    alpha: float
    target: float
    metrics: dict[str, float]
    feasible: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "alpha": self.alpha, "target": self.target, "metrics": dict(self.metrics),
            "feasible": self.feasible,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepPoint:
        return cls(d["variant"], float(d["alpha"]), float(d["target"]), dict(d["metrics"]), d.get("feasible"))


@dataclass
class InterventionResult:
    """What :func:`~hf_stage_attribution.interventions.sweep.scale_stage` measured and chose.

    ``points`` holds the sweep of the main variant (``kind``) and of the comparison variant (``delta``);
    ``replay`` the replay-without-stage model's figures (or None, ``replay_note`` says why); ``chosen`` the picked
    point (None when no α > 0 met the constraint or improved on the original model; ``message`` says which).
    :meth:`save` writes the chosen model.

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
        >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
        >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
        >>> from hf_stage_attribution.interventions import scale_stage
        >>> result = scale_stage(ledger, model, "digits-patch", [0.5, 1.0], target=pipe.behaviors["patch_gap"])
        >>> result.stage, result.chosen.variant, result.table().splitlines()[0].split()
        ('digits-patch', 'aa-linear', ['variant', 'α', 'target', 'chosen'])

    Plotting needs matplotlib, and saving a ``save_pretrained`` model::

        result.plot("sweep.png"); result.save("out/intervened", tokenizer=tok)
    """

    stage: str
    stage_index: int
    kind: str
    target_name: str
    target_unit: str
    target_direction: str
    baseline: SweepPoint
    points: list[SweepPoint]
    replay: SweepPoint | None = None
    replay_note: str = ""
    constraint: Any = None
    objective: str = "target"
    chosen: SweepPoint | None = None
    message: str = ""
    accuracy_metrics: dict[str, str] = field(default_factory=dict)
    #: why the comparison variant ``delta`` was not swept (it is the same edit as ``kind``), or ""
    delta_note: str = ""
    ledger: LedgerCore = field(default=None, repr=False, compare=False)
    model: Any = field(default=None, repr=False, compare=False)
    embedding_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    replay_model: Any = field(default=None, repr=False, compare=False)
    target_behavior: Any = field(default=None, repr=False, compare=False)
    utility_metrics: list[Any] = field(default_factory=list, repr=False, compare=False)

    # --- queries ---------------------------------------------------------------------------------------------

    def sweep(self, variant: str | None = None) -> list[SweepPoint]:
        """The points of one variant (default: the main one, ``kind``), by α."""
        variant = variant or self.kind
        return sorted((p for p in self.points if p.variant == variant), key=lambda p: p.alpha)

    def point(self, alpha: float, variant: str | None = None) -> SweepPoint:
        for p in self.sweep(variant):
            if abs(p.alpha - float(alpha)) < 1e-12:
                return p
        known = [p.alpha for p in self.sweep(variant)]
        raise InterventionError(f"α={alpha} is not in the {variant or self.kind} sweep (α values: {known}).")

    def change(self, metric: str, point: SweepPoint | None = None) -> float | None:
        """``metric`` (``"target"`` or a utility) at ``point`` (default: the chosen one) minus the original model's."""
        point = point or self.chosen
        if point is None:
            return None
        if metric == "target":
            return point.target - self.baseline.target
        return point.metrics[metric] - self.baseline.metrics[metric]

    def headline(self) -> str:
        """One sentence: what the chosen α buys (target, worst-group accuracy) and costs (average accuracy)."""
        if self.chosen is None:
            return self.message
        parts = [f"{self.target_name} {self.baseline.target:.4g} → {self.chosen.target:.4g}"]
        for label, key in (("worst-group accuracy", "worst_group"), ("average accuracy", "average")):
            name = self.accuracy_metrics.get(key)
            if name:
                before, after = self.baseline.metrics[name], self.chosen.metrics[name]
                parts.append(f"{label} {before:.1f}% → {after:.1f}% ({after - before:+.1f} points)")
        return f"Scaling down stage {self.stage!r} ({self.kind}, α={self.chosen.alpha:g}): " + "; ".join(parts) + "."

    # --- text ------------------------------------------------------------------------------------------------

    def _columns(self, groups: bool = True) -> list[str]:
        names = list(self.baseline.metrics)
        first = [self.accuracy_metrics[k] for k in ("average", "worst_group") if k in self.accuracy_metrics]
        rest = [n for n in names if n not in first and "[" not in n]
        return first + rest + ([n for n in names if "[" in n] if groups else [])

    def rows(self, groups: bool = True) -> list[list[str]]:
        """Table rows (strings): variant, α, target, utilities (per-group accuracies with ``groups``), meets
        constraint (only with a constraint), chosen. Target and utilities show 4 significant digits."""
        cols = self._columns(groups)
        percent = self._percent_columns(cols)
        out = []
        for p in [self.baseline, *self.sweep(), *self.sweep("delta" if self.kind != "delta" else "-"),
                  *([self.replay] if self.replay else [])]:  # fmt: skip
            mark = "*" if p is self.chosen else ""
            ok = ["" if p.feasible is None else ("yes" if p.feasible else "no")] if self.constraint is not None else []
            values = [f"{p.metrics[c]:.2f}" if c in percent else f"{p.metrics[c]:.4g}" for c in cols]
            out.append([p.variant, f"{p.alpha:g}", f"{p.target:+.4g}", *values, *ok, mark])
        return out

    def _percent_columns(self, cols: list[str]) -> set[str]:
        """The accuracy columns (percent, per group too): printed with two decimals, so 100 reads 100.00 beside
        95.21 rather than 100 (4 significant digits)."""
        names = set(self.accuracy_metrics.values())
        average = self.accuracy_metrics.get("average")
        return {c for c in cols if c in names or (average is not None and c.startswith(f"{average}["))}

    def header(self, groups: bool = True) -> list[str]:
        meets = ["meets constraint"] if self.constraint is not None else []
        return ["variant", "α", self.target_name, *self._columns(groups), *meets, "chosen"]

    def table(self, groups: bool = False) -> str:
        """A plain-text table of the sweep (per-group accuracies with ``groups``), then the choice and trade-off."""

        table = render_table(self.header(groups), self.rows(groups))
        lines = [self.message] if self.chosen is None else [self.message, self.headline()]  # the same sentence once
        return "\n".join([table, "", *lines, self.replay_note, *([self.delta_note] if self.delta_note else [])])

    def to_markdown(self) -> str:
        head = self.header()
        return md_table(head, ["---"] * len(head), [[c.replace("|", "\\|") for c in row] for row in self.rows()])

    # --- JSON ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        c = self.constraint
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "stage": self.stage,
            "stage_index": self.stage_index,
            "kind": self.kind,
            "target": {"name": self.target_name, "unit": self.target_unit, "direction": self.target_direction},
            "baseline": self.baseline.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "replay": self.replay.to_dict() if self.replay else None,
            "replay_note": self.replay_note,
            "constraint": c.to_dict() if c is not None else None,
            "objective": self.objective,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "message": self.message,
            "headline": self.headline(),
            "accuracy_metrics": dict(self.accuracy_metrics),
            "delta_note": self.delta_note,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_bytes(Path(path), text.encode("utf-8"))
        return text

    @classmethod
    def from_json(cls, path_or_str: str | Path) -> InterventionResult:
        """Read a result written by :meth:`to_json` (figures only: it cannot :meth:`save` models)."""

        text = str(path_or_str)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_str).read_text(encoding="utf-8")
        d = json.loads(text)
        if d.get("format") != RESULT_FORMAT:
            raise InterventionError(f"Expected an intervention result ({RESULT_FORMAT}), found {d.get('format')!r}.")
        points = [SweepPoint.from_dict(p) for p in d["points"]]
        chosen = None
        if d.get("chosen"):
            ch = d["chosen"]
            chosen = next((p for p in points if p.variant == ch["variant"] and p.alpha == ch["alpha"]), None)
        return cls(
            d["stage"], d["stage_index"], d["kind"], d["target"]["name"], d["target"]["unit"],
            d["target"]["direction"], SweepPoint.from_dict(d["baseline"]), points,
            SweepPoint.from_dict(d["replay"]) if d.get("replay") else None, d.get("replay_note", ""),
            Constraint(**d["constraint"]) if d.get("constraint") else None, d.get("objective", "target"), chosen,
            d.get("message", ""), dict(d.get("accuracy_metrics", {})), d.get("delta_note", ""),
        )  # fmt: skip

    # --- plot and models ---------------------------------------------------------------------------------------

    def plot(self, path: str | Path) -> Path:
        """A PNG of the sweep: the target and the accuracies against α, per variant, with the choice marked."""

        return plot_sweep(self, path)

    def model_at(self, alpha: float | None = None, variant: str | None = None) -> tuple[Any, str]:
        """A new model holding the intervention (default: the chosen one) and its form, ``"adapter"`` or ``"full"``;
        ``variant="replay"`` gives the replay-without-stage model."""

        return materialize(self, alpha, variant)

    def save(self, output_dir: str | Path, **kwargs: Any) -> Any:
        """Write the chosen (or given ``alpha``/``variant``) model with ``save_pretrained``, a card section, the sweep
        JSON and plot; see :func:`~hf_stage_attribution.interventions.save.save_intervention`."""

        return save_intervention(self, output_dir, **kwargs)


__all__ = ["InterventionResult", "SweepPoint"]
