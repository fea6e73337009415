"""Loading a model from a local directory for the command line: transformers models and PEFT adapters.

``trust_remote_code`` is never enabled implicitly: a model whose config needs custom code is refused with a
message saying how to load it from Python instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelMismatchError


def load_model(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load the model saved at ``path`` (``save_pretrained`` output, or a PEFT adapter directory).

    Example::

        model = load_model("out/final")   # BertForSequenceClassification, GPT2LMHeadModel, PeftModel, ...
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelMismatchError(
            f"Expected a model directory (save_pretrained output) at {path}, found "
            f"{'a file' if path.exists() else 'nothing'}. Pass the directory the final model was saved to."
        )
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, trust_remote_code)
    if not (path / "config.json").exists():
        raise ModelMismatchError(f"{path} has no config.json: it is not a transformers model directory.")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(path, trust_remote_code=trust_remote_code, attn_implementation="eager")
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ModelMismatchError(
            f"{path} needs custom code (config.auto_map) to load; this tool never runs remote code implicitly. "
            "Load the model yourself in Python and use StageAttributor directly."
        )
    raise ModelMismatchError(
        f"{path} holds a {getattr(config, 'model_type', 'custom')!r} model whose architecture "
        f"({', '.join(architectures) or 'none listed'}) is not a transformers class. Load it yourself in Python "
        "and use StageAttributor (or register the class with transformers' Auto classes)."
    )


def _load_adapter(path: Path, trust_remote_code: bool) -> Any:
    from peft import PeftModel

    with open(path / "adapter_config.json", encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelMismatchError(
            f"The adapter at {path} names its base model {base!r}, which is not a local directory. "
            "Merge the adapter (merge_and_unload + save_pretrained) or fix base_model_name_or_path."
        )
    return PeftModel.from_pretrained(load_model(base, trust_remote_code=trust_remote_code), path)
