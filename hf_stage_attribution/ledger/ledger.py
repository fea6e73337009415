"""``StageLedger``: an ordered, versioned record of the stages that built a model (the public facade).

It is :class:`~hf_stage_attribution.ledger.core.LedgerCore` plus the two entry points that create stages: from a
custom training loop (:meth:`StageLedger.record_stage`) and from published checkpoints
(:meth:`StageLedger.from_checkpoints`, which calls the checkpoint importer; the importer itself only needs the core).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .._internal.precision import half_precision_dtype, half_precision_note, half_weight_dtypes
from ..checkpoints.importer import import_checkpoints
from ..errors import LedgerError
from .core import LedgerCore
from .recorder import StageRecording


class StageLedger(LedgerCore):
    """An ordered list of training stages recorded on disk (``ledger.json`` + safetensors).

    ``StageLedger(dir)`` opens a ledger or prepares a new one there (nothing is written until a stage is
    recorded); ``StageLedger.load(dir)`` requires an existing one.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ledger = StageLedger(tempfile.mkdtemp())
        >>> with ledger.record_stage("warmup", kind="pretraining", model=model, optimizer=opt) as rec:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.ones(1, 3)).sum().backward(); opt.step(); rec.step()
        >>> [(s.name, s.num_steps) for s in ledger.stages]
        [('warmup', 3)]
    """

    @classmethod
    def from_checkpoints(cls, boundaries: list[dict], output_dir: str | os.PathLike, **options: Any) -> StageLedger:
        """Build a ledger from published checkpoints (Hub revisions/repos, local or Trainer ``checkpoint-*``
        folders, PEFT adapters); ``boundaries[0]`` is θ_0. Options: see
        :func:`hf_stage_attribution.checkpoints.importer.import_checkpoints`.
        """
        import_checkpoints(boundaries, output_dir, **options)
        return cls.load(output_dir)

    # --- custom loops ----------------------------------------------------------------------------------

    def record_stage(
        self,
        name: str,
        kind: str = "custom",
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        loss_fn: Callable | tuple[Callable, Callable] | None = None,
        **options: Any,
    ) -> StageRecording:
        """Record a stage of a custom training loop; a context manager yielding a :class:`StageRecording`.

        Call ``rec.step(batch=None)`` right after ``optimizer.step()``, before ``scheduler.step()`` and
        ``optimizer.zero_grad()`` (under accelerate's gradient accumulation, also on the micro-batches: those record
        no step). With
        ``batch`` and ``loss_fn`` (``f(model, batch) -> scalar`` or a ``(forward, loss)`` pair for Gauss–Newton
        products) the recorder also keeps curvature material (``curvature_segments``, default 3, needs
        ``num_steps``). Other options: see :class:`~hf_stage_attribution.ledger.recorder.StageRecording`.
        """
        if model is None:
            raise LedgerError("record_stage needs `model=` (the model being trained).")
        recording = StageRecording(
            self, name, kind=kind, model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, **options
        )
        half = half_precision_dtype(model)
        if half is not None and recording.is_main:  # the Trainer callback says it itself (training_mode_warnings)
            note = half_precision_note(half)
            warnings.warn(f"Stage {name!r}: {note}", UserWarning, stacklevel=2)
            recording.update_metadata(
                notes=[*recording.metadata.get("notes", []), note],
                training_precision={"weights": half_weight_dtypes(model)},
            )
        return recording
