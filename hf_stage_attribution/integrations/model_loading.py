"""Loading a model from a local directory for the command line: transformers models and PEFT adapters.

Custom code is never run implicitly: a model whose config needs custom code (``auto_map``) is refused unless
``trust_code=True`` (CLI: ``--trust-code``, the same opt-in that lets behavior specs import code), which is then
passed on as ``trust_remote_code``. Weights are read with ``use_safetensors=True``; a folder with only
``pytorch_model.bin`` is refused with a message saying how to convert it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._internal.memory import is_out_of_memory
from .._internal.pretrained import check_pretrained_dir
from ..errors import ModelMismatchError, StageAttributionError


def load_model(path: str | Path, *, trust_code: bool = False) -> Any:
    """Load the model saved at ``path`` (``save_pretrained`` output, or a PEFT adapter directory).

    A folder that cannot be read as a model (a ``config.json`` that is not valid JSON, truncated or corrupt
    weights, an unreadable file) raises :class:`ModelMismatchError` with the first line of the underlying error.

    Example::

        model = load_model("out/final")   # BertForSequenceClassification, GPT2LMHeadModel, PeftModel, ...
    """
    path = Path(path)
    with model_load_errors(path):
        if not path.is_dir():
            raise ModelMismatchError(
                f"Expected a model directory (save_pretrained output) at {path}, found "
                f"{'a file' if path.exists() else 'nothing'}. Pass the directory the final model was saved to."
            )
        if (path / "adapter_config.json").exists():
            return _load_adapter(path, trust_code)
        if not (path / "config.json").exists():
            raise ModelMismatchError(f"{path} has no config.json: it is not a transformers model directory.")
        check_pretrained_dir(path, "model", trust_code=trust_code, weights=True)
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_code)
        architectures = getattr(config, "architectures", None) or []
        load = {"trust_remote_code": trust_code, "use_safetensors": True, "attn_implementation": "eager"}
        for arch in architectures:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls.from_pretrained(path, **load)
        for auto in getattr(config, "auto_map", None) or {}:  # custom code, allowed by trust_code (checked above)
            if auto.startswith("AutoModel") and hasattr(transformers, auto):
                return getattr(transformers, auto).from_pretrained(path, **load)
        raise ModelMismatchError(
            f"{path} holds a {getattr(config, 'model_type', 'custom')!r} model whose architecture "
            f"({', '.join(architectures) or 'none listed'}) is not a transformers class. Load it yourself in Python "
            "and use StageAttributor (or register the class with transformers' Auto classes)."
        )


@contextlib.contextmanager
def model_load_errors(path: str | Path) -> Iterator[None]:
    """Inside the block, an error that says the model folder ``path`` is unreadable (:func:`is_load_error`)
    becomes the one-line :func:`load_error`; the package's own errors and anything else pass unchanged.

    Example:
        >>> try:
        ...     with model_load_errors("m"):
        ...         raise OSError("config.json is not a valid JSON file")
        ... except ModelMismatchError as err:
        ...     print(str(err)[:63])
        Cannot load the model at m (OSError: config.json is not a valid
    """
    try:
        yield
    except StageAttributionError:
        raise
    except Exception as exc:
        if not is_load_error(exc):
            raise
        raise load_error(path, exc) from exc


def is_load_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a model folder is unreadable (bad JSON, truncated weights, missing file): OSError,
    ValueError, KeyError, TypeError, safetensors' SafetensorError, or a RuntimeError that is not out-of-memory."""
    if isinstance(exc, RuntimeError):
        return not is_out_of_memory(exc)
    return isinstance(exc, OSError | ValueError | KeyError | TypeError) or type(exc).__name__ == "SafetensorError"


def load_error(path: str | Path, exc: BaseException) -> ModelMismatchError:
    """The one-line error for a model folder that transformers/PEFT/safetensors could not read.

    Example:
        >>> str(load_error("m", ValueError("Expecting value: line 1 column 1 (char 0)")))[:72]
        'Cannot load the model at m (ValueError: Expecting value: line 1 column 1'
    """
    first = str(exc).splitlines()[0][:300] if str(exc).strip() else ""
    found = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ModelMismatchError(
        f"Cannot load the model at {path} ({found}). Expected a save_pretrained directory with a valid config.json "
        "and complete weights (model.safetensors), or a PEFT adapter whose base model is a local directory; save "
        "the model again or pass another directory."
    )


def _load_adapter(path: Path, trust_code: bool) -> Any:
    from peft import PeftModel

    with open(path / "adapter_config.json", encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelMismatchError(
            f"The adapter at {path} names its base model {base!r}, which is not a local directory. "
            "Merge the adapter (merge_and_unload + save_pretrained) or fix base_model_name_or_path."
        )
    check_pretrained_dir(path, "adapter", trust_code=trust_code, weights=True)
    # the check above leaves PEFT only adapter_model.safetensors to read (it takes it over a .bin)
    return PeftModel.from_pretrained(load_model(base, trust_code=trust_code), path)
