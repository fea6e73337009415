"""Loading tokenizers and models that behaviors take either as objects or as local paths (offline only).

Example:
    >>> from hf_stage_attribution.behaviors.loading import reference_path
    >>> reference_path("/tmp", "tokenizer")
    '/tmp'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BehaviorError

__all__ = ["load_tokenizer", "load_sequence_classifier", "reference_path", "resolve_path"]


def resolve_path(ref: Any, base_dir: Path | None) -> Any:
    """``ref`` resolved against ``base_dir`` when it is a relative path string that exists there."""
    if isinstance(ref, str) and base_dir is not None and not Path(ref).is_absolute():
        candidate = Path(base_dir) / ref
        if candidate.exists():
            return str(candidate)
    return ref


def _local_dir(ref: str | Path, what: str) -> str:
    path = Path(ref)
    if not path.is_dir():
        raise BehaviorError(
            f"The {what} {str(ref)!r} is not a local directory; behaviors load {what}s offline only: "
            f"save it with save_pretrained(DIR) and pass DIR, or pass the object itself."
        )
    return str(path)


def load_tokenizer(ref: Any) -> Any:
    """A tokenizer object as given, or ``AutoTokenizer.from_pretrained`` of a local directory."""
    if ref is None or not isinstance(ref, (str, Path)):
        return ref
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_dir(ref, "tokenizer"), local_files_only=True)


def load_sequence_classifier(ref: Any) -> Any:
    """A model object as given, or ``AutoModelForSequenceClassification`` loaded from a local directory."""
    if not isinstance(ref, (str, Path)):
        return ref
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(_local_dir(ref, "model"), local_files_only=True)


def reference_path(obj: Any, what: str) -> str:
    """The local path a spec can use to reload ``obj`` (a path string, or an object's ``name_or_path``)."""
    if isinstance(obj, (str, Path)):
        return str(obj)
    path = getattr(obj, "name_or_path", None) or getattr(getattr(obj, "config", None), "_name_or_path", None)
    if path and Path(path).is_dir():
        return str(path)
    raise BehaviorError(
        f"This behavior's {what} was given as an in-memory object with no local path, so it cannot be written to "
        f"a spec; save it with save_pretrained(DIR) and pass DIR as the {what}."
    )
