"""Paired statistics: Wilcoxon / t-test p-values, TOST equivalence, intervals, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from coordinator.restore.stats import describe, mean_ci, paired_comparison, tost_paired


def test_p_values_are_scipys_paired_tests() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(30, 2, 40)
    b = a + rng.normal(0.3, 0.5, 40)
    out = paired_comparison(a, b, margin=0.5)
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert out["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert out["n"] == 40
    assert out["mean_difference"] == pytest.approx(float(np.mean(a - b)))


def test_tiny_consistent_difference_is_equivalent_within_margin() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(30, 2, 200)
    b = a + rng.normal(0.0, 0.2, 200)
    out = paired_comparison(a, b, margin=0.5)
    assert out["tost"]["p"] < 0.05
    assert out["verdict"] == "equivalent"


def test_large_difference_is_different_and_not_equivalent() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(30, 1, 50)
    b = a - 2.0 + rng.normal(0, 0.3, 50)
    out = paired_comparison(a, b, margin=0.5)
    assert out["verdict"] == "different"
    assert out["tost"]["p"] > 0.5


def test_significant_but_small_difference_is_different_but_within_margin() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.9, 0.02, 400)
    b = a - 0.003 + rng.normal(0, 0.002, 400)
    out = paired_comparison(a, b, margin=0.01)
    assert out["verdict"] == "different but within margin"


def test_few_noisy_images_are_inconclusive_not_equivalent() -> None:
    # "p > 0.05" here, but the data cannot show equivalence either
    rng = np.random.default_rng(4)
    a = rng.normal(30, 2, 6)
    b = a + rng.normal(0, 2.0, 6)
    out = paired_comparison(a, b, margin=0.5)
    assert out["ttest_p"] > 0.05
    assert out["verdict"] == "inconclusive"


def test_tost_p_is_the_larger_one_sided_p() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 30), rng.normal(0.1, 1, 30)
    t = tost_paired(a, b, 0.5)
    d = a - b
    lower = stats.ttest_1samp(d, -0.5, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 0.5, alternative="less").pvalue
    assert t["p"] == pytest.approx(max(lower, upper))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.floats(-1.0, 1.0), st.floats(0.05, 2.0))
def test_tost_equivalence_iff_90_ci_inside_margin(seed: int, shift: float, sd: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, 25)
    b = a + shift + rng.normal(0, sd, 25)
    t = tost_paired(a, b, 0.5)
    inside = -0.5 < t["ci90_low"] and t["ci90_high"] < 0.5
    if abs(abs(t["ci90_low"]) - 0.5) > 1e-9 and abs(abs(t["ci90_high"]) - 0.5) > 1e-9:
        assert (t["p"] < 0.05) == inside


def test_mean_ci_matches_t_interval() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
    low, high = mean_ci(values)
    expected = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected)


def test_describe_and_degenerate_inputs() -> None:
    d = describe([2.0, 4.0])
    assert d["n"] == 2 and d["mean"] == 3.0 and d["sd"] == pytest.approx(math.sqrt(2))
    single = describe([5.0])
    assert math.isnan(single["ci95_low"]) and math.isnan(single["sd"])
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], margin=0.5)
    assert same["verdict"] == "equivalent" and same["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([1.0, 2.0], [1.0], margin=0.5)
    with pytest.raises(ValueError, match="finite"):
        describe([1.0, math.inf])
    with pytest.raises(ValueError, match="margin"):
        tost_paired([1.0, 2.0], [1.0, 2.0], 0.0)


def test_no_margin_never_claims_equivalence() -> None:
    out = paired_comparison([1.0, 2.0, 3.0, 4.0], [1.1, 2.0, 2.9, 4.05], margin=None)
    assert out["verdict"] == "no significant difference (no margin)"
    assert out["tost"] is None
