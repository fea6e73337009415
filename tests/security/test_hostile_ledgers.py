"""Hostile ledgers: paths and symlinks leaving the directory, wrong types, huge counts, bad tensor files.

Every case starts from a valid two-stage ledger and a *bait* directory next to it holding a valid copy of the
same ledger, so that a loader which followed a path or link out of the ledger would succeed instead of failing.
A kernel-level watch (inotify) on the bait proves nothing there is even opened (safetensors opens files from
Rust, out of reach of Python's audit hooks).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerFormatError, StageAttributionError, UnsafeInputError
from hf_stage_attribution.ledger.format import FORMAT_VERSION
from hf_stage_attribution.ledger.summary import ledger_summary

# --- helpers shared with test_security_ledger_fuzz.py ---------------------------------------------------------


def build_ledger(directory: Path) -> None:
    """Stage ``a`` (Adam, curvature segments, tuple batches) and ``b`` (continues a's optimizer state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.arange(6) % 2
    ledger = StageLedger(directory)

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    for name in ("a", "b"):
        with ledger.record_stage(
            name, model=model, optimizer=opt, loss_fn=loss_fn, num_steps=4, curvature_material="full"
        ) as rec:
            for _ in range(4):
                opt.zero_grad()
                loss_fn(model, (x, y)).backward()
                opt.step()
                rec.step((x, y))


def read_everything(directory: Path) -> StageLedger:
    """Everything a user (or inspect, an estimator, a card) reads from a ledger."""
    ledger = StageLedger.load(directory)
    ledger_summary(ledger)
    for stage in ledger.stages:
        _ = (stage.kind, stage.num_steps, stage.learning_rates, stage.optimizer, stage.lora, stage.curvature_loss)
        _ = (stage.trainable_parameters, stage.optimizer_state_policy, stage.end_digests, stage.replay_dir)
        stage.delta()
        stage.optimizer_state_at_start()
        for segment in stage.segments:
            _ = (segment.learning_rates, segment.num_examples)
            segment.params_delta()
            segment.second_moments()
            segment.examples()
    ledger.initial_state().materialize()
    ledger.final_state().materialize()
    _ = (ledger.fingerprint, ledger.final_hash, ledger.embeddings_dir)
    ledger.incomplete_stages()
    ledger.leftover_files()
    ledger.verify()  # last, so that the readers above also meet files whose hashes no longer match
    return ledger


class OpenWatch:
    """inotify (IN_OPEN | IN_ACCESS) on every directory under ``root``: did anything open a file there?"""

    def __init__(self, root: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        for d in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
            if self.libc.inotify_add_watch(self.fd, str(d).encode(), 0x20 | 0x01) < 0:  # IN_OPEN | IN_ACCESS
                pytest.skip("inotify watch could not be added")

    def events(self) -> list[str]:
        names = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(buf):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                names.append(buf[offset + 16 : offset + 16 + length].rstrip(b"\0").decode() or ".")
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    build_ledger(root / "pristine")
    read_everything(root / "pristine")  # the unmodified ledger is valid
    return root / "pristine"


@pytest.fixture
def hostile(pristine, tmp_path):
    """(ledger copy to tamper with, bait copy outside it, watch on the bait)."""
    ledger, bait = tmp_path / "ledger", tmp_path / "bait"
    shutil.copytree(pristine, ledger)
    shutil.copytree(pristine, bait)
    watch = OpenWatch(bait)
    yield ledger, bait, watch
    watch.close()


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def replace_with_link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())


def _refused(ledger: Path, watch: OpenWatch, error: type[Exception], names: str) -> str:
    with pytest.raises(error) as info:
        read_everything(ledger)
    assert watch.events() == [], "a file outside the ledger was opened"
    assert names in str(info.value), f"the message should name {names!r}: {info.value}"
    return str(info.value)


# --- paths and links leaving the ledger ------------------------------------------------------------------------

ESCAPES = {
    "stage dir ../": ("ledger.json", lambda j: j["stages"][0].update(dir="stages/../../bait/stages/000-a"), "000-a"),
    "stage dir absolute": ("ledger.json", lambda j: j["stages"][0].update(dir="{bait}/stages/000-a"), "bait"),
    "start file ../": ("ledger.json", lambda j: j["start"].update(file="../bait/start.safetensors"), "start.file"),
    "delta file absolute": (
        "stages/000-a/stage.json",
        lambda j: j.update(delta_file="{bait}/stages/000-a/delta.safetensors"),
        "delta_file",
    ),
    "delta file ../": (
        "stages/000-a/stage.json",
        lambda j: j.update(delta_file="../../../bait/stages/000-a/delta.safetensors"),
        "delta_file",
    ),
    "segment dir ../": (
        "stages/000-a/stage.json",
        lambda j: j["segments"][0].update(dir="../../../bait/stages/000-a/segments/0"),
        "segments[].dir",
    ),
    "optimizer state absolute": (
        "stages/001-b/stage.json",
        lambda j: j.update(optimizer_state_file="{bait}/stages/001-b/optimizer_state.safetensors"),
        "optimizer_state_file",
    ),
    "files key ../": (
        "ledger.json",
        lambda j: j["stages"][0]["files"].update({"../../bait/ledger.json": "ab" * 32}),
        "files key",
    ),
    "windows drive": ("ledger.json", lambda j: j["stages"][0].update(dir="C:/bait/stages/000-a"), "stages[0].dir"),
}
A = "stages/000-a/stage.json"
ODD_PATHS = {
    "NUL byte in a stage dir": ("ledger.json", lambda j: j["stages"][0].update(dir="stages/000-a\x00x"), "dir"),
    "NUL byte in a delta file": (A, lambda j: j.update(delta_file="a\x00b"), "delta_file"),
    "over-long path component": ("ledger.json", lambda j: j["stages"][0].update(dir="stages/" + "a" * 300), "dir"),
    "over-long path": (A, lambda j: j["segments"][0].update(dir="s/" * 3000), "segments[].dir"),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_paths_leaving_the_ledger_are_refused(hostile, case):
    ledger, bait, watch = hostile
    rel, mutate, names = ESCAPES[case]

    def fill(j):
        mutate(j)
        text = json.dumps(j).replace("{bait}", str(bait))
        j.clear()
        j.update(json.loads(text))

    edit_json(ledger / rel, fill)
    _refused(ledger, watch, UnsafeInputError, names)


@pytest.mark.parametrize("case", sorted(ODD_PATHS))
def test_paths_with_nul_bytes_or_over_long_names_are_refused(hostile, case):
    ledger, _, watch = hostile
    rel, mutate, names = ODD_PATHS[case]
    edit_json(ledger / rel, mutate)
    _refused(ledger, watch, LedgerFormatError, names)


@pytest.mark.parametrize(
    "rel", ["stages", "stages/000-a", "stages/000-a/stage.json", "stages/000-a/delta.safetensors"]
)
def test_symlink_loops_are_refused(hostile, rel):
    ledger, _, watch = hostile
    replace_with_link(ledger / rel, ledger / rel)
    _refused(ledger, watch, UnsafeInputError, "loop")


LINKS = [
    "stages",
    "stages/000-a",
    "stages/000-a/stage.json",
    "stages/000-a/delta.safetensors",
    "stages/000-a/segments",
    "stages/000-a/segments/0",
    "stages/000-a/segments/1/params_delta.safetensors",
    "stages/000-a/segments/1/examples.safetensors",
    "stages/000-a/segments/2/second_moments.safetensors",
    "stages/001-b/optimizer_state.safetensors",
    "ledger.json",
    "start.safetensors",
]


@pytest.mark.parametrize("rel", LINKS)
def test_symlinks_leaving_the_ledger_are_refused(hostile, rel):
    ledger, bait, watch = hostile
    replace_with_link(ledger / rel, bait / rel)
    _refused(ledger, watch, UnsafeInputError, "outside")


def test_links_that_stay_inside_the_ledger_are_fine(hostile):
    ledger, _, _ = hostile
    shutil.move(ledger / "stages" / "000-a" / "delta.safetensors", ledger / "a-delta.safetensors")
    (ledger / "stages" / "000-a" / "delta.safetensors").symlink_to(ledger / "a-delta.safetensors")
    read_everything(ledger)


def test_a_ledger_reached_through_a_symlinked_directory_loads(hostile, tmp_path):
    ledger, _, _ = hostile
    (tmp_path / "alias").symlink_to(ledger, target_is_directory=True)
    assert [s.name for s in read_everything(tmp_path / "alias").stages] == ["a", "b"]


def test_replay_and_embeddings_links_leaving_the_ledger_are_refused(hostile):
    ledger, bait, watch = hostile
    (bait / "replay").mkdir()
    (ledger / "stages" / "000-a" / "replay").symlink_to(bait / "replay", target_is_directory=True)
    with pytest.raises(UnsafeInputError, match="replay"):
        _ = StageLedger.load(ledger).stages[0].replay_dir
    (ledger / "stages" / "000-a" / "replay").unlink()
    (bait / "embeddings").mkdir()
    (ledger / "embeddings").symlink_to(bait / "embeddings", target_is_directory=True)
    _refused(ledger, watch, UnsafeInputError, "embeddings")


def _no_stages_yet(ledger: Path) -> None:
    """ledger.json of a ledger whose first stage never finished: nothing listed would lead out of it."""
    edit_json(ledger / "ledger.json", lambda j: j.update(stages=[]))


def test_recording_into_a_ledger_whose_stages_dir_leaves_it_writes_nothing_outside(hostile):
    ledger, bait, _ = hostile
    _no_stages_yet(ledger)
    replace_with_link(ledger / "stages", bait / "stages")
    before = sorted(p.relative_to(bait) for p in bait.rglob("*"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(UnsafeInputError, match="stages"),
        StageLedger(ledger).record_stage("c", model=model, optimizer=opt),
    ):
        pass
    assert sorted(p.relative_to(bait) for p in bait.rglob("*")) == before
    assert not (ledger / "ledger.lock").exists()


def test_remove_incomplete_never_deletes_outside_the_ledger(hostile):
    ledger, bait, _ = hostile
    _no_stages_yet(ledger)
    replace_with_link(ledger / "stages", bait / "stages")
    (bait / "stages" / "precious").mkdir()  # would look like an "incomplete stage" through the link
    (bait / "stages" / "precious" / "data.txt").write_text("keep me")
    with pytest.raises(StageAttributionError):
        StageLedger(ledger).remove_incomplete()
    assert (bait / "stages" / "precious" / "data.txt").read_text() == "keep me"
    assert (bait / "stages" / "000-a" / "stage.json").exists()
    (ledger / "stages").unlink()
    shutil.copytree(bait / "stages", ledger / "stages")
    shutil.rmtree(ledger / "stages" / "precious")
    (ledger / "stages" / "precious").symlink_to(bait / "stages" / "precious")  # an incomplete stage that is a link
    removed = StageLedger(ledger).remove_incomplete()
    assert sorted(p.name for p in removed) == ["000-a", "001-b", "precious"]  # none is listed in ledger.json
    assert (bait / "stages" / "precious" / "data.txt").read_text() == "keep me"  # the link went, not its target


# --- wrong types, huge or negative counts, future versions -----------------------------------------------------

B, LEDGER = "stages/001-b/stage.json", "ledger.json"
SCHEMA = {
    "negative num_steps": (A, lambda j: j.update(num_steps=-1), "num_steps"),
    "huge num_steps": (A, lambda j: j.update(num_steps=10**30), "num_steps"),
    "num_steps as text": (A, lambda j: j.update(num_steps="4"), "num_steps"),
    "num_steps as bool": (A, lambda j: j.update(num_steps=True), "num_steps"),
    "learning rates not a list": (A, lambda j: j.update(learning_rates="fast"), "learning_rates"),
    "NaN learning rate": (A, lambda j: j["learning_rates"][0].__setitem__(0, float("nan")), "learning_rates"),
    "huge tensor shape": (LEDGER, lambda j: j["model"]["parameters"][0].__setitem__(1, [10**6, 10**6]), "0.weight"),
    "negative dim": (LEDGER, lambda j: j["model"]["parameters"][0].__setitem__(1, [-4, 3]), "model.parameters"),
    "shape not matching the files": (LEDGER, lambda j: j["model"]["parameters"][0].__setitem__(1, [3, 4]), "0.weight"),
    "parameters not a list": (LEDGER, lambda j: j["model"].update(parameters={"w": 1}), "model.parameters"),
    "stage entry not an object": (LEDGER, lambda j: j["stages"].__setitem__(0, "stages/000-a"), "stage entry"),
    "stage index out of order": (LEDGER, lambda j: j["stages"][0].update(index=7), "index"),
    "duplicate stage names": (LEDGER, lambda j: j["stages"][1].update(name="a"), "unique stage names"),
    "name with control characters": (LEDGER, lambda j: j["stages"][0].update(name="a\x1b[31m"), "control"),
    "missing start": (LEDGER, lambda j: j.pop("start"), "start"),
    "start digests not a map": (LEDGER, lambda j: j["start"].update(digests=[1, 2]), "start.digests"),
    "hash not hex": (LEDGER, lambda j: j["stages"][0].update(end_hash="../../etc"), "end_hash"),
    "segment steps negative": (A, lambda j: j["segments"][0].update(step_start=-3), "step_start"),
    "segment beyond the stage": (A, lambda j: j["segments"][2].update(step_end=10**9), "segment steps"),
    "segment index missing": (A, lambda j: j["segments"][0].pop("index"), "segments[].index"),
    "segment layout unknown": (A, lambda j: j["segments"][0].update(batch_layout="pickle"), "batch_layout"),
    "huge num_examples": (A, lambda j: j["segments"][0].update(num_examples=10**40), "num_examples"),
    "lora not an object": (A, lambda j: j.update(lora=[1]), "lora"),
    "lora scaling text": (A, lambda j: j.update(lora={"modules": {"0.weight": {"scaling": "2"}}}), "scaling"),
    "end digests not a map": (B, lambda j: j.update(end_digests=["x"]), "end_digests"),
    "datasets not objects": (A, lambda j: j.update(datasets=["imdb"]), "datasets"),
    "dataset size negative": (A, lambda j: j.update(datasets=[{"name": "x", "size": -1}]), "size"),
    "optimizer params not names": (A, lambda j: j["optimizer"]["param_groups"][0].update(params=[0, 1]), "params"),
    "optimizer state policy": (B, lambda j: j.update(optimizer_state_policy="maybe"), "optimizer_state_policy"),
    "unflagged not a list": (A, lambda j: j.update(changed_without_grad="0.weight"), "changed_without_grad"),
    "unflagged not trainable": (A, lambda j: j.update(changed_without_grad=["nope"]), "changed_without_grad"),
    "weight decay as text": (A, lambda j: j["optimizer"]["param_groups"][0].update(weight_decay=":"), "weight_decay"),
    "betas not numbers": (A, lambda j: j["optimizer"]["param_groups"][0].update(betas=["x", 1]), "betas"),
    "infinite lr": (A, lambda j: j["optimizer"]["param_groups"][0].update(lr=float("inf")), "lr"),
    "amsgrad as text": (A, lambda j: j["optimizer"]["param_groups"][0].update(amsgrad="yes"), "amsgrad"),
    "stage name differs from ledger.json": (A, lambda j: j.update(name="z"), "'a'"),
    "curvature loss not an object": (A, lambda j: j.update(curvature_loss="causal-lm"), "curvature_loss"),
    "ledger format from the future": (
        LEDGER,
        lambda j: j.update(format_version=FORMAT_VERSION + 1),
        "newer than this library",
    ),
    "stage format from the future": (B, lambda j: j.update(format_version=99), "newer than this library"),
    "format version as text": (LEDGER, lambda j: j.update(format_version="1"), "format_version"),
    "not a ledger": (LEDGER, lambda j: j.update(format="something-else"), "format"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA))
def test_wrong_types_counts_and_versions_are_refused_naming_the_file(hostile, case):
    ledger, _, watch = hostile
    rel, mutate, names = SCHEMA[case]
    edit_json(ledger / rel, mutate)
    message = _refused(ledger, watch, StageAttributionError, names)
    assert Path(rel).name in message or "safetensors" in message


def test_json_that_is_not_an_object_or_not_json(hostile):
    ledger, _, watch = hostile
    for text, expected in (
        ("[1, 2]", "JSON object"),
        ('{"format": ', "not valid JSON"),
        ("\xff\xfe", "Could not read"),
    ):
        (ledger / A).write_bytes(text.encode("latin-1"))
        message = _refused(ledger, watch, LedgerFormatError, expected)
        assert "stage.json" in message


# --- tensor files: shapes, names, dtypes, truncation, foreign formats ------------------------------------------


def _retensor(path: Path, fn: Callable[[dict], dict]) -> None:
    save_file(fn(load_file(str(path))), str(path))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])


DELTA, START = "stages/000-a/delta.safetensors", "start.safetensors"
SEG = "stages/000-a/segments/1"
TENSORS = {
    "delta of the wrong shape": (DELTA, lambda p: _retensor(p, lambda t: {**t, "0.weight": torch.zeros(3, 4)})),
    "delta of an unknown parameter": (DELTA, lambda p: _retensor(p, lambda t: {**t, "evil": torch.zeros(1)})),
    "integer delta": (DELTA, lambda p: _retensor(p, lambda t: {**t, "0.bias": torch.zeros(4, dtype=torch.int64)})),
    "delta truncated in the data": (DELTA, lambda p: _truncate(p, -8)),
    "delta truncated in the header": (DELTA, lambda p: _truncate(p, 20)),
    "empty delta file": (DELTA, lambda p: _truncate(p, 0)),
    "delta header claiming 2**60 bytes": (DELTA, lambda p: p.write_bytes(struct.pack("<Q", 2**60) + b"{}")),
    "start of the wrong shape": (START, lambda p: _retensor(p, lambda t: {**t, "2.weight": torch.zeros(4, 2)})),
    "start missing a tensor": (START, lambda p: _retensor(p, lambda t: {k: v for k, v in t.items() if k != "0.bias"})),
    "start truncated": (START, lambda p: _truncate(p, -4)),
    "midpoint of the wrong shape": (
        f"{SEG}/params_delta.safetensors",
        lambda p: _retensor(p, lambda t: {**t, "0.bias": torch.zeros(5)}),
    ),
    "second moments with malformed keys": (
        f"{SEG}/second_moments.safetensors",
        lambda p: _retensor(p, lambda t: {"nokind": torch.zeros(1)}),
    ),
    "examples with malformed keys": (
        f"{SEG}/examples.safetensors",
        lambda p: _retensor(p, lambda t: {"abc": torch.zeros(2)}),
    ),
    "examples not matching the layout": (
        f"{SEG}/examples.safetensors",
        lambda p: _retensor(p, lambda t: {"0/7": torch.zeros(2)}),
    ),
    "optimizer state truncated": ("stages/001-b/optimizer_state.safetensors", lambda p: _truncate(p, -16)),
}


@pytest.mark.parametrize("case", sorted(TENSORS))
def test_bad_tensor_files_are_refused_naming_the_file(hostile, case):
    ledger, _, watch = hostile
    rel, damage = TENSORS[case]
    damage(ledger / rel)
    # verify() would already catch the changed hashes; the loader must refuse the files on their own too
    edit_json(ledger / LEDGER, lambda j: [s.update(files={}) for s in j["stages"]])
    _refused(ledger, watch, LedgerFormatError, Path(rel).name)


def test_lora_factors_that_do_not_fit_the_weight_are_refused(hostile):
    ledger, _, watch = hostile
    stage = ledger / "stages" / "000-a"
    save_file({"0.weight::A": torch.ones(2, 5), "0.weight::B": torch.ones(4, 2)}, str(stage / "lora.safetensors"))
    lora = {"modules": {"0.weight": {"scaling": 2.0, "fan_in_fan_out": False, "layer_type": "linear"}}}
    edit_json(stage / "stage.json", lambda j: j.update(lora_file="lora.safetensors", lora=lora))
    edit_json(ledger / LEDGER, lambda j: [s.update(files={}) for s in j["stages"]])
    message = _refused(ledger, watch, LedgerFormatError, "lora.safetensors")
    assert "0.weight" in message
    save_file({"0.weight::A": torch.ones(2, 3), "0.weight::B": torch.ones(4, 3)}, str(stage / "lora.safetensors"))
    _refused(ledger, watch, LedgerFormatError, "do not chain")
    save_file({"1.weight::A": torch.ones(2, 3)}, str(stage / "lora.safetensors"))  # a factor of an untargeted weight
    _refused(ledger, watch, LedgerFormatError, "1.weight::A")
