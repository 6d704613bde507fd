"""workflow/lib/statistics.py with known answers: McNemar (Agresti's textbook case), bootstrap CIs, the paired
bootstrap, Holm, the minimum detectable difference."""
import math

import numpy as np
import pytest

from workflow.lib.statistics import (
    bootstrap_ci,
    holm,
    mcnemar_test,
    minimum_detectable_difference,
    paired_bootstrap,
    significance_mark,
)


def paired(both, only_ref, only_other, neither):
    """Paired 0/1 outcomes with the given 2x2 counts."""
    a = [1] * both + [1] * only_ref + [0] * only_other + [0] * neither
    b = [1] * both + [0] * only_ref + [1] * only_other + [0] * neither
    return np.array(a, float), np.array(b, float)


def test_mcnemar_agresti_presidential_approval():
    # Agresti, An Introduction to Categorical Data Analysis, Table 10.1: 794 / 150 / 86 / 570;
    # continuity-corrected statistic (|150-86|-1)^2 / 236 = 16.82, p = 4.1e-5
    t = mcnemar_test(*paired(794, 150, 86, 570))
    assert (t["b"], t["c"], t["n"], t["exact"]) == (150, 86, 1600, False)
    assert t["statistic"] == pytest.approx(3969 / 236, rel=1e-9)
    assert t["p"] == pytest.approx(4.115e-5, rel=1e-3)


def test_mcnemar_exact_with_few_discordant_pairs():
    # 1 vs 6 discordant pairs: exact two-sided binomial p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8/128
    t = mcnemar_test(*paired(10, 1, 6, 10))
    assert t["exact"] and t["p"] == pytest.approx(0.125)
    assert mcnemar_test(*paired(5, 0, 0, 5))["p"] == 1.0  # no discordant pair
    a, b = paired(0, 3, 0, 0)
    b[0] = np.nan  # an unparseable answer drops its pair
    assert mcnemar_test(a, b)["n"] == 2


def test_bootstrap_ci_contains_the_truth_and_excludes_far_values():
    matrix = np.tile([1.0, 0.0], (3, 200))  # 3 seeds x 400 prompts, rate 0.5
    lo, hi = bootstrap_ci(matrix, n_boot=1000, seed=1)
    assert lo < 0.5 < hi and lo > 0.4 and hi < 0.6
    assert bootstrap_ci(np.ones((2, 30)), n_boot=200) == (1.0, 1.0)
    # seeded: same seed, same interval; another seed, another interval
    assert bootstrap_ci(matrix, n_boot=500, seed=7) == bootstrap_ci(matrix, n_boot=500, seed=7)
    assert bootstrap_ci(matrix, n_boot=500, seed=7) != bootstrap_ci(matrix, n_boot=500, seed=8)


def test_paired_bootstrap_detects_a_clear_difference_and_not_an_absent_one():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 60)) < 0.8).astype(float)
    same = paired_bootstrap(a, a.copy(), n_boot=500, seed=0)
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "se": 0.0}  # se: for the MDD
    b = a.copy()
    b[:, :30] = 0.0  # the other method is unsafe on half as many prompts
    res = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert res["diff"] == pytest.approx(b.mean() - a.mean())
    assert res["ci_high"] < 0 and res["p"] < 0.01 and res["se"] > 0
    unjudged = paired_bootstrap(np.full((1, 5), np.nan), np.ones((1, 5)), n_boot=50)
    # the same keys as a tested comparison: callers read boot["se"] for the minimum detectable difference
    assert set(unjudged) == set(res) and np.isnan(unjudged["p"]) and np.isnan(unjudged["ci_low"])
    assert np.isnan(unjudged["se"])
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_bootstrap(a, b[:, :10])


def test_holm_and_marks():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(holm([np.nan, 0.01])[0])
    assert [significance_mark(p) for p in (0.0005, 0.005, 0.03, 0.2, float("nan"))] == ["***", "**", "*", "", ""]
    # at another α one star is still "below α": 0.07 is significant at α = 0.1, and ** / *** are α/5, α/50
    assert [significance_mark(p, 0.1) for p in (0.07, 0.015, 0.0015, 0.1)] == ["*", "**", "***", ""]


def test_minimum_detectable_difference_formula():
    # (z_0.975 + z_0.8)·SE = (1.95996 + 0.84162)·SE
    assert minimum_detectable_difference(0.1) == pytest.approx(2.80158 * 0.1, rel=1e-4)
    assert minimum_detectable_difference(0.1, alpha=0.01, power=0.9) == pytest.approx((2.57583 + 1.28155) * 0.1, rel=1e-4)
    assert math.isnan(minimum_detectable_difference(0.0))  # no discordant pair: nothing estimated
    # paired 0/1 outcomes on n = 400 prompts, 60 discordant one way and 20 the other:
    # SE = √((p10 + p01 − (p10 − p01)²)/n) = √((0.2 − 0.01)/400)
    n = 400
    a = np.zeros(n)
    b = np.zeros(n)
    a[:60] = 1   # only the reference is 1
    b[60:80] = 1  # only the other is 1
    a[80:200] = b[80:200] = 1
    boot = paired_bootstrap(a, b, n_boot=4000, seed=0)
    closed = math.sqrt((0.2 - 0.1 ** 2) / n)
    assert boot["diff"] == pytest.approx(-0.1)
    assert boot["se"] == pytest.approx(closed, rel=0.08)
    assert minimum_detectable_difference(boot["se"]) == pytest.approx(2.80158 * closed, rel=0.08)
