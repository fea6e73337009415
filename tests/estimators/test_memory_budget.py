"""Refusing before heavy work: aa-ggn's Krylov basis checked against the memory available; ``auto`` falls back to
aa-linear and says why on the console; out-of-memory errors become one-line CLI errors."""

from __future__ import annotations

import argparse

import pytest
import torch

from hf_stage_attribution import StageAttributor, estimators
from hf_stage_attribution._internal.memory import is_out_of_memory, out_of_memory_message
from hf_stage_attribution.cli import main as cli_main
from hf_stage_attribution.errors import EstimatorMemoryError
from hf_stage_attribution.estimators.curvature.propagation import curvature_memory_problem, curvature_peak_bytes
from tests.ledger.test_compact_material import _model, _record


@pytest.fixture
def two_stages(tmp_path):
    model = _model()
    for name in ("a", "b"):
        ledger, _ = _record(tmp_path / "l", model, name)
    return ledger, model


def _behavior(m):
    return m(torch.linspace(-1, 1, 64).reshape(2, 32))[:, 0]


def test_aa_ggn_refuses_before_any_work_when_its_basis_does_not_fit(two_stages, monkeypatch):
    ledger, model = two_stages
    n = sum(p.numel() for p in model.parameters())
    assert curvature_memory_problem(ledger, 0, 12) is None  # fits on this machine
    monkeypatch.setenv("HF_STAGE_ATTRIBUTION_MEMORY_BYTES", str(curvature_peak_bytes(n, 8) + 1))
    problem = curvature_memory_problem(ledger, 0, 12)
    assert problem is not None and "--curvature-preset cheap" in problem and "\n" not in problem
    monkeypatch.setenv("HF_STAGE_ATTRIBUTION_MEMORY_BYTES", "1000")
    with pytest.raises(EstimatorMemoryError, match=r"aa-ggn: .* use --estimator aa-fd"):
        estimators.get("aa-ggn").estimate(ledger, model, _behavior)
    assert not ledger.embeddings_dir.exists() or not any(ledger.embeddings_dir.rglob("*.safetensors"))


def test_auto_falls_back_to_aa_fd_and_says_so_on_the_console(two_stages, monkeypatch, capsys):
    ledger, model = two_stages
    assert estimators.choose_estimator(ledger)[0] == "aa-ggn-fd"
    monkeypatch.setenv("HF_STAGE_ATTRIBUTION_MEMORY_BYTES", "1000")
    chosen, reason = estimators.choose_estimator(ledger)
    assert chosen == "aa-fd" and "would not fit in memory" in reason
    report = StageAttributor(ledger, model, diagnostics=False, show_progress=False).attribute({"out": _behavior})
    assert report.estimator == "aa-fd"
    err = capsys.readouterr().err
    assert "estimator auto -> aa-fd: aa-ggn-fd would not fit in memory" in err


def test_auto_says_when_the_aa_ggn_basis_goes_to_scratch_disk(two_stages, monkeypatch):
    """aa-ggn-fd stays auto's choice, but the reason names the cost a disk-backed basis was measured to have at scale
    (BENCHMARKS.md §9) and the fast alternative; a basis kept in RAM says nothing of it."""
    ledger, _ = two_stages
    name, reason = estimators.choose_estimator(ledger)
    assert name == "aa-ggn-fd" and "scratch disk" not in reason
    monkeypatch.setenv("HF_STAGE_ATTRIBUTION_CURVATURE_SCRATCH", "disk")  # as for a model of > 0.5 M parameters
    name, reason = estimators.choose_estimator(ledger)
    assert name == "aa-ggn-fd" and "goes to scratch disk" in reason and "estimator='aa-fd'" in reason


def test_out_of_memory_errors_become_one_line_cli_errors(monkeypatch, capsys):
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                       "allocate 1076120064 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip
    assert is_out_of_memory(oom) and is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("x"))
    assert "\n" not in out_of_memory_message(oom)

    def boom(args):
        raise oom

    class Parser:  # the real sub-command parsing, with a handler that runs out of memory
        def __init__(self, command=None):
            assert command == "validate"  # main builds the parser of the command it is given

        def parse_args(self, argv):
            return argparse.Namespace(func=boom, command="validate", verbose=False)

    monkeypatch.setattr(cli_main, "build_parser", Parser)
    assert cli_main.main(["validate"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Ran out of memory" in err and "--estimator aa-fd" in err
