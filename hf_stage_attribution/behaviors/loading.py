"""Loading tokenizers and models that behaviors take either as objects or as local paths (offline only).

A folder whose config needs custom code (``auto_map``) is refused unless ``trust_code=True`` (the spec loaders'
and the CLI's one code opt-in, ``--trust-code``); models are read with ``use_safetensors=True``.

Example:
    >>> from hf_stage_attribution.behaviors.loading import reference_path
    >>> reference_path("/tmp", "tokenizer")
    '/tmp'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._internal.pretrained import check_pretrained_dir, needs_custom_code
from ..errors import BehaviorError, StageAttributionError
from .base import one_line

__all__ = [
    "folder_tokenizer", "has_tokenizer_files", "load_tokenizer", "load_sequence_classifier", "reference_path",
    "resolve_path", "spec_reference",
]  # fmt: skip

_TOKENIZER_FILES = (
    "tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model",
)  # fmt: skip


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds one of the files ``tokenizer.save_pretrained`` writes (``_TOKENIZER_FILES``)."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def resolve_path(ref: Any, base_dir: Path | None) -> Any:
    """``ref`` resolved against ``base_dir`` when it is a relative path string that exists there."""
    if isinstance(ref, str) and base_dir is not None and not Path(ref).is_absolute():
        candidate = Path(base_dir) / ref
        if candidate.exists():
            return str(candidate)
    return ref


def _not_a_folder(path: Path) -> str:
    return "is a file, not a folder" if path.exists() else "does not exist"


def _local_dir(ref: str | Path, what: str) -> str:
    path = Path(ref)
    if not path.is_dir():
        where = "" if path.is_absolute() else " (a relative path is taken from the working directory)"
        raise BehaviorError(
            f"The {what} {str(ref)!r} is not a local directory: {str(path.absolute())!r} {_not_a_folder(path)}"
            f"{where}; behaviors load {what}s offline only: save it with save_pretrained(DIR) and pass DIR, or pass "
            "the object itself."
        )
    return str(path)


def load_tokenizer(ref: Any, *, trust_code: bool = False) -> Any:
    """A tokenizer object as given, or ``AutoTokenizer.from_pretrained`` of a local directory (custom-code
    tokenizers only with ``trust_code=True``)."""
    if ref is None or not isinstance(ref, (str, Path)):
        return ref
    from transformers import AutoTokenizer

    path = _local_dir(ref, "tokenizer")
    check_pretrained_dir(path, "tokenizer", trust_code=trust_code)
    folder, expected = str(Path(path).resolve()), ", ".join(_TOKENIZER_FILES)
    if not has_tokenizer_files(path):
        raise BehaviorError(
            f"The tokenizer folder {folder!r} holds no tokenizer files (expected one of {expected}); pass the "
            "folder that tokenizer.save_pretrained(DIR) wrote (usually the model's folder)."
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_code)
    except StageAttributionError:
        raise
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError/... with multi-line messages
        raise BehaviorError(
            f"Cannot load a tokenizer from the folder {folder!r} (AutoTokenizer said: {one_line(exc)}); expected the "
            f"files tokenizer.save_pretrained(DIR) writes ({expected}) — pass the folder holding the model's own "
            "tokenizer."
        ) from exc


def folder_tokenizer(model_ref: Any) -> Any:
    """The tokenizer saved beside a model: in the folder ``model_ref`` names, or the folder a model object was
    loaded from (``name_or_path``); None when there is no such folder, it holds no tokenizer files, or (for an
    object) its tokenizer needs custom code."""
    is_path = isinstance(model_ref, (str, Path))
    folder = model_ref if is_path else getattr(model_ref, "name_or_path", None)
    if not isinstance(folder, (str, Path)) or not folder or not Path(folder).is_dir():
        return None
    if not has_tokenizer_files(folder):
        return None
    if not is_path and needs_custom_code(folder):
        return None  # an object loaded with trust_code; its folder's tokenizer is not loaded behind the user's back
    return load_tokenizer(str(folder))


def load_sequence_classifier(ref: Any, *, trust_code: bool = False) -> Any:
    """A model object as given, or ``AutoModelForSequenceClassification`` loaded from a local directory
    (safetensors weights only; custom-code models only with ``trust_code=True``)."""
    if not isinstance(ref, (str, Path)):
        return ref
    from transformers import AutoModelForSequenceClassification

    path = _local_dir(ref, "model")
    check_pretrained_dir(path, "model", trust_code=trust_code, weights=True)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_code, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:  # transformers' multi-line messages
        raise BehaviorError(
            f"Cannot load a sequence-classification (reward) model from {Path(path).resolve()}: "
            f"{type(exc).__name__}: {one_line(exc)}. Expected a folder written by save_pretrained of an "
            "AutoModelForSequenceClassification model (config.json with a *ForSequenceClassification architecture, "
            "safetensors weights)."
        ) from exc


def spec_reference(ref: Any, base_dir: Path | None, what: str, *, trust_code: bool) -> Any:
    """A tokenizer/model entry of a spec: the path resolved against ``base_dir``; a local folder that needs custom
    code is refused without ``trust_code``, and with it loaded here (the behavior receives the object)."""
    ref = resolve_path(ref, base_dir)
    if isinstance(ref, str) and not Path(ref).is_dir():
        raise BehaviorError(_missing_reference(ref, base_dir, what))
    if not isinstance(ref, str):
        return ref
    check_pretrained_dir(ref, what, trust_code=trust_code)
    if not trust_code or not needs_custom_code(ref):
        return ref
    if what == "reward model":
        return load_sequence_classifier(ref, trust_code=trust_code)
    return load_tokenizer(ref, trust_code=trust_code)


def _missing_reference(ref: str, base_dir: Path | None, what: str) -> str:
    """Where a spec's ``what`` path ``ref`` (not a folder) was looked for: relative paths are taken from the spec
    file's folder, then from the working directory."""
    path = Path(ref)
    if path.is_absolute():
        looked = f"{ref!r} {_not_a_folder(path)}"
    elif base_dir is not None:
        in_spec = Path(base_dir).absolute() / ref
        looked = (
            f"relative paths are taken from the spec file's folder ({str(in_spec)!r} {_not_a_folder(in_spec)}), "
            f"then from the working directory ({str(path.absolute())!r} {_not_a_folder(path)})"
        )
    else:
        looked = f"a relative path is taken from the working directory: {str(path.absolute())!r} {_not_a_folder(path)}"
    return (
        f"The {what} {ref!r} is not a local directory: {looked}. Behaviors load {what}s offline only: give the folder "
        "that save_pretrained(DIR) wrote, relative to the spec file or absolute."
    )


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
