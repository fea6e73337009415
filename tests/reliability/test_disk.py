"""Read-only directories and full disks: a clear ``LedgerError``, the ledger unchanged, no half-written files.

The failures are real ones from the kernel, not mocks: a permission denial (as an unprivileged user when the test
runs as root), a per-process file-size limit (``RLIMIT_FSIZE``, so writes fail with EFBIG) and, where this
process may mount one, a tiny tmpfs that fills up (ENOSPC).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))


def _record(ledger_dir: Path, name: str, curvature: bool = False, model: torch.nn.Module | None = None) -> None:
    model = model or _model()
    if (ledger_dir / "ledger.json").exists():
        model.load_state_dict(StageLedger.load(ledger_dir).final_state().materialize())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 0, 1])

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    options = {"loss_fn": loss_fn, "num_steps": 4} if curvature else {}
    with StageLedger(ledger_dir).record_stage(name, model=model, optimizer=opt, **options) as rec:
        for _ in range(4):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
            rec.step((x, y))


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _in_child(fn: Callable[[], None]) -> dict:
    """Run ``fn`` in a forked process; return ``{"ok": True}`` or the error it raised (type and message)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            try:
                fn()
                result = {"ok": True}
            except BaseException as exc:
                result = {
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "is_ledger_error": isinstance(exc, LedgerError),
                }
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def _assert_refused_cleanly(result: dict, ledger_dir: Path, before: dict[str, str], reason: str) -> None:
    assert result.get("is_ledger_error"), result
    assert "Could not write" in result["message"] and reason in result["message"], result["message"]
    assert _files(ledger_dir) == before, "the ledger directory changed"
    ledger = StageLedger.load(ledger_dir)
    assert [s.name for s in ledger.stages] == ["a"]
    assert ledger.incomplete_stages() == [] and ledger.leftover_files() == []
    ledger.verify()


# --- read-only -----------------------------------------------------------------------------------------------


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="hfsa-readonly-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def _read_only(root: Path, *dirs: Path) -> Callable[[], None]:
    """Make ``dirs`` (under ``root``) read-only for the process that will write, the rest of ``root`` writable:
    as root, drop to `nobody` in the child (root ignores permissions); otherwise chmod ``dirs`` to 0555."""
    if os.geteuid() != 0:
        for d in dirs:
            d.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        return lambda: None
    for d in [root, *root.rglob("*")]:
        if d.is_dir() and not d.is_symlink():
            d.chmod(0o755 if d in dirs else 0o777)

    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    return drop


@pytest.mark.parametrize("which", ["ledger directory", "stages directory"])
def test_read_only_ledger_gives_a_clear_error_and_changes_nothing(shared_dir, which):
    ledger_dir = shared_dir / "ledger"
    _record(ledger_dir, "a")
    before = _files(ledger_dir)
    drop = _read_only(ledger_dir, ledger_dir if which == "ledger directory" else ledger_dir / "stages")
    result = _in_child(lambda: (drop(), _record(ledger_dir, "b")))
    _assert_refused_cleanly(result, ledger_dir, before, "ermission denied")
    assert not (ledger_dir / "ledger.lock").exists()


def test_new_ledger_in_a_read_only_place_gives_a_clear_error(shared_dir):
    parent = shared_dir / "ro"
    parent.mkdir()
    drop = _read_only(parent, parent)
    result = _in_child(lambda: (drop(), _record(parent / "ledger", "a")))
    assert result.get("is_ledger_error") and "ermission denied" in result["message"], result
    assert list(parent.iterdir()) == []


# --- full disk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["during a step (curvature midpoint)", "while finishing (stage delta)"])
def test_file_size_limit_mid_stage_leaves_no_half_written_files(tmp_path, when):
    ledger_dir = tmp_path / "ledger"
    _record(ledger_dir, "a")
    before = _files(ledger_dir)

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        limit = 12 * 1024  # small files (JSON, lock) fit; a 64x64 float32 tensor (16 KiB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        _record(ledger_dir, "b", curvature=when.startswith("during"))

    _assert_refused_cleanly(_in_child(limited), ledger_dir, before, "too large")
    _record(ledger_dir, "b", curvature=True)  # once there is room again, recording works
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a", "b"]


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]}); the RLIMIT_FSIZE test covers it"
        )
    try:
        yield mount
    finally:
        gc.collect()  # memory-mapped tensor files of dropped ledgers keep the mount busy
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_gives_a_clear_error_and_changes_nothing(tiny_disk):
    ledger_dir = tiny_disk / "ledger"
    _record(ledger_dir, "a", curvature=True)
    before = _files(ledger_dir)
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk, then free the last few KiB: room for small files, not for a 16 KiB tensor
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - 8 * 1024))
    os.close(fd)
    # refused before any write: the recorder compares its projected growth with the free space (issue 16)
    with pytest.raises(LedgerError, match=r"needs about .* but the disk has .* free"):
        _record(ledger_dir, "b", curvature=True)
    assert _files(ledger_dir) == before, "the ledger directory changed"
    ledger = StageLedger.load(ledger_dir)
    assert [s.name for s in ledger.stages] == ["a"]
    assert ledger.incomplete_stages() == [] and ledger.leftover_files() == []
    ledger.verify()
    filler.unlink()
    _record(ledger_dir, "b", curvature=True)
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a", "b"]
