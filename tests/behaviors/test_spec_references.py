"""A spec's tokenizer that is missing, holds no tokenizer files or does not load, and text examples without a
tokenizer, each fail when the spec is built, in one line that names the behavior, the spec file, the folder looked
at (relative paths: the spec file's folder, then the working directory) and what was expected there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError
from hf_stage_attribution.testing.lm import tiny_tokenizer

TEXT_ROWS = [{"text": "you are kind", "label": 0}, {"text": "you are a shit", "label": 1}]


def spec_file(folder: Path, **entries) -> Path:
    path = folder / "behaviors.json"
    item = {"name": "p-toxic", "kind": "classification", "data": TEXT_ROWS, "measure": "probability", **entries}
    path.write_text(json.dumps({"behaviors": [item]}))
    return path


def one_line_error(path: Path) -> str:
    with pytest.raises(BehaviorError) as err:
        behaviors.load_specs(path)
    message = str(err.value)
    assert "\n" not in message, message
    assert f"In spec file {str(path)!r}, line 1: " in message and "ehavior 'p-toxic'" in message
    return message


def test_a_folder_without_tokenizer_files_names_the_folder_and_the_files_expected(tmp_path):
    (tmp_path / "emptydir").mkdir()
    message = one_line_error(spec_file(tmp_path, tokenizer="emptydir"))
    assert f"The tokenizer folder {str((tmp_path / 'emptydir').resolve())!r} holds no tokenizer files" in message
    assert "tokenizer_config.json, tokenizer.json" in message and "save_pretrained" in message


def test_a_folder_outside_the_spec_is_resolved_and_refused_the_same_way(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "specs").mkdir()
    message = one_line_error(spec_file(tmp_path / "specs", tokenizer="../elsewhere"))
    assert f"folder {str((tmp_path / 'elsewhere').resolve())!r} holds no tokenizer files" in message


@pytest.mark.parametrize(
    "file, content", [("tokenizer_config.json", "{}"), ("tokenizer.json", "not json")], ids=["no-backend", "garbled"]
)
def test_tokenizer_files_that_do_not_load_give_one_line_naming_the_folder(tmp_path, file, content):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / file).write_text(content)
    message = one_line_error(spec_file(tmp_path, tokenizer="tok"))
    assert f"Cannot load a tokenizer from the folder {str((tmp_path / 'tok').resolve())!r}" in message
    assert "AutoTokenizer said:" in message and "tokenizer.save_pretrained(DIR)" in message


def test_a_relative_tokenizer_that_does_not_exist_says_where_it_was_looked_for(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    message = one_line_error(spec_file(tmp_path, tokenizer="./no_such_tok"))
    assert "relative paths are taken from the spec file's folder" in message
    assert f"{str(tmp_path / 'no_such_tok')!r} does not exist" in message
    assert f"then from the working directory ({str(work / 'no_such_tok')!r} does not exist)" in message
    with pytest.raises(BehaviorError, match="a relative path is taken from the working directory") as err:
        behaviors.Classification(TEXT_ROWS, tokenizer="no_such_tok")
    assert repr(os.path.join(str(work), "no_such_tok")) in str(err.value)


def test_a_relative_tokenizer_in_the_spec_folder_still_loads(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    b = behaviors.load_specs(spec_file(tmp_path, tokenizer="tok"))["p-toxic"]
    assert b.tokenizer is not None


@pytest.mark.parametrize("tokenizer", [None, "absent"], ids=["null", "absent"])
def test_text_examples_without_a_tokenizer_fail_when_the_spec_is_built(tmp_path, tokenizer):
    entries = {"tokenizer": None} if tokenizer is None else {}
    message = one_line_error(spec_file(tmp_path, **entries))
    assert "its examples have a 'text' field and no 'input' tensor, and it has no tokenizer" in message
    assert "text examples need 'tokenizer' (a local folder with the model's tokenizer" in message


def test_text_examples_without_a_tokenizer_fail_in_python_too_and_tensor_examples_do_not():
    with pytest.raises(BehaviorError, match="text examples need 'tokenizer'"):
        behaviors.Classification(TEXT_ROWS)
    with pytest.raises(BehaviorError, match="text examples need 'tokenizer'"):
        behaviors.SpuriousReliance(TEXT_ROWS, paired_key="other")
    assert len(behaviors.Classification([{"input": [1.0, 0.0], "text": "kept for reading", "label": 0}])) == 1
