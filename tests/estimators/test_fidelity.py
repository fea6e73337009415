"""Fidelity metrics (ESTIMATORS.md §5) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from hf_stage_attribution.estimators import EstimateResult, fidelity
from hf_stage_attribution.estimators.fidelity import pearson, spearman


def test_spearman_averages_ties_and_pearson_matches_formula():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # ranks of a: 1, 2.5, 2.5, 4 → Pearson with 1..4
    ra, rb = torch.tensor([1.0, 2.5, 2.5, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = float(((ra - ra.mean()) * (rb - rb.mean())).sum() / ((ra - ra.mean()).norm() * (rb - rb.mean()).norm()))
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman(b, -b) == pytest.approx(-1.0)
    assert pearson([1.0, 2.0, 4.0], [2.0, 4.0, 8.0]) == pytest.approx(1.0)
    assert math.isnan(pearson([1.0, 1.0], [1.0, 2.0]))  # constant side: undefined, not 0


def test_fidelity_blocks_all_and_non_terminal():
    pairs = [("s1", "b1"), ("s2", "b1"), ("s3", "b1"), ("s1", "b2"), ("s2", "b2"), ("s3", "b2")]
    truth = dict(zip(pairs, [1.0, -2.0, 5.0, 0.5, 0.1, -1.0]))
    est = dict(zip(pairs, [2.0, 1.0, 5.0, 0.1, 0.4, -1.0]))
    out = fidelity(est, truth, terminal_stage="s3")
    assert out["terminal_stage"] == "s3"
    assert out["all"]["n_pairs"] == 6 and out["non_terminal"]["n_pairs"] == 4
    # sign agreement: all pairs: s2/b1 disagrees → 5/6; non-terminal: 3/4
    assert out["all"]["sign_agreement"] == pytest.approx(5 / 6)
    assert out["non_terminal"]["sign_agreement"] == pytest.approx(3 / 4)
    # top stage per behavior, all pairs: b1 → s3 in both; b2 → truth s3 (|-1|), estimate s3 → 1.0
    assert out["all"]["top_stage_agreement"] == 1.0
    # non-terminal: b1 truth s2 (|-2|) vs estimate s1 (2 > 1); b2 truth s1 (0.5) vs estimate s2 (0.4) → 0
    assert out["non_terminal"]["top_stage_agreement"] == 0.0
    # scale-free error, non-terminal: b1 median(|1|, |3|) / 2 = 1.0; b2 median(0.4, 0.3) / 0.5 = 0.7
    assert out["non_terminal"]["scale_free_error_per_behavior"] == pytest.approx({"b1": 1.0, "b2": 0.7})
    assert out["non_terminal"]["scale_free_error"] == pytest.approx(0.85)
    # all pairs: b1 errors (1, 3, 0) → median 1 / 5; b2 errors (0.4, 0.3, 0) → 0.3 / 1
    assert out["all"]["scale_free_error_per_behavior"] == pytest.approx({"b1": 0.2, "b2": 0.3})
    t = torch.tensor([1.0, -2.0, 5.0, 0.5, 0.1, -1.0])
    e = torch.tensor([2.0, 1.0, 5.0, 0.1, 0.4, -1.0])
    assert out["all"]["pearson"] == pytest.approx(pearson(e, t))
    assert out["all"]["spearman"] == pytest.approx(spearman(e, t))
    assert math.isnan(out["all"]["per_example_spearman"])  # scalars only: no per-example figures


def test_fidelity_from_estimate_results_with_per_example_values():
    def result(values):
        return EstimateResult("x", {s: torch.tensor(v, dtype=torch.float64) for s, v in values.items()})

    truth = {"tox": result({"pre": [1.0, 2.0, 3.0], "sft": [0.0, -1.0, -2.0], "dpo": [4.0, 4.0, 4.0]})}
    est = {"tox": result({"pre": [0.5, 1.0, 2.0], "sft": [0.0, -2.0, -1.0], "dpo": [4.0, 4.0, 4.0]})}
    out = fidelity(est, truth)  # terminal stage inferred: the last listed ("dpo")
    assert out["terminal_stage"] == "dpo"
    assert out["non_terminal"]["per_example_spearman"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["all"]["per_example_spearman"] == pytest.approx((1.0 + 0.5) / 2)  # "dpo" is constant: skipped
    assert out["non_terminal"]["sign_agreement"] == 1.0
    empty = fidelity({}, truth)
    assert empty["all"]["n_pairs"] == 0 and math.isnan(empty["all"]["spearman"])
