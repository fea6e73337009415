"""Behavior/spec errors name the behavior and the spec file (and line), and suggest the closest known name."""

from __future__ import annotations

import json

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.errors import BehaviorError, UnknownNameError, did_you_mean, unknown_name
from hf_stage_attribution.testing.lm import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return path


def test_toxic_key_typo_names_the_behavior_the_spec_file_and_its_line(tmp_path, tokenizer_dir):
    spec = tmp_path / "behaviors.yaml"
    spec.write_text(
        "# two behaviors\n"
        "behaviors:\n"
        "  - name: fine\n"
        "    kind: classification\n"
        "    data: [{input: [1.0], label: 0}]\n"
        "  - name: toxicity\n"
        "    kind: lm-toxicity-teacher-forced\n"
        '    data: [{prompt: "a", toxic: "b", clean: "c"}]\n'
        f"    tokenizer: {tokenizer_dir}\n"
        "    toxic_key: toxik\n"
    )
    with pytest.raises(BehaviorError) as err:
        behaviors.load_specs(spec)
    message = str(err.value)
    assert f"spec file {str(spec)!r}, line 6" in message and "Behavior 'toxicity'" in message
    assert "toxic_key 'toxik' is not a field of its examples (fields: prompt, toxic, clean)" in message
    assert "Did you mean 'toxic'?" in message


def test_unknown_kind_and_keys_get_a_did_you_mean_and_their_place(tmp_path):
    spec = tmp_path / "behaviors.json"
    spec.write_text(json.dumps({"behaviors": [{"name": "m", "kind": "clasification", "data": [{"input": [1.0]}]}]}))
    with pytest.raises(UnknownNameError) as err:
        behaviors.load_specs(spec)
    message = str(err.value)
    assert message.startswith(f"In spec file {str(spec)!r}, line 1: behavior 'm': Unknown behavior kind")
    assert "Did you mean 'classification'?" in message and "Known behavior kinds:" in message
    spec.write_text(
        json.dumps(
            {"behaviors": [{"name": "m", "kind": "classification", "data": [{"input": [1.0]}], "lable_key": "y"}]},
            indent=1,
        )
    )
    with pytest.raises(BehaviorError, match=r"line 3: Behavior 'm' \(classification\): unknown spec keys") as err:
        behaviors.load_specs(spec)
    assert "'lable_key': Did you mean 'label_key'?" in str(err.value)
    assert did_you_mean("zzz", ["classification"]) == ""
    assert "Did you mean" not in str(unknown_name("estimator", "qqq", ["aa-linear"]))


def test_errors_at_evaluation_name_the_behavior_and_its_spec(tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_text("behaviors:\n  - name: m\n    kind: classification\n    data: [{input: [1.0, 0.0]}]\n")
    behavior = behaviors.load_specs(spec)["m"]  # no label field: only evaluation finds out
    with pytest.raises(BehaviorError) as err:
        behavior(torch.nn.Linear(2, 3))
    message = str(err.value)
    assert message.startswith(f"Behavior 'm' (classification, spec file {str(spec)!r}, line 2): ")
    assert "has no label" in message
