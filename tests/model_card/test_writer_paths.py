"""Where the model-card writer writes: never over a non-markdown file, through a symlinked README, never a second
section beside a hand-written one, and without huggingface_hub's log line about a new README."""

from __future__ import annotations

import logging

import pytest

from hf_stage_attribution.cli.main import main
from hf_stage_attribution.errors import ModelCardError
from hf_stage_attribution.model_card import SECTION_BEGIN, SIDECAR_NAME, write_model_card

from .test_writer import fixed_report


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "notes.txt", "README"])
def test_a_file_that_is_not_markdown_is_refused_and_kept(tmp_path, name):
    target = tmp_path / name
    target.write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelCardError, match=r"ending in \.md.*nothing was written"):
        write_model_card(fixed_report(), target, plot=False)
    assert target.read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_new_non_markdown_name_is_refused(tmp_path):
    with pytest.raises(ModelCardError, match=r"ending in \.md"):
        write_model_card(fixed_report(), tmp_path / "card.txt", plot=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_card_refuses_config_json(tmp_path, capsys):
    report = tmp_path / "report.json"
    fixed_report().to_json(report)
    model = tmp_path / "modelB"
    model.mkdir()
    config = model / "config.json"
    config.write_text('{"model_type": "gpt2"}')
    assert main(["card", str(report), "--readme", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-stage-attribution card: error: Expected the model card") and "\n" not in err
    assert config.read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert main(["card", str(report), "--readme", str(model)]) == 0  # the directory form writes its README.md
    assert f"written to {model / 'README.md'}" in capsys.readouterr().out
    assert config.read_text() == '{"model_type": "gpt2"}' and (model / "README.md").exists()


@pytest.mark.parametrize("name", ["README.md", "MODEL_CARD.MD", "card.Md"])
def test_markdown_names_in_any_case_and_directories_are_accepted(tmp_path, name):
    files = write_model_card(fixed_report(), tmp_path / name, plot=False)
    assert files.readme == tmp_path / name and SECTION_BEGIN in files.readme.read_text()
    files = write_model_card(fixed_report(), tmp_path, plot=False)
    assert files.readme == tmp_path / "README.md"


def test_a_symlinked_readme_is_written_through_and_stays_a_link(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "card.md"
    target.write_text("# Shared card\n\nKept.\n")
    model = tmp_path / "model"
    model.mkdir()
    link = model / "README.md"
    link.symlink_to(target)
    files = write_model_card(fixed_report(), link, plot=False)
    assert link.is_symlink() and link.resolve() == target.resolve()
    text = target.read_text()
    assert text.startswith("---\n") and "Kept." in text and text.count(SECTION_BEGIN) == 1
    assert files.sidecar == model / SIDECAR_NAME and files.sidecar.exists()
    assert sorted(p.name for p in shared.iterdir()) == ["card.md"]  # no temporary file left beside the target
    write_model_card(fixed_report(), model, plot=False)  # the directory form follows the link as well
    assert link.is_symlink() and target.read_text() == text


def test_a_dangling_symlink_into_a_missing_directory_is_refused(tmp_path):
    link = tmp_path / "README.md"
    link.symlink_to(tmp_path / "gone" / "card.md")
    with pytest.raises(ModelCardError, match="does not exist"):
        write_model_card(fixed_report(), link, plot=False)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.parametrize(
    "heading", ["## Accountability: training-stage attribution", "### accountability: Training-stage attribution ##"]
)
def test_a_hand_written_section_is_not_duplicated(tmp_path, heading):
    readme = tmp_path / "README.md"
    content = f"# Model\n\n{heading}\n\nWritten by hand.\n"
    readme.write_text(content)
    with pytest.raises(ModelCardError, match="without them.*line 3.*hf-stage-attribution:begin"):
        write_model_card(fixed_report(), readme, plot=False)
    with pytest.raises(ModelCardError, match="without them"):
        write_model_card(fixed_report(), readme, plot=False, overwrite=True)
    assert readme.read_text() == content and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_a_hand_written_section_between_markers_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Model\n\n<!-- hf-stage-attribution:begin -->\n## Accountability: training-stage attribution\n\nold\n"
        "<!-- hf-stage-attribution:end -->\n"
    )
    write_model_card(fixed_report(), readme, plot=False)
    text = readme.read_text()
    assert text.count("## Accountability: training-stage attribution") == 1 and "\nold\n" not in text


def test_a_new_readme_logs_nothing_from_huggingface_hub(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="huggingface_hub"):
        write_model_card(fixed_report(), tmp_path, plot=False)
    assert not [r for r in caplog.records if "metadata block was not found" in r.getMessage()]
    logging.getLogger("huggingface_hub.repocard").warning("still reported")
    assert "still reported" in caplog.text  # only the one message, and only inside the writer


def test_a_sidecar_the_writer_did_not_write_is_kept(tmp_path):
    from hf_stage_attribution.model_card import PLOT_NAME

    (tmp_path / SIDECAR_NAME).write_text('{"mine": 1}')
    with pytest.raises(ModelCardError, match=r"another file there.*--overwrite.*nothing was written"):
        write_model_card(fixed_report(), tmp_path, plot=False)
    assert (tmp_path / SIDECAR_NAME).read_text() == '{"mine": 1}' and not (tmp_path / "README.md").exists()
    (tmp_path / SIDECAR_NAME).unlink()
    (tmp_path / PLOT_NAME).write_bytes(b"user png")
    with pytest.raises(ModelCardError, match=r"a plot with no stage_attribution\.json"):
        write_model_card(fixed_report(), tmp_path)
    assert (tmp_path / PLOT_NAME).read_bytes() == b"user png" and not (tmp_path / "README.md").exists()
    write_model_card(fixed_report(), tmp_path, plot=False)  # the plot is not touched without plot=True
    assert (tmp_path / PLOT_NAME).read_bytes() == b"user png"
    write_model_card(fixed_report(), tmp_path, overwrite=True)
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(b"\x89PNG")


def test_two_cards_of_different_ledgers_in_one_folder_do_not_share_a_report(tmp_path):
    write_model_card(fixed_report(), tmp_path / "CARD.md")
    report_before = (tmp_path / SIDECAR_NAME).read_bytes()
    with pytest.raises(ModelCardError, match=r"report of another ledger.*own folder"):
        write_model_card(fixed_report(fingerprint="0000000000000000"), tmp_path / "OTHER.md")
    assert (tmp_path / SIDECAR_NAME).read_bytes() == report_before and not (tmp_path / "OTHER.md").exists()
    write_model_card(fixed_report(shift=1.0), tmp_path / "CARD.md")  # the same ledger re-written: fine
    assert main(["card", str(tmp_path / SIDECAR_NAME), "--readme", str(tmp_path / "THIRD.md")]) == 0
