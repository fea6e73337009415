"""Peak RSS rise of every estimator (and ``validate``) over the parameter bytes, each in a fresh process
(``benchmarks/estimator_memory.py``: a 4.2M-parameter GPT-2, two AdamW stages with curvature material). The bound
is issue 16's: ≤ 3 × the parameter bytes. Estimators that do not meet it yet are marked ``xfail(strict=True)`` with
the figure measured when they were marked: the test then fails as soon as one of them meets the bound (tighten the
mark) — and, for every other estimator, as soon as its rise grows past the bound."""

from __future__ import annotations

import pytest

BOUND = 3.0
NOT_YET = {  # estimator: why it is above the bound (measured rise ÷ parameter bytes)
    "aa-ggn": "Krylov basis of 12 float64 model-sized vectors and the curvature operator's graphs (≈ 103×)",
    "aa-ggn-fd": "aa-ggn's embeddings (≈ 103×)",
    "aa-hvp": "Krylov basis and Hessian-vector graphs (≈ 103×)",
    "aa-hvp-fd": "aa-hvp's embeddings (≈ 103×)",
    "validate": "runs auto = aa-ggn on this ledger (≈ 103×)",
    "replay": "a model copy, the optimizer's two moments and the training step's activations (≈ 5×)",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from benchmarks import estimator_memory

    cfg = {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 4096, "positions": 64}
    measured = estimator_memory.measure_all(cfg, tmp_path_factory.mktemp("estimator-memory"))
    return {row["estimator"]: row for row in measured}


def _case(name: str):
    if name in NOT_YET:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[name]))
    return name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [_case(n) for n in ("delta-linear", "delta-fd", "aa-linear", "aa-fd", "aa-ggn", "aa-ggn-fd", "aa-hvp",
                        "aa-hvp-fd", "replay", "validate")],
)  # fmt: skip
def test_peak_rss_rise_per_parameter_byte_stays_within_the_bound(rows, name):
    rise = rows[name]["rise_over_parameter_bytes"]
    assert rise <= BOUND, f"{name}: peak RSS rise {rise:.2f}× the parameter bytes (bound {BOUND}×)"
