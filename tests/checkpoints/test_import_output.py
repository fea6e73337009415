"""``import-checkpoints --output OUT [--overwrite]``: only an existing ledger is ever replaced.

An output that is, or holds, a checkpoint the spec imports, a file, or a folder that is not a ledger is refused
before any work, with or without ``--overwrite``, and is left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from hf_stage_attribution import StageLedger
from hf_stage_attribution.checkpoints.importer import import_checkpoints
from hf_stage_attribution.cli.main import main
from hf_stage_attribution.errors import CheckpointImportError
from hf_stage_attribution.ledger.storage import DirectoryLock
from tests.checkpoints.test_fixtures import recorded_run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two saved checkpoints (θ_0 and the end of one stage) of a tiny GPT-2."""
    root = tmp_path_factory.mktemp("import_output")
    _, folders, _ = recorded_run(root, stage_steps=(2,))
    return folders


def _snapshot(root: Path) -> dict[str, str]:
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def work(checkpoints, tmp_path):
    """A copy of the checkpoints under ``tmp_path/runs`` and a spec importing them."""
    runs = tmp_path / "runs"
    for folder in checkpoints:
        shutil.copytree(folder, runs / folder.name)
    spec = tmp_path / "spec.yaml"
    stages = [{"model": str(runs / "ckpt-0")}, {"model": str(runs / "ckpt-1"), "name": "sft", "kind": "sft"}]
    spec.write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path, runs, spec


def _import(spec: Path, out: Path, *extra: str) -> int:
    return main(["import-checkpoints", str(spec), "--output", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("target", ["runs", "runs/ckpt-1"])
def test_an_output_holding_the_imported_checkpoints_is_refused(work, capsys, target):
    root, runs, spec = work
    before = _snapshot(runs)
    for extra in ((), ("--overwrite",)):
        assert _import(spec, root / target, *extra) == 1
        err = capsys.readouterr().err
        assert "apart from the checkpoints being imported" in err and "ckpt-" in err and err.count("\n") == 1
    assert _snapshot(runs) == before


def test_a_file_as_output_is_refused_and_called_a_file(work, capsys):
    root, _, spec = work
    target = root / "afile.txt"
    target.write_text("precious")
    for extra in ((), ("--overwrite",)):
        assert _import(spec, target, *extra) == 1
        err = capsys.readouterr().err
        assert "which is a file" in err and "with files in it" not in err
    assert target.read_text() == "precious"


def test_a_folder_that_is_not_a_ledger_is_never_replaced(work, capsys):
    root, _, spec = work
    report = root / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    (report / "figures").mkdir()
    (report / "figures" / "a.png").write_bytes(b"png")
    before = _snapshot(report)
    assert _import(spec, report, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "not a ledger" in err and "report.json" in err and "only replaces a ledger" in err
    assert _snapshot(report) == before


def test_overwrite_replaces_an_existing_ledger_and_nothing_with_extra_files(work, capsys):
    root, runs, spec = work
    out = root / "ledger"
    assert _import(spec, out) == 0
    capsys.readouterr()
    assert _import(spec, out) == 1
    assert "existing ledger" in capsys.readouterr().err
    first = StageLedger.load(out)  # the fingerprint chains each stage's record, its time included: compare states
    (out / "ledger.json").touch()  # and tell the new ledger from the old one by its file
    old_inode = (out / "ledger.json").stat().st_ino
    assert _import(spec, out, "--overwrite") == 0
    capsys.readouterr()
    again = StageLedger.load(out)
    assert (out / "ledger.json").stat().st_ino != old_inode
    assert again.final_hash == first.final_hash and [s.name for s in again.stages] == [s.name for s in first.stages]
    assert sorted(p.name for p in root.iterdir()) == [
        "ledger",
        "runs",
        "spec.yaml",
    ]  # the replaced ledger and the temporary folder are gone
    (out / "README.md").write_text("my notes")  # a ledger plus someone's file: not only ledger content
    (out / "stages" / "mine.txt").write_text("keep")
    for extra_file in (out / "README.md", out / "stages" / "mine.txt"):
        assert _import(spec, out, "--overwrite") == 1
        assert extra_file.name in capsys.readouterr().err
        extra_file.rename(root / extra_file.name)
    assert _import(spec, out, "--overwrite") == 0


def test_the_python_entry_point_refuses_the_same(work):
    root, runs, _ = work
    boundaries = [{"model": str(runs / "ckpt-0")}, {"model": str(runs / "ckpt-1"), "name": "sft"}]
    before = _snapshot(runs)
    with pytest.raises(CheckpointImportError, match="contains the input"):
        import_checkpoints(boundaries, root, overwrite=True, progress=False)
    with pytest.raises(CheckpointImportError, match="is the input"):
        StageLedger.from_checkpoints(boundaries, runs / "ckpt-0", overwrite=True, progress=False)
    assert _snapshot(runs) == before


def test_overwrite_refuses_a_ledger_that_another_process_records_into(work, capsys):
    """The recorder holds the ledger's lock for the whole stage; replacing the folder under it would lose the stage."""
    root, runs, spec = work
    out = root / "ledger"
    assert _import(spec, out) == 0
    capsys.readouterr()
    before = _snapshot(out)
    with DirectoryLock(out, "recording a stage"):  # what StageRecorder holds while a stage trains
        assert _import(spec, out, "--overwrite") == 1
        err = capsys.readouterr().err
        assert "another process is recording into" in err and "Nothing was changed" in err
    assert _snapshot(out) == before
    assert _import(spec, out, "--overwrite") == 0  # once the recording ended, the ledger may be replaced
