"""Interventions (issue 8): scaling a stage down, worst-group accuracy, choosing α, saving and reloading, bad input.

The main fixture is the ``spurious_digits`` pipeline at its small size (three recorded stages, a corner patch tied to
class 7 in the middle one); a second, tiny pipeline ends with a LoRA stage to check that an adapter-only change is
saved as an adapter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_stage_attribution._internal.params import state_digests
from hf_stage_attribution.errors import InterventionError
from hf_stage_attribution.interventions.card import SECTION_BEGIN, SECTION_END, splice
from hf_stage_attribution.interventions.result import SweepPoint
from hf_stage_attribution.interventions.sweep import (
    Accuracy,
    Constraint,
    InterventionResult,
    check_alphas,
    choose,
    resolve_stage,
    scale_stage,
)

TARGET = "patch-reliance"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from hf_stage_attribution.examples.spurious_digits import build_spurious_digits

    return build_spurious_digits(tmp_path_factory.mktemp("digits"), size="small", seed=0)


def _utilities(p):
    return [
        Accuracy(p.clean_rows, name="accuracy"),
        Accuracy(p.eval_rows, name="all_groups_accuracy", group_key="group", worst_group_name="worst_group_accuracy"),
    ]


def _scale(p, stage, alphas=(0.25, 0.5, 1.0), **kw):
    kw.setdefault("constraint", Constraint("accuracy", max_drop=1.0))
    return scale_stage(
        p.ledger_dir, p.model, stage, list(alphas), target=p.behaviors[TARGET], utilities=_utilities(p), **kw
    )


# --- the acceptance figures at reduced size ------------------------------------------------------------------------


def test_top_ranked_stage_helps_and_last_ranked_stage_barely_moves_the_target(digits):
    from hf_stage_attribution import StageAttributor

    report = StageAttributor(digits.ledger_dir, digits.model, diagnostics=False).attribute(digits.behaviors)
    order = sorted(report.rows_for(TARGET), key=lambda r: -abs(r.effect))
    top, last = order[0].stage, order[-1].stage
    assert top == "patch"
    r_top = _scale(digits, top, stage_fns=digits.stage_fns)
    r_last = _scale(digits, last, stage_fns=digits.stage_fns)
    # the chosen α of the accountable stage buys ≥ 10 points of worst-group accuracy within 1 point of accuracy
    assert r_top.chosen is not None and r_top.chosen.variant == "aa-linear"
    assert r_top.change("worst_group_accuracy") >= 10.0
    assert r_top.change("accuracy") >= -1.0
    assert r_top.chosen.target < r_top.baseline.target
    # the same edit (α = 1) on the last-ranked stage moves the target far less than on the top-ranked one
    moved_top = abs(r_top.point(1.0).target - r_top.baseline.target)
    moved_last = abs(r_last.point(1.0).target - r_last.baseline.target)
    assert moved_last < 0.2 * moved_top, (moved_top, moved_last)
    # the delta variant and replay are reported beside it
    assert len(r_top.sweep("delta")) == 3 and r_top.replay is not None
    assert abs(r_top.replay.target) < abs(r_top.baseline.target)
    text = r_top.table()
    assert "worst_group_accuracy" in text and "replay" in text and "α=" in text


def test_worst_group_accuracy_is_the_lowest_group(digits):
    acc = Accuracy(digits.eval_rows, name="acc", group_key="group")
    values = acc(digits.model)
    groups = {k: v for k, v in values.items() if k.startswith("acc[")}
    assert set(groups) == {"acc[7]", "acc[7+patch]", "acc[other]", "acc[other+patch]"}
    assert values["worst_group_acc"] == min(groups.values())
    assert acc.worst_group(values) == "other+patch"  # the patch pulls other digits toward 7
    correct = acc.correct(digits.model)
    assert values["acc"] == pytest.approx(100.0 * float(correct.double().mean()))


def test_the_original_model_is_left_untouched(digits):
    before = state_digests(digits.model)
    _scale(digits, "patch", replay=False)
    assert state_digests(digits.model) == before
    calls = {"n": 0}

    def failing(model):
        calls["n"] += 1
        if calls["n"] == 3:  # fails in the middle of the sweep, while the model holds θ_K − α·v_k
            raise RuntimeError("boom")
        return digits.behaviors[TARGET](model)

    from hf_stage_attribution.errors import BehaviorError

    with pytest.raises((RuntimeError, BehaviorError), match="boom"):  # a custom behavior's error may come wrapped
        scale_stage(digits.ledger_dir, digits.model, "patch", [0.5, 1.0], target=failing, replay=False)
    assert state_digests(digits.model) == before


def test_saved_model_reloads_and_reproduces_the_figures(digits, tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_stage_attribution.examples.spurious_digits_model import DigitsMLP

    result = _scale(digits, "patch", stage_fns=digits.stage_fns)
    card = tmp_path / "card.md"
    card.write_text("---\nlicense: mit\n---\n# Digits\n\nOur own text.\n", encoding="utf-8")
    saved = result.save(tmp_path / "out", card_from=card)
    assert saved.form == "full" and saved.max_difference is not None and saved.max_difference < 1e-5
    for cls in (DigitsMLP, AutoModelForImageClassification):
        model = cls.from_pretrained(tmp_path / "out").eval()
        target = float(digits.behaviors[TARGET](model).mean())
        metrics = {}
        for metric in _utilities(digits):
            metrics.update(metric(model))
        assert target == pytest.approx(result.chosen.target, abs=1e-5)
        assert metrics["accuracy"] == result.chosen.metrics["accuracy"]
        assert metrics["worst_group_accuracy"] == result.chosen.metrics["worst_group_accuracy"]
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\nlicense: mit\n---\n# Digits\n\nOur own text.\n")
    assert readme.count(SECTION_BEGIN) == 1 and readme.count(SECTION_END) == 1
    assert f"α = {result.chosen.alpha:g}" in readme and "| variant |" in readme
    assert (tmp_path / "out" / "intervention_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "out" / "intervention.json").read_text(encoding="utf-8"))
    assert stored["saved"]["form"] == "full" and stored["chosen"]["alpha"] == result.chosen.alpha
    again = InterventionResult.from_json(tmp_path / "out" / "intervention.json")
    assert again.chosen.alpha == result.chosen.alpha and again.to_markdown() == result.to_markdown()
    with pytest.raises(InterventionError, match="already holds a saved model"):
        result.save(tmp_path / "out")
    replayed = result.save(tmp_path / "replayed", variant="replay")
    assert replayed.form == "full" and replayed.max_difference < 1e-5
    assert "re-trained without stage `patch`" in (tmp_path / "replayed" / "README.md").read_text(encoding="utf-8")


def test_card_section_is_replaced_not_duplicated():
    card = "# Model\n\nText.\n"
    once = splice(card, f"{SECTION_BEGIN}\nfirst\n{SECTION_END}")
    twice = splice(once, f"{SECTION_BEGIN}\nsecond\n{SECTION_END}")
    assert twice.startswith(card) and "first" not in twice and twice.count(SECTION_BEGIN) == 1
    assert splice(twice, f"{SECTION_BEGIN}\nsecond\n{SECTION_END}") == twice
    from hf_stage_attribution.errors import ModelCardError

    with pytest.raises(ModelCardError, match="marker"):
        splice(f"{SECTION_END}\n{SECTION_BEGIN}\n", "x")


def test_card_section_lines_end_as_the_cards_do():
    card = "# Model\r\n\r\nText.\r\n"
    once = splice(card, f"{SECTION_BEGIN}\nfirst\nsecond\n{SECTION_END}")
    assert once.startswith(card) and "\n" not in once.replace("\r\n", "")
    twice = splice(once, f"{SECTION_BEGIN}\nthird\n{SECTION_END}")
    assert twice == card + f"\r\n{SECTION_BEGIN}\r\nthird\r\n{SECTION_END}\r\n"
    section = f"{SECTION_BEGIN}\nx\n{SECTION_END}"
    assert splice("# Model\n", section) == f"# Model\n\n{section}\n"


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alphas", "match"),
    [([], "empty"), ([0.5, math.nan], "non-finite"), ([math.inf], "non-finite"), (["half"], "sequence of numbers")],
)
def test_bad_alpha_sweeps_are_refused(alphas, match):
    with pytest.raises(InterventionError, match=match):
        check_alphas(alphas)


def test_bad_stages_and_kinds_are_refused_before_anything_runs(digits):
    from hf_stage_attribution import StageLedger

    ledger = StageLedger.load(digits.ledger_dir)
    for stage, match in (
        (3, "out of range"),
        (-1, "out of range"),
        ("nope", "No stage named"),
        (1.5, "name or index"),
    ):
        with pytest.raises(InterventionError, match=match) as info:
            resolve_stage(ledger, stage)
        assert "0:pretraining, 1:patch, 2:finetune" in str(info.value)
    assert resolve_stage(ledger, "1").name == "patch"
    before = state_digests(digits.model)
    with pytest.raises(InterventionError, match="Unknown intervention kind"):
        _scale(digits, "patch", kind="negate")
    with pytest.raises(InterventionError, match="out of range"):
        _scale(digits, 7)
    with pytest.raises(InterventionError, match="non-finite"):
        _scale(digits, "patch", alphas=[float("nan")])
    with pytest.raises(InterventionError, match="no utility reports"):
        _scale(digits, "patch", constraint=Constraint("f1", max_drop=1.0), replay=False)
    with pytest.raises(InterventionError, match="neither 'target' nor a utility"):
        _scale(digits, "patch", objective="f1", replay=False)
    assert state_digests(digits.model) == before


def test_an_unsatisfiable_constraint_gives_a_clear_result_and_saves_nothing(digits, tmp_path):
    before = state_digests(digits.model)
    result = _scale(digits, "patch", constraint=Constraint("accuracy", min_value=100.5), replay=False)
    assert result.chosen is None
    assert result.message.startswith("No α met the constraint (accuracy ≥ 100.5)")
    assert result.table().count(result.message) == 1  # not repeated as the trade-off headline
    assert all(p.feasible is False for p in result.sweep())
    with pytest.raises(InterventionError, match="No α met the constraint"):
        result.save(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    assert state_digests(digits.model) == before
    assert "No α met" in result.headline()


def test_constraint_and_choice_rules():
    with pytest.raises(InterventionError, match="needs `max_drop`"):
        Constraint("accuracy")
    with pytest.raises(InterventionError, match=">= 0"):
        Constraint("accuracy", max_drop=-1.0)
    with pytest.raises(InterventionError, match="finite"):
        Constraint("accuracy", max_drop=math.nan)
    loss = Constraint("loss", max_drop=0.1, higher_is_better=False)
    assert loss.allows({"loss": 1.05}, {"loss": 1.0}) and not loss.allows({"loss": 1.2}, {"loss": 1.0})
    base = SweepPoint("original", 0.0, 5.0, {"accuracy": 90.0})
    pts = [SweepPoint("aa-linear", a, 5.0 - 4 * a, {"accuracy": 90.0 - 3 * a}) for a in (0.25, 0.5, 1.0)]
    chosen, message = choose(pts, base, Constraint("accuracy", max_drop=1.6))
    assert chosen.alpha == 0.5 and "2 of 3" in message
    chosen, _ = choose(pts, base, None)
    assert chosen.alpha == 1.0
    # every α lowers accuracy: asked to raise it, none is chosen (a model worse than the original is not saved)
    chosen, message = choose(
        pts, base, Constraint("accuracy", max_drop=5.0), objective="accuracy", direction="increase"
    )
    assert chosen is None and message.startswith("No α improves on the original model: the best among those that")
    chosen, _ = choose(pts, base, Constraint("accuracy", max_drop=5.0), objective="accuracy", direction="decrease")
    assert chosen.alpha == 1.0
    # α = 0 is the original model: never chosen, even where it ties the best
    chosen, message = choose([SweepPoint("aa-linear", 0.0, 5.0, {"accuracy": 90.0}), *pts], base, None)
    assert chosen.alpha == 1.0 and "of 3 α values" in message
    with pytest.raises(InterventionError, match="neither 'target' nor a utility"):
        choose(pts, base, None, objective="f1")
    with pytest.raises(InterventionError, match="no utility reports"):
        Constraint("f1", max_drop=1.0).allows(pts[0].metrics, base.metrics)


# --- LoRA: an adapter-only change stays an adapter -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_pipeline(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.examples import spurious_digits as sd

    root = tmp_path_factory.mktemp("lora")
    stages, held = sd.make_stages("small", seed=1)
    torch.manual_seed(1)
    from hf_stage_attribution.examples.spurious_digits_model import DigitsMLP, DigitsMLPConfig

    model = DigitsMLP(DigitsMLPConfig(hidden_size=16))
    ledger = StageLedger(root / "ledger")
    first, patch = stages[0], stages[1]
    first.steps, patch.steps = 40, 40
    sd.train_stage(model, first, ledger)
    model.save_pretrained(root / "base")
    torch.manual_seed(2)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["hidden.0"], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    patch.name, patch.kind = "lora-patch", "lora"
    sd.train_stage(peft_model, patch, ledger)
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    _, clean = sd.evaluation_rows(held)
    return root, peft_model, sd.reliance_behavior(held), clean


def test_lora_stage_is_saved_as_an_adapter_and_reloads(lora_pipeline, tmp_path):
    from peft import PeftModel

    from hf_stage_attribution.examples.spurious_digits_model import DigitsMLP

    root, model, target, clean = lora_pipeline
    before = state_digests(model)
    utilities = [Accuracy(clean)]
    result = scale_stage(root / "ledger", model, "lora-patch", [0.5, 1.0], target=target, utilities=utilities)
    assert state_digests(model) == before
    assert result.replay is not None  # the last stage: replay without it is θ_{K−1}, no training needed
    assert result.point(1.0).target == pytest.approx(result.replay.target, abs=1e-4)
    saved = result.save(tmp_path / "adapter", alpha=0.5)
    assert saved.form == "adapter" and saved.notes == []
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert saved.max_difference < 1e-4
    reloaded = PeftModel.from_pretrained(DigitsMLP.from_pretrained(root / "base"), tmp_path / "adapter").eval()
    assert float(target(reloaded).mean()) == pytest.approx(result.point(0.5).target, abs=1e-4)
    # the first stage is dense: the adapter is merged and the full model saved
    dense = scale_stage(root / "ledger", model, 0, [0.5], target=target, utilities=utilities, compare_delta=False)
    saved = dense.save(tmp_path / "full", alpha=0.5)
    assert saved.form == "full" and (tmp_path / "full" / "config.json").exists() and saved.max_difference < 1e-4
    assert state_digests(model) == before


def test_a_stage_whose_embedding_is_its_delta_is_not_swept_twice(lora_pipeline):
    """The last stage's embedding is its recorded delta: the `delta` comparison would repeat every row of the
    `aa-linear` sweep (SmolLM2-135M's intervene card showed both, equal point for point). It is swept once, and the
    table, the JSON and the card say why."""
    from hf_stage_attribution.interventions.card import render_section

    root, model, target, clean = lora_pipeline
    result = scale_stage(root / "ledger", model, "lora-patch", [0.5, 1.0], target=target, utilities=[Accuracy(clean)])
    assert {p.variant for p in result.points} == {"aa-linear"}
    assert result.delta_note.startswith("`delta` (task-vector negation) is the same edit as `aa-linear` here")
    assert result.delta_note in result.table()
    assert InterventionResult.from_json(result.to_json()).delta_note == result.delta_note
    assert result.delta_note in render_section(result)
    # a stage whose embedding the later stages change keeps its comparison rows
    first = scale_stage(root / "ledger", model, 0, [1.0], target=target, utilities=[Accuracy(clean)])
    assert {p.variant for p in first.points} == {"aa-linear", "delta"} and first.delta_note == ""


# --- command line --------------------------------------------------------------------------------------------------


def _write_specs(p, directory):
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "target.json"
    target.write_text(json.dumps({"behaviors": [p.behaviors[TARGET].to_spec()]}), encoding="utf-8")
    utility = directory / "utility.json"
    accuracy = {"kind": "accuracy", "name": "accuracy", "data": p.eval_rows, "group_key": "group"}
    utility.write_text(json.dumps({"utilities": [accuracy]}), encoding="utf-8")
    return str(target), str(utility)


def test_cli_intervene(digits, tmp_path, capsys):
    from hf_stage_attribution.cli.main import main

    target, utility = _write_specs(digits, tmp_path / "specs")
    common = [str(digits.ledger_dir), "--model", str(digits.model_dir), "--target", target, "--utility", utility]
    out = tmp_path / "cli"
    code = main(["intervene", *common, "--stage", "patch", "--output-dir", str(out), "--max-drop", "accuracy=5",
                 "--alphas", "0.5,1", "--json"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["chosen"] is not None and printed["saved"]["max_difference"] < 1e-5
    assert (
        (out / "config.json").exists() and (out / "README.md").exists() and (out / "intervention_sweep.png").exists()
    )
    assert main(["intervene", *common, "--stage", "9", "--output-dir", str(tmp_path / "x")]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["intervene", *common, "--stage", "patch", "--alphas", "", "--output-dir", str(tmp_path / "y")]) == 1
    assert "empty" in capsys.readouterr().err
    code = main(["intervene", *common, "--stage", "patch", "--min-value", "accuracy=101", "--no-replay",
                 "--output-dir", str(tmp_path / "z")])  # fmt: skip
    assert code == 0
    assert "No α met the constraint" in capsys.readouterr().out
    assert not (tmp_path / "z" / "config.json").exists() and (tmp_path / "z" / "intervention.json").exists()
    with pytest.raises(SystemExit) as info:
        main(["intervene", "--help"])
    assert info.value.code == 0 and "--max-drop" in capsys.readouterr().out


def test_cli_refuses_an_earlier_intervention_before_the_sweep_and_overwrite_replaces_it(digits, tmp_path, capsys):
    from hf_stage_attribution.cli.main import main

    target, utility = _write_specs(digits, tmp_path / "specs")
    common = [str(digits.ledger_dir), "--model", str(digits.model_dir), "--utility", utility, "--stage", "patch",
              "--alphas", "0.5,1", "--no-replay"]  # fmt: skip
    out = tmp_path / "cli"
    assert main(["intervene", *common, "--target", target, "--output-dir", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "README.md", "intervention.json"} <= set(before)
    # refused up front (a missing target spec would fail the loading that comes later), naming the CLI's flag
    for extra in ([], ["--no-save"]):
        argv = ["intervene", *common, "--target", str(tmp_path / "missing.json"), "--output-dir", str(out), *extra]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "already holds a saved model" in err and "--overwrite" in err and "overwrite=True" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite with --no-save replaces the earlier intervention as a whole: no model left that the sweep does not
    # describe
    argv = ["intervene", *common, "--target", target, "--output-dir", str(out), "--no-save", "--overwrite"]
    assert main(argv) == 0
    assert "No model saved: --no-save was given" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["intervention.json", "intervention_sweep.png"]
    assert json.loads((out / "intervention.json").read_text(encoding="utf-8")).get("saved") is None
    with pytest.raises(SystemExit):
        main(["intervene", "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_cli_saves_no_model_when_no_alpha_improves_on_the_original(digits, tmp_path, capsys):
    from hf_stage_attribution.cli.main import main

    target, utility = _write_specs(digits, tmp_path / "specs")
    out = tmp_path / "cli"
    # scaling the patch stage down lowers the patch reliance: asked to raise it, no α helps
    argv = ["intervene", str(digits.ledger_dir), "--model", str(digits.model_dir), "--target", target, "--utility",
            utility, "--stage", "patch", "--alphas", "0.5,1", "--no-replay", "--target-direction", "increase",
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "No α improves on the original model" in printed and "No model saved: no α was chosen" in printed
    assert sorted(p.name for p in out.iterdir()) == ["intervention.json", "intervention_sweep.png"]
