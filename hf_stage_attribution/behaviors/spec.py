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

from ..errors import BehaviorError, StageAttributionError, UnknownNameError
from .base import Behavior
from .registry import get

__all__ = ["from_spec", "load_specs", "read_spec_file", "spec_item_lines", "specs_document"]


def read_spec_file(path: str | Path) -> Any:
    """Parse a JSON (``.json``) or YAML (``.yaml``/``.yml``, or anything else) spec file.

    A missing path, a directory, a file that is not UTF-8 text and a file that does not parse each raise a one-line
    BehaviorError (with the line and column of a parse error).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "b.yaml").write_text("behaviors: [a, b")
        >>> read_spec_file(folder / "b.yaml")
        Traceback (most recent call last):
        ...
        hf_stage_attribution.errors.BehaviorError: Behavior spec file '...' is not valid YAML: ...line 1, column 17...
    """
    p = Path(path)
    if p.is_dir():
        raise BehaviorError(
            f"Expected the behavior spec to be a YAML/JSON file, but {str(p)!r} is a directory. Pass the spec file "
            "itself (e.g. behaviors.yaml)."
        )
    if not p.is_file():
        raise BehaviorError(f"Behavior spec file {str(p)!r} does not exist; pass a JSON or YAML file.")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BehaviorError(
            f"Expected the behavior spec {str(p)!r} to be a YAML/JSON text file (UTF-8), found bytes that are not "
            f"UTF-8 text (at byte {exc.start}). Pass the spec file, not a data or model file."
        ) from None
    except OSError as exc:
        raise BehaviorError(f"Cannot read the behavior spec file {str(p)!r}: {exc.strerror or exc}.") from None
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BehaviorError(
                f"Behavior spec file {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                f"{exc.colno}. Fix the file (JSON needs double quotes and no trailing commas)."
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BehaviorError(
            f"Behavior spec file {str(p)!r} is not valid YAML: {_yaml_problem(exc)}. Fix the file (check the "
            "indentation and the brackets/quotes there)."
        ) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where (1-based line and column)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(part for part in (getattr(exc, "context", None), problem) if part) or type(exc).__name__
    if mark is None:
        return " ".join(str(exc).split())
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}"


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
        raise BehaviorError(
            f"Behavior {spec.get('name', '(unnamed)')!r}: a behavior spec needs 'kind' (one of the registered kinds); "
            f"got keys {sorted(spec)}."
        )
    cls = get(str(spec["kind"]))
    return cls.from_spec(dict(spec), base_dir=base_dir, trust_code=trust_code)


def spec_item_lines(path: str | Path) -> list[int | None]:
    """The 1-based line where each item of the file's behavior list starts (None where unknown).

    JSON is read with the YAML parser too (it gives positions); a file it cannot read gives no lines.
    """
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return []
    if isinstance(root, yaml.MappingNode):
        root = next((value for key, value in root.value if getattr(key, "value", None) == "behaviors"), None)
    if not isinstance(root, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in root.value]


def _where(path: str | Path, lines: list[int | None], i: int) -> str:
    line = lines[i] if i < len(lines) else None
    return f"spec file {str(path)!r}" + (f", line {line}" if line else f", behavior #{i}")


def located(exc: StageAttributionError, name: str | None, where: str) -> StageAttributionError:
    """``exc`` (same class) with a message that names the behavior and where its spec is."""
    message = str(exc)
    who = "" if name is None or repr(str(name)) in message else f"behavior {str(name)!r}: "
    new = type(exc)(f"In {where}: {who}{message}")
    if isinstance(exc, BehaviorError | UnknownNameError):
        new.__dict__.update(exc.__dict__)
    return new


def load_specs(path: str | Path, *, trust_code: bool = False) -> dict[str, Behavior]:
    """``{name: Behavior}`` from a JSON/YAML file with a list under ``behaviors`` (or a bare list), in order.

    An empty list, a missing or duplicate name raise BehaviorError; relative paths inside resolve against the
    file's folder. Every error names the behavior and the spec file (with the line where the item starts).
    """
    content = read_spec_file(path)
    items = content.get("behaviors") if isinstance(content, Mapping) else content
    if not isinstance(items, list):
        raise BehaviorError(
            f"Behavior spec file {str(path)!r} needs a list under 'behaviors'; got {type(items).__name__}."
        )
    if not items:
        raise BehaviorError(f"Behavior spec file {str(path)!r} lists no behaviors; add at least one.")
    lines = spec_item_lines(path)
    seen: set[str] = set()
    for i, item in enumerate(items):  # check every name before building anything
        if not isinstance(item, Mapping) or not item.get("name"):
            raise BehaviorError(f"Behavior {i} in {_where(path, lines, i)} needs a 'name' (and a 'kind').")
        if str(item["name"]) in seen:
            raise BehaviorError(
                f"Behavior name {item['name']!r} appears twice in {_where(path, lines, i)}; names must be unique."
            )
        seen.add(str(item["name"]))
    out: dict[str, Behavior] = {}
    for i, item in enumerate(items):
        where = _where(path, lines, i)
        try:
            behavior = from_spec(item, base_dir=Path(path).parent, trust_code=trust_code)
        except (BehaviorError, UnknownNameError) as exc:
            raise located(exc, str(item["name"]), where) from exc
        behavior.spec_origin = where  # runtime errors of this behavior name its spec too
        out[str(item["name"])] = behavior
    return out


def specs_document(behaviors: Mapping[str, Behavior]) -> dict[str, Any]:
    """``{"behaviors": [spec, ...]}`` for a behavior set, ready for ``json.dump`` / ``yaml.safe_dump``."""
    if not behaviors:
        raise BehaviorError("The behavior set is empty; nothing to write.")
    return {"behaviors": [{**b.to_spec(), "name": name} for name, b in behaviors.items()]}
