"""The disk-backed Krylov basis (issue 16): the scratch store gives the numbers of the RAM one, streams in chunks,
cleans up after itself, and the curvature propagation gives the same result with the basis on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_stage_attribution.errors import EstimatorMemoryError
from hf_stage_attribution.estimators.curvature import scratch
from hf_stage_attribution.estimators.curvature.krylov import block_lanczos, lanczos_into
from hf_stage_attribution.estimators.curvature.propagation import propagate
from hf_stage_attribution.estimators.curvature.scratch import VectorStore, scratch_mode

from .test_curvature import LATER, _ce_data, _flat, _mlp, record_pipeline


def _rows(n: int, r: int) -> torch.Tensor:
    return torch.randn(r, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_disk_store_streams_the_same_algebra_as_ram_and_deletes_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv(scratch.SCRATCH_DIR_ENV, str(tmp_path))
    n, rows = 37, _rows(37, 4)
    w = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    d = np.linspace(0.0, 1.0, n)
    with VectorStore(n, 5, where="disk", chunk=8) as disk:  # 8 coordinates per chunk: 5 chunks, a short last one
        assert os.listdir(tmp_path) == []  # unlinked once open: nothing is left behind even by a killed process
        for i, row in enumerate(rows):
            disk.write(i, row.float() if i == 0 else row)  # float32 input is widened, as the RAM store does
        ref = rows.clone()
        ref[0] = rows[0].float().double()
        assert torch.allclose(disk.dots(w), ref @ w, atol=1e-12)
        assert torch.equal(disk.read(2), ref[2])
        assert torch.allclose(disk.combine(c), ref.T @ c, atol=1e-12)
        assert torch.allclose(disk.combine(torch.stack([c, 2 * c], 1)), ref.T @ torch.stack([c, 2 * c], 1))
        (g1, g2) = disk.gram([lambda lo, hi: np.ones(hi - lo), lambda lo, hi: d[lo:hi]])
        assert np.allclose(g1, (ref @ ref.T).numpy())
        assert np.allclose(g2, ((ref * torch.from_numpy(d)) @ ref.T).numpy())
        v = w.clone()
        disk.subtract(v, c)
        assert torch.allclose(v, w - ref.T @ c, atol=1e-12)
        with pytest.raises(IndexError):
            disk.write(6, w)  # rows are appended in order
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"), VectorStore(n, 2, where="disk") as disk:
        disk.write(0, w)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # and on an exception


@pytest.mark.parametrize("where", ["disk", "ram"])
def test_a_subtraction_returns_the_next_dots_or_the_norm_bit_for_bit(where):
    """Gram–Schmidt's passes fused with the reads of the next step (krylov.lanczos_rows): the same row and the same
    numbers as the separate calls, chunk for chunk."""
    n, rows = 37, _rows(37, 4)
    w = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stores = [VectorStore(n, 5, where=where, chunk=8) for _ in range(2)]
    for store in stores:
        for i, row in enumerate(rows):
            store.write(i, row)
        store.write_range(4, 0, w)
    separate, fused = stores
    separate.row_subtract(4, separate.row_dots(4))
    second = separate.row_dots(4)
    separate.row_subtract(4, second)
    fused_second = fused.row_subtract(4, fused.row_dots(4), then="dots")
    assert torch.equal(fused_second, second)
    assert fused.row_subtract(4, fused_second, then="norm") == separate.row_norm(4)
    assert torch.equal(fused.read_range(4, 0, n), separate.read_range(4, 0, n))
    with pytest.raises(ValueError, match="`then` must be None, 'dots' or 'norm'"):
        fused.row_subtract(4, second, then="norms")
    empty = VectorStore(n, 2, where=where)
    empty.write_range(0, 0, w)
    assert empty.row_subtract(0, torch.zeros(0), then="norm") == pytest.approx(float(w.norm()), rel=1e-15)
    assert empty.row_subtract(0, torch.zeros(0), then="dots").numel() == 0


def test_a_store_still_open_at_interpreter_exit_closes_quietly(monkeypatch):
    """At interpreter exit the modules' globals are cleared before the last objects go: a disk store still open then
    must not print "Exception ignored in VectorStore.__del__" (its ``os`` is gone), as TensorFile does not."""
    store = VectorStore(10, 2, where="disk")
    fd = store._fd
    monkeypatch.setattr(scratch, "os", None)  # what interpreter teardown leaves in the module
    store.__del__()  # no AttributeError
    monkeypatch.undo()
    os.close(fd)


def test_a_process_killed_with_a_disk_basis_leaves_no_scratch_file(tmp_path):
    """A run killed by the kernel for memory (SIGKILL: no cleanup runs) used to leave its Krylov basis file behind."""
    code = (
        "import os, signal, torch\n"
        "from hf_stage_attribution.estimators.curvature.scratch import VectorStore\n"
        "store = VectorStore(1000, 4, where='disk')\n"
        "store.write(0, torch.ones(1000, dtype=torch.float64))\n"
        "print(len(os.listdir(os.environ['HF_STAGE_ATTRIBUTION_SCRATCH_DIR'])), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, scratch.SCRATCH_DIR_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "0" and os.listdir(tmp_path) == []


def test_scratch_mode_keeps_small_bases_in_ram_and_can_be_forced(monkeypatch):
    monkeypatch.delenv(scratch.SCRATCH_ENV, raising=False)
    assert scratch_mode(1000, 12) == "ram"
    assert scratch_mode(scratch.RAM_BASIS_BYTES // 8 + 1, 1) == "disk"
    monkeypatch.setenv(scratch.SCRATCH_ENV, "disk")
    assert scratch_mode(10, 2) == "disk"
    monkeypatch.setenv(scratch.SCRATCH_ENV, "tape")
    with pytest.raises(EstimatorMemoryError, match="must be 'ram', 'disk' or 'auto'"):
        scratch_mode(10, 2)


def test_lanczos_on_a_disk_basis_equals_the_ram_one(tmp_path, monkeypatch):
    monkeypatch.setenv(scratch.SCRATCH_DIR_ENV, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(23, 23, generator=gen, dtype=torch.float64)
    a = a @ a.T
    starts = [torch.randn(23, generator=gen, dtype=torch.float64), torch.randn(23, generator=gen)]
    shift = torch.linspace(0.0, 1.0, 23, dtype=torch.float64)
    q, h, products = block_lanczos(lambda v: a @ v, starts, 9, shift=shift)
    with VectorStore(23, 9, where="disk", chunk=5) as store:
        h_disk, p_disk = lanczos_into(store, lambda v: a @ v, starts, 9, shift=shift)
        q_disk = store.combine(torch.eye(store.count, dtype=torch.float64))
    assert p_disk == products == 9 and q_disk.shape == q.shape
    assert torch.allclose(q_disk, q, atol=1e-10) and torch.allclose(h_disk, h, atol=1e-10)
    assert torch.allclose(q.T @ q, torch.eye(9, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("mode", ["ggn", "hvp"])
def test_propagation_with_the_basis_on_disk_equals_the_basis_in_ram(tmp_path, monkeypatch, mode):
    """Two param groups with different decay (a non-uniform coupled decay: the streamed Gram matrices of the basis
    are used) and a chunk smaller than one tensor: the disk-backed run is the RAM run."""
    monkeypatch.setenv(scratch.SCRATCH_DIR_ENV, str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["two-groups"])
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}
    names = [n for n, _ in model.named_parameters()]
    monkeypatch.setenv(scratch.SCRATCH_ENV, "ram")
    ram, info_ram = propagate(v, ledger, 1, mode=mode, model=model, krylov_size=6)
    monkeypatch.setenv(scratch.SCRATCH_ENV, "disk")
    monkeypatch.setattr(scratch, "CHUNK", 7)
    disk, info_disk = propagate(v, ledger, 1, mode=mode, model=model, krylov_size=6)
    assert {s["scratch"] for s in info_ram["segments"]} == {"ram"}
    assert {s["scratch"] for s in info_disk["segments"]} == {"disk"}
    assert info_disk["curvature_products"] == info_ram["curvature_products"] > 0
    assert torch.allclose(_flat(disk, names), _flat(ram, names), atol=1e-11, rtol=1e-9)
    assert (_flat(ram, names) - _flat(v, names)).abs().max() != 0  # the stage moved the perturbation
    assert os.listdir(tmp_path / "scratch") == []


def test_preflight_counts_the_basis_on_disk_and_refuses_when_the_scratch_disk_is_too_small(tmp_path, monkeypatch):
    from hf_stage_attribution.estimators.curvature import propagation

    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["two-groups"])
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setenv(scratch.SCRATCH_ENV, "disk")
    big = 10**7  # on disk only one chunk of the basis counts in RAM
    assert propagation.curvature_peak_bytes(big, 12) < propagation.curvature_peak_bytes(big, 12, where="ram")
    # basis, x, buf, P, s and the model's own values (forced to disk), and a Hessian product's staged float32 tangent
    assert propagation.curvature_scratch_bytes(n, 12) == 8 * n * (15 + 3 + 2) + 4 * n
    assert propagation.curvature_memory_problem(ledger, 0, 12) is None
    # room for 9 of the 12 basis vectors (+3 rows, +5 carried, scale and saved vectors, + the tangent)
    monkeypatch.setattr(propagation, "scratch_free_bytes", lambda: 8 * n * (9 + 3 + 5) + 4 * n)
    problem = propagation.curvature_memory_problem(ledger, 0, 12)
    assert problem is not None and "\n" not in problem and "scratch disk" in problem
    assert "krylov_size': 9" in problem and "--curvature-preset cheap" in problem
    short = propagation.curvature_peak_bytes(n, 1) - 1  # RAM short whatever the basis size
    monkeypatch.setenv("HF_STAGE_ATTRIBUTION_MEMORY_BYTES", str(short))
    problem = propagation.curvature_memory_problem(ledger, 0, 12)
    assert problem is not None and "in RAM (basis on disk" in problem and "use --estimator aa-fd" in problem


def test_allocation_failures_in_the_curvature_path_become_one_line_errors(tmp_path, monkeypatch):
    from hf_stage_attribution.estimators.curvature import propagation

    model = _mlp()
    ledger = record_pipeline(tmp_path / "l", model, _ce_data(), LATER["two-groups"])
    v = {n: t.double() for n, t in ledger.stages[0].iter_delta()}

    def fail(message, kind=RuntimeError):
        def lanczos(*args, **kwargs):
            raise kind(message)

        return lanczos

    oom = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate"
    for message, kind in ((oom, RuntimeError), ("", MemoryError), ("[Errno 28] No space left on device", OSError)):
        monkeypatch.setattr(propagation, "lanczos_rows", fail(message, kind))
        with pytest.raises(EstimatorMemoryError) as caught:
            propagate(v, ledger, 1, mode="ggn", model=model, krylov_size=12)
        text = str(caught.value)
        assert "\n" not in text and text.startswith("aa-ggn: the curvature propagation ran out of memory")
        assert "--curvature-preset cheap or --estimator aa-fd" in text
    monkeypatch.setattr(propagation, "lanczos_rows", fail("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not disguised
        propagate(v, ledger, 1, mode="ggn", model=model, krylov_size=4)
