"""Behavior specs: dicts / JSON / YAML that name a registered kind and its arguments, for the CLI.

A spec file holds a list under ``behaviors``::

    behaviors:
      - name: toxicity
        kind: lm-toxicity-teacher-forced
        data: toxicity.jsonl          # relative paths resolve against the spec file's folder
        tokenizer: ./tokenizer

Example:
    >>> from hf_stage_attribution import behaviors
    >>> spec = {"name": "m", "kind": "classification", "data": [{"input": [1.0, 0.0], "label": 0}]}
    >>> b = behaviors.from_spec(spec)
    >>> behaviors.from_spec(b.to_spec()).to_spec() == b.to_spec()
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import BehaviorError
from .base import Behavior
from .registry import get

__all__ = ["from_spec", "load_specs", "read_spec_file", "specs_document"]


def read_spec_file(path: str | Path) -> Any:
    """Parse a JSON (``.json``) or YAML (``.yaml``/``.yml``, or anything else) spec file."""
    p = Path(path)
    if not p.is_file():
        raise BehaviorError(f"Behavior spec file {str(p)!r} does not exist; pass a JSON or YAML file.")
    text = p.read_text(encoding="utf-8")

    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise BehaviorError(f"Behavior spec file {str(p)!r} is not valid JSON/YAML: {exc}.") from None


def from_spec(
    spec: Mapping[str, Any] | str | Path, *, base_dir: str | Path | None = None, trust_code: bool = False
) -> Behavior:
    """Build one behavior from a spec dict (or a JSON/YAML file holding one).

    ``kind`` picks the registered class (an unknown kind raises UnknownNameError listing the known ones);
    ``trust_code=True`` is needed for specs that load code: a function (``custom`` kind, callable scorers), an
    ``evaluate`` module, a tokenizer/model folder whose config names custom code (``auto_map``). Without it they
    raise UnsafeInputError naming the opt-in; nothing in the spec itself can turn it on.
    """
    if isinstance(spec, (str, Path)):
        base_dir = Path(spec).parent if base_dir is None else base_dir
        spec = read_spec_file(spec)
    if not isinstance(spec, Mapping):
        raise BehaviorError(f"A behavior spec must be a mapping with a 'kind'; got a {type(spec).__name__}.")
    if "kind" not in spec:
        raise BehaviorError(f"A behavior spec needs 'kind' (one of the registered kinds); got keys {sorted(spec)}.")
    cls = get(str(spec["kind"]))
    return cls.from_spec(dict(spec), base_dir=base_dir, trust_code=trust_code)


def load_specs(path: str | Path, *, trust_code: bool = False) -> dict[str, Behavior]:
    """``{name: Behavior}`` from a JSON/YAML file with a list under ``behaviors`` (or a bare list), in order.

    An empty list, a missing or duplicate name raise BehaviorError; relative paths inside resolve against the
    file's folder.
    """
    content = read_spec_file(path)
    items = content.get("behaviors") if isinstance(content, Mapping) else content
    if not isinstance(items, list):
        raise BehaviorError(
            f"Behavior spec file {str(path)!r} needs a list under 'behaviors'; got {type(items).__name__}."
        )
    if not items:
        raise BehaviorError(f"Behavior spec file {str(path)!r} lists no behaviors; add at least one.")
    seen: set[str] = set()
    for i, item in enumerate(items):  # check every name before building anything
        if not isinstance(item, Mapping) or not item.get("name"):
            raise BehaviorError(f"Behavior {i} in {str(path)!r} needs a 'name' (and a 'kind').")
        if str(item["name"]) in seen:
            raise BehaviorError(
                f"Behavior name {item['name']!r} appears twice in {str(path)!r}; names must be unique."
            )
        seen.add(str(item["name"]))
    out: dict[str, Behavior] = {}
    for item in items:
        out[str(item["name"])] = from_spec(item, base_dir=Path(path).parent, trust_code=trust_code)
    return out


def specs_document(behaviors: Mapping[str, Behavior]) -> dict[str, Any]:
    """``{"behaviors": [spec, ...]}`` for a behavior set, ready for ``json.dump`` / ``yaml.safe_dump``."""
    if not behaviors:
        raise BehaviorError("The behavior set is empty; nothing to write.")
    return {"behaviors": [{**b.to_spec(), "name": name} for name, b in behaviors.items()]}
