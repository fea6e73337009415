"""A ledger from published checkpoints (Hub revisions or repos, local folders, Trainer ``checkpoint-*``, LoRA).

``spec`` parses the boundary list, ``hub`` and ``cache`` locate files, ``trainer``, ``lora``, ``model`` and
``tensors`` read what each kind of checkpoint holds, ``plan`` decides what each stage can support, and ``importer``
writes the ledger through :mod:`hf_stage_attribution.ledger.writer`.
"""

from .importer import import_checkpoints

__all__ = ["import_checkpoints"]
