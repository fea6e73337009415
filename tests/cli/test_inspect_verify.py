"""``hf-stage-attribution inspect LEDGER --verify``: a passing check says so (text and JSON); a failing one errors."""

from __future__ import annotations

import json

import pytest

from hf_stage_attribution import StageLedger
from hf_stage_attribution.cli.main import main
from hf_stage_attribution.errors import LedgerFormatError
from tests.cli.test_commands import _golden_ledger


def test_verify_reports_how_many_files_matched(tmp_path, capsys):
    ledger = _golden_ledger(tmp_path / "ledger")
    files = 1 + sum(len(stage.entry["files"]) for stage in ledger.stages)  # θ_0's file and every stage file
    assert files > 0 and ledger.verify() == files
    assert main(["inspect", str(tmp_path / "ledger")]) == 0
    assert "verified" not in capsys.readouterr().out  # without --verify, nothing claims a check ran
    assert main(["inspect", str(tmp_path / "ledger"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"verified: {files} file(s) match the hashes recorded in ledger.json" in out
    assert main(["inspect", str(tmp_path / "ledger"), "--json"]) == 0
    assert "verified_files" not in json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tmp_path / "ledger"), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified_files"] == files


def test_verify_of_a_modified_stage_fails_in_one_line(tmp_path, capsys):
    _golden_ledger(tmp_path / "ledger")
    path = StageLedger.load(tmp_path / "ledger").stages[1].dir / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor: the header still reads
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ledger"), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verified:" not in captured.out
    assert "delta.safetensors does not match the hash" in captured.err and captured.err.count("\n") == 1


def test_verify_checks_the_start_file_too(tmp_path, capsys):
    """θ_0 is what every replay and estimate starts from: a changed start.safetensors fails --verify."""
    ledger = _golden_ledger(tmp_path / "ledger")
    start = tmp_path / "ledger" / "start.safetensors"
    data = bytearray(start.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor: the header still parses
    start.write_bytes(bytes(data))
    with pytest.raises(LedgerFormatError, match="θ_0"):
        ledger.verify()
    assert main(["inspect", str(tmp_path / "ledger"), "--verify"]) == 1
    assert "start.safetensors does not match" in capsys.readouterr().err
