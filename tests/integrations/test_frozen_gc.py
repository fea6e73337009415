"""``integrations.replay.frozen_gc``: the replayed training runs with the collector frozen, and the collector's
state is restored afterwards, also when the training raises or the use is nested."""

from __future__ import annotations

import gc
import weakref

import pytest

from hf_stage_attribution.integrations.replay import frozen_gc


def test_frozen_inside_and_restored_after_an_error() -> None:
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="boom"), frozen_gc():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_nested_use_leaves_the_freeze_to_the_outer_one() -> None:
    """An object alive on the outer entry stays frozen after the inner exit: a forced collection does not free it.
    (The freeze count itself is no witness: frozen objects freed by reference counting leave the permanent
    generation, so the count can drop by a few at any time.)"""
    old = _Node()
    old.me = old
    old_ref = weakref.ref(old)
    with frozen_gc():
        assert gc.get_freeze_count() > 0
        with frozen_gc():
            assert not gc.isenabled()
        del old
        gc.collect()
        assert old_ref() is not None  # still frozen: the inner exit did not unfreeze the outer's objects
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with frozen_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_cyclic_garbage_made_inside_is_collected_by_a_forced_collection() -> None:
    class Node:
        pass

    with frozen_gc():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2  # what a Trainer's forced collection does: the new cycle is found


def test_replay_runs_stage_functions_with_the_collector_frozen() -> None:
    import torch

    from hf_stage_attribution.estimators.replay import run_stage

    class FakeStage:  # what run_stage reads of a ledger stage
        name, index, num_steps, learning_rates = "s", 1, 1, [[0.1]]

    seen = {}

    def fn(model, max_steps=None):
        seen["enabled"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()
        return model

    model = torch.nn.Linear(2, 1)
    out, state = run_stage(FakeStage(), model, {"s": fn}, {})
    assert out is model and state is None
    assert seen["enabled"] is False and seen["frozen"] > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0


class _Node:
    pass


def _dropped_cycle() -> weakref.ref:
    """A weak reference to a self-referencing object that nothing else holds: only a collection frees it."""
    node = _Node()
    node.me = node
    return weakref.ref(node)


def test_cyclic_garbage_made_inside_is_freed_on_exit_without_waiting_for_the_collector() -> None:
    """A finished Trainer is a reference cycle holding its optimizer's moments (and a DPO reference model): it must
    be gone when the replayed stage returns, not at Python's next full collection (issue 16: on SmolLM2-135M each
    replayed DPO stage otherwise left ≈ 3× the parameter bytes behind)."""
    gc.disable()  # no automatic collection can free it: only frozen_gc's own
    try:
        with frozen_gc():
            ref = _dropped_cycle()
            assert ref() is not None  # a cycle: reference counting alone does not free it
        assert ref() is None
    finally:
        gc.enable()


def test_release_freed_memory_frees_cyclic_garbage() -> None:
    from hf_stage_attribution._internal.memory import release_freed_memory

    gc.disable()
    try:
        ref = _dropped_cycle()
        release_freed_memory()
        assert ref() is None
    finally:
        gc.enable()


def test_a_use_inside_collections_of_new_objects_still_frees_its_garbage_on_exit() -> None:
    """The replay estimators freeze what was alive when they began (``collections_of_new_objects``); a replayed
    stage inside must still leave no cyclic garbage behind when it returns (the freeze stays the outer one's)."""
    from hf_stage_attribution._internal.memory import collections_of_new_objects

    gc.disable()
    try:
        old = _Node()
        old.me = old
        old_ref = weakref.ref(old)
        with collections_of_new_objects():
            assert gc.get_freeze_count() > 0
            with frozen_gc():
                ref = _dropped_cycle()
            assert ref() is None
            del old
            gc.collect()
            assert old_ref() is not None  # still frozen: not unfrozen by the inner exit
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_collections_of_new_objects_scan_only_what_was_made_inside() -> None:
    """Garbage made inside is freed by ``release_freed_memory``; objects alive on entry are not scanned (frozen),
    so a cycle that was alive on entry and dropped inside waits for the first collection after exit."""
    from hf_stage_attribution._internal.memory import collections_of_new_objects, release_freed_memory

    gc.disable()
    try:
        old = _Node()
        old.me = old
        old_ref = weakref.ref(old)
        with collections_of_new_objects():
            del old
            new_ref = _dropped_cycle()
            release_freed_memory()
            assert new_ref() is None
            assert old_ref() is not None  # frozen: not scanned inside
        gc.collect()
        assert old_ref() is None
    finally:
        gc.enable()
