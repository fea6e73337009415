"""One-line notices the library writes for a person on stderr (not data, not warnings): the projected size of a
stage before recording, the estimator ``auto`` chose and why; and the library warnings nobody can act on, which
the CLI and every replayed training ignore (:func:`harmless_warnings_ignored`).

A script that records or attributes sees them; the CLI's quiet console holds back the routine ones (``--verbose``
shows them) through :func:`held_back`.

Example:
    >>> import io, contextlib
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     notice("stage 'sft': projected ledger growth 1.2 MB")
    ...     with held_back() as held:
    ...         notice("not shown", routine=True)
    ...         notice("shown", routine=False)
    >>> err.getvalue().splitlines()
    ["[hf-stage-attribution] stage 'sft': projected ledger growth 1.2 MB", '[hf-stage-attribution] shown']
    >>> held
    ['not shown']
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

PREFIX = "[hf-stage-attribution] "
_held: list[list[str]] = []


def notice(message: str, *, routine: bool = True) -> None:
    """Write ``message`` on stderr, or keep it back inside :func:`held_back` when it is ``routine``."""
    if routine and _held:
        _held[-1].append(message)
        return
    sys.stderr.write(PREFIX + message + "\n")


@contextlib.contextmanager
def held_back() -> Iterator[list[str]]:
    """Inside the block, routine notices are collected (the yielded list) instead of written."""
    _held.append([])
    try:
        yield _held[-1]
    finally:
        _held.pop()


_LIBRARIES = r"(transformers|trl|peft|accelerate|datasets|huggingface_hub|torch)(\..*)?$"

#: (category, module regex, message regex) of warnings from the training libraries that a user of this package
#: cannot act on: their own deprecations (one library calling another's deprecated API), PEFT's ``fan_in_fan_out``
#: note on GPT-2, and PEFT noticing that an adapter's base model moved (a replay wraps a copy of the final model,
#: not the folder the adapter was trained from).
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, _LIBRARIES, ""),
    (DeprecationWarning, _LIBRARIES, ""),
    (UserWarning, r"peft(\..*)?$", r"fan_in_fan_out is set to False"),
    (UserWarning, r"peft(\..*)?$", r"The PEFT config's `base_model_name_or_path` was renamed"),
)


@contextlib.contextmanager
def harmless_warnings_ignored() -> Iterator[None]:
    """:data:`HARMLESS_WARNINGS` ignored inside the block (the CLI's quiet console; every replayed training, whose
    warnings the user already saw when the stage was trained); the previous filters come back on exit.

    Example:
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     with harmless_warnings_ignored():
        ...         warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="transformers.trainer")
        ...         warnings.warn_explicit("yours", FutureWarning, "y.py", 1, module="my_training_script")
        >>> [str(w.message) for w in seen]
        ['yours']
    """
    with warnings.catch_warnings():
        for category, module, message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


@contextlib.contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """transformers' and datasets' progress bars off inside the block — a replay's reloading of a reference model
    and its trainer's dataset preparation are not the user's — and back as they were on exit.

    Example:
        >>> import datasets
        >>> before = datasets.is_progress_bar_enabled()
        >>> with library_progress_bars_off():
        ...     datasets.is_progress_bar_enabled()
        False
        >>> datasets.is_progress_bar_enabled() == before
        True
    """
    import datasets
    import transformers.utils.logging as tf_logging

    restore = []
    try:
        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            restore.append(tf_logging.enable_progress_bar)
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
        yield
    finally:
        for enable in reversed(restore):
            enable()


#: (logger, message) of library log lines that say nothing to a user of this package: huggingface_hub noting that a
#: README the model-card writer is about to create has no YAML front matter yet.
HARMLESS_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    ("huggingface_hub.repocard", "Repo card metadata block was not found. Setting CardData to empty."),
)


class _DropMessages(logging.Filter):
    def __init__(self, messages: set[str]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


@contextlib.contextmanager
def harmless_log_messages_dropped() -> Iterator[None]:
    """:data:`HARMLESS_LOG_MESSAGES` dropped inside the block (exactly those messages; every other record of the
    same loggers passes); the filters are removed on exit.

    Example:
        >>> import logging
        >>> seen = []
        >>> class Keep(logging.Handler):
        ...     def emit(self, record):
        ...         seen.append(record.getMessage())
        >>> log = logging.getLogger("huggingface_hub.repocard")
        >>> handler = Keep()
        >>> log.addHandler(handler)
        >>> with harmless_log_messages_dropped():
        ...     log.warning("Repo card metadata block was not found. Setting CardData to empty.")
        ...     log.warning("something else")
        >>> log.removeHandler(handler)
        >>> seen
        ['something else']
    """
    installed = []
    by_logger: dict[str, set[str]] = {}
    for name, message in HARMLESS_LOG_MESSAGES:
        by_logger.setdefault(name, set()).add(message)
    for name, messages in by_logger.items():
        log_filter = _DropMessages(messages)
        logging.getLogger(name).addFilter(log_filter)
        installed.append((name, log_filter))
    try:
        yield
    finally:
        for name, log_filter in installed:
            logging.getLogger(name).removeFilter(log_filter)
