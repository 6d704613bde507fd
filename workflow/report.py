"""Assemble results/report.md and results/report.html: the verdicts and headline figures first, then every table and
figure, provenance and the config.

    python -m workflow.report --config-json '{...}' --tables results/tables --figures results/figures/*.png \
        --model-provenance results/models/base/provenance.json --probe-metrics ... --decontamination ... \
        --subspace ... --preferences ... --noise-summaries ... [--judge-agreement ...] [--reward-metrics ...] \
        --markdown results/report.md --html results/report.html

The tables come from ``workflow.stats`` and the figures from ``workflow.figures``; this module only
reads, formats and writes, one small function per section (``build`` lists them in page order). The verdict panel
is ``workflow.lib.verdicts``; the page's blocks render through ``workflow.lib.document`` (self-contained HTML, the
figures embedded as base64 PNG and the PDF beside each linked; report.md links the figures by relative path).
"What the numbers say" is written by ``preconditions_statement`` and ``claim_statement`` from the comparison
tables; "Is the perturbation effective?" from ``workflow.perturbation``'s table (``--perturbation``). The CI level,
α and the numerical-identity tolerance are the config's ``report`` section.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from workflow.lib.captions import figure_captions, level_text
from workflow.lib.config import fill_defaults
from workflow.lib.display import (
    comparisons_display,
    fmt_noise,
    fmt_signed,
    main_table_wide,
    main_table_with_preferences,
    perturbation_display,
    preference_comparisons_display,
    preference_display,
    rates_sentence,
)
from workflow.lib.document import Document
from workflow.lib.files import read_json, write_text
from workflow.lib.provenance import source_files
from workflow.lib.results import RULE_BASED
from workflow.lib.verdicts import verdict_frame, verdicts

PACKAGES = ["torch", "transformers", "accelerate", "safetensors", "datasets", "gguf", "numpy", "pandas", "scipy",
            "statsmodels", "scikit-learn", "matplotlib", "snakemake"]


# -------------------------------------------------------------------------------------------- provenance
def package_versions() -> pd.DataFrame:
    rows = [{"package": "python", "version": platform.python_version()}]
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "(not in the report environment)"
        rows.append({"package": name, "version": version})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- the statements
def _cells(rows: pd.DataFrame, level: float) -> str:
    parts = [f"{r.benchmark} at ε = {r.noise:g} ({fmt_signed(r.diff)}, {level_text(level)} CI "
             f"[{fmt_signed(r.ci_low)}, {fmt_signed(r.ci_high)}], Holm p = {r.p_holm:.2g})" for r in rows.itertuples()]
    return "; ".join(parts)


def detectable_sentence(comp: pd.DataFrame, size: str, alpha: float, level: float) -> str:
    """The smallest difference the run could detect on the harmful rates, from the comparisons' ``mdd80`` (the one
    formula: (z_{1−α/2} + z₀.₈)·SE of the paired difference), and the CIs' widths."""
    harmful = comp[comp.kind == "harmful"] if "kind" in comp else comp
    widths = (comp["ci_high"] - comp["ci_low"]) / 2
    width = f"; the observed {level_text(level)} CIs of the differences are ±{widths.mean():.2g} wide on average"
    mdd = harmful["mdd80"].dropna() if "mdd80" in harmful else pd.Series(dtype=float)
    if mdd.empty:
        return (f"The run has {size}. The smallest difference it could detect is not estimable: no harmful-rate "
                f"comparison had a discordant prompt (its paired variance is 0){width}.")
    text = (f"The run has {size}: at 80% power and two-sided α = {alpha:g} (unadjusted) a harmful-rate difference "
            f"must be about {_mdd_range(mdd)} or larger to be detected ((z_{{1−α/2}} + z₀.₈)·SE of the paired "
            f"difference; docs/statistics.md){width}")
    return text + (" — the sample is too small to separate the methods by the effect sizes the paper reports."
                   if mdd.median() > 0.1 else ".")


def claim_statement(comp: pd.DataFrame, rates: pd.DataFrame, reference: str, claim_method: str,
                    alpha: float, level: float) -> str:
    """One plain paragraph on the paper's claim (the claim method lowers the harmful rate under label noise
    relative to the reference), written from the comparisons of the primary judge."""
    trained = rates[rates.method.ne("base")]
    if trained.empty:
        return "No trained policy was evaluated, so the numbers say nothing about the claim."
    seeds, prompts = int(trained.seeds.max()), int(trained.prompts.min())
    most = int(trained.prompts.max())
    size = f"{seeds} seed(s) and {prompts if prompts == most else f'{prompts}–{most}'} prompts per benchmark"
    if comp.empty:
        return (f"The reference method {reference!r} was not trained in this run, so no method was compared with it "
                f"and the numbers cannot test the claim ({size}).")
    methods = list(dict.fromkeys(comp.method))
    focus = claim_method if claim_method in methods else None
    harmful = comp[comp.kind == "harmful"]
    harmless = comp[comp.kind == "harmless"]
    text = []
    if focus is None:
        text.append(f"The claim concerns {claim_method!r}, which was not trained in this run; the other methods "
                    f"are compared with {reference!r} below.")
    for method in ([focus] if focus else []) + [m for m in methods if m != focus]:
        h = harmful[harmful.method == method]
        noisy = h[h.noise > 0]
        lower, higher = noisy[noisy.significant & (noisy["diff"] < 0)], noisy[noisy.significant & (noisy["diff"] > 0)]
        clean = h[(h.noise == 0) & h.significant]
        if noisy.empty:
            sentence = f"{method} was not evaluated under label noise (no noise rate above 0)."
        elif lower.empty and higher.empty:
            sentence = (f"Under label noise, no difference in harmful rate between {method} and {reference} is "
                        f"significant (Holm-adjusted paired bootstrap, α = {alpha:g}) in any of the {len(noisy)} "
                        f"benchmark × noise cells; the differences range from {fmt_signed(noisy['diff'].min())} to "
                        f"{fmt_signed(noisy['diff'].max())}.")
        else:
            sentence = f"Under label noise, {method}"
            if len(lower):
                sentence += f" has a significantly lower harmful rate than {reference} on {_cells(lower, level)}"
            if len(higher):
                sentence += (" but" if len(lower) else "") + \
                    f" a significantly higher harmful rate on {_cells(higher, level)}"
            rest = len(noisy) - len(lower) - len(higher)
            sentence += f"; {rest} other benchmark × noise cell(s) show no significant difference." if rest else "."
        if len(clean):
            sentence += f" Without noise it differs significantly on {_cells(clean, level)}."
        r = harmless[(harmless.method == method) & harmless.significant]
        if len(r):
            sentence += (" Its over-refusal (refusal rate on harmless prompts) differs significantly on "
                         f"{_cells(r, level)}.")
        if method == focus:
            verdict = ("supported by this run" if len(lower) and higher.empty else
                       "contradicted by this run" if len(higher) and lower.empty else
                       "mixed in this run" if len(lower) and len(higher) else "not shown by this run")
            sentence = f"The paper's claim ({method} lowers the harmful rate under label noise relative to " \
                       f"{reference}) is {verdict}. " + sentence
        text.append(sentence)
    text.append(detectable_sentence(comp, size, alpha, level))
    return " ".join(text)


def _ci(row, level: float) -> str:
    return f"{fmt_signed(row['diff'])} ({level_text(level)} CI [{fmt_signed(row.ci_low)}, {fmt_signed(row.ci_high)}])"


def _mdd_range(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "not estimable (no comparison had a non-zero paired variance)"
    text = f"{v.median():.3g}" if len(v) == 1 or v.min() == v.max() else \
        f"{v.median():.3g} (median; {v.min():.3g}–{v.max():.3g} over {len(v)} comparisons)"
    missing = int(values.isna().sum())
    return text + (f"; {missing} comparison(s) with no discordant pair left out" if missing else "")


def preconditions_statement(pref_comp: pd.DataFrame, comp: pd.DataFrame, reference: str, level: float,
                            alpha: float) -> list[str]:
    """The three statements the default run must answer, from the held-out preference comparisons (and the
    harmful-rate comparisons for the detectable difference):

    1. training works: the reference method at the lowest noise rate against the base model, on held-out
       preference accuracy (shown when the CI of the paired difference lies above 0);
    2. noise matters: the reference method at each higher noise rate against its lowest-noise self on the
       clean held-out pairs (shown when the CI of the accuracy difference lies below 0);
    3. each method against the reference method at each noise rate, with the smallest difference the run
       could detect at 80% power (``mdd80``) for the preference metric and the harmful rates.
    """
    out = []
    ci = level_text(level)
    acc = pref_comp[pref_comp.metric == "accuracy"]
    margin = pref_comp[pref_comp.metric == "mean_margin"]

    def margin_of(row):
        m = margin[(margin.comparison == row.comparison) & (margin.method == row.method) & (margin.noise == row.noise)]
        if m.empty:
            return ""
        m = m.iloc[0]
        return (f"; mean margin {m.value_vs:.3f} → {m.value:.3f}, difference {_ci(m, level)}"
                + (" (numerically identical)" if m.get("identical", False) else ""))

    train = acc[acc.comparison == "training"]
    if train.empty:
        out.append(f"1. Training works: not tested ({reference!r} or the base model was not scored on held-out pairs).")
    else:
        r = train.iloc[0]
        verdict = ("shown" if r.ci_low > 0 else "not shown: the policy prefers the rejected answers more than the base "
                   "model does" if r.ci_high < 0 else "not shown")
        out.append(f"1. Training works — {verdict}. {reference} at ε = {r.noise:g} against the base model on "
                   f"{int(r.pairs)} clean held-out pairs: preference accuracy {r.value_vs:.3f} → {r.value:.3f}, "
                   f"difference {_ci(r, level)}{margin_of(r)}. Training counts as working when the {ci} "
                   "paired-bootstrap CI of the accuracy difference from the base model lies above 0; without an SFT "
                   "stage the base model is the reference itself (every margin 0, accuracy 0.5 by construction), so "
                   f"this is the CI of {reference}'s held-out accuracy excluding 0.5.")
    noise = acc[acc.comparison == "noise"]
    if noise.empty:
        out.append(f"2. Noise matters: not tested (needs {reference} at two noise rates).")
    else:
        parts, shown = [], []
        for _, r in noise.iterrows():
            shown.append(r.ci_high < 0)
            parts.append(f"ε = {r.noise:g} against ε = {r.vs_noise:g}: accuracy {r.value_vs:.3f} → {r.value:.3f}, "
                         f"difference {_ci(r, level)}{margin_of(r)}")
        verdict = "shown" if all(shown) else "shown at some noise rates" if any(shown) else "not shown"
        out.append(f"2. Noise matters — {verdict}. {reference} trained with flipped labels, scored on the same clean "
                   f"held-out pairs (paired): " + "; ".join(parts) + f". Noise counts as mattering when the {ci} CI "
                   "of the accuracy difference lies below 0.")
    methods = acc[acc.comparison == "method"]
    if methods.empty:
        out.append(f"3. Methods compared with {reference}: none (no other method was trained).")
    else:
        cells = []
        for _, r in methods.iterrows():
            same = " (numerically identical)" if r.get("identical", False) else ""
            cells.append(f"{r.method} at ε = {r.noise:g}: accuracy {r.value_vs:.3f} → {r.value:.3f}, difference "
                         f"{_ci(r, level)}{same}, Holm p = {r.p_holm:.2g}{margin_of(r)}")
        sig = methods[methods.significant.astype(bool)]
        harmful = comp[comp.kind == "harmful"] if len(comp) else comp
        text = (f"3. Each method against {reference} at the same noise rate, paired on the held-out pairs: "
                + "; ".join(cells) + ". "
                + (f"{len(sig)} of {len(methods)} accuracy differences are significant after Holm's correction "
                   "(over the method comparisons of both preference metrics). ")
                + f"The smallest difference this run could detect (80% power, two-sided α = {alpha:g} unadjusted, "
                "(z_{1−α/2} + z₀.₈)·SE of the paired difference; docs/statistics.md): held-out accuracy "
                f"{_mdd_range(methods.mdd80)}; mean margin {_mdd_range(margin[margin.comparison == 'method'].mdd80)}")
        if len(harmful) and "mdd80" in harmful:
            text += f"; harmful rates {_mdd_range(harmful.mdd80)}"
        out.append(text + ".")
    return out


# ------------------------------------------------------------------------------------------- the inputs
HEADLINE_FIGURES = ["preference_accuracy_vs_noise", "harmful_rate_vs_noise"]
PERTURBATION_FIGURE = "perturbation_effect"


@dataclass
class Run:
    """What the report reads, read once: the resolved config, the tables of the primary judge, the figures."""
    config: dict
    tables: Path
    reference: str
    claim: str
    alpha: float
    rates: pd.DataFrame
    comp: pd.DataFrame  # comparisons of the primary judge
    prefs: pd.DataFrame | None  # held-out preference tables (when the pairs were scored)
    pref_comp: pd.DataFrame | None
    summary: pd.DataFrame | None  # the perturbation summary (methods with a sharpness-aware step)
    figures: dict  # file stem -> PNG path

    @property
    def rep(self) -> dict:
        return self.config["report"]

    @property
    def level(self) -> float:
        return self.rep["ci_level"]

    @property
    def judge(self) -> str:
        return self.config["evaluation"]["judges"][0]

    @property
    def judge_type(self) -> str:
        return self.config["judges"][self.judge]["type"]

    @property
    def caveat(self) -> str:
        return refusal_caveat(self.judge, self.judge_type)

    @property
    def captions(self) -> dict:
        return figure_captions(self.level, self.rep["inert_effective_fraction"], self.rep["inert_cosine_gap"])


def read_run(a) -> Run:
    config = fill_defaults(json.loads(a.config_json), "")  # the resolved config, as the workflow ran it
    tables = Path(a.tables)
    comp = pd.read_csv(tables / "comparisons.csv")
    primary = config["evaluation"]["judges"][0]
    prefs = pref_comp = summary = None
    if a.preference_tables:
        prefs = pd.read_csv(tables / "preference_accuracy.csv")
        pref_comp = pd.read_csv(tables / "preference_comparisons.csv")
    if a.perturbation:
        summary = pd.read_csv(a.perturbation, keep_default_na=False, na_values=[""])
        summary["base"] = summary["base"].fillna("")
    return Run(config=config, tables=tables, reference=a.reference_method, claim=a.claim_method,
               alpha=config["report"]["alpha"] if a.alpha is None else a.alpha,
               rates=pd.read_csv(tables / "harmful_rate.csv"), comp=comp[comp.judge == primary] if len(comp) else comp,
               prefs=prefs, pref_comp=pref_comp, summary=summary, figures={Path(f).stem: f for f in a.figures})


# ----------------------------------------------------------------------------------------- the sections
def run_line(run: Run) -> str:
    """One line on what the run is: methods, noise rates, seeds, held-out pairs, benchmarks, the judge."""
    trained = run.rates[run.rates.method.ne("base")]
    methods = list(dict.fromkeys(trained.method))
    noises = ", ".join(f"{n:g}" for n in sorted(trained.noise.dropna().unique()))
    seeds = int(trained.seeds.max()) if len(trained) else 0
    pairs = "" if run.prefs is None else f"; {int(run.prefs.pairs.max())} clean held-out preference pairs"
    benchmarks = sorted(run.rates.benchmark.unique())
    prompts = sorted(set(run.rates.prompts.astype(int)))
    judge = run.judge + (" (refusal markers: it measures refusal, not harm)" if run.judge_type == RULE_BASED else "")
    return (f"This run: model {run.config['model']['name_or_path']}; methods {', '.join(methods) or 'none'} at noise "
            f"rates {noises or '—'}, {seeds} seed(s){pairs}; {len(benchmarks)} benchmark(s) ({', '.join(benchmarks)}) "
            f"× {'–'.join(map(str, [prompts[0], prompts[-1]] if len(prompts) > 1 else prompts))} prompts; primary "
            f"judge {judge}. Reference method {run.reference}, claim method {run.claim}.")


def status_legend(run: Run) -> str:
    ci = level_text(run.level)
    return (f"Status: shown = the difference goes the asked way and is significant (its {ci} CI excludes 0; for "
            f"{run.claim} vs {run.reference}, Holm p < α = {run.alpha:g}); not shown = not significant, the other way, "
            f"or numerically identical (within {run.rep['identical_tolerance']:g}); not estimable = the run lacks what "
            "the question needs; inert = the sharpness-aware step changes nothing the optimizer sees.")


def verdict_section(doc: Document, run: Run) -> None:
    doc.heading("Verdicts")
    doc.text(run_line(run))
    rows = verdicts(run.pref_comp, run.comp, run.summary, run.reference, run.claim, run.rep | {"alpha": run.alpha})
    doc.verdicts(verdict_frame(rows, f"{level_text(run.level)} CI"))
    doc.text(status_legend(run))
    with doc.details("How to read this report: the metrics and the tests"):
        definitions(doc, run)


def definitions(doc: Document, run: Run) -> None:
    ci = level_text(run.level)
    doc.text("Held-out preference accuracy: on clean held-out preference pairs (never trained on, never flipped), the "
             "share of pairs whose implicit reward margin β·[(log π − log π_ref)(chosen) − (log π − log π_ref)"
             "(rejected)] is positive (a tie counts half), with π_ref the start model. The mean margin is the average "
             "of that margin. Without an SFT stage the base model is π_ref itself: every margin 0, accuracy 0.5.")
    doc.text(f"Harmful rate: unsafe answers / all answers to a benchmark's prompts, by the primary judge {run.judge}; "
             "for over-refusal benchmarks the refusal rate on harmless prompts. " + run.caveat)
    doc.text(f"Tests: every difference is paired (the same held-out pairs, or the same prompts, and seeds) with a "
             f"{ci} paired-bootstrap CI (pairs or prompts and seeds resampled together, config report.n_bootstrap "
             f"draws). Training and noise are single pre-specified tests judged by their CI; the method comparisons "
             f"are judged by their Holm-adjusted bootstrap p at α = {run.alpha:g} (one family per metric kind). The "
             "minimum detectable difference (MDD) is (z_{1−α/2} + z₀.₈)·SE of the paired difference: the smallest "
             "true difference a test at α finds with 80% power (docs/statistics.md).")
    doc.text("Statuses in full: not shown also covers a difference that is numerically identical — its value and both "
             f"CI ends within {run.rep['identical_tolerance']:g} of 0 (config report.identical_tolerance): two models "
             "that differ only by rounding, which is never starred whatever its p. A perturbation is inert when the "
             "median fraction of moved weights changed in the compute precision is below "
             f"{run.rep['inert_effective_fraction']:g} or the median 1 − cos(∇L(θ), ∇L(θ+δ)) is below "
             f"{run.rep['inert_cosine_gap']:g} (config report.inert_effective_fraction, report.inert_cosine_gap).")


def headline_figures(doc: Document, run: Run) -> None:
    shown = [stem for stem in HEADLINE_FIGURES if stem in run.figures]
    if not shown:
        return
    doc.heading("Headline figures")
    for stem in shown:
        doc.figure(run.figures[stem], run.captions[stem])


def statements_section(doc: Document, run: Run) -> None:
    doc.heading("What the numbers say")
    with doc.details("The verdicts in words, with every number and the detectable difference"):
        if run.pref_comp is not None:
            for sentence in preconditions_statement(run.pref_comp, run.comp, run.reference, run.level, run.alpha):
                doc.text(sentence)
        doc.text(run.caveat + claim_statement(run.comp, run.rates, run.reference, run.claim, run.alpha, run.level))


def main_table_section(doc: Document, run: Run) -> None:
    doc.heading("Main table")
    doc.text(f"Primary judge {run.judge} (type {run.judge_type}). {rates_sentence(run.rates)}")
    doc.table(main_table_with_preferences(main_table_wide(run.rates), run.prefs, run.level),
              "Columns are 'benchmark: what the rate measures'; mean ± std over seeds "
              f"[{level_text(run.level)} bootstrap CI over prompts and seeds]"
              + ("; the last two: held-out preference accuracy and mean margin [CI over pairs and seeds]."
                 if run.prefs is not None else "."))
    note = generation_note(run.rates, run.config["evaluation"])
    if note:
        doc.text(note)


def preference_section(doc: Document, run: Run) -> None:
    if run.prefs is None:
        return
    ci = level_text(run.level)
    doc.heading("Held-out preference accuracy")
    doc.table(preference_display(run.prefs, run.level), "Clean held-out pairs: accuracy (margin > 0, ties half) and "
              f"mean implicit reward margin [{ci} bootstrap CI over pairs and seeds].")
    doc.table(preference_comparisons_display(run.pref_comp, run.level),
              "Paired on the same held-out pairs and seeds (diff = model − vs). training: the reference method "
              "at the lowest noise rate vs the base model; noise: the reference method at a higher noise rate vs "
              "at the lowest; method: each method vs the reference method at the same noise rate. p (Holm): "
              "adjusted over the method rows (both metrics), a family separate from the harmful-rate comparisons; "
              "the training and noise rows are single pre-specified tests judged by their CI. MDD: minimum "
              "detectable difference at 80% power, (z_{1−α/2} + z₀.₈)·SE with α = " + f"{run.alpha:g}.")


def comparisons_section(doc: Document, run: Run) -> None:
    a = run.alpha
    doc.heading(f"Comparisons with {run.reference}")
    doc.text(f"Each method against {run.reference} at the same noise rate, paired on the same prompts and seeds. "
             f"diff = method − reference with a {level_text(run.level)} paired-bootstrap CI (prompts and seeds "
             "resampled together); p: two-sided paired-bootstrap p-value pooled over seeds; p (Holm): adjusted over "
             f"all comparisons of the primary judge; sig.: * / ** / *** for Holm p < {a:g} / {a / 5:g} / {a / 50:g} "
             f"(α, α/5, α/50), or 'numerically identical' when the difference and its CI lie within "
             f"{run.rep['identical_tolerance']:g} of 0 (never starred). McNemar's test per seed (exact binomial under "
             "25 discordant pairs) is in results/tables/mcnemar_by_seed.csv; the column shows its smallest "
             "unadjusted p over seeds. With B bootstrap draws the smallest p is 2/(B+1).")
    doc.table(perturbation_column(comparisons_display(run.comp, run.level), run.comp, run.summary))


def perturbation_column(display: pd.DataFrame, comp: pd.DataFrame, summary: pd.DataFrame | None) -> pd.DataFrame:
    """The comparisons table with a column "perturbation": the verdict of a method's sharpness-aware step (inert:
    it trained as its base method), blank for methods without one."""
    if summary is None or display.empty:
        return display
    verdicts = {r.method: (f"inert (trains as {r.base})" if r.verdict == "inert" and isinstance(r.base, str) and r.base
                           else r.verdict) for r in summary.itertuples()}
    return display.assign(perturbation=[verdicts.get(m, "") for m in comp["method"]])


def perturbation_section(doc: Document, run: Run) -> None:
    summary, rep, claim_method, reference = run.summary, run.rep, run.claim, run.reference
    if summary is None:
        return
    doc.heading("Is the perturbation effective?")
    for sentence in summary.statement:
        doc.text(sentence)
    claim = summary[summary.method == claim_method]
    if len(claim) and claim.verdict.iloc[0] == "inert":
        base = claim.base.iloc[0]
        doc.text(f"So the comparison of {claim_method} with {reference} above compares "
                 + (f"{reference} with itself (two runs of one loss)" if base == reference else
                    f"{base or 'its base loss'} with {reference}")
                 + ": what it shows is not an effect of the geometry step.")
    doc.table(perturbation_display(summary), "Per method: medians over its sharpness-aware steps "
              "(results/tables/perturbation.csv): ‖δ‖ (move_norm), ‖δ‖/‖W_S‖ (move_relative), the fraction of "
              "moved weights changed (median and largest), 1 − the gradient cosine, the relative change of the "
              "gradient norm, ΔL and its largest absolute value.")
    if PERTURBATION_FIGURE in run.figures:
        doc.figure(run.figures[PERTURBATION_FIGURE], run.captions[PERTURBATION_FIGURE])
    with doc.details("What is measured, and when a step is inert"):
        doc.text("Each sharpness-aware step logs (training log columns) the move ‖δ‖ = γ·‖g_S‖ on the moved weights, "
                 "the fraction of moved weights whose value as the forward pass sees it changed (bf16 under autocast, "
                 "fp32 otherwise), ΔL = L(θ+δ) − L(θ), and the cosine between the gradient at θ and the gradient at "
                 "θ+δ that the optimizer uses. A method is called inert when, over its sharpness-aware steps (noise "
                 f"rates and seeds pooled), the median changed fraction is below {rep['inert_effective_fraction']:g} "
                 "(the forward pass saw almost the same weights) or the median gradient cosine is above "
                 f"1 − {rep['inert_cosine_gap']:g} (the optimizer got almost the same gradient); config "
                 "report.inert_effective_fraction and report.inert_cosine_gap. Either way its optimizer sees its base "
                 "loss's gradient to within rounding.")


def more_figures(doc: Document, run: Run) -> None:
    rest = [stem for stem in run.figures if stem not in HEADLINE_FIGURES + [PERTURBATION_FIGURE]]
    if not rest:
        return
    doc.heading("More figures")
    for stem in rest:
        doc.figure(run.figures[stem], run.captions.get(stem, stem))


def categories_section(doc: Document, run: Run) -> None:
    doc.heading("Per-category rates")
    doc.table(category_wide(pd.read_csv(run.tables / "categories.csv")),
              f"{run.caveat}Metric of each benchmark per category (primary judge; the main table's metric of that "
              "benchmark), mean over seeds.")


def judge_section(doc: Document, run: Run, agreement: str | None) -> None:
    doc.heading("Judge agreement")
    if not agreement:
        doc.text(f"One judge only ({run.judge}): no agreement to report.")
        return
    doc.table(pd.read_csv(agreement).round(3), "Pairwise agreement and Cohen's kappa per benchmark.")
    by_judge = pd.read_csv(run.tables / "rates_by_judge.csv")
    by_judge = by_judge.assign(noise=by_judge.noise.map(fmt_noise), rate=by_judge.rate.map(lambda r: f"{r:.3f}"))
    doc.table(by_judge.pivot_table(index=["method", "noise", "benchmark"], columns="judge", values="rate",
                                   aggfunc="first", sort=False).reset_index().rename_axis(columns=None),
              "Metric per judge (mean over seeds): the attack success rate (unsafe / all answers) for LLM "
              "judges; for refusal_markers the no-refusal rate, which measures refusal, not harm; the "
              "over-refusal rate (refusal markers) for over-refusal benchmarks.")


def reward_section(doc: Document, metrics: str | None) -> None:
    if metrics:
        doc.heading("Reward-level training")
        doc.code(json.dumps(read_json(metrics), indent=2))


def probe_section(doc: Document, a) -> None:
    doc.heading("Probe, subspace and decontamination")
    probe_metrics, subspace = read_json(a.probe_metrics), pd.read_csv(a.subspace, sep="\t")
    sensitivity = fit_sensitivity(probe_metrics, subspace)
    if sensitivity:
        doc.text(sensitivity)
    doc.table(subspace, "Selected neurons per layer (results/subspace/summary.tsv); secondary_selected and shared: "
              "the other probe fit's selection and its overlap with this one.")
    doc.table(pd.read_csv(a.decontamination, sep="\t"), "Decontamination, probe side: probe texts read, removed for "
              "overlap with each benchmark of probe.decontaminate_against or the held-out preference prompts, and kept "
              "(results/probe/decontamination.tsv).")
    if a.benchmark_decontamination:
        doc.table(benchmark_decontamination_table(a.benchmark_decontamination), "Decontamination, benchmark side: "
                  "prompts of each answered benchmark, removed because the probe data used them (never answered or "
                  "scored), left, and sampled (results/data/benchmarks/<name>/decontamination.json).")
    with doc.details("Probe metrics (results/probe/metrics.json)"):
        doc.code(json.dumps(probe_metrics, indent=2))


def data_section(doc: Document, a) -> None:
    doc.heading("Training data and label noise")
    noise = pd.DataFrame([read_json(p) | {"file": p} for p in a.noise_summaries])
    doc.table(noise, "Realised label noise per noise rate and seed.")
    with doc.details("Preference data (results/data/preferences/summary.json)"):
        doc.code(json.dumps(read_json(a.preferences), indent=2))


def provenance_section(doc: Document, run: Run, model_provenance: str) -> None:
    doc.heading("Provenance")
    doc.table(pd.DataFrame(source_files(run.config), columns=["config key", "source", "file", "sha256"]),
              "Data sources: config key, source, file and its sha256.")
    doc.table(package_versions(), "Package versions of the environment that rendered this report.")
    with doc.details("Model (results/models/base/provenance.json)"):
        doc.code(json.dumps(read_json(model_provenance), indent=2))


def configuration_section(doc: Document, run: Run) -> None:
    doc.heading("Configuration")
    with doc.details("The resolved config of this run (YAML, defaults filled in)"):
        doc.code(yaml.safe_dump(run.config, sort_keys=False))


def refusal_caveat(judge: str, judge_type: str) -> str:
    """A sentence for every place that shows the primary judge's numbers, when that judge is the refusal markers."""
    if judge_type != RULE_BASED:
        return ""
    return (f"The primary judge {judge} is the refusal-marker judge: an answer counts as 'unsafe' when it has no "
            "refusal phrase, so every harmful rate below is a no-refusal rate; it measures refusal, not harm. ")


def fit_sensitivity(metrics: dict, subspace: pd.DataFrame) -> str | None:
    """A sentence on how much the subspace depends on the probe fit: the cosine of the two fits' directions
    (train_probe) and the Jaccard overlap of the neurons they select (select_subspace's summary)."""
    if "fit_cosine" not in metrics or "shared" not in subspace:
        return None
    shared = int(subspace.shared.sum())
    union = int(subspace.selected.sum() + subspace.secondary_selected.sum()) - shared
    head = metrics["fits"]["linear_head"]
    return (f"Probe fit sensitivity: the subspace comes from the {metrics['fit']} probe. The {metrics['secondary_fit']} "
            f"probe, fitted on the same texts, has cosine {metrics['fit_cosine']:.3f} with it, and selects "
            f"{int(subspace.secondary_selected.sum())} neurons of which {shared} are shared: Jaccard "
            f"{shared / union if union else 1.0:.3f}. Linear head: ‖random init‖² / ‖direction‖² = "
            f"{head['init_share']:.2f}, cosine {head['cosine_with_init']:.3f} with the init"
            + (" (the head is mostly its random initialisation: it barely moved in its training steps)."
               if head["init_share"] > 0.5 else "."))


def category_wide(categories: pd.DataFrame) -> pd.DataFrame:
    column = categories.method + categories.noise.map(lambda n: "" if pd.isna(n) else f" ε={n:g}")
    return (categories.assign(column=column, rate=categories.rate.map(lambda r: f"{r:.2f}"))
            .pivot_table(index=["benchmark", "category"], columns="column", values="rate", aggfunc="first",
                         sort=False).reset_index().rename_axis(columns=None))


def generation_note(rates: pd.DataFrame, evaluation: dict) -> str:
    """What the report must say about how answers were generated: samples per prompt, prompts cut to fit."""
    text = []
    if evaluation["samples"] > 1:
        text.append(f"Each prompt was answered {evaluation['samples']} times (sampled, seeds evaluation.seed + k); "
                    "a prompt's outcome is the mean over its answers, so the bootstrap resamples prompts. McNemar's "
                    "test needs one 0/1 outcome per prompt and was not run.")
    if "prompt_truncated" not in rates:
        return " ".join(text)
    cut = rates.groupby("benchmark", sort=True).agg(cut=("prompt_truncated", "max"), prompts=("prompts", "max"))
    cut = cut[cut.cut > 0]
    if cut.empty:
        text.append("No prompt was longer than the model's context.")
    else:
        parts = ", ".join(f"{b}: {int(r.cut)} of {int(r.prompts)}" for b, r in cut.iterrows())
        text.append(f"Prompts longer than the model's context (minus evaluation.max_new_tokens) were cut from the "
                    f"left of their content to fit ({parts}); their answers are scored like the others and "
                    "flagged prompt_truncated in the generation files (docs/generation.md).")
    return " ".join(text)


def build(a) -> Document:
    """The page, top to bottom: the verdicts and the headline figures first, then the tables and sections that
    hold every number, then provenance and the config."""
    run = read_run(a)
    doc = Document("ShaPO reproduction: report", Path(a.markdown).parent)
    verdict_section(doc, run)
    headline_figures(doc, run)
    statements_section(doc, run)
    main_table_section(doc, run)
    preference_section(doc, run)
    comparisons_section(doc, run)
    perturbation_section(doc, run)
    more_figures(doc, run)
    categories_section(doc, run)
    judge_section(doc, run, a.judge_agreement)
    reward_section(doc, a.reward_metrics)
    probe_section(doc, a)
    data_section(doc, a)
    provenance_section(doc, run, a.model_provenance)
    configuration_section(doc, run)
    return doc


def benchmark_decontamination_table(paths: list[str]) -> pd.DataFrame:
    """One row per benchmark: prompts, removed because the probe used them, left (evaluable), sampled."""
    rows = [read_json(p) for p in paths]
    return pd.DataFrame([{k: r[k] for k in ("benchmark", "prompts", "removed_probe_overlap", "evaluable", "sampled")}
                         for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-json", required=True, help="the run's config (as JSON)")
    p.add_argument("--tables", required=True, help="folder of the workflow.stats tables")
    p.add_argument("--figures", nargs="+", required=True, help="PNG figures (the PDF beside each is linked)")
    p.add_argument("--reference-method", required=True)
    p.add_argument("--claim-method", required=True, help="method the paper's claim is about")
    p.add_argument("--alpha", type=float, help="significance level (default: the config's report.alpha)")
    p.add_argument("--model-provenance", required=True)
    p.add_argument("--probe-metrics", required=True)
    p.add_argument("--subspace", required=True)
    p.add_argument("--decontamination", required=True)
    p.add_argument("--benchmark-decontamination", nargs="*", default=[],
                   help="decontamination.json of each answered benchmark (workflow.sample_benchmark)")
    p.add_argument("--preferences", required=True, help="results/data/preferences/summary.json")
    p.add_argument("--noise-summaries", nargs="+", required=True)
    p.add_argument("--judge-agreement", help="results/tables/judge_agreement.csv (with two judges or more)")
    p.add_argument("--reward-metrics", help="results/reward/metrics.json (reward-level methods)")
    p.add_argument("--preference-tables", action="store_true",
                   help="the tables folder has the held-out preference tables (preference_accuracy.csv, "
                        "preference_comparisons.csv): report them and the three preconditions")
    p.add_argument("--perturbation", help="results/tables/perturbation.csv (methods with a sharpness-aware step)")
    p.add_argument("--markdown", required=True)
    p.add_argument("--html", required=True)
    a = p.parse_args(argv)

    doc = build(a)
    write_text(a.markdown, doc.markdown())
    write_text(a.html, doc.html())
    print(doc.markdown()[:4000])


if __name__ == "__main__":
    main()
