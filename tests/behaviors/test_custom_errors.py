"""A `custom` behavior whose module cannot be imported says how to make it importable, and an exception raised in
the user's function comes back as one line naming the behavior, with the original exception as its cause."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from hf_stage_attribution import behaviors
from hf_stage_attribution.behaviors.custom import import_callable
from hf_stage_attribution.errors import BehaviorError

ROWS = [{"text": "a"}, {"text": "b"}, {"text": "c"}]


def user_module(folder, body: str, monkeypatch) -> str:
    """A module file in ``folder`` (put on sys.path) with a fresh name; returns the name."""
    name = f"user_behaviors_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    return name


def test_a_module_that_is_not_on_the_path_says_how_to_make_it_importable(tmp_path):
    (tmp_path / "mybeh_not_on_path.py").write_text("def f(model, batch):\n    return None\n")
    spec = tmp_path / "behaviors.json"
    item = {"name": "toxic_logit", "kind": "custom", "function": "mybeh_not_on_path:f", "data": ROWS}
    spec.write_text(json.dumps({"behaviors": [item]}))
    with pytest.raises(BehaviorError) as err:
        behaviors.load_specs(spec, trust_code=True)
    message = str(err.value)
    assert "\n" not in message and "behavior 'toxic_logit'" in message
    assert "no module named 'mybeh_not_on_path' on the Python path" in message
    assert "install it, or add the folder that holds it to PYTHONPATH" in message
    assert "a spec file's folder is not searched" in message


def test_a_module_that_fails_on_import_is_named_with_its_error(tmp_path, monkeypatch):
    name = user_module(tmp_path, "import no_such_dependency_xyz\n", monkeypatch)
    with pytest.raises(BehaviorError, match=f"importing {name!r} needs the module 'no_such_dependency_xyz'"):
        import_callable(f"{name}:f", True)
    name = user_module(tmp_path, "raise RuntimeError('bad\\nsetup')\n", monkeypatch)
    with pytest.raises(BehaviorError, match=f"importing the module {name!r} raised RuntimeError: bad setup") as err:
        import_callable(f"{name}:f", True, what="reward function")
    assert isinstance(err.value.__cause__, RuntimeError) and "reward function" in str(err.value)


def test_an_exception_in_the_users_function_names_the_behavior_and_keeps_the_cause(tmp_path, monkeypatch):
    body = "def broken(model, batch):\n    return batch['nonexistent_field']\n\ndef whole(model):\n    1 / 0\n"
    name = user_module(tmp_path, body, monkeypatch)
    b = behaviors.from_spec(
        {"name": "broken", "kind": "custom", "function": f"{name}:broken", "data": ROWS, "batch_size": 2},
        trust_code=True,
    )
    with pytest.raises(BehaviorError) as err:
        b(torch.nn.Linear(2, 2))
    message = str(err.value)
    assert message.startswith("Behavior 'broken' (custom): its function 'broken' raised TypeError: ")
    assert "on examples 0-1" in message and "\n" not in message
    assert isinstance(err.value.__cause__, TypeError)
    bare = behaviors.from_spec({"name": "whole", "kind": "custom", "function": f"{name}:whole"}, trust_code=True)
    with pytest.raises(BehaviorError, match=r"Behavior 'whole' \(custom\): its function 'whole' raised Zero") as err:
        bare(torch.nn.Linear(2, 2))
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_package_errors_raised_in_the_users_function_pass_through():
    def strict(model, batch):
        raise BehaviorError("my own message")

    with pytest.raises(BehaviorError, match="my own message") as err:
        behaviors.PerExample(strict, [1, 2], name="strict")(torch.nn.Linear(2, 2))
    assert "raised" not in str(err.value)


def test_a_wrapped_runtime_error_still_lets_the_linear_read_out_fall_back_to_double_backward():
    from hf_stage_attribution.estimators.linear import jvp_per_example, parameter_paths

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def no_forward_mode(m, batch):
        if not torch.is_grad_enabled():  # the forward-mode read-out runs under no_grad, as an op without a rule
            raise NotImplementedError("no forward-mode AD rule for this op")
        return m(x[batch])[:, 0]

    b = behaviors.PerExample(no_forward_mode, [0, 1, 2, 3], name="fwd")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="Behavior 'fwd' .* no forward-mode AD rule"):
        b(model)
    paths = parameter_paths(model)
    first = next(iter(paths))
    tangent = {first: torch.randn_like(paths[first][1])}
    stats: dict = {}
    out = jvp_per_example(model, b, tangent, paths, stats)
    assert stats["mode"] == "double-backward" and out.shape == (4,)
    param = paths[first][1]
    want = torch.stack([(torch.autograd.grad(model(x)[i, 0], param)[0] * tangent[first]).sum() for i in range(4)])
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
