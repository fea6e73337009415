"""A spec path that is not a spec file (binary, a directory, malformed YAML/JSON) raises one line that says what
was expected and where the problem is."""

from __future__ import annotations

import pytest

from hf_stage_attribution import behaviors
from hf_stage_attribution.behaviors.spec import read_spec_file
from hf_stage_attribution.errors import BehaviorError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_a_binary_file_is_refused(tmp_path):
    spec = tmp_path / "model.safetensors"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(BehaviorError) as err:
        behaviors.load_specs(spec)
    assert "to be a YAML/JSON text file (UTF-8), found bytes that are not UTF-8 text" in _one_line(err)


def test_a_directory_is_named_a_directory(tmp_path):
    with pytest.raises(BehaviorError) as err:
        read_spec_file(tmp_path)
    message = _one_line(err)
    assert "is a directory" in message and "does not exist" not in message
    with pytest.raises(BehaviorError, match="does not exist"):
        read_spec_file(tmp_path / "missing.yaml")


def test_malformed_yaml_is_one_line_with_line_and_column(tmp_path):
    spec = tmp_path / "behaviors.yaml"
    spec.write_text("behaviors:\n  - name: x\n    kind: classification\n   data: [1, 2]\n")
    with pytest.raises(BehaviorError) as err:
        behaviors.load_specs(spec)
    message = _one_line(err)
    assert f"Behavior spec file {str(spec)!r} is not valid YAML" in message and "line 4, column 4" in message


def test_malformed_json_is_one_line_with_line_and_column(tmp_path):
    spec = tmp_path / "behaviors.json"
    spec.write_text('{"behaviors": [\n  {"name": "x",}\n]}')
    with pytest.raises(BehaviorError) as err:
        read_spec_file(spec)
    assert "is not valid JSON: Expecting property name enclosed in double quotes at line 2" in _one_line(err)
