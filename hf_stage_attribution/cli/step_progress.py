"""The Trainer callback behind :meth:`Console.callback`, in its own module: it subclasses
``transformers.TrainerCallback``, so importing the console (every CLI command does) does not import transformers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback


class StepProgress(TrainerCallback):
    """Drives a phase bar from a Trainer's steps: ``open_bar(total)`` at ``on_train_begin`` (a
    :class:`~hf_stage_attribution.cli.console.PhaseProgress`), one ``update`` per step, ``close`` at the end."""

    def __init__(self, open_bar: Callable[[int | None], Any]) -> None:
        self.open_bar = open_bar
        self.progress: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress = self.open_bar(int(state.max_steps or 0) or None)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
