"""Model cards: the "Accountability: training-stage attribution" section, YAML keys, sidecar JSON and plot.

    >>> import tempfile
    >>> from hf_stage_attribution.model_card import write_model_card
    >>> from hf_stage_attribution.report import AttributionReport
    >>> report = AttributionReport.build({"toxicity": {"sft": [0.5, 0.7]}}, estimator="aa-linear", versions={})
    >>> readme = f"{tempfile.mkdtemp()}/README.md"
    >>> _ = write_model_card(report, readme, push_to_hub=None, plot=False)
    >>> "training-stage attribution" in open(readme).read()
    True

``strip_attribution`` removes the section and the YAML key again, for the card of a model derived from this one.

``keep_section_callback`` returns a ``transformers.TrainerCallback`` (transformers is imported only then).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card_text import METADATA_KEY, SECTION_BEGIN, SECTION_END, strip_attribution
from .writer import (
    PLOT_NAME,
    SIDECAR_NAME,
    ModelCardFiles,
    card_metadata,
    compose_card,
    derived_card_text,
    push_card,
    render_section,
    write_model_card,
)

if TYPE_CHECKING:
    from ..report.attribution import AttributionReport


def keep_section_callback(
    report_or_sidecar_path: AttributionReport | str | Path, readme_path: str | Path, plot: bool = True
) -> Any:
    """A ``TrainerCallback`` that re-writes our section of ``readme_path`` on every save and at the end of training,
    so a TRL trainer rewriting ``README.md`` (``create_model_card``) does not remove it."""
    from .callback import KeepStageAttributionSection  # deferred: it subclasses transformers.TrainerCallback

    return KeepStageAttributionSection(report_or_sidecar_path, readme_path, plot=plot)


__all__ = [
    "METADATA_KEY",
    "PLOT_NAME",
    "SECTION_BEGIN",
    "SECTION_END",
    "SIDECAR_NAME",
    "ModelCardFiles",
    "card_metadata",
    "compose_card",
    "derived_card_text",
    "keep_section_callback",
    "push_card",
    "render_section",
    "strip_attribution",
    "write_model_card",
]
