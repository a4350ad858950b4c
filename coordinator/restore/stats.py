"""Paired statistics for the arm comparison: difference tests, equivalence (TOST), intervals.

"p > 0.05" alone does not show that two arms are equivalent; only an equivalence test with a
stated margin can (Schuirmann's two one-sided tests, TOST, on the per-image paired differences).
The verdict names the claim the data supports:

- ``equivalent``: TOST rejects a difference of at least the margin (p_tost < alpha);
- ``different``: the paired t-test and Wilcoxon signed-rank both reject no difference, and TOST
  does not show equivalence;
- ``different but within margin``: a significant difference smaller than the margin;
- ``inconclusive``: neither difference nor equivalence shown (too few images or too much spread).

Margins default to 0.5 dB PSNR and 0.01 SSIM (the issue's); RMSE has no default margin.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MARGINS",
    "describe",
    "mean_ci",
    "tost_paired",
    "paired_comparison",
]

DEFAULT_MARGINS: dict[str, float] = {"psnr_db": 0.5, "ssim": 0.01}


def _finite(values: np.ndarray | list[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite (an infinite PSNR means an identical image)")
    return arr


def mean_ci(values: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean; (nan, nan) for fewer than 2 values."""
    from scipy import stats

    arr = _finite(values)
    n = arr.size
    if n < 2:
        return (math.nan, math.nan)
    mean = float(arr.mean())
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return (mean, mean)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sem
    return (mean - half, mean + half)


def describe(values: np.ndarray | list[float]) -> dict[str, float]:
    """n, mean, sd (ddof 1), 95 % CI of the mean, median."""
    arr = _finite(values)
    low, high = mean_ci(arr)
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()) if arr.size else math.nan,
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
        "ci95_low": low,
        "ci95_high": high,
        "median": float(np.median(arr)) if arr.size else math.nan,
    }


def tost_paired(
    a: np.ndarray | list[float], b: np.ndarray | list[float], margin: float
) -> dict[str, float]:
    """TOST on the paired differences a - b with equivalence bounds (-margin, +margin).

    Returns the two one-sided p-values and ``p`` = their maximum, plus the 90 % CI of the mean
    difference (equivalence at alpha = 0.05 holds exactly when it lies inside the bounds).
    """
    from scipy import stats

    if not margin > 0:
        raise ValueError("margin must be > 0")
    d = _finite(a) - _finite(b)
    if d.size < 2:
        return {"p": math.nan, "p_lower": math.nan, "p_upper": math.nan,
                "ci90_low": math.nan, "ci90_high": math.nan}
    if float(d.std(ddof=1)) == 0.0:
        inside = -margin < float(d.mean()) < margin
        p = 0.0 if inside else 1.0
        return {"p": p, "p_lower": p, "p_upper": p,
                "ci90_low": float(d.mean()), "ci90_high": float(d.mean())}
    lower = stats.ttest_1samp(d, -margin, alternative="greater")
    upper = stats.ttest_1samp(d, margin, alternative="less")
    low, high = mean_ci(d, level=0.90)
    return {
        "p": float(max(lower.pvalue, upper.pvalue)),
        "p_lower": float(lower.pvalue),
        "p_upper": float(upper.pvalue),
        "ci90_low": low,
        "ci90_high": high,
    }


def paired_comparison(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    margin: float | None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Paired tests of a vs b (same images, same order): Wilcoxon, t-test, TOST, verdict."""
    from scipy import stats

    x, y = _finite(a), _finite(b)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    d = x - y
    out: dict[str, Any] = {
        "n": int(d.size),
        "mean_difference": float(d.mean()) if d.size else math.nan,
        "sd_difference": float(d.std(ddof=1)) if d.size > 1 else math.nan,
    }
    out["ci95_low"], out["ci95_high"] = mean_ci(d)
    if d.size >= 2 and np.any(d != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
        tt = stats.ttest_rel(x, y)
        out["ttest_p"] = float(tt.pvalue) if np.isfinite(tt.pvalue) else math.nan
    else:
        out["wilcoxon_p"] = math.nan if d.size < 2 else 1.0
        out["ttest_p"] = math.nan if d.size < 2 else 1.0
    different = bool(
        out["wilcoxon_p"] < alpha and out["ttest_p"] < alpha
    )  # nan compares False
    if margin is None:
        out["margin"] = None
        out["tost"] = None
        out["verdict"] = "different" if different else "no significant difference (no margin)"
        return out
    tost = tost_paired(x, y, margin)
    out["margin"] = float(margin)
    out["tost"] = tost
    equivalent = bool(tost["p"] < alpha)
    if equivalent and different:
        verdict = "different but within margin"
    elif equivalent:
        verdict = "equivalent"
    elif different:
        verdict = "different"
    else:
        verdict = "inconclusive"
    out["verdict"] = verdict
    return out
