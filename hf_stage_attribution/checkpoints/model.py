"""What a checkpoint's ``config.json`` tells without loading weights: the model's parameter names and the
``Trainer``'s weight-decay groups, from the model class built on the ``meta`` device (no memory, no download,
never ``trust_remote_code``).

Example, with the ``config.json`` of a checkpoint read into ``config_dict``::

    names = parameter_names(config_dict)           # e.g. ['transformer.wte.weight', ...] or None
    tied_parameters(config_dict)                   # e.g. {'lm_head.weight': 'transformer.wte.weight'} or None
    embedding_parameters(config_dict)              # e.g. {'transformer.wte.weight'} or None
    groups = trainer_groups(config_dict, [10, 18])  # [decay names, no-decay names] or None
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from ..errors import CheckpointImportError

_CACHE: dict[str, Any] = {}


def meta_model(config: dict | None) -> torch.nn.Module | None:
    """The ``architectures[0]`` class of ``config`` built on the meta device, or None if that is not possible."""
    if not config or not isinstance(config.get("architectures"), list) or not config["architectures"]:
        return None
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE.clear()  # keep one model: a meta model is small, but configs of many architectures need not pile up
        _CACHE[key] = _build(config)
    return _CACHE[key]


def _build(config: dict) -> torch.nn.Module | None:
    try:
        import transformers

        cls = getattr(transformers, str(config["architectures"][0]), None)
        if cls is None or not hasattr(cls, "config_class"):
            return None
        cfg = cls.config_class.from_dict(dict(config))
        with torch.device("meta"):
            return cls(cfg)
    except Exception:  # any architecture transformers cannot build from this config: names stay as stored
        return None


def parameter_names(config: dict | None) -> list[str] | None:
    """Names of the model's parameters (tied weights once), in module order; None without a buildable config."""
    model = meta_model(config)
    return None if model is None else [n for n, _ in model.named_parameters()]


def tied_parameters(config: dict | None) -> dict[str, str] | None:
    """``{alias: parameter}`` for the model's tied weights (``lm_head.weight`` → the input embedding), or None."""
    model = meta_model(config)
    if model is None:
        return None
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


def embedding_parameters(config: dict | None) -> set[str] | None:
    """Names of the input and output embeddings' parameters (the tensors a resized vocabulary grows), or None."""
    model = meta_model(config)
    if model is None:
        return None
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: set[str] = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, torch.nn.Module):
            out |= {canonical[id(p)] for p in module.parameters()}
    return out


def decay_parameter_names(config: dict | None) -> list[str] | None:
    """The names ``transformers.Trainer`` applies weight decay to (its own rule, from the installed version)."""
    model = meta_model(config)
    if model is None:
        return None
    from transformers import Trainer

    return list(Trainer.get_decay_parameter_names(None, model))


def trainer_groups(config: dict | None, sizes: list[int], names: list[str]) -> list[list[str]] | None:
    """Names of the params in each group of a Trainer's optimizer (``sizes`` from ``optimizer.pt``), or None.

    The Trainer builds ``[decay params, no-decay params]`` in ``named_parameters()`` order; the result is only
    returned when the group sizes match exactly, so a mapping is never guessed.
    """
    order = parameter_names(config)
    if order is None or not set(order) <= set(names):
        return None
    if sizes == [len(order)]:
        return [order]
    if len(sizes) == 2:
        decay = set(decay_parameter_names(config) or [])
        groups = [[n for n in order if n in decay], [n for n in order if n not in decay]]
        if [len(g) for g in groups] == sizes:
            return groups
    return None


def split_no_decay(names: list[str], no_decay: Any, config: dict | None, label: str) -> tuple[list[str], list[str]]:
    """``(decay, no_decay)`` names by the spec's ``no_decay``: regex patterns, or ``"hf-trainer"`` (Trainer's rule)."""
    if no_decay == "hf-trainer":
        decay = decay_parameter_names(config)
        if decay is None:
            raise CheckpointImportError(
                f"{label}: `no_decay: hf-trainer` needs the checkpoint's config.json with an architecture "
                "transformers can build; give `no_decay` as a list of name patterns instead."
            )
        chosen = set(decay)
        return [n for n in names if n in chosen], [n for n in names if n not in chosen]
    if not isinstance(no_decay, list) or not all(isinstance(p, str) for p in no_decay):
        raise CheckpointImportError(
            f"{label}: expected `no_decay` to be a list of regex patterns or 'hf-trainer', found {no_decay!r}."
        )
    try:
        patterns = [re.compile(p) for p in no_decay]
    except re.error as exc:
        raise CheckpointImportError(f"{label}: invalid `no_decay` pattern: {exc}.") from exc
    excluded = {n for n in names if any(p.search(n) for p in patterns)}
    return [n for n in names if n not in excluded], [n for n in names if n in excluded]
