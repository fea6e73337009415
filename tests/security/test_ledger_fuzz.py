"""Property-based tests over the ledger's JSON schema and the loader (hypothesis).

Mutate a valid ``ledger.json`` / ``stage.json`` (replace, delete or add values anywhere in the tree, with
hostile strings, huge or negative numbers, NaN, wrong types; or damage the raw bytes): the loader either
loads or raises a subclass of ``StageAttributionError`` - never another exception type - and never opens a
file outside the ledger (a kernel inotify watch on a valid copy of the ledger placed next to it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_stage_attribution.errors import StageAttributionError
from tests.security.test_hostile_ledgers import OpenWatch, build_ledger, read_everything

FILES = ["ledger.json", "stages/000-a/stage.json", "stages/001-b/stage.json"]


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    build_ledger(root / "ledger")
    shutil.copytree(root / "ledger", root / "bait")
    originals = {rel: (root / "ledger" / rel).read_bytes() for rel in FILES}
    watch = OpenWatch(root / "bait")
    yield root / "ledger", root / "bait", originals, watch
    watch.close()


def _hostile_strings(bait: Path) -> list[str]:
    return [
        "../bait",
        "../../bait/stages/000-a",
        "stages/../../bait/stages/000-a",
        str(bait),
        str(bait / "stages" / "000-a"),
        str(bait / "stages" / "000-a" / "delta.safetensors"),
        "/etc/passwd",
        "stages/000-a",
        "stages/001-b",
        "stages",
        "delta.safetensors",
        "optimizer_state.safetensors",
        "segments/0",
        "segments/../../../bait",
        "0.weight",
        "",
        ".",
        "C:\\bait",
        "a\x00b",
        "x" * 300,
        "stages/" + "x" * 300,
        "stages/a\x00b",
        "stages/000-a/stage.json",
        "segments/0/../../..",
        "a" * 64,
    ]


def _json_values(bait: Path):
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([0, 1, -1, 2, 3, 10**12, 10**13, 2**63])
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
        | st.sampled_from(_hostile_strings(bait))
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=8,
    )


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutate(data, path, op, value, key):
    if not path:
        return value if op != "add" or not isinstance(data, dict) else {**data, key: value}
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif op == "add" and isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = value
    return data


def _check_loader(ledger: Path, watch: OpenWatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys are warned about, which is fine here
        with contextlib.suppress(StageAttributionError):
            read_everything(ledger)
    assert watch.events() == [], "the loader opened a file outside the ledger"


def _restore(ledger: Path, originals: dict[str, bytes]) -> None:
    for rel, data in originals.items():
        (ledger / rel).write_bytes(data)


def _mutation_case(arena, data) -> None:
    ledger, bait, originals, watch = arena
    try:
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            rel = data.draw(st.sampled_from(FILES), label="file")
            doc = json.loads((ledger / rel).read_text())
            path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
            op = data.draw(st.sampled_from(["set", "set", "delete", "add"]) if path else st.just("set"), label="op")
            value = data.draw(_json_values(bait), label="value")
            key = data.draw(st.sampled_from(["dir", "file", "delta_file", "name", "index", "surprise"]), label="key")
            doc = _mutate(doc, path, op, value, key)
            (ledger / rel).write_text(json.dumps(doc, allow_nan=True))
        _check_loader(ledger, watch)
    finally:
        _restore(ledger, originals)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_json_loads_or_raises_a_package_error(arena, data):
    _mutation_case(arena, data)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_json_loads_or_raises_a_package_error_long_run(arena, data):
    _mutation_case(arena, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=st.sampled_from(FILES), cut=st.floats(0, 1), junk=st.binary(max_size=16), at=st.floats(0, 1))
def test_damaged_json_bytes_load_or_raise_a_package_error(arena, rel, cut, junk, at):
    ledger, _, originals, watch = arena
    try:
        text = originals[rel][: int(len(originals[rel]) * cut)] if cut < 0.98 else originals[rel]
        pos = int(len(text) * at)
        (ledger / rel).write_bytes(text[:pos] + junk + text[pos:])
        _check_loader(ledger, watch)
    finally:
        _restore(ledger, originals)
