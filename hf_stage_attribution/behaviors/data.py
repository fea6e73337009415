"""Behavior data: a ``datasets.Dataset``, a list (of dicts, or of anything for custom behaviors), a dict of
columns, or a JSON / JSONL file path, held with where it came from so that specs can point back to it.

Example:
    >>> from hf_stage_attribution.behaviors.data import ExampleData
    >>> data = ExampleData.from_any([{"text": "a"}, {"text": "b"}, {"text": "c"}])
    >>> [r["text"] for r in data.select([2, 0]).rows(0, 2)]
    ['c', 'a']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BehaviorError

__all__ = ["ExampleData", "read_json_examples", "jsonable"]


def read_json_examples(path: str | Path) -> list[Any]:
    """Read examples from a ``.json`` file (a list, or ``{"examples": [...]}`` / ``{"data": [...]}``) or a
    ``.jsonl`` file (one JSON value per line); suffixes in any case, UTF-8 with or without a byte-order mark. A file
    with another suffix is read as one JSON value when it parses as one, else as JSONL."""
    p = Path(path)
    if not p.is_file():
        raise BehaviorError(f"Behavior data file {str(p)!r} does not exist; expected a .json or .jsonl file path.")
    text = p.read_text(encoding="utf-8-sig")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _json_lines(text)
        if suffix == ".json":
            value = json.loads(text)
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return _json_lines(text)
    except json.JSONDecodeError as exc:
        raise BehaviorError(f"Behavior data file {str(p)!r} is not valid JSON/JSONL ({exc}); fix the file.") from None
    if isinstance(value, Mapping):
        for key in ("examples", "data"):
            if isinstance(value.get(key), list):
                return value[key]
        return _columns_to_rows(value, str(p))
    if not isinstance(value, list):
        raise BehaviorError(f"Behavior data file {str(p)!r} holds a {type(value).__name__}; expected a list.")
    return value


def _json_lines(text: str) -> list[Any]:
    """One JSON value per non-blank line; a bad line's error names its line number in the file."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(f"JSONL line {number}: {exc.msg}", exc.doc, exc.pos) from None
    return rows


def _columns_to_rows(columns: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    lengths = {k: len(v) for k, v in columns.items() if isinstance(v, (list, tuple))}
    if not lengths or len(set(lengths.values())) != 1 or len(lengths) != len(columns):
        raise BehaviorError(
            f"Behavior data {where} is a mapping but not a dict of equal-length columns (lengths: {lengths}); "
            "pass a list of examples, a dict of columns, or {'examples': [...]}."
        )
    n = next(iter(lengths.values()))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def jsonable(value: Any) -> Any:
    """``value`` with tensors/arrays turned into (nested) lists, so it can be written as JSON."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise BehaviorError(
        f"Behavior data holds a {type(value).__name__}, which cannot be written to a JSON spec; "
        "save the data to a JSON/JSONL file and pass its path instead."
    )


class ExampleData:
    """An ordered set of behavior examples: ``items`` (a list or a ``datasets.Dataset``), the file it was read
    from (``source``, or None), and ``indices`` (positions of the items in the original set).

    Example:
        >>> ExampleData.from_any({"text": ["a", "b"], "label": [0, 1]}).select([1]).to_spec()
        {'data': [{'text': 'b', 'label': 1}], 'indices': [1]}
    """

    def __init__(
        self, items: Any, source: str | None = None, indices: list[int] | None = None, total: int | None = None
    ) -> None:
        self.items = items
        self.source = source
        self.indices = list(range(len(items))) if indices is None else list(indices)
        self.total = len(items) if total is None else total  # size of the original set

    @classmethod
    def from_any(cls, data: Any, base_dir: str | Path | None = None) -> ExampleData:
        """Build from a Dataset, a list/tuple, a dict of columns, an :class:`ExampleData`, or a file path
        (relative paths are resolved against ``base_dir``)."""
        if isinstance(data, ExampleData):
            return data
        if isinstance(data, (str, Path)):
            path = Path(data)
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            return cls(read_json_examples(path), source=str(path))
        if _is_dataset(data):
            return cls(data)
        if isinstance(data, Mapping):
            return cls(_columns_to_rows(data, "given as a dict"))
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            return cls(list(data))
        raise BehaviorError(
            f"Behavior data of type {type(data).__name__} is not supported; pass a datasets.Dataset, a list of "
            "examples, a dict of columns, or a JSON/JSONL file path."
        )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def is_dataset(self) -> bool:
        return _is_dataset(self.items)

    def select(self, indices: Sequence[int]) -> ExampleData:
        """The examples at ``indices`` (positions in this set), in the order given."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise BehaviorError(f"select() got indices {bad[:5]} outside [0, {len(self)}); pass positions in the set.")
        items = self.items.select(idx) if self.is_dataset else [self.items[i] for i in idx]
        return ExampleData(items, self.source, [self.indices[i] for i in idx], self.total)

    def batch(self, start: int, stop: int) -> Any:
        """Items ``start:stop``: a list slice, or for a Dataset its dict of columns (``dataset[start:stop]``)."""
        return self.items[start:stop]

    def rows(self, start: int = 0, stop: int | None = None) -> list[Any]:
        """Items ``start:stop`` as a list of rows (Dataset rows as dicts)."""
        stop = len(self) if stop is None else stop
        if self.is_dataset:
            return [self.items[i] for i in range(start, stop)]
        return list(self.items[start:stop])

    def to_spec(self) -> dict[str, Any]:
        """``{"data": path, "select": [...]}`` when read from a file, else the examples inline."""
        if self.source is not None:
            spec: dict[str, Any] = {"data": self.source}
            if self.indices != list(range(self.total)):
                spec["select"] = list(self.indices)
            return spec
        spec = {"data": jsonable(self.rows())}
        if self.indices != list(range(len(self))):
            spec["indices"] = list(self.indices)  # original positions: they seed per-example sampling
        return spec

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], base_dir: str | Path | None = None) -> ExampleData:
        """The examples of a behavior spec: ``data`` (+ ``select`` for files, ``indices`` for inline data)."""
        if "data" not in spec:
            raise BehaviorError(
                f"A behavior spec of kind {spec.get('kind')!r} needs 'data' (a JSON/JSONL path or a list)."
            )
        data = cls.from_any(spec["data"], base_dir=base_dir)
        if spec.get("select") is not None:
            data = data.select(spec["select"])
        if spec.get("indices") is not None:
            indices = [int(i) for i in spec["indices"]]
            if len(indices) != len(data):
                raise BehaviorError(f"'indices' has {len(indices)} entries for {len(data)} examples; they must match.")
            data = ExampleData(data.items, data.source, indices, max(indices, default=-1) + 1)
        return data


def _is_dataset(obj: Any) -> bool:
    return type(obj).__name__ == "Dataset" and hasattr(obj, "select") and hasattr(obj, "column_names")
