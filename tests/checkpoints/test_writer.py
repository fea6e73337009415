"""``LedgerWriter``: a ledger written from tensor streams reads back like a recorded one; bad input is refused and a
failed stage leaves the ledger as it was."""

from __future__ import annotations

import pytest
import torch

from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import LedgerError
from hf_stage_attribution.ledger.writer import LedgerWriter, digest

SPECS = [("w", (2, 3)), ("b", (3,))]


def _start():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}


def _writer(tmp_path):
    writer = LedgerWriter(tmp_path / "ledger")
    writer.initialize(SPECS, iter(_start().items()), model_class="Toy", source={"type": "checkpoints"})
    return writer


def test_stream_written_ledger_reads_back(tmp_path):
    writer = _writer(tmp_path)
    delta = torch.full((2, 3), 0.5, dtype=torch.float16)  # written as float32
    end = _start()["w"] + 0.5
    optimizer = {"type": "SGD", "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": ["w", "b"]}]}
    writer.append_stage(
        "s1", "imported", [("w", (2, 3))], iter([("w", delta)]), end_digests={"w": digest(end)},
        learning_rates=[[0.1], [0.05]], optimizer=optimizer, optimizer_state_policy="fresh", notes=["n"],
        source={"type": "checkpoints", "model": "org/m"},
    )  # fmt: skip
    a, b = torch.randn(1, 2), torch.randn(3, 1)
    lora = {"modules": {"w": {"scaling": 2.0, "fan_in_fan_out": True, "layer_type": "linear"}}}
    writer.append_stage(
        "s2", "lora", [], iter([]), end_digests={"w": digest(end + 2.0 * (b @ a).T)}, lora=lora,
        lora_tensors={"w::A": a, "w::B": b},
    )  # fmt: skip
    ledger = StageLedger.load(tmp_path / "ledger")
    assert ledger.manifest["model"]["source"] == {"type": "checkpoints"}
    assert [s.name for s in ledger.stages] == ["s1", "s2"]
    first, second = ledger.stages
    assert first.num_steps == 2 and first.learning_rates == [[0.1], [0.05]] and first.optimizer["type"] == "SGD"
    assert first.delta_tensor("w").dtype == torch.float32 and torch.equal(first.delta_tensor("b"), torch.zeros(3))
    torch.testing.assert_close(second.delta_tensor("w"), 2.0 * (b @ a).T)
    torch.testing.assert_close(ledger.final_state()["w"], end + 2.0 * (b @ a).T)
    assert second.start_hash == first.end_hash and first.start_hash == ledger.manifest["start"]["state_hash"]
    ledger.verify()


def test_bad_input_is_refused(tmp_path):
    writer = _writer(tmp_path)
    with pytest.raises(LedgerError, match="existing ledger.json"):
        writer.initialize(SPECS, iter(_start().items()), model_class="Toy")
    cases = [
        ({"delta_specs": [("x", (1,))]}, "not a parameter"),
        ({"delta_specs": [("w", (3, 2))]}, "shape"),
        ({"kind": "nonsense"}, "kind"),
        ({"learning_rates": [[0.1, 0.2]], "optimizer": {"type": "SGD", "param_groups": [{}]}}, "per param group"),
        ({"metadata": {"bogus": 1}}, "stage.json keys"),
    ]
    for overrides, message in cases:
        kwargs = {"kind": "imported", "delta_specs": [], "end_digests": {}, **overrides}
        name, kind, specs = "s", kwargs.pop("kind"), kwargs.pop("delta_specs")
        with pytest.raises(LedgerError, match=message):
            writer.append_stage(name, kind, specs, iter([]), **kwargs)
    assert StageLedger.load(tmp_path / "ledger").stages == []


def test_failing_stream_leaves_no_stage(tmp_path):
    writer = _writer(tmp_path)

    def broken():
        yield "w", torch.ones(2, 3)
        raise RuntimeError("source vanished")

    with pytest.raises(RuntimeError, match="vanished"):
        writer.append_stage("s", "imported", SPECS, broken(), end_digests={})
    ledger = StageLedger.load(tmp_path / "ledger")
    assert ledger.stages == [] and ledger.incomplete_stages() == []
    assert not (tmp_path / "ledger" / "ledger.lock").exists()


def test_zero_copy_digest_equals_the_ledger_digest():
    from hf_stage_attribution._internal.hashing import tensor_digest

    tensors = (torch.randn(5, 7), torch.randn(4, 6).T, torch.randn(3).half(), torch.zeros(0, 3), torch.tensor(2.0))
    for tensor in tensors:
        assert digest(tensor) == tensor_digest(tensor)
