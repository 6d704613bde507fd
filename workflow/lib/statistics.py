"""The statistics of the report: bootstrap CIs over prompts and seeds, the paired bootstrap, McNemar's test,
Holm's correction and the minimum detectable difference. Pure functions on arrays (seeds x prompts)."""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

EXACT_BELOW = 25  # discordant pairs below which McNemar uses the exact binomial test (the usual rule)

def _resample(rng: np.random.Generator, n_boot: int, n_seeds: int, n_prompts: int):
    """Bootstrap indices: seeds and prompts resampled independently (two-stage bootstrap)."""
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds)), rng.integers(0, n_prompts, size=(n_boot, n_prompts))

def _boot_means(matrix: np.ndarray, seeds_idx: np.ndarray, prompts_idx: np.ndarray) -> np.ndarray:
    """Mean (NaN-aware) of the resampled seeds x prompts matrix for every bootstrap draw."""
    values = matrix[seeds_idx[:, :, None], prompts_idx[:, None, :]]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of unjudged answers only: NaN, dropped later
        return np.nanmean(values.reshape(len(values), -1), axis=1) if values.size else np.full(len(values), np.nan)

def bootstrap_ci(matrix, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean of a seeds x prompts 0/1 matrix (NaN = not judged), by bootstrap over both."""
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    if np.isnan(matrix).all():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = _boot_means(matrix, *_resample(rng, n_boot, *matrix.shape))
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)

def paired_bootstrap(reference, other, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Difference of rates other − reference on the same seeds x prompts, resampled jointly (paired).

    Returns the observed difference, its percentile CI, a two-sided bootstrap p-value
    (2 x the smaller tail share of differences at or beyond 0, with the +1 correction, capped at 1) and the
    standard deviation of the draws (``se``, for the minimum detectable difference); a difference that is 0 in
    every draw (identical outcomes) gets p = 1. Nothing judged on one side: every value but ``diff`` is NaN.
    """
    a = np.atleast_2d(np.asarray(reference, dtype=float))
    b = np.atleast_2d(np.asarray(other, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: shapes differ {a.shape} vs {b.shape} (pairs must be the same prompts and seeds)")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (unjudged) sides give NaN, handled below
        diff = float(np.nanmean(b) - np.nanmean(a))
    rng = np.random.default_rng(seed)
    idx = _resample(rng, n_boot, *a.shape)
    draws = _boot_means(b, *idx) - _boot_means(a, *idx)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:  # nothing judged on one side (e.g. every label unparseable): no test possible
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "se": math.nan}
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    if np.all(draws == 0):
        p = 1.0
    else:
        tail = min((draws <= 0).sum(), (draws >= 0).sum())
        p = min(1.0, 2 * (tail + 1) / (len(draws) + 1))
    se = float(np.std(draws, ddof=1)) if draws.size > 1 else math.nan
    return {"diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p": float(p), "se": se}

def minimum_detectable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided level-``alpha`` test detects with probability ``power``:
    (z_{1−α/2} + z_{power})·SE, SE the standard error of the paired difference (for one seed of 0/1
    outcomes on n prompts SE = √((p₁₀ + p₀₁ − (p₁₀ − p₀₁)²)/n), p₁₀, p₀₁ the discordant shares). A
    zero SE (no discordant pair) estimates nothing: NaN."""
    if se is None or math.isnan(se) or se <= 0:
        return math.nan
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)

def mcnemar_test(reference, other) -> dict:
    """McNemar's test on paired 0/1 outcomes (NaN pairs dropped); exact binomial when discordant pairs < 25.

    ``b``: pairs where only the reference is 1, ``c``: only the other is 1. No discordant pair: p = 1.
    """
    a = np.asarray(reference, dtype=float).ravel()
    o = np.asarray(other, dtype=float).ravel()
    keep = ~(np.isnan(a) | np.isnan(o))
    a, o = a[keep].astype(bool), o[keep].astype(bool)
    table = np.array([[np.sum(a & o), np.sum(a & ~o)], [np.sum(~a & o), np.sum(~a & ~o)]])
    b, c = int(table[0, 1]), int(table[1, 0])
    exact = b + c < EXACT_BELOW
    if b + c == 0:
        return {"b": b, "c": c, "n": int(keep.sum()), "statistic": 0.0, "p": 1.0, "exact": exact}
    res = mcnemar(table, exact=exact, correction=True)
    return {"b": b, "c": c, "n": int(keep.sum()), "statistic": float(res.statistic), "p": float(res.pvalue),
            "exact": exact}

def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (family-wise error control); NaNs stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out

def significance_mark(p_adjusted: float, alpha: float = 0.05) -> str:
    """*, **, *** for adjusted p below α, α/5 and α/50 (0.05, 0.01, 0.001 at the usual α = 0.05); '' otherwise
    (or when untested). One star is exactly "significant at the configured α"."""
    if p_adjusted is None or math.isnan(p_adjusted):
        return ""
    return "***" if p_adjusted < alpha / 50 else "**" if p_adjusted < alpha / 5 else "*" if p_adjusted < alpha else ""

def numerically_identical(diff: float, ci_low: float, ci_high: float, tolerance: float) -> bool:
    """True when the difference and both ends of its CI lie within ``tolerance`` of 0 (config
    ``report.identical_tolerance``): two models that differ only by rounding. Such a difference can be "significant"
    (a consistent rounding of one sign) but is never reported as one. A CI that could not be estimated (NaN)
    decides nothing: False."""
    values = (diff, ci_low, ci_high)
    return all(v is not None and not math.isnan(v) and abs(v) <= tolerance for v in values)
