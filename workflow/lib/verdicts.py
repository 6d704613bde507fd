"""The verdict panel at the top of the report: one line per question the run asks, each with its status, the key
number and its CI, written from the comparison tables (``workflow.lib.tables``) and the perturbation summary
(``workflow.perturbation``).

The questions: does training work (the reference method at the lowest noise rate against the base model, on
held-out preference accuracy), does label noise hurt (the reference method at each higher noise rate against the
lowest), does the claim method beat the reference method at each noise rate (held-out accuracy; the harmful rate,
or the over-refusal rate, of each benchmark: lower is better for both), and is the claim method's perturbation
effective. Statuses:

- ``shown``: the difference is in the asked direction and significant: its CI excludes 0 (training, noise) or
  its Holm-adjusted p is below α (the method comparisons);
- ``not shown``: not significant, significant the other way, or numerically identical (within
  ``report.identical_tolerance`` of 0);
- ``not estimable``: the run lacks what the question needs, or the CI could not be computed;
- ``inert``: the perturbation changes (to within rounding) nothing the optimizer sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from workflow.lib.display import diff_ci, fmt_signed

SHOWN, NOT_SHOWN, NOT_ESTIMABLE, INERT = "shown", "not shown", "not estimable", "inert"
STATUSES = (SHOWN, NOT_SHOWN, NOT_ESTIMABLE, INERT)


@dataclass
class Verdict:
    question: str  # the question, short ("Does training work?")
    compared: str  # what is compared, on which metric
    status: str
    result: str = "—"  # the key number: values compared and their difference
    ci: str = "—"  # the CI of the difference
    basis: str = ""  # what decided the status, and on what data


def _ci(row) -> str:
    return diff_ci(row["diff"], row["ci_low"], row["ci_high"]).split(" ", 1)[1]


def _estimable(row) -> bool:
    return not (pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]))


def _identical(row) -> bool:
    return bool(row.get("identical", False))


def _precondition(question: str, compared: str, row, want: int, tolerance: float, basis: str) -> Verdict:
    """A pre-specified single test judged by its CI: ``want`` +1 (CI above 0) or −1 (CI below 0)."""
    result = f"{row.value_vs:.3f} → {row.value:.3f} ({fmt_signed(row['diff'])})"
    if not _estimable(row):
        return Verdict(question, compared, NOT_ESTIMABLE, result, basis="the CI could not be computed")
    if _identical(row):
        return Verdict(question, compared, NOT_SHOWN, result, _ci(row), f"numerically identical (within {tolerance:g})")
    hit = row.ci_low > 0 if want > 0 else row.ci_high < 0
    return Verdict(question, compared, SHOWN if hit else NOT_SHOWN, result, _ci(row), basis)


def training_verdict(pref_comp: pd.DataFrame | None, reference: str, tolerance: float) -> Verdict:
    question = "Does training work?"
    if pref_comp is None:
        return Verdict(question, "", NOT_ESTIMABLE, basis="the held-out pairs were not scored")
    rows = pref_comp[(pref_comp.comparison == "training") & (pref_comp.metric == "accuracy")]
    if rows.empty:
        return Verdict(question, "", NOT_ESTIMABLE, basis=f"needs {reference} and the base model scored on the "
                                                          "held-out pairs")
    row = rows.iloc[0]
    return _precondition(question, f"{reference} ε = {row.noise:g} vs base: held-out accuracy ↑", row, +1,
                         tolerance, f"CI above 0 ({int(row.pairs)} pairs × {int(row.seeds)} seed(s))")


def noise_verdicts(pref_comp: pd.DataFrame | None, reference: str, tolerance: float) -> list[Verdict]:
    question = "Does label noise hurt?"
    if pref_comp is None:
        return [Verdict(question, "", NOT_ESTIMABLE, basis="the held-out pairs were not scored")]
    rows = pref_comp[(pref_comp.comparison == "noise") & (pref_comp.metric == "accuracy")]
    if rows.empty:
        return [Verdict(question, "", NOT_ESTIMABLE, basis=f"needs {reference} at two noise rates")]
    return [_precondition(question, f"{reference} ε = {r.noise:g} vs ε = {r.vs_noise:g}: held-out accuracy ↓", r, -1,
                          tolerance, f"CI below 0 (the same {int(r.pairs)} clean pairs)") for _, r in rows.iterrows()]


def _method_verdict(question: str, compared: str, row, better: int, alpha: float, tolerance: float, inert_note: str,
                    result: str) -> Verdict:
    """A method comparison judged by its Holm-adjusted p: ``better`` +1 (higher is better) or −1 (lower is)."""
    if not _estimable(row):
        return Verdict(question, compared, NOT_ESTIMABLE, result, basis="the CI could not be computed" + inert_note)
    if _identical(row):
        return Verdict(question, compared, NOT_SHOWN, result, _ci(row),
                       f"numerically identical (within {tolerance:g})" + inert_note)
    p = f"Holm p = {row.p_holm:.2g}"
    if row.significant and row["diff"] * better > 0:
        return Verdict(question, compared, SHOWN, result, _ci(row), f"{p} < α = {alpha:g}" + inert_note)
    if row.significant:
        return Verdict(question, compared, NOT_SHOWN, result, _ci(row), f"significantly worse ({p})" + inert_note)
    return Verdict(question, compared, NOT_SHOWN, result, _ci(row), f"{p}, not below α = {alpha:g}" + inert_note)


def claim_verdicts(pref_comp: pd.DataFrame | None, comp: pd.DataFrame, reference: str, claim: str, alpha: float,
                   tolerance: float, inert_base: str | None = None) -> list[Verdict]:
    """Does ``claim`` beat ``reference`` at each noise rate: on held-out accuracy, then on each benchmark's rate
    (primary judge). ``inert_base``: the claim method's perturbation is inert and it trains as this method."""
    # said once, on the first line of the claim: the lines below compare two runs of one loss
    note = "" if inert_base is None else f"; {claim}'s step is inert: it trains as {inert_base}"
    question = f"Does {claim} beat {reference}?"
    out = []
    acc = (pd.DataFrame() if pref_comp is None else
           pref_comp[(pref_comp.comparison == "method") & (pref_comp.metric == "accuracy") & (pref_comp.method == claim)])
    for _, r in acc.iterrows():
        out.append(_method_verdict(question, f"ε = {r.noise:g}: held-out accuracy ↑", r, +1, alpha,
                                   tolerance, "" if out else note,
                                   f"{r.value_vs:.3f} → {r.value:.3f} ({fmt_signed(r['diff'])})"))
    rates = comp[comp.method == claim] if len(comp) else comp
    for _, r in rates.sort_values(["noise", "benchmark"]).iterrows() if len(rates) else []:
        what = "harmful rate" if r.kind == "harmful" else "over-refusal rate"
        out.append(_method_verdict(question, f"ε = {r.noise:g}: {what}, {r.benchmark} ↓", r, -1,
                                   alpha, tolerance, "" if out else note,
                                   f"{r.rate_reference:.3f} → {r.rate_method:.3f} ({fmt_signed(r['diff'])})"))
    if not out:
        trained = (pref_comp is not None and claim in set(pref_comp.method)) or (len(comp) and claim in set(comp.method))
        reason = (f"{claim} was not compared with {reference}" if trained else
                  f"{claim} or {reference} was not trained in this run")
        out.append(Verdict(question, "", NOT_ESTIMABLE, basis=reason))
    return out


def perturbation_verdict(summary: pd.DataFrame | None, claim: str, fraction: float, gap: float) -> Verdict:
    question = f"Is {claim}'s perturbation effective?"
    compared = "its sharpness-aware steps (medians)"
    row = None if summary is None else next((r for _, r in summary.iterrows() if r.method == claim), None)
    if row is None:
        return Verdict(question, "", NOT_ESTIMABLE, basis=f"{claim} has no sharpness-aware step in this run")
    if row.verdict == "no step":
        return Verdict(question, compared, NOT_ESTIMABLE,
                       basis=f"{claim} took no sharpness-aware step (interval {row.interval})")
    result = f"changed fraction {row.effective_fraction:.3g}; 1 − cos {row.cosine_gap:.3g}"
    rule = f"{int(row.steps)} steps; inert when the fraction < {fraction:g} or 1 − cos < {gap:g}"
    if row.verdict == "inert":
        trains_as = f"; it trains as {row.base}" if isinstance(row.base, str) and row.base else ""
        return Verdict(question, compared, INERT, result, basis=rule + trains_as)
    return Verdict(question, compared, SHOWN, result, basis=rule)


def verdicts(pref_comp: pd.DataFrame | None, comp: pd.DataFrame, summary: pd.DataFrame | None, reference: str,
             claim: str, rep: dict) -> list[Verdict]:
    """Every line of the panel, in the order of the questions; ``rep`` is the config's ``report`` section."""
    tolerance = rep["identical_tolerance"]
    perturbation = perturbation_verdict(summary, claim, rep["inert_effective_fraction"], rep["inert_cosine_gap"])
    inert_base = None
    if perturbation.status == INERT:
        row = summary[summary.method == claim].iloc[0]
        inert_base = row.base if isinstance(row.base, str) and row.base else "its loss without the step"
    return [training_verdict(pref_comp, reference, tolerance), *noise_verdicts(pref_comp, reference, tolerance),
            *claim_verdicts(pref_comp, comp, reference, claim, rep["alpha"], tolerance, inert_base), perturbation]


def verdict_frame(rows: list[Verdict], ci_header: str) -> pd.DataFrame:
    """The panel as a table; a question asked on several lines is named on its first only."""
    questions = [v.question if i == 0 or v.question != rows[i - 1].question else "" for i, v in enumerate(rows)]
    return pd.DataFrame({"question": questions, "compared (↑ ↓: the direction asked)": [v.compared for v in rows],
                         "status": [v.status for v in rows], "result": [v.result for v in rows],
                         ci_header: [v.ci for v in rows], "why": [v.basis for v in rows]})
