"""A quiet console for the CLI: third-party logs, warnings and progress bars off by default, one progress bar per
long phase of our own, and plain lines (no carriage-return redraws) when stderr is not a terminal.

``quiet_console(verbose=False)`` lowers transformers / datasets / huggingface_hub logging to errors, turns their
progress bars off, ignores the known-harmless deprecation warnings of the training libraries, and (with
``capture_stdout=True`` on :meth:`Console.phase`) keeps the dicts a ``Trainer`` prints at each log step off the
screen. ``--verbose`` leaves everything as the libraries set it. Everything is restored on exit.

Example:
    >>> import io
    >>> console = Console(verbose=False, stream=io.StringIO())
    >>> with console.phase("training sft", total=2) as bar:
    ...     bar.update()
    ...     bar.update()
    >>> console.stream.getvalue().startswith("training sft: done (2/2) in ")
    True
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from .._internal.notices import harmless_warnings_ignored, held_back, library_progress_bars_off


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (progress bars may redraw in place)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _Libraries:
    """Save, lower and restore the logging verbosity of transformers, datasets and the Hub, and the Hub's progress
    bars (transformers' and datasets' bars: :func:`~.._internal.notices.library_progress_bars_off`)."""

    def __init__(self) -> None:
        self.restore: list[Any] = []

    def quiet(self, training_libraries: bool = True) -> None:
        import huggingface_hub.utils as hub_utils

        if training_libraries:
            import datasets
            import transformers.utils.logging as tf_logging

            self.restore.append((tf_logging.set_verbosity, tf_logging.get_verbosity()))
            tf_logging.set_verbosity_error()
            self.restore.append((datasets.utils.logging.set_verbosity, datasets.utils.logging.get_verbosity()))
            datasets.utils.logging.set_verbosity_error()
        self.restore.append((hub_utils.logging.set_verbosity, hub_utils.logging.get_verbosity()))
        hub_utils.logging.set_verbosity_error()  # "Repo card metadata block was not found…"
        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            self.restore.append((hub_utils.enable_progress_bars,))

    def undo(self) -> None:
        for fn, *args in reversed(self.restore):
            fn(*args)
        self.restore.clear()


@contextlib.contextmanager
def quiet_console(verbose: bool = False, training_libraries: bool = True) -> Iterator[None]:
    """Third-party logs, progress bars and known-harmless warnings off inside the block (nothing changes with
    ``verbose=True``); the previous settings come back on exit. ``training_libraries=False``: a command that uses
    neither transformers nor datasets (``card``, ``inspect``) leaves them alone instead of importing them (3 s) to
    quiet them."""
    if verbose:
        yield
        return
    libraries = _Libraries()
    bars = library_progress_bars_off() if training_libraries else contextlib.nullcontext()
    with harmless_warnings_ignored(), bars:
        try:
            libraries.quiet(training_libraries)
            with held_back():  # routine notices (a stage's projected ledger size): --verbose shows them
                yield
        finally:
            libraries.undo()


class PhaseProgress:
    """A progress bar for one phase: tqdm on a terminal, else a single plain line when the phase ends."""

    def __init__(self, desc: str, total: int | None, stream: TextIO, live: bool) -> None:
        self.desc, self.total, self.stream, self.count = desc, total, stream, 0
        self.started = time.perf_counter()
        self.note = ""  # said after "done" on the closing line
        self.bar = tqdm(total=total, desc=desc, file=stream, leave=False, dynamic_ncols=True) if live else None
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self, note: str = "") -> None:
        """End the phase: one line saying it is done, how far it got and how long it took."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        done = f" ({self.count}/{self.total})" if self.total else ""
        note = note or self.note
        extra = f"; {note}" if note else ""
        print(f"{self.desc}: done{done} in {time.perf_counter() - self.started:.1f}s{extra}", file=self.stream)


class Console:
    """Where the CLI's progress goes (stderr by default) and whether third-party output is shown (``verbose``)."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr
        self.live = is_terminal(self.stream)

    @contextlib.contextmanager
    def captured(self) -> Iterator[None]:
        """Unless verbose, keep back what third-party code prints to stdout inside the block (a Trainer's log
        dicts); shown on stderr only if the block fails."""
        if self.verbose:
            yield
            return
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                yield
        except BaseException:
            print(captured.getvalue(), end="", file=self.stream)
            raise

    @contextlib.contextmanager
    def phase(self, desc: str, total: int | None = None) -> Iterator[PhaseProgress]:
        """A progress bar for one long phase (third-party stdout kept back, see :meth:`captured`)."""
        progress = PhaseProgress(desc, total, self.stream, self.live)
        try:
            with self.captured():
                yield progress
        except BaseException:
            if progress.bar is not None:
                progress.bar.close()
            raise
        progress.close()

    def callback(self, desc: str) -> Any:
        """A ``TrainerCallback`` that advances one phase bar per optimizer step of the trainer it is given to."""
        from .step_progress import StepProgress  # deferred: it subclasses transformers.TrainerCallback

        return StepProgress(lambda total: PhaseProgress(desc, total, self.stream, self.live))
