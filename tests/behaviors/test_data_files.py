"""Behavior data files: suffixes in any case, a JSON list in a file of another suffix, a UTF-8 byte-order mark."""

from __future__ import annotations

import json

import pytest

from hf_stage_attribution.behaviors.data import read_json_examples
from hf_stage_attribution.errors import BehaviorError

ROWS = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
ONE_PER_LINE = "[\n" + ",\n".join(json.dumps(r) for r in ROWS) + "\n]\n"  # valid JSON that looks like JSONL
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)


@pytest.mark.parametrize(("name", "body"), [
    ("examples.JSON", ONE_PER_LINE), ("examples.txt", ONE_PER_LINE), ("examples.Jsonl", JSONL),
    ("examples.txt", JSONL), ("examples", JSONL),
])  # fmt: skip
def test_json_or_jsonl_is_read_whatever_the_suffix(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    assert read_json_examples(path) == ROWS


@pytest.mark.parametrize(("name", "body"), [("data.jsonl", JSONL), ("data.json", json.dumps(ROWS))])
def test_utf8_byte_order_mark_is_accepted(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(("\ufeff" + body).encode("utf-8"))
    assert read_json_examples(path) == ROWS


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(JSONL + "{oops\n", encoding="utf-8")
    with pytest.raises(BehaviorError, match="JSONL line 3"):
        read_json_examples(path)
