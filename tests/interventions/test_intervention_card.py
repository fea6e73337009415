"""The edited model's card (``intervene``): the source card's own text and YAML kept byte for byte, its
stage-attribution section and key dropped (they describe the unedited model), the source model named; the sweep
table's utilities at the target's precision, the accuracy note only with an accuracy utility."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_stage_attribution.interventions.card import render_section
from hf_stage_attribution.interventions.result import InterventionResult, SweepPoint
from hf_stage_attribution.model_card import METADATA_KEY, SECTION_BEGIN, SECTION_END, write_model_card
from hf_stage_attribution.report import AttributionReport
from tests.interventions.test_sweep import _write_specs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from hf_stage_attribution.examples.spurious_digits import build_spurious_digits

    return build_spurious_digits(tmp_path_factory.mktemp("digits"), size="small", seed=0)


def test_intervene_keeps_the_source_card_but_not_its_attribution_section(digits, tmp_path, capsys):
    from hf_stage_attribution.cli.main import main
    from hf_stage_attribution.interventions.card import SECTION_BEGIN as INTERVENTION_BEGIN

    model = tmp_path / "model"
    shutil.copytree(digits.model_dir, model)
    # the owner's card, with Windows line endings and one Unix line: both kept as they are
    own = (model / "README.md").read_text(encoding="utf-8").replace("\n", "\r\n") + "Unix line.\n"
    (model / "README.md").write_bytes(own.encode("utf-8"))
    report = AttributionReport.build({"patch-reliance": {"pretraining": [0.1], "patch": [2.0], "finetune": [0.2]}},
                                     estimator="aa-linear", versions={})  # fmt: skip
    write_model_card(report, model, plot=False)
    attributed = (model / "README.md").read_bytes().decode("utf-8")
    assert SECTION_BEGIN in attributed and f"\r\n{METADATA_KEY}:" in attributed

    target, utility = _write_specs(digits, tmp_path / "specs")
    out = tmp_path / "out"
    argv = ["intervene", str(digits.ledger_dir), "--model", str(model), "--target", target, "--utility", utility]
    assert main([*argv, "--stage", "patch", "--alphas", "0.5,1", "--no-replay", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_bytes().decode("utf-8")
    assert card.startswith(own + "\r\n" + INTERVENTION_BEGIN + "\r\n")  # every byte of the owner's card, then ours
    assert "\n" not in card[len(own) :].replace("\r\n", "")  # ours ends its lines as most of the card's do
    assert SECTION_BEGIN not in card and SECTION_END not in card and f"{METADATA_KEY}:" not in card
    assert "stage_attribution.json" not in card and not (out / "stage_attribution.json").exists()
    assert f"It is derived from the model `{model.resolve()}`." in card
    assert "Accuracies are in percent on held-out data; worst-group accuracy is the lowest" in card


def _result(accuracy_metrics: dict[str, str]) -> InterventionResult:
    base = SweepPoint("original", 0.0, 2.0, {"toxicity": 0.12794})
    points = [SweepPoint("aa-linear", 0.25, 1.5, {"toxicity": 0.13549}, None),
              SweepPoint("aa-linear", 0.5, 1.25, {"toxicity": 0.14221}, None)]  # fmt: skip
    return InterventionResult("sft", 1, "aa-linear", "target", "", "decrease", base, points, chosen=points[0],
                              message="chosen", accuracy_metrics=accuracy_metrics)  # fmt: skip


def test_utilities_show_the_targets_significant_digits():
    result = _result({})
    rows = result.rows()
    assert [row[3] for row in rows] == ["0.1279", "0.1355", "0.1422"]  # 2 decimals showed 0.13, 0.14, 0.14
    assert [row[2] for row in rows] == ["+2", "+1.5", "+1.25"]
    assert "| aa-linear | 0.5 | +1.25 | 0.1422 |" in result.to_markdown()
    assert "0.1355" in result.table()
    round_trip = InterventionResult.from_json(result.to_json())
    assert round_trip.rows() == rows


def test_the_accuracy_note_only_with_an_accuracy_utility():
    assert "Accuracies are in percent" not in render_section(_result({}))
    legend = render_section(_result({}))  # only the variants the table holds: no delta, no replay rows here
    assert "`variant`: `original` is the unedited final model, `aa-linear` subtracts α·v_k" in legend
    assert "`delta`" not in legend and "`replay`" not in legend
    average = render_section(_result({"average": "toxicity"}))
    assert "Accuracies are in percent on held-out data." in average and "worst-group" not in average
    both = render_section(_result({"average": "toxicity", "worst_group": "toxicity"}))
    assert "Accuracies are in percent on held-out data; worst-group accuracy is the lowest accuracy" in both


def test_save_names_the_source_model_and_refuses_two_cards(tmp_path):
    from hf_stage_attribution.errors import InterventionError
    from hf_stage_attribution.interventions.save import save_intervention

    with pytest.raises(InterventionError, match="not both"):
        save_intervention(_result({}), tmp_path, card_from=tmp_path / "README.md", card_text="# x\n")
    assert "derived from the model `org/model`." in render_section(_result({}), derived_from="org/model")
    assert json.loads(_result({}).to_json())["points"][0]["metrics"] == {"toxicity": 0.13549}


def test_accuracy_columns_print_two_decimals_so_100_reads_like_95_21():
    acc = {"accuracy": 100.0, "worst_group_accuracy": 95.21, "accuracy[a]": 100.0, "accuracy[b]": 95.21, "loss": 0.5}
    base = SweepPoint("original", 0.0, 1.0, acc)
    point = SweepPoint("aa-linear", 1.0, 0.5, {**acc, "accuracy": 95.21, "loss": 100.0})
    result = InterventionResult(
        stage="s", stage_index=0, kind="aa-linear", target_name="target", target_unit="", target_direction="decrease",
        baseline=base, points=[point], chosen=point,
        accuracy_metrics={"average": "accuracy", "worst_group": "worst_group_accuracy"},
    )  # fmt: skip
    rows = {row[0]: row for row in result.rows(groups=True)}
    head = result.header(groups=True)
    original = dict(zip(head, rows["original"]))
    assert original["accuracy"] == "100.00" and original["worst_group_accuracy"] == "95.21"
    assert original["accuracy[a]"] == "100.00" and original["loss"] == "0.5"  # not an accuracy: 4 significant digits
    assert dict(zip(head, rows["aa-linear"]))["loss"] == "100"
