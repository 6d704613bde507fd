"""The verdict panel follows the numbers: one line per question, with its status, key number and CI."""
import math

import pandas as pd

from workflow.lib.verdicts import (
    INERT,
    NOT_ESTIMABLE,
    NOT_SHOWN,
    SHOWN,
    verdict_frame,
    verdicts,
)

REP = {"alpha": 0.05, "identical_tolerance": 1e-4, "inert_effective_fraction": 1e-3, "inert_cosine_gap": 1e-6}


def pref(comparison, method, noise, vs_method, vs_noise, value_vs, value, lo, hi, p_holm=math.nan, identical=False,
         metric="accuracy"):
    diff = value - value_vs
    family = comparison == "method"
    significant = (p_holm < 0.05 if family else (lo > 0 or hi < 0)) and not identical
    return dict(comparison=comparison, method=method, noise=noise, vs_method=vs_method, vs_noise=vs_noise,
                metric=metric, value_vs=value_vs, value=value, diff=diff, ci_low=lo, ci_high=hi, p_holm=p_holm,
                identical=identical, significant=significant, pairs=128, seeds=1)


def rate(method, noise, benchmark, diff, lo, hi, p_holm, kind="harmful", identical=False):
    return dict(method=method, reference="dpo", noise=noise, benchmark=benchmark, kind=kind, rate_reference=0.5,
                rate_method=0.5 + diff, diff=diff, ci_low=lo, ci_high=hi, p_holm=p_holm, identical=identical,
                significant=p_holm < 0.05 and not identical)


# the default run's numbers (docs/sizing.md): training and noise shown, shapo identical to dpo and inert
DEFAULT_PREFS = pd.DataFrame([
    pref("training", "dpo", 0.0, "base", None, 0.5, 0.633, 0.047, 0.219),
    pref("noise", "dpo", 0.4, "dpo", 0.0, 0.633, 0.461, -0.266, -0.078),
    pref("method", "shapo", 0.0, "dpo", 0.0, 0.633, 0.633, 0.0, 0.0, 1.0, identical=True),
    pref("method", "shapo", 0.4, "dpo", 0.4, 0.461, 0.461, 0.0, 0.0, 1.0, identical=True),
    pref("method", "shapo", 0.4, "dpo", 0.4, 0.007, 0.007 - 3e-6, -5e-6, -1e-6, 0.036, identical=True,
         metric="mean_margin"),
])
DEFAULT_COMP = pd.DataFrame([rate("shapo", n, b, 0.0, 0.0, 0.0, 1.0, identical=True)
                             for n in (0.0, 0.4) for b in ("donotanswer", "harmbench")])
INERT_SHAPO = pd.DataFrame([dict(method="shapo", verdict="inert", base="dpo", interval=5, steps=6,
                                 effective_fraction=0.79, cosine_gap=5.2e-12)])


def by_compared(rows):
    return {v.compared: v for v in rows}


def test_default_run_training_and_noise_shown_shapo_identical_and_inert():
    rows = verdicts(DEFAULT_PREFS, DEFAULT_COMP, INERT_SHAPO, "dpo", "shapo", REP)
    statuses = [v.status for v in rows]
    assert statuses == [SHOWN, SHOWN] + [NOT_SHOWN] * 6 + [INERT]
    training = rows[0]
    assert (training.question, training.compared) == ("Does training work?", "dpo ε = 0 vs base: held-out accuracy ↑")
    assert training.result == "0.500 → 0.633 (+0.133)" and training.ci == "[+0.047, +0.219]"
    assert rows[1].ci == "[-0.266, -0.078]" and rows[1].compared == "dpo ε = 0.4 vs ε = 0: held-out accuracy ↓"
    claim = rows[2]
    assert (claim.question, claim.compared) == ("Does shapo beat dpo?", "ε = 0: held-out accuracy ↑")
    assert "numerically identical (within 0.0001)" in claim.basis and "trains as dpo" in claim.basis
    assert "inert" not in rows[3].basis  # said once, on the first line of the claim
    harm = by_compared(rows)["ε = 0.4: harmful rate, harmbench ↓"]
    assert harm.status == NOT_SHOWN and harm.result == "0.500 → 0.500 (+0.000)"
    assert rows[-1].question == "Is shapo's perturbation effective?" and "5.2e-12" in rows[-1].result
    frame = verdict_frame(rows, "90% CI")
    assert list(frame.columns) == ["question", "compared (↑ ↓: the direction asked)", "status", "result", "90% CI", "why"] and len(frame) == 9
    # a question asked on several lines is named once
    assert frame.question.tolist()[2:9] == ["Does shapo beat dpo?"] + [""] * 5 + ["Is shapo's perturbation effective?"]


def test_a_claim_shown_where_it_beats_the_reference_and_not_where_it_is_worse():
    prefs = pd.DataFrame([pref("method", "shapo", 0.4, "dpo", 0.4, 0.46, 0.55, 0.03, 0.15, 0.01)])
    comp = pd.DataFrame([rate("shapo", 0.4, "harmbench", -0.2, -0.3, -0.1, 0.002),
                         rate("shapo", 0.4, "advbench", 0.2, 0.1, 0.3, 0.002),
                         rate("shapo", 0.4, "xstest", -0.02, -0.1, 0.06, 0.6, kind="harmless")])
    effective = INERT_SHAPO.assign(verdict="effective", cosine_gap=6e-5)
    every = verdicts(prefs, comp, effective, "dpo", "shapo", REP)
    rows = by_compared(every)
    assert rows["ε = 0.4: held-out accuracy ↑"].status == SHOWN
    assert rows["ε = 0.4: harmful rate, harmbench ↓"].status == SHOWN
    worse = rows["ε = 0.4: harmful rate, advbench ↓"]
    assert worse.status == NOT_SHOWN and worse.basis.startswith("significantly worse")
    assert rows["ε = 0.4: over-refusal rate, xstest ↓"].status == NOT_SHOWN
    assert every[-1].status == SHOWN and every[-1].question == "Is shapo's perturbation effective?"
    assert every[0].status == NOT_ESTIMABLE and every[0].question == "Does training work?"  # no base-model row


def test_what_the_run_lacks_is_not_estimable():
    rows = verdicts(None, pd.DataFrame(), None, "drdpo", "shapo", REP)
    assert [v.status for v in rows] == [NOT_ESTIMABLE] * 4
    assert "not scored" in rows[0].basis and "not trained" in rows[2].basis
    assert "no sharpness-aware step" in rows[3].basis
    no_ci = DEFAULT_PREFS.assign(ci_low=math.nan, ci_high=math.nan, identical=False)
    assert {v.status for v in verdicts(no_ci, pd.DataFrame(), None, "dpo", "shapo", REP)} == {NOT_ESTIMABLE}
