"""Checks made before ``from_pretrained`` reads a local directory: custom code and pickle-only weights.

Two things in a ``save_pretrained`` folder can run code when loaded: an ``auto_map`` entry in ``config.json``
(or ``tokenizer_config.json``) that names Python files to import, and pickle weights (``pytorch_model.bin``).
:func:`needs_custom_code` finds the first; :func:`check_pretrained_dir` refuses it unless the caller's one code
opt-in (``trust_code=True``, CLI ``--trust-code``) is given, and refuses folders whose weights are pickles only
(every ``from_pretrained`` of the package passes ``use_safetensors=True``).

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "my_model.MyModel"}}))
    >>> needs_custom_code(folder)
    True
    >>> check_pretrained_dir(folder, "model", trust_code=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    hf_stage_attribution.errors.UnsafeInputError: The model at ... needs custom code ... trust_code=True ...
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnsafeInputError

__all__ = ["needs_custom_code", "check_pretrained_dir", "TRUST_CODE_HINT"]

TRUST_CODE_HINT = "pass trust_code=True (CLI: --trust-code) if you trust its author"
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def needs_custom_code(directory: str | Path) -> bool:
    """Whether a config file of ``directory`` names Python code to import (``auto_map``)."""
    for name in _CONFIG_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # transformers reports an unreadable config itself
        if isinstance(content, dict) and content.get("auto_map"):
            return True
    return False


def check_pretrained_dir(directory: str | Path, what: str, *, trust_code: bool, weights: bool = False) -> None:
    """Refuse ``directory`` if it needs custom code without ``trust_code``, or (``weights=True``) if its only
    weights are pickles (``use_safetensors=True`` is passed when it is loaded)."""
    directory = Path(directory)
    if not trust_code and needs_custom_code(directory):
        raise UnsafeInputError(
            f"The {what} at {directory} needs custom code (an 'auto_map' in its config names Python files, which "
            f"loading would import and run); code is never run unless you allow it: {TRUST_CODE_HINT}."
        )
    if weights and directory.is_dir():
        names = {p.name for p in directory.iterdir()}
        if not names & set(_SAFE_WEIGHTS) and names & set(_PICKLE_WEIGHTS):
            found = ", ".join(sorted(names & set(_PICKLE_WEIGHTS)))
            raise UnsafeInputError(
                f"The {what} at {directory} has only pickle weights ({found}) and no safetensors; models are loaded "
                "with use_safetensors=True because unpickling can run code. Convert it once, in a process you "
                "trust: `AutoModel.from_pretrained(DIR).save_pretrained(DIR)` writes model.safetensors."
            )
