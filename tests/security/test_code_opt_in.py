"""Every path that loads code from a spec or a model folder obeys one opt-in: ``trust_code`` (CLI ``--trust-code``).

An ``evaluate`` module named in a behavior spec is a Python script; a model folder whose config has an ``auto_map``
names Python files; pickle-only weights would be unpickled. Without the opt-in each is refused with an error that
names it (and the code never runs); with it, the evaluate module and the custom-code model load.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hf_stage_attribution import StageLedger, behaviors
from hf_stage_attribution.cli.main import main
from hf_stage_attribution.errors import UnsafeInputError
from hf_stage_attribution.integrations.model_loading import load_model
from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer

_METRIC = """
import datasets
import evaluate

open({marker!r}, "w").close()  # importing this script is running code


class ExclamationCount(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            description="number of '!' in each text", citation="", inputs_description="predictions: list of str",
            features=datasets.Features({{"predictions": datasets.Value("string")}}),
        )

    def _compute(self, predictions):
        return {{"bangs": [float(t.count("!")) for t in predictions]}}
"""


@pytest.fixture
def spec_with_evaluate_module(tmp_path):
    """A spec file whose scorer is an evaluate module in a folder next to it (relative path, as a shared spec has)."""
    folder = tmp_path / "bangs"
    folder.mkdir()
    marker = tmp_path / "metric-code-ran"
    (folder / "bangs.py").write_text(_METRIC.format(marker=str(marker)))
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    spec = {
        "behaviors": [
            {
                "name": "bangs",
                "kind": "lm-toxicity-generations",
                "data": [{"prompt": "you are"}],
                "tokenizer": "tok",
                "scorer": {"type": "evaluate", "module": "bangs"},
                "num_samples": 1,
            }
        ]
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, marker


def test_an_evaluate_module_in_a_spec_needs_trust_code(spec_with_evaluate_module):
    path, marker = spec_with_evaluate_module
    with pytest.raises(UnsafeInputError, match=r"trust_code=True \(CLI: --trust-code\)") as err:
        behaviors.load_specs(path)
    assert "evaluate" in str(err.value)
    assert not marker.exists(), "the module's script ran without the opt-in"
    loaded = behaviors.load_specs(path, trust_code=True)["bangs"]
    assert marker.exists()
    assert loaded.scorer(["hi!!", "hi"]) == [2.0, 0.0]


def test_the_hub_evaluate_measurement_needs_trust_code_too():
    with pytest.raises(UnsafeInputError, match="trust_code"):
        behaviors.get_scorer({"type": "evaluate", "module": "toxicity"})


def test_the_attribute_command_refuses_an_evaluate_spec_without_trust_code(
    spec_with_evaluate_module, tmp_path, capsys
):
    path, marker = spec_with_evaluate_module
    model = tiny_gpt2(tiny_tokenizer())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with StageLedger(tmp_path / "ledger").record_stage("sft", model=model, optimizer=opt) as rec:
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        opt.step()
        rec.step()
    model.save_pretrained(tmp_path / "model")
    argv = ["attribute", str(tmp_path / "ledger"), "--model", str(tmp_path / "model"), "--behaviors", str(path)]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) != 0
    assert "--trust-code" in capsys.readouterr().err
    assert not marker.exists()


_CUSTOM_MODEL = """
from transformers import GPT2Config, GPT2LMHeadModel


class MarkedConfig(GPT2Config):
    model_type = "marked-gpt2"


class MarkedLM(GPT2LMHeadModel):
    config_class = MarkedConfig

    def __init__(self, config):
        super().__init__(config)
        self.custom_code_ran = True
"""


@pytest.fixture
def custom_code_model(tmp_path):
    folder = tmp_path / "marked"
    tiny_gpt2(tiny_tokenizer()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="marked-gpt2",
        architectures=["MarkedLM"],
        auto_map={"AutoConfig": "marked_model.MarkedConfig", "AutoModelForCausalLM": "marked_model.MarkedLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "marked_model.py").write_text(_CUSTOM_MODEL)
    return folder


def test_a_model_with_custom_code_needs_trust_code(custom_code_model):
    with pytest.raises(UnsafeInputError, match=r"needs custom code.*trust_code=True \(CLI: --trust-code\)"):
        load_model(custom_code_model)
    model = load_model(custom_code_model, trust_code=True)
    assert type(model).__name__ == "MarkedLM" and model.custom_code_ran


def test_a_tokenizer_or_scorer_model_with_custom_code_in_a_spec_needs_trust_code(tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["my_tokenizer.MyTokenizer", None]}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    spec = {"kind": "lm-toxicity-teacher-forced", "data": [{"prompt": "a", "toxic": "b", "clean": "c"}]}
    with pytest.raises(UnsafeInputError, match="tokenizer .* needs custom code.*--trust-code"):
        behaviors.from_spec({**spec, "tokenizer": "tok"}, base_dir=tmp_path)
    with pytest.raises(UnsafeInputError, match="scorer model .* needs custom code.*--trust-code"):
        behaviors.get_scorer({"type": "transformers", "model": str(tok_dir)})


def test_pickle_only_model_folders_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    model = tiny_gpt2(tiny_tokenizer())
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeInputError, match="only pickle weights .*pytorch_model.bin.*use_safetensors=True"):
        load_model(folder)
    with pytest.raises(UnsafeInputError, match="only pickle weights"):
        behaviors.get_scorer({"type": "transformers", "model": str(folder)})
