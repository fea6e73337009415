"""Ledger directories without their index (``ledger.json``) and ``--remove-incomplete``: nothing recorded is lost.

A directory holding ``start.safetensors`` or entries in ``stages/`` but no ``ledger.json`` (a ledger whose index was
lost, or a project folder with its own ``stages/``) is refused before anything is written, and
``remove_incomplete`` / ``inspect --remove-incomplete`` delete only what the package itself wrote and left behind.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.cli.main import main
from hf_stage_attribution.errors import LedgerError
from hf_stage_attribution.ledger.writer import LedgerWriter


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _record(ledger_dir: Path, model: torch.nn.Module, name: str, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    with StageLedger(ledger_dir).record_stage(name, model=model, optimizer=opt, curvature_segments=0) as rec:
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
            rec.step()


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes (folders as ``dir``)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def lost_index(tmp_path):
    """A one-stage ledger whose ledger.json was moved away: start.safetensors and stages/000-a remain."""
    ledger_dir = tmp_path / "ledger"
    model = _mlp()
    _record(ledger_dir, model, "a")
    (ledger_dir / "ledger.json").rename(tmp_path / "ledger.json.bak")
    return ledger_dir, model


def test_recording_into_a_ledger_without_its_index_writes_nothing(lost_index):
    ledger_dir, model = lost_index
    before = _snapshot(ledger_dir)
    with pytest.raises(LedgerError, match="index is missing") as info:
        _record(ledger_dir, model, "b")
    message = str(info.value)
    assert "start.safetensors" in message and "stages/000-a" in message and "nothing was written" in message
    assert "backup" in message and "--remove-incomplete" not in message  # the advice would delete stage a
    assert _snapshot(ledger_dir) == before  # θ_0 not replaced, no new ledger.json, no lock left


def test_remove_incomplete_refuses_a_directory_without_ledger_json(lost_index, capsys):
    ledger_dir, _ = lost_index
    before = _snapshot(ledger_dir)
    with pytest.raises(LedgerError, match="nothing was removed"):
        StageLedger(ledger_dir).remove_incomplete()
    assert main(["inspect", str(ledger_dir), "--remove-incomplete"]) == 1
    err = capsys.readouterr().err
    assert "index is missing" in err and err.count("\n") == 1
    assert _snapshot(ledger_dir) == before
    (ledger_dir.parent / "ledger.json.bak").rename(ledger_dir / "ledger.json")  # restoring the index: all is back
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a"]
    StageLedger.load(ledger_dir).verify()


def test_recording_into_a_folder_with_its_own_stages_writes_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "stages" / "mine.txt").write_text("keep")
    (project / "notes.txt").write_text("mine too")
    before = _snapshot(project)
    with pytest.raises(LedgerError, match="stages/mine.txt"):
        _record(project, _mlp(), "a")
    assert _snapshot(project) == before  # no ledger.json, no start.safetensors
    assert main(["inspect", str(project), "--remove-incomplete"]) == 1
    assert "stages/mine.txt" in capsys.readouterr().err
    assert (project / "stages" / "mine.txt").read_text() == "keep"


def test_writer_refuses_a_directory_without_ledger_json(lost_index):
    ledger_dir, _ = lost_index
    before = _snapshot(ledger_dir)
    with pytest.raises(LedgerError, match="index is missing"):
        LedgerWriter(ledger_dir).initialize([("w", (2,))], iter([("w", torch.zeros(2))]), model_class="Toy")
    assert _snapshot(ledger_dir) == before


def test_remove_incomplete_removes_only_what_the_package_left(tmp_path):
    ledger_dir = tmp_path / "ledger"
    model = _mlp()
    _record(ledger_dir, model, "a")
    stages = ledger_dir / "stages"
    # left by the package: an interrupted recording, a committed stage dir not yet listed, a temporary file
    (stages / ".partial-001-b").mkdir()
    (stages / ".partial-001-b" / "progress.json").write_text("{}")
    shutil.copytree(stages / "000-a", stages / "001-c")
    (ledger_dir / ".ledger.json.ab12_x9z.tmp").write_text("{")
    # not the package's: kept whatever their names
    (stages / "mine.txt").write_text("keep")
    (stages / "notes").mkdir()
    (stages / "notes" / "n.md").write_text("keep")
    (stages / "002-mine").mkdir()  # the naming pattern, but no stage.json: not a stage the package wrote
    (stages / "002-mine" / "data.bin").write_bytes(b"keep")
    (ledger_dir / "notes.tmp").write_text("keep")
    ledger = StageLedger.load(ledger_dir)
    assert [p.name for p in ledger.incomplete_stages()] == [".partial-001-b", "001-c"]
    assert [p.name for p in ledger.leftover_files()] == [".ledger.json.ab12_x9z.tmp"]
    removed = ledger.remove_incomplete()
    assert sorted(p.name for p in removed) == [".ledger.json.ab12_x9z.tmp", ".partial-001-b", "001-c"]
    assert (stages / "mine.txt").read_text() == "keep" and (stages / "notes" / "n.md").read_text() == "keep"
    assert (stages / "002-mine" / "data.bin").read_bytes() == b"keep" and (ledger_dir / "notes.tmp").exists()
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a"]
    StageLedger.load(ledger_dir).verify()


def test_a_stale_ledger_object_does_not_remove_stages_recorded_since(tmp_path):
    ledger_dir = tmp_path / "ledger"
    stale = StageLedger(ledger_dir)  # made before the ledger existed: it lists no stage
    _record(ledger_dir, _mlp(), "a")
    assert stale.remove_incomplete() == []
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a"]


def test_a_lone_start_file_of_an_interrupted_creation_is_refused_then_removable(tmp_path):
    ledger_dir = tmp_path / "ledger"
    model = _mlp()
    _record(ledger_dir, model, "a")
    (ledger_dir / "ledger.json").unlink()  # as if killed after writing θ_0, before listing it
    shutil.rmtree(ledger_dir / "stages")
    with pytest.raises(LedgerError, match="--remove-incomplete"):
        _record(ledger_dir, model, "b")
    assert sorted(p.name for p in ledger_dir.iterdir()) == ["start.safetensors"]
    assert [p.name for p in StageLedger(ledger_dir).remove_incomplete()] == ["start.safetensors"]
    _record(ledger_dir, model, "b")
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["b"]


def test_a_start_file_the_package_did_not_write_is_never_removed(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "start.safetensors"))  # someone else's file of the same name
    before = _snapshot(folder)
    assert StageLedger(folder).leftover_files() == []
    with pytest.raises(LedgerError, match="index is missing"):
        _record(folder, _mlp(), "a")
    assert main(["inspect", str(folder), "--remove-incomplete"]) == 1
    assert "start.safetensors" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_a_foreign_folder_where_the_stage_would_go_is_refused_before_training(tmp_path):
    ledger_dir = tmp_path / "ledger"
    LedgerWriter(ledger_dir).initialize(
        [(n, tuple(p.shape)) for n, p in _mlp().named_parameters()],
        iter([(n, p.detach()) for n, p in _mlp().named_parameters()]),
        model_class="Sequential",
    )
    (ledger_dir / "stages" / "000-a").mkdir(parents=True)
    (ledger_dir / "stages" / "000-a" / "mine.txt").write_text("keep")
    with pytest.raises(LedgerError, match="000-a"):
        _record(ledger_dir, _mlp(), "a")
    assert (ledger_dir / "stages" / "000-a" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in (ledger_dir / "stages").iterdir()) == ["000-a"]  # no partial stage was started
    assert StageLedger(ledger_dir).remove_incomplete() == []
    assert (ledger_dir / "stages" / "000-a" / "mine.txt").read_text() == "keep"
