"""A Trainer callback that keeps the stage-attribution section in ``README.md`` when a trainer rewrites the card.

TRL trainers write ``output_dir/README.md`` from their own template every time they save a checkpoint
(``_save_checkpoint`` -> ``create_model_card``), which drops our section. ``on_save`` runs right after that
write, and ``on_train_end`` after the last one, so re-writing the section there keeps it.
``trainer.push_to_hub()`` writes the card once more *after* every callback event: push with
``write_model_card(..., push_to_hub=repo_id)`` after training instead (it uploads README, sidecar and plot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..report.attribution import AttributionReport
from .writer import write_model_card


class KeepStageAttributionSection(TrainerCallback):
    """Re-write the stage-attribution section of ``readme_path`` after every save and at the end of training.

    ``report`` is an :class:`AttributionReport` or the path of its JSON (re-read at each write, so a newer report
    written there is picked up). Only the world-process-zero writes. Weights saved beside the README that are not
    the model the report attributes stop the write (and the training) with ModelCardError unless
    ``allow_other_weights`` (see :func:`~.writer.write_model_card`).

    Example:
        >>> import tempfile
        >>> from hf_stage_attribution.report import AttributionReport
        >>> report = AttributionReport.build({"toxicity": {"sft": [0.5, 0.7]}}, estimator="aa-linear", versions={})
        >>> out = tempfile.mkdtemp()
        >>> callback = KeepStageAttributionSection(report, f"{out}/README.md", plot=False)
        >>> from transformers import TrainerCallback
        >>> isinstance(callback, TrainerCallback)
        True

    Then pass it to a trainer::

        SFTTrainer(..., args=SFTConfig(output_dir=out, ...), callbacks=[callback])
    """

    def __init__(
        self, report: AttributionReport | str | Path, readme_path: str | Path, plot: bool = True,
        allow_other_weights: bool = False,
    ) -> None:  # fmt: skip
        self.report = report
        self.readme_path = Path(readme_path)
        self.plot = plot
        self.allow_other_weights = allow_other_weights
        self.writes = 0

    def rewrite(self) -> None:
        """Write the section now (what the events below call)."""
        written = write_model_card(
            self.report, self.readme_path, plot=self.plot, allow_other_weights=self.allow_other_weights
        )
        if written is not None:
            self.writes += 1

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.rewrite()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.rewrite()
