"""The forward-mode read-out of the linear estimators keeps no autograd graph: parameters outside the tangent still
require grad, and without ``no_grad`` the forward recorded every activation for a backward pass that never comes."""

from __future__ import annotations

import torch

from hf_stage_attribution.estimators.linear import jvp_per_example, parameter_paths


def test_jvp_read_out_records_no_graph_and_matches_the_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)

    def behavior(m):
        return m(x)[:, 0]

    paths = parameter_paths(model)
    first = next(iter(paths))  # only one tensor in the tangent: the others stay trainable parameters
    tangent = {first: torch.randn_like(paths[first][1])}
    stats: dict = {}
    out = jvp_per_example(model, behavior, tangent, paths, stats)
    assert stats.get("jvp") == 1 and not out.requires_grad and out.grad_fn is None
    param = paths[first][1]
    want = torch.stack([(torch.autograd.grad(behavior(model)[i], param)[0] * tangent[first]).sum() for i in range(5)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
