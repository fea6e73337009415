"""Crash safety: a process recording a stage is SIGKILLed at named points of the write, and at random times.

A fork server (this file run as a script) imports torch once, then forks one child per kill. The child records
stage ``c`` into a copy of a two-stage ledger with instrumented I/O: at the named point it announces itself on
stdout and waits, and the test SIGKILLs it there. After every kill the test checks that the ledger loads, that
every earlier stage is intact byte for byte, that the partial stage is reported as incomplete, that
``hf-stage-attribution inspect --remove-incomplete`` removes it, and that recording the stage again gives the
same end state as a run that was never killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

STEPS = 6

# Named kill points, in the order the writer reaches them. (point, ledger copy, trigger description)
KILL_POINTS = [
    "lock-acquired",
    "partial-dir-created",
    "optimizer-state-mid-file",
    "segment-moments-mid-file",
    "segment-examples-before-rename",
    "delta-mid-file",
    "delta-before-rename",
    "stage-json-before-rename",
    "before-stage-dir-rename",
    "after-stage-dir-rename",
    "ledger-json-before-rename",
    "after-ledger-json-rename",
]
FIRST_STAGE_POINTS = ["initial-state-mid-file", "initial-ledger-json-before-rename"]


# --- the recording (runs in the fork server's children) ------------------------------------------------------


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def _record(ledger_dir: str, name: str, slow: float = 0.0) -> str:
    """Record stage ``name`` (Adam continued from a primed state) from the ledger's final state; return end hash."""
    import torch

    from hf_stage_attribution import StageLedger

    ledger = StageLedger(ledger_dir)
    model = _model()
    if ledger.exists:
        model.load_state_dict(ledger.final_state().materialize())
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x, y = torch.randn(8, 64, generator=gen), torch.randint(0, 4, (8,), generator=gen)

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    loss_fn(model, (x, y)).backward()
    opt.step()  # lr 0: primes Adam's state without moving the weights, so the stage continues a state
    opt.param_groups[0]["lr"] = 0.01
    with ledger.record_stage(name, model=model, optimizer=opt, loss_fn=loss_fn, num_steps=STEPS) as rec:
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
            rec.step((x, y))
            if slow:
                time.sleep(slow)
    return ledger.stages[-1].end_hash


def _instrument(point: str) -> None:
    """Make the writer announce ``point`` on stdout and wait there (to be SIGKILLed)."""
    import pathlib

    from hf_stage_attribution.ledger import storage

    def hit(where: str) -> None:
        if where == point:
            print(json.dumps({"event": "at", "point": point, "pid": os.getpid()}), flush=True)
            time.sleep(600)

    real_acquire, real_mkdir, real_replace = storage.DirectoryLock.acquire, pathlib.Path.mkdir, os.replace
    real_mkstemp, real_tensor_bytes = storage.tempfile.mkstemp, storage.tensor_bytes
    current = {"target": "", "count": 0}

    def acquire(self):
        real_acquire(self)
        hit("lock-acquired")

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".partial-"):
            hit("partial-dir-created")

    def mkstemp(*args, prefix="", **kwargs):
        current["target"], current["count"] = prefix.strip("."), 0
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    def tensor_bytes(tensor):
        current["count"] += 1
        if current["count"] == 2:  # header and first tensor written, second one about to be
            for name, where in (
                ("optimizer_state.safetensors", "optimizer-state-mid-file"),
                ("second_moments.safetensors", "segment-moments-mid-file"),
                ("delta.safetensors", "delta-mid-file"),
                ("start.safetensors", "initial-state-mid-file"),
            ):
                if current["target"] == name:
                    hit(where)
        return real_tensor_bytes(tensor)

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        before = {
            "examples.safetensors": "segment-examples-before-rename",
            "delta.safetensors": "delta-before-rename",
            "stage.json": "stage-json-before-rename",
        }
        if dst.name in before:
            hit(before[dst.name])
        if dst.name == "ledger.json":
            first = not (dst.parent / "stages").is_dir()
            hit("initial-ledger-json-before-rename" if first else "ledger-json-before-rename")
        if src.name.startswith(".partial-"):
            hit("before-stage-dir-rename")
        real_replace(src, dst, *args, **kwargs)
        if src.name.startswith(".partial-"):
            hit("after-stage-dir-rename")
        if dst.name == "ledger.json" and (dst.parent / "stages").is_dir():
            hit("after-ledger-json-rename")

    storage.DirectoryLock.acquire = acquire
    pathlib.Path.mkdir = mkdir
    storage.tempfile.mkstemp = mkstemp
    storage.tensor_bytes = tensor_bytes
    os.replace = replace


def _serve() -> None:
    """Fork server: one JSON command per stdin line, one child per command; events as JSON lines on stdout."""
    import torch

    import hf_stage_attribution.ledger  # noqa: F401  (imported once, before forking)

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as warm:  # lazy imports and first-call costs, paid once before forking
        _record(warm, "warm-up")
    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if cmd.get("point"):
                    _instrument(cmd["point"])
                end_hash = _record(cmd["ledger"], cmd["stage"], cmd.get("slow", 0.0))
                print(json.dumps({"event": "done", "pid": os.getpid(), "end_hash": end_hash}), flush=True)
            except BaseException as exc:  # report, never fall back into the server loop
                print(json.dumps({"event": "error", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
                code = 1
            finally:
                os._exit(code)
        print(json.dumps({"event": "forked", "pid": pid}), flush=True)
        if cmd.get("kill_after") is not None:  # killed by its parent: the pid cannot have been reused
            time.sleep(cmd["kill_after"])
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        print(json.dumps({"event": "exit", "pid": pid, "signal": killed_by}), flush=True)


# --- the test side ---------------------------------------------------------------------------------------------


class ForkServer:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self._event()["event"] == "ready"

    def _event(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit code {self.proc.poll()})")
        return json.loads(line)

    def run(self, ledger: Path, stage: str, point: str | None = None, kill_after: float | None = None,
            slow: float = 0.0) -> dict:  # fmt: skip
        """Record ``stage``; kill the child at ``point`` (or after ``kill_after`` seconds). Return the outcome."""
        cmd = {"ledger": str(ledger), "stage": stage, "point": point, "slow": slow, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        forked = self._event()
        assert forked["event"] == "forked", forked
        pid, outcome = forked["pid"], {}
        while True:
            event = self._event()
            if event["event"] == "at":
                os.kill(pid, signal.SIGKILL)
            elif event["event"] == "exit":
                outcome["signal"] = event["signal"]
                return outcome
            outcome[event["event"]] = event

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "ledger.lock"
    }


def _listed_files(ledger) -> set[str]:
    files = {"ledger.json", ledger.manifest["start"]["file"]}
    for stage in ledger.stages:
        files |= {f"{stage.entry['dir']}/{rel}" for rel in stage.entry["files"]}
    return files


@pytest.fixture(scope="module")
def base(server, tmp_path_factory):
    """A two-stage ledger, and the end hash of stage ``c`` recorded on top of it without interruption."""
    root = tmp_path_factory.mktemp("crash")
    ledger_dir = root / "base"
    for name in ("a", "b"):
        assert "done" in server.run(ledger_dir, name)
    reference = root / "reference"
    shutil.copytree(ledger_dir, reference)
    done = server.run(reference, "c")["done"]
    return ledger_dir, done["end_hash"]


def _check_after_kill(
    ledger_dir: Path, before: dict[str, str], prior: list[str], point: str, named: bool = True
) -> tuple[bool, bool]:
    """The checks every kill must pass; returns (stage c committed, something was left to clean)."""
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.cli.main import main

    ledger = StageLedger.load(ledger_dir)
    names = [s.name for s in ledger.stages]
    committed = names == [*prior, "c"]
    assert names == prior or committed, f"{point}: stages {names}"
    ledger.verify()  # every listed file matches its recorded hash
    after = _digests(ledger_dir)
    for rel, digest in before.items():  # earlier stages, θ_0 (and ledger.json unless c committed) untouched
        if rel != "ledger.json" or not committed:
            assert after.get(rel) == digest, f"{point}: {rel} changed"
    for s in ledger.stages:
        assert s.delta() and s.learning_rates
    ledger.final_state().materialize()
    left = ledger.incomplete_stages() + ledger.leftover_files()
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["inspect", str(ledger_dir)]) == 0
    for path in left:  # inspect lists what was left behind and says how to remove it
        assert path.name in shown.getvalue() and "--remove-incomplete" in shown.getvalue(), shown.getvalue()
    if named:  # from the partial directory's creation until the commit, the partial stage is reported
        assert (not committed and point != "lock-acquired") == bool(ledger.incomplete_stages()), (point, left)
    assert main(["inspect", str(ledger_dir), "--remove-incomplete"]) == 0
    ledger = StageLedger.load(ledger_dir)
    assert ledger.incomplete_stages() == [] and ledger.leftover_files() == []
    assert set(_digests(ledger_dir)) == _listed_files(ledger), f"{point}: stray files remain"
    assert not (ledger_dir / "ledger.lock").exists()
    return committed, bool(left)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_named_point_leaves_a_loadable_recoverable_ledger(server, base, tmp_path, point):
    base_dir, reference_hash = base
    ledger_dir = tmp_path / "ledger"
    shutil.copytree(base_dir, ledger_dir)
    before = _digests(ledger_dir)
    outcome = server.run(ledger_dir, "c", point=point)
    assert "at" in outcome and outcome["signal"] == signal.SIGKILL, f"the writer never reached {point}: {outcome}"
    if point == "after-stage-dir-rename":  # the orphaned stage dir is refused before training, not after it
        refused = server.run(ledger_dir, "c")
        assert "--remove-incomplete" in refused["error"]["error"], refused
    committed, _ = _check_after_kill(ledger_dir, before, ["a", "b"], point)
    assert committed == (point == "after-ledger-json-rename")
    if not committed:  # record the stage again: same result as a run that was never killed
        again = server.run(ledger_dir, "c")
        assert again["done"]["end_hash"] == reference_hash
    from hf_stage_attribution import StageLedger

    ledger = StageLedger.load(ledger_dir)
    ledger.verify()
    assert [s.name for s in ledger.stages] == ["a", "b", "c"] and ledger.final_hash == reference_hash


@pytest.mark.parametrize("point", FIRST_STAGE_POINTS)
def test_sigkill_while_creating_the_ledger(server, tmp_path, point):
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.cli.main import main
    from hf_stage_attribution.errors import LedgerError

    ledger_dir = tmp_path / "fresh"
    outcome = server.run(ledger_dir, "a", point=point)
    assert "at" in outcome and outcome["signal"] == signal.SIGKILL, outcome
    with pytest.raises(LedgerError, match="Expected a ledger"):  # no ledger.json yet: nothing half-listed
        StageLedger.load(ledger_dir)
    ledger = StageLedger(ledger_dir)
    assert ledger.leftover_files(), "the killed write should have left its temporary file"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["inspect", str(ledger_dir), "--remove-incomplete"]) == 0
    assert ledger.leftover_files() == [] and list(ledger_dir.iterdir()) == []
    assert "done" in server.run(ledger_dir, "a")
    assert [s.name for s in StageLedger.load(ledger_dir).stages] == ["a"]


def test_sigkill_at_a_few_random_times(server, base, tmp_path):
    """The fast variant of the random-kill check below (CI's fast tier): 4 kills spread over a recording slowed to
    ~0.3 s (seeded, so the same times every run); every one leaves a loadable, recoverable ledger."""
    import random

    base_dir, reference_hash = base
    rng, landed = random.Random(7), []
    for i, (low, high) in enumerate([(0.0, 0.15), (0.15, 0.3), (0.3, 0.45), (0.45, 0.6)]):
        ledger_dir = tmp_path / f"l{i}"
        shutil.copytree(base_dir, ledger_dir)
        before = _digests(ledger_dir)
        outcome = server.run(ledger_dir, "c", kill_after=rng.uniform(low, high), slow=0.05)
        assert outcome["signal"] in (0, signal.SIGKILL)
        committed, left = _check_after_kill(ledger_dir, before, ["a", "b"], f"random kill {i}", named=False)
        landed.append("committed" if committed else "mid-stage" if left else "before any write")
        if not committed:
            assert server.run(ledger_dir, "c")["done"]["end_hash"] == reference_hash
    print(f"4 random kills: {landed}")


@pytest.mark.slow
def test_sigkill_at_random_times_during_slow_writes(server, base, tmp_path):
    """30 kills at random times over a recording slowed to ~0.6 s; every one leaves a loadable ledger."""
    import random

    base_dir, _ = base
    rng = random.Random(1234)
    mid_stage = 0
    for i in range(30):
        ledger_dir = tmp_path / f"l{i}"
        shutil.copytree(base_dir, ledger_dir)
        before = _digests(ledger_dir)
        outcome = server.run(ledger_dir, "c", kill_after=rng.uniform(0.0, 1.2), slow=0.1)
        assert outcome["signal"] in (0, signal.SIGKILL)
        committed, left = _check_after_kill(ledger_dir, before, ["a", "b"], f"random kill {i}", named=False)
        mid_stage += left and not committed
    print(f"{mid_stage} of 30 random kills landed while stage c was being written; all left a loadable ledger")
    assert mid_stage >= 10, f"only {mid_stage} of 30 kills landed while the stage was being written"


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve()
