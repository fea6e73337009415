"""One exception tree for the whole package.

Every error derives from :class:`StageAttributionError` and from the builtin it refines
(``ValueError``, ``KeyError``, ``RuntimeError``), so ``except ValueError`` keeps working.
Every message says what was expected, what was found, and what to do about it.
"""

from __future__ import annotations

import difflib


class StageAttributionError(Exception):
    """Base class of every error raised by hf-stage-attribution."""


# --- ledger -------------------------------------------------------------------------------------------


class LedgerError(StageAttributionError, ValueError):
    """A ledger directory cannot be read or written as asked."""


class LedgerFormatError(LedgerError):
    """A ledger file is corrupt, of an unknown format version, or structurally invalid."""


class LedgerMismatchError(LedgerError):
    """A ledger belongs to another model, or its hashes do not chain."""


class LedgerLockedError(LedgerError):
    """Another process is writing this ledger."""


class IncompleteStageError(LedgerError):
    """A stage was started but never finished (the writer crashed or was interrupted)."""


class UnsafeInputError(StageAttributionError, ValueError):
    """Input that would read/write outside its directory or execute code (pickles, path escapes)."""


# --- estimators ---------------------------------------------------------------------------------------


class UnsupportedOptimizerError(StageAttributionError, ValueError):
    """An optimizer whose update rule the propagation rules do not know."""


class MissingCurvatureError(StageAttributionError, ValueError):
    """A curvature-aware estimator was asked for, but the ledger holds no curvature material."""


class ModelMismatchError(StageAttributionError, ValueError):
    """A model's parameters do not match the ledger (names, shapes or final hash)."""


class ReplayError(StageAttributionError, RuntimeError):
    """A stage cannot be replayed (no replay data, no stage function, or the replay diverged)."""


class PartialReplayError(ReplayError, ValueError):
    """Partial replay cannot run a stage: no replay data nor stage function, or a stage function without the
    step-limited form ``fn(model, max_steps=None)``; the message says how to record or write it."""


class EstimatorError(StageAttributionError, ValueError):
    """An estimator cannot be applied to this ledger, model or stage (e.g. ``lora-exact`` on a non-terminal stage)."""


class EstimatorMemoryError(StageAttributionError, MemoryError):
    """An attribution would not fit in the memory available (refused before the work), or ran out of it; the
    message names a setting that fits."""


# --- behaviors, registries, reports --------------------------------------------------------------------


class BudgetError(EstimatorError):
    """An estimator's budget (a fraction of replay's cost) outside [0, 1] or of the wrong type."""


class UnknownNameError(StageAttributionError, KeyError):
    """A registry lookup for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class BehaviorError(StageAttributionError, ValueError):
    """A behavior is empty, returns non-finite values, or cannot be built from its spec."""


class ScorerUnavailableError(BehaviorError):
    """A toxicity/reward scorer cannot be loaded (typically: it needs a network download)."""


class ReportError(StageAttributionError, ValueError):
    """A report file is invalid or does not belong to the ledger/model it is used with."""


class ModelCardError(StageAttributionError, ValueError):
    """A README/model card cannot be parsed or updated safely."""


class CheckpointImportError(StageAttributionError, ValueError):
    """Published checkpoints cannot be turned into a ledger."""


class CheckpointNotFoundError(CheckpointImportError):
    """A checkpoint's repository, revision, subfolder or weight files cannot be found (online or in the cache)."""


class CheckpointMismatchError(CheckpointImportError):
    """Two stage boundaries are not checkpoints of the same architecture (names or shapes differ)."""


class UnsafeCheckpointError(CheckpointImportError, UnsafeInputError):
    """A checkpoint file would have to be unpickled (refused without permission, or not plain tensors)."""


class InterventionError(StageAttributionError, ValueError):
    """An intervention request is invalid (stage out of range, empty or non-finite sweep, ...)."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'x'?`` for the closest known name (difflib), or '' when none is close.

    Example:
        >>> did_you_mean("clasification", ["classification", "custom"])
        " Did you mean 'classification'?"
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build the standard error for a registry miss: the closest known name, then all of them."""
    hint = did_you_mean(name, known)
    return UnknownNameError(f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(known))}.")
