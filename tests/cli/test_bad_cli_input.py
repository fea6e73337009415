"""Bad command-line input gets a one-line error before any work, and nothing is written: unreadable model folders,
spec files that are not specs, an --output-dir that is a file, a second demo run into the same folder; and the
help of --stages, --estimator and --target-direction says what to pass."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from hf_stage_attribution import StageAttributor, estimators
from hf_stage_attribution.behaviors import load_specs
from hf_stage_attribution.cli.main import build_parser, main
from hf_stage_attribution.errors import ModelMismatchError
from hf_stage_attribution.integrations.model_loading import load_model

from .test_commands import classifier_run  # noqa: F401  (module-scoped fixture: a recorded tiny classifier)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hf-stage-attribution {command}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _broken_model(root, tmp_path, how: str):
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    if how == "config":
        (model / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], ')
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return model


def _attribute_argv(root, tmp_path, model, **extra):
    out = extra.get("out", tmp_path / "report")
    argv = ["attribute", str(root / "ledger"), "--model", str(model), "--behaviors"]
    return [*argv, str(extra.get("spec", root / "behaviors.json")), "--output-dir", str(out)]


@pytest.mark.parametrize("how", ["config", "weights"])
def test_an_unreadable_model_folder_is_one_line_for_attribute_and_intervene(classifier_run, tmp_path, capsys, how):  # noqa: F811
    root = classifier_run
    model = _broken_model(root, tmp_path, how)
    with pytest.raises(ModelMismatchError, match=r"Cannot load the model at .*Expected a save_pretrained directory"):
        load_model(model)
    assert main(_attribute_argv(root, tmp_path, model)) == 1
    assert "Cannot load the model at" in _one_line_error(capsys, "attribute")
    assert not (tmp_path / "report").exists()
    texts = ["a nice day", "what an idiot"]
    target = tmp_path / "target.json"
    rows = [{"text": t, "label": i} for i, t in enumerate(texts)]
    tokenizer = str(root / "model")
    spec = {"name": "margin", "kind": "classification", "measure": "margin", "tokenizer": tokenizer, "data": rows}
    target.write_text(json.dumps(spec))
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"utilities": [{"kind": "accuracy", "tokenizer": tokenizer, "data": rows}]}))
    argv = ["intervene", str(root / "ledger"), "--model", str(model), "--stage", "flip", "--target", str(target)]
    assert main([*argv, "--utility", str(utility), "--output-dir", str(tmp_path / "int")]) == 1
    assert "Cannot load the model at" in _one_line_error(capsys, "intervene")
    assert not (tmp_path / "int").exists()


@pytest.mark.parametrize("what", ["binary", "directory", "yaml"])
def test_a_behavior_spec_that_is_not_a_spec_file_is_one_line(classifier_run, tmp_path, capsys, what):  # noqa: F811
    root = classifier_run
    spec = tmp_path / "behaviors.yaml"
    if what == "binary":
        spec.write_bytes(bytes(range(256)) * 4)
        expected = "not UTF-8 text"
    elif what == "directory":
        spec.mkdir()
        expected = "is a directory"
    else:
        spec.write_text("behaviors:\n  - name: x\n   kind: classification\n")
        expected = "is not valid YAML: .* at line 3, column 4"
    assert main(_attribute_argv(root, tmp_path, root / "model", spec=spec)) == 1
    assert re.search(expected, _one_line_error(capsys, "attribute"))
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", ["attribute", "validate"])
@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_an_output_dir_that_is_a_file_is_refused_before_any_work(classifier_run, tmp_path, capsys, command, where):  # noqa: F811
    root = classifier_run
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    out = blocker if where == "is-a-file" else blocker / "report"
    argv = _attribute_argv(root, tmp_path, tmp_path / "no-such-model", out=out)  # the model would fail later
    argv[0] = command
    assert main(argv) == 1
    err = _one_line_error(capsys, command)
    assert "Expected --output-dir to be a directory" in err and "Cannot load" not in err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", ["attribute", "validate"])
@pytest.mark.parametrize("theirs", ["report.md", "report.json"])
def test_report_files_the_package_did_not_write_are_refused_before_any_work(
    classifier_run,  # noqa: F811
    tmp_path,
    capsys,
    command,
    theirs,
):
    root = classifier_run
    out = tmp_path / "notes"
    out.mkdir()
    (out / theirs).write_text('{"mine": 1}' if theirs.endswith(".json") else "precious notes")
    argv = _attribute_argv(root, tmp_path, tmp_path / "no-such-model", out=out)  # the model would fail later
    argv[0] = command
    assert main(argv) == 1
    err = _one_line_error(capsys, command)
    assert f"holds {theirs}" in err and "--overwrite" in err and "Cannot load" not in err
    assert sorted(p.name for p in out.iterdir()) == [theirs]


def test_a_rerun_replaces_its_own_report_and_overwrite_replaces_any(classifier_run, tmp_path, capsys):  # noqa: F811
    root = classifier_run
    out = tmp_path / "report"
    argv = [*_attribute_argv(root, tmp_path, root / "model", out=out), "--estimator", "delta-fd", "--json"]
    assert main([*argv, "--stages", "flip"]) == 0
    assert main([*argv, "--stages", "base"]) == 0  # its own earlier report: replaced
    assert {row["stage"] for row in json.loads((out / "report.json").read_text())["rows"]} == {"base"}
    capsys.readouterr()
    (out / "report.json").write_text('{"mine": 1}')
    assert main(argv) == 1
    assert "is not an hf-stage-attribution report" in _one_line_error(capsys, "attribute")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["format"] != "mine"


CALLS: list[str] = []


def replay_from_data(model, info, max_steps=None):
    """A stage function for --stage-fn: replays the stage from its replay data, and says it ran."""
    from hf_stage_attribution.integrations.replay import replay_trainer_stage

    CALLS.append(info["stage"].name)
    return replay_trainer_stage(info["stage"], model, max_steps=max_steps)


def test_stage_functions_by_import_path_drive_replay_only_with_trust_code(classifier_run, tmp_path, capsys):  # noqa: F811
    root = classifier_run
    argv = [*_attribute_argv(root, tmp_path, root / "model"), "--estimator", "replay", "--json", "--stages", "base"]
    fn = f"flip={__name__}:replay_from_data"
    assert main([*argv, "--stage-fn", fn]) == 1
    assert "names the function" in _one_line_error(capsys, "attribute") and not CALLS
    assert main([*argv, "--stage-fn", "flip=nowhere", "--trust-code"]) == 1
    assert "Expected --stage-fn STAGE=MODULE:FUNCTION" in _one_line_error(capsys, "attribute")
    assert main(argv) == 0  # from the replay data
    want = json.loads(capsys.readouterr().out)["rows"][0]["effect"]
    assert main([*argv, "--stage-fn", fn, "--trust-code", "--overwrite"]) == 0
    assert CALLS == ["flip"] and json.loads(capsys.readouterr().out)["rows"][0]["effect"] == pytest.approx(want)


def logits(model, batch):
    """The forward half of a --loss-fn pair for the recorded classifier (batches as its Trainer collated them)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def tempered_loss(outputs, batch):
    return 3.0 * torch.nn.functional.cross_entropy(outputs, batch["labels"])


def test_loss_functions_by_import_path_drive_the_curvature_estimators_only_with_trust_code(
    classifier_run,  # noqa: F811
    tmp_path,
    capsys,
):
    root = classifier_run
    argv = [*_attribute_argv(root, tmp_path, root / "model"), "--estimator", "aa-ggn", "--json", "--stages", "base"]
    pair = f"flip={__name__}:logits,tempered_loss"
    assert main([*argv, "--loss-fn", pair]) == 1
    assert "names the function" in _one_line_error(capsys, "attribute") and not (tmp_path / "report").exists()
    for bad in ("flip=nowhere", f"flip={__name__}:logits,tempered_loss,logits", f"flip={__name__}:logits,"):
        assert main([*argv, "--loss-fn", bad, "--trust-code"]) == 1
        assert "Expected --loss-fn STAGE=MODULE:FORWARD,LOSS" in _one_line_error(capsys, "attribute")
    assert main([*argv, "--loss-fn", pair, "--trust-code"]) == 0
    given = json.loads(capsys.readouterr().out)["rows"][0]["effect"]
    model = load_model(root / "model")
    spec = {"flip": (logits, tempered_loss)}
    want = StageAttributor(root / "ledger", model, estimator="aa-ggn", loss_fns=spec, show_progress=False).attribute(
        load_specs(root / "behaviors.json"), stages=["base"]
    )
    assert given == pytest.approx(want.rows[0].effect, rel=1e-6)
    assert main([*argv, "--overwrite"]) == 0  # the recorded loss (3 × smaller): another curvature, another estimate
    assert json.loads(capsys.readouterr().out)["rows"][0]["effect"] != pytest.approx(given, rel=1e-6)


def test_stages_accept_commas_and_refuse_an_empty_list(classifier_run, tmp_path, capsys):  # noqa: F811
    root = classifier_run
    argv = [*_attribute_argv(root, tmp_path, root / "model"), "--estimator", "aa-linear", "--json"]
    assert main([*argv, "--stages", "base,flip"]) == 0
    assert {row["stage"] for row in json.loads(capsys.readouterr().out)["rows"]} == {"base", "flip"}
    assert main([*argv, "--stages", "flip"]) == 0
    assert {row["stage"] for row in json.loads(capsys.readouterr().out)["rows"]} == {"flip"}
    assert main([*_attribute_argv(root, tmp_path, root / "model", out=tmp_path / "r2"), "--stages", ","]) == 1
    assert "Expected --stages to name at least one stage" in _one_line_error(capsys, "attribute")


def _help(command: str, dest: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert f"--{dest.replace('_', '-')}" in sub.format_help()
    return next(a for a in sub._actions if a.dest == dest).help or ""


def test_help_says_where_stages_go_which_estimators_exist_and_what_target_direction_does():
    for command in ("attribute", "validate"):
        text = _help(command, "stages")
        assert "--stages sft,dpo" in text and "put it after LEDGER_DIR" in text
        text = _help(command, "estimator")
        assert "see `estimators`" not in text
        assert all(name in text for name in estimators.names())
    assert "lower the target behavior" in _help("intervene", "target_direction")


def test_a_second_demo_into_the_same_folder_is_refused_before_training(tmp_path, capsys):
    earlier = tmp_path / "digits" / "ledger"
    earlier.mkdir(parents=True)
    (earlier / "ledger.json").write_text("{}")
    assert main(["demo", "--output-dir", str(tmp_path), "--only", "digits"]) == 1
    err = _one_line_error(capsys, "demo")
    assert "hold no earlier demo run" in err and "Pass a new --output-dir" in err and "Stage names" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["digits", "ledger", "ledger.json"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--output-dir", str(blocker), "--only", "digits"]) == 1
    assert "found a file" in _one_line_error(capsys, "demo")
