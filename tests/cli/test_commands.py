"""The command line: --help everywhere, inspect golden table, attribute → card end to end, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.cli.main import SUBCOMMANDS, build_parser, main

GOLDEN = Path(__file__).parent.parent / "fixtures" / "cli" / "inspect_table.txt"


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = _subcommands()
    assert set(names) >= {"attribute", "card", "demo", "import-checkpoints", "inspect", "intervene", "validate"}
    assert len(SUBCOMMANDS) >= 6
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: hf-stage-attribution " + name in capsys.readouterr().out


def test_the_command_table_is_what_the_modules_register():
    """``cli/commands.py`` lists every command with its module and help line; the full parser registers exactly
    those, with those lines, and a parser built for one command lists the others by the same lines."""
    from hf_stage_attribution.cli.commands import COMMANDS

    def listing(parser):
        action = next(a for a in parser._actions if a.dest == "command")
        return {c.dest: c.help for c in action._choices_actions}

    full = listing(build_parser())
    assert full == {name: command.help for name, command in COMMANDS.items()}
    assert listing(build_parser("card")) == full and listing(build_parser(None)) == full
    for name in COMMANDS:  # the module the table names registers the command whole (a listed one has no description)
        choices = next(a for a in build_parser(name)._actions if a.dest == "command").choices
        assert choices[name].description and not any(choices[n].description for n in choices if n != name and
                                                      COMMANDS[n].module != COMMANDS[name].module)  # fmt: skip


def test_a_command_imports_only_its_own_module():
    """``--help`` imports no torch, ``card`` and ``inspect`` neither the estimators nor transformers or datasets (each
    command paid for every other's imports, and the quiet console imported both libraries to quiet them: ``card``
    took 12.9 s on SmolLM2-135M, 9.5 s of it importing the other commands, 2.9 s the two libraries). A command's
    ``--help`` (and a mistyped option) imports what its parser needs: for ``attribute`` and ``demo`` the estimators'
    names (torch) but not transformers (11.1 s → 3.8 s: the example models imported it)."""
    code = (
        "import sys\n"
        "from hf_stage_attribution.cli.main import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'transformers', 'datasets', 'hf_stage_attribution.attributor')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    runs = [(["--help"], "[]"), (["inspect", "/nonexistent-ledger"], "['torch']")]
    runs += [(["card", "--help"], "['torch']")]
    runs += [([name, "--help"], "['hf_stage_attribution.attributor', 'torch']") for name in ("attribute", "demo")]
    for argv, imported in [*runs, (["nope"], "[]")]:  # inspect runs in the quiet console: it imports no datasets
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert done.stdout.strip().splitlines()[-1] == imported, (argv, done.stdout, done.stderr)
    assert "invalid choice: 'nope'" in done.stderr


def _golden_ledger(root: Path) -> StageLedger:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    ledger = StageLedger(root)
    x, y = torch.linspace(-1, 1, 24).reshape(8, 3), torch.arange(8) % 2
    for name, opt in (
        ("warmup", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("finetune", torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)),
    ):
        with ledger.record_stage(name, kind="custom", model=model, optimizer=opt, curvature_segments=0) as rec:
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()
    return ledger


def test_inspect_table_matches_the_golden_file(tmp_path, capsys):
    _golden_ledger(tmp_path / "ledger")
    assert main(["inspect", str(tmp_path / "ledger")]) == 0
    text = capsys.readouterr().out.replace(str(tmp_path / "ledger"), "LEDGER")
    text = re.sub(r"\d+(\.\d)? [kMGT]?B( on disk = | \()\d+\.\d\d×", r"SIZE\2R×", text)  # sizes vary by bytes
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert main(["inspect", str(tmp_path / "ledger"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["warmup", "finetune"]
    assert summary["stages"][0]["optimizer"] == "SGD"
    # what validate would re-run: custom loops recorded without replay data, so it cannot from the ledger alone
    assert summary["replay"]["optimizer_steps"] == 3 and summary["replay"]["stages"] == ["finetune"]
    assert "no replay data" in summary["replay"]["problems"][0]


def test_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-stage-attribution inspect: error: Expected a ledger") and "\n" not in err


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """Two Trainer stages on a tiny BERT classifier, recorded; the final model saved; a behavior spec."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.testing.lm import tiny_bert_classifier, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok)
    texts = ["the weather today is really nice", "you are a total idiot", "the food was warm", "such a stupid jerk"]
    for k, (name, labels) in enumerate((("base", [0, 1, 0, 1]), ("flip", [1, 0, 1, 0]))):
        data = Dataset.from_dict({"text": texts * 4, "label": labels * 4}).map(
            lambda b: tok(b["text"], truncation=True, max_length=16, padding="max_length"), batched=True
        )
        args = TrainingArguments(
            str(root / f"run{k}"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, use_cpu=True,
            report_to=[], save_strategy="no", disable_tqdm=True, seed=k,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data.remove_columns(["text"]),
                callbacks=[StageRecorder(root / "ledger", name, stage_kind="fine-tuning",
                                         save_replay_data=True)]).train()  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    spec = {
        "behaviors": [
            {"name": "margin", "kind": "classification", "measure": "margin", "tokenizer": "model",
             "data": [{"text": t, "label": i % 2} for i, t in enumerate(texts + ["a nice day", "what an idiot"])]},
        ]
    }  # fmt: skip
    (root / "behaviors.json").write_text(json.dumps(spec))
    return root


def test_attribute_then_card_twice_is_byte_identical(classifier_run, tmp_path, capsys):
    root = classifier_run
    out = tmp_path / "report"
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "aa-linear", "--output-dir", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "margin" in table and "base" in table and "flip" in table
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "plot.png"}
    readme = tmp_path / "card" / "README.md"
    readme.parent.mkdir()
    readme.write_text("---\nlicense: apache-2.0\n---\n\n# My classifier\n\nHand-written text.\n")
    assert main(["card", str(out), "--readme", str(readme)]) == 0
    first = readme.read_bytes()
    assert b"Hand-written text." in first and b"stage_attribution" in first
    assert main(["card", str(out), "--readme", str(readme)]) == 0
    assert readme.read_bytes() == first


def test_attribute_with_the_cheap_curvature_preset(classifier_run, tmp_path, capsys):
    """``--curvature-preset cheap``: aa-ggn uses one segment per later stage and at most 8 Krylov vectors, and the
    report says which settings it ran with."""
    from hf_stage_attribution.estimators.curvature.propagation import CURVATURE_PRESETS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["attribute"]
    preset = next(a for a in sub._actions if a.dest == "curvature_preset")
    assert sorted(preset.choices) == sorted(CURVATURE_PRESETS)
    root = classifier_run
    out = tmp_path / "report"
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "aa-ggn", "--curvature-preset", "cheap"]
    assert main([*argv, "--output-dir", str(out), "--no-diagnostics"]) == 0
    capsys.readouterr()
    curvature = json.loads((out / "report.json").read_text())["diagnostics"]["margin"]["notes"]["curvature"]
    assert curvature["settings"]["preset"] == "cheap" and curvature["settings"]["max_segments"] == 1
    assert 0 < curvature["curvature_products"] <= 8
    with pytest.raises(SystemExit):  # argparse refuses an unknown preset
        main([*argv[:-1], "expensive", "--output-dir", str(out)])
    assert "invalid choice: 'expensive'" in capsys.readouterr().err


def test_attribute_partial_replay_with_budget_and_interpolated_factual(classifier_run, tmp_path, capsys):
    """``--budget`` and ``--factual`` reach partial replay: at 50 % of the 4 later steps, the interpolated factual
    branch buys 2 counterfactual steps of stage ``flip`` where replaying both branches buys 1 each."""
    root = classifier_run
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "partial-replay", "--budget", "0.5", "--no-diagnostics"]
    plans = {}
    for factual in ("replay", "interpolated"):
        out = tmp_path / factual
        assert main([*argv, "--factual", factual, "--output-dir", str(out)]) == 0
        notes = json.loads((out / "report.json").read_text())["diagnostics"]["margin"]["notes"]
        plans[factual] = notes["partial_replay"]["plans"]["base"]
    capsys.readouterr()
    assert plans == {"replay": "flip 1/4 steps ×2", "interpolated": "flip 2/4 steps (factual: interpolated)"}
    with pytest.raises(SystemExit):
        main([*argv, "--factual", "guess", "--output-dir", str(tmp_path / "bad")])
    assert "invalid choice: 'guess'" in capsys.readouterr().err


def test_validate_json_carries_the_replay_value_of_every_stage(classifier_run, tmp_path, capsys):
    root = classifier_run
    argv = ["validate", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "aa-linear", "--output-dir", str(tmp_path / "v")]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    assert [r["stage"] for r in rows] == ["base", "flip"] and all(isinstance(r["replay_effect"], float) for r in rows)
    assert "{'loss'" not in captured.out + captured.err  # the replayed Trainer's log dicts stay off the console
    assert "\r" not in captured.err  # not a terminal: plain lines, no redraws
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "replay" in table.splitlines()[0] and "Fidelity against replay:\npairs of (stage, behavior)" in table


def test_attribute_some_stages_says_so_in_the_console_and_the_card(classifier_run, tmp_path, capsys):
    """``--stages base``: the top stage is the top of the attributed stage only; the console, report.md and the
    card say so and name the stage left out (flip), the card's YAML lists it."""
    root = classifier_run
    out = tmp_path / "report"
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "aa-linear", "--no-diagnostics", "--output-dir", str(out)]
    assert main([*argv, "--stages", "base"]) == 0
    scope = "Among the 1 attributed stage of 2 only (not attributed: flip)"
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("* ")]
    assert scope in line
    assert scope in (out / "report.md").read_text(encoding="utf-8")
    readme = tmp_path / "card" / "README.md"
    readme.parent.mkdir()
    assert main(["card", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert scope in text and "Only 1 of the ledger's 2 stages was attributed (not attributed: flip)" in text
    assert "stages_not_attributed:\n  - flip" in text


def test_attribute_bad_input_leaves_nothing(classifier_run, tmp_path, capsys):
    root = classifier_run
    out = tmp_path / "report"
    base = ["attribute", str(root / "ledger"), "--behaviors", str(root / "behaviors.json"), "--output-dir", str(out)]
    assert main([*base, "--model", str(tmp_path / "missing")]) == 1
    assert "Expected a model directory" in capsys.readouterr().err
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps({"behaviors": [{"name": "x", "kind": "no-such-kind", "data": [{"text": "a"}]}]}))
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors", str(bad_spec)]
    assert main([*argv, "--output-dir", str(out)]) == 1
    assert "Known behavior kinds" in capsys.readouterr().err
    assert not out.exists()
    # --budget is partial (and strided) replay's: with another estimator it was ignored silently
    good = [*base, "--model", str(root / "model"), "--estimator", "aa-fd", "--budget", "0.1"]
    assert main(good) == 1
    err = capsys.readouterr().err
    assert "Estimator 'aa-fd' has no option 'budget'. It is an option of auto, partial-replay" in err
    assert not out.exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_attribute_with_the_cheap_second_opinion(classifier_run, tmp_path, capsys):
    """``--second-opinion`` reaches the attributor: by default replay itself checks partial replay (its values and the
    fidelity table are printed); ``delta-fd`` checks it against task-vector negation without any replay; a replay
    family as asked."""
    root = classifier_run
    argv = ["attribute", str(root / "ledger"), "--model", str(root / "model"), "--behaviors"]
    argv += [str(root / "behaviors.json"), "--estimator", "partial-replay", "--budget", "0.5"]
    reports, printed = {}, {}
    for choice in ("auto", "delta-fd", "strided-replay"):
        out = tmp_path / choice
        assert main([*argv, "--second-opinion", choice, "--output-dir", str(out)]) == 0
        reports[choice] = json.loads((out / "report.json").read_text())
        printed[choice] = capsys.readouterr()
    assert reports["auto"]["fidelity"] and all(r["replay_effect"] is not None for r in reports["auto"]["rows"])
    assert "checked against replay itself" in printed["auto"].err and "Fidelity against replay" in printed["auto"].out
    assert "replay ran as the check of the estimates" in printed["auto"].err
    for choice in ("delta-fd", "strided-replay"):  # no replay: no replay values, no fidelity
        assert not reports[choice]["fidelity"] and all(r["replay_effect"] is None for r in reports[choice]["rows"])
        assert "Fidelity against replay" not in printed[choice].out and "replay ran" not in printed[choice].err
    assert "delta-fd" in json.dumps(reports["delta-fd"]) and "strided-replay" not in json.dumps(reports["delta-fd"])
    assert "strided-replay" in json.dumps(reports["strided-replay"])
    with pytest.raises(SystemExit):
        main([*argv, "--second-opinion", "validate", "--output-dir", str(tmp_path / "bad")])
    assert "invalid choice: 'validate'" in capsys.readouterr().err


def test_module_form_runs_the_command():
    import subprocess

    from hf_stage_attribution import __version__

    done = subprocess.run([sys.executable, "-m", "hf_stage_attribution", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout
