"""Assemble results/report.md and results/report.html: every table and figure, provenance and a plain verdict.

    python -m workflow.report --config-json '{...}' --tables results/tables --figures results/figures/*.png \
        --model-provenance results/models/base/provenance.json --probe-metrics ... --decontamination ... \
        --subspace ... --preferences ... --noise-summaries ... [--judge-agreement ...] [--reward-metrics ...] \
        --markdown results/report.md --html results/report.html

The tables come from ``workflow.stats`` and the figures from ``workflow.figures``; this module only
reads, formats and writes. The HTML page is self-contained (figures embedded as base64 PNG, the PDF
next to each PNG is linked by relative path); report.md links the figures by relative path.
The paragraph "What the numbers say" is written by ``claim_statement`` from the comparisons table; the
section "Is the perturbation effective?" from ``workflow.perturbation``'s table (``--perturbation``).
"""
from __future__ import annotations

import argparse
import base64
import html
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import pandas as pd
import yaml

from workflow.lib.config import fill_defaults
from workflow.lib.display import (
    comparisons_display,
    fmt_noise,
    main_table_wide,
    main_table_with_preferences,
    markdown,
    perturbation_display,
    preference_comparisons_display,
    preference_display,
    rates_sentence,
)
from workflow.lib.files import read_json, write_text
from workflow.lib.provenance import source_files
from workflow.lib.results import RULE_BASED

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


# ------------------------------------------------------------------------------------------- the verdict
def _cells(rows: pd.DataFrame) -> str:
    parts = [f"{r.benchmark} at ε = {r.noise:g} ({r.diff:+.3f}, 95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
             f"Holm p = {r.p_holm:.2g})" for r in rows.itertuples()]
    return "; ".join(parts)


def claim_statement(comp: pd.DataFrame, rates: pd.DataFrame, reference: str, claim_method: str,
                    alpha: float) -> str:
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
                        f"significant (Holm-adjusted paired bootstrap, α = {alpha}) in any of the {len(noisy)} "
                        f"benchmark × noise cells; the differences range from {noisy['diff'].min():+.3f} to "
                        f"{noisy['diff'].max():+.3f}.")
        else:
            sentence = f"Under label noise, {method}"
            if len(lower):
                sentence += f" has a significantly lower harmful rate than {reference} on {_cells(lower)}"
            if len(higher):
                sentence += (" but" if len(lower) else "") + \
                    f" a significantly higher harmful rate on {_cells(higher)}"
            rest = len(noisy) - len(lower) - len(higher)
            sentence += f"; {rest} other benchmark × noise cell(s) show no significant difference." if rest else "."
        if len(clean):
            sentence += f" Without noise it differs significantly on {_cells(clean)}."
        r = harmless[(harmless.method == method) & harmless.significant]
        if len(r):
            sentence += f" Its over-refusal (refusal rate on harmless prompts) differs significantly on {_cells(r)}."
        if method == focus:
            verdict = ("supported by this run" if len(lower) and higher.empty else
                       "contradicted by this run" if len(higher) and lower.empty else
                       "mixed in this run" if len(lower) and len(higher) else "not shown by this run")
            sentence = f"The paper's claim ({method} lowers the harmful rate under label noise relative to " \
                       f"{reference}) is {verdict}. " + sentence
        text.append(sentence)
    # worst-case (rates near 0.5) standard error of a difference of two rates on n prompts x s seeds
    detectable = 1.96 * math.sqrt(0.5 / (prompts * seeds))
    widths = (comp["ci_high"] - comp["ci_low"]) / 2
    text.append(f"The run has {size}: a difference must be about {detectable:.2f} or larger to be detected "
                f"(1.96·√(0.5/(prompts·seeds))); the observed 95% CIs of the differences are ±{widths.mean():.2f} "
                "wide on average" + (" — the sample is too small to separate the methods by the effect sizes the "
                                     "paper reports." if detectable > 0.1 else "."))
    return " ".join(text)


def _ci(row, digits: int = 3) -> str:
    return f"{row['diff']:+.{digits}f} (95% CI [{row.ci_low:+.{digits}f}, {row.ci_high:+.{digits}f}])"


def _mdd_range(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "not estimable (no comparison had a non-zero paired variance)"
    text = f"{v.median():.3f}" if len(v) == 1 or v.min() == v.max() else \
        f"{v.median():.3f} (median; {v.min():.3f}–{v.max():.3f} over {len(v)} comparisons)"
    missing = int(values.isna().sum())
    return text + (f"; {missing} comparison(s) with no discordant pair left out" if missing else "")


def preconditions_statement(pref_comp: pd.DataFrame, comp: pd.DataFrame, reference: str) -> list[str]:
    """The three statements the default run must answer, from the held-out preference comparisons (and the
    harmful-rate comparisons for the detectable difference):

    1. training works: the reference method at the lowest noise rate against the base model, on held-out
       preference accuracy (shown when the 95% CI of the paired difference lies above 0);
    2. noise matters: the reference method at each higher noise rate against its lowest-noise self on the
       clean held-out pairs (shown when the CI of the accuracy difference lies below 0);
    3. each method against the reference method at each noise rate, with the smallest difference the run
       could detect at 80% power (``mdd80``) for the preference metric and the harmful rates.
    """
    out = []
    acc = pref_comp[pref_comp.metric == "accuracy"]
    margin = pref_comp[pref_comp.metric == "mean_margin"]

    def margin_of(row):
        m = margin[(margin.comparison == row.comparison) & (margin.method == row.method) & (margin.noise == row.noise)]
        return "" if m.empty else f"; mean margin {m.iloc[0].value_vs:.3f} → {m.iloc[0].value:.3f}, difference {_ci(m.iloc[0])}"

    train = acc[acc.comparison == "training"]
    if train.empty:
        out.append(f"1. Training works: not tested ({reference!r} or the base model was not scored on held-out pairs).")
    else:
        r = train.iloc[0]
        verdict = ("shown" if r.ci_low > 0 else "not shown: the policy prefers the rejected answers more than the base "
                   "model does" if r.ci_high < 0 else "not shown")
        out.append(f"1. Training works — {verdict}. {reference} at ε = {r.noise:g} against the base model on "
                   f"{int(r.pairs)} clean held-out pairs: preference accuracy {r.value_vs:.3f} → {r.value:.3f}, "
                   f"difference {_ci(r)}{margin_of(r)}. Training counts as working when the 95% paired-bootstrap CI "
                   "of the accuracy difference from the base model lies above 0; without an SFT stage the base model "
                   "is the reference itself (every margin 0, accuracy 0.5 by construction), so this is the CI of "
                   f"{reference}'s held-out accuracy excluding 0.5.")
    noise = acc[acc.comparison == "noise"]
    if noise.empty:
        out.append(f"2. Noise matters: not tested (needs {reference} at two noise rates).")
    else:
        parts, shown = [], []
        for _, r in noise.iterrows():
            shown.append(r.ci_high < 0)
            parts.append(f"ε = {r.noise:g} against ε = {r.vs_noise:g}: accuracy {r.value_vs:.3f} → {r.value:.3f}, "
                         f"difference {_ci(r)}{margin_of(r)}")
        verdict = "shown" if all(shown) else "shown at some noise rates" if any(shown) else "not shown"
        out.append(f"2. Noise matters — {verdict}. {reference} trained with flipped labels, scored on the same clean "
                   f"held-out pairs (paired): " + "; ".join(parts) + ". Noise counts as mattering when the 95% CI of "
                   "the accuracy difference lies below 0.")
    methods = acc[acc.comparison == "method"]
    if methods.empty:
        out.append(f"3. Methods compared with {reference}: none (no other method was trained).")
    else:
        cells = []
        for _, r in methods.iterrows():
            cells.append(f"{r.method} at ε = {r.noise:g}: accuracy {r.value_vs:.3f} → {r.value:.3f}, difference {_ci(r)}, "
                         f"Holm p = {r.p_holm:.2g}{margin_of(r)}")
        sig = methods[methods.significant.astype(bool)]
        harmful = comp[comp.kind == "harmful"] if len(comp) else comp
        text = (f"3. Each method against {reference} at the same noise rate, paired on the held-out pairs: "
                + "; ".join(cells) + ". "
                + (f"{len(sig)} of {len(methods)} accuracy differences are significant after Holm's correction "
                   "(over the method comparisons of both preference metrics). ")
                + "The smallest difference this run could detect (80% power, two-sided α = 0.05 unadjusted, "
                f"(z₀.₉₇₅ + z₀.₈)·SE of the paired difference; docs/statistics.md): held-out accuracy "
                f"{_mdd_range(methods.mdd80)}; mean margin {_mdd_range(margin[margin.comparison == 'method'].mdd80)}")
        if len(harmful) and "mdd80" in harmful:
            text += f"; harmful rates {_mdd_range(harmful.mdd80)}"
        out.append(text + ".")
    return out


# --------------------------------------------------------------------------------------------- rendering
class Document:
    """Blocks rendered both as markdown and as one self-contained HTML page."""

    def __init__(self, title: str, root: Path):
        self.title, self.root, self.blocks = title, root, []

    def heading(self, text: str):
        self.blocks.append(("h2", text))

    def text(self, text: str):
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame, caption: str = ""):
        self.blocks.append(("table", frame, caption))

    def code(self, text: str):
        self.blocks.append(("pre", text))

    def figure(self, path: str, caption: str):
        self.blocks.append(("figure", Path(path), caption))

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def markdown(self) -> str:
        out = [f"# {self.title}\n"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                out.append(f"## {block[1]}\n")
            elif kind == "p":
                out.append(block[1] + "\n")
            elif kind == "table":
                out.append((f"{block[2]}\n\n" if block[2] else "") + markdown(block[1].astype(object).where(block[1].notna(), "")))
            elif kind == "pre":
                out.append(f"```\n{block[1].rstrip()}\n```\n")
            elif kind == "figure":
                pdf = block[1].with_suffix(".pdf")
                out.append(f"![{block[2]}]({self.rel(block[1])})\n\n*{block[2]}*"
                           + (f" ([PDF]({self.rel(pdf)}))" if pdf.exists() else "") + "\n")
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                anchor = html.escape(block[1].lower().replace(" ", "-"))
                body.append(f'<h2 id="{anchor}">{html.escape(block[1])}</h2>')
            elif kind == "p":
                body.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "table":
                caption = f"<p class='caption'>{html.escape(block[2])}</p>" if block[2] else ""
                body.append(caption + block[1].to_html(index=False, na_rep="", border=0, classes="t"))
            elif kind == "pre":
                body.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "figure":
                data = base64.b64encode(block[1].read_bytes()).decode()
                pdf = block[1].with_suffix(".pdf")
                link = f' (<a href="{html.escape(self.rel(pdf))}">PDF</a>)' if pdf.exists() else ""
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(block[2])}{link}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
                 "table.t{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
                 "table.t td,table.t th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.8em}"
                 ".caption{font-style:italic;margin-bottom:0}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


FIGURE_CAPTIONS = {
    "harmful_rate_vs_noise": "Harmful rate (refusal rate for over-refusal sets; the y axis names what it measures) "
                             "against the noise rate, per benchmark; error bars: 95% bootstrap CI over prompts and "
                             "seeds; grey: base model",
    "training_curves": "Training loss and pair accuracy on clean (solid) vs flipped (dashed) pairs, mean over seeds",
    "subspace_neurons": "Probe-selected MLP neurons per layer",
    "refusal_vs_harmful": "Over-refusal (refusal rate on harmless prompts) against harmful rate (the axes name "
                          "what each measures), per method and noise rate",
    "reward_soft_labels": "Reward-level: distribution of reward differences and the soft labels they give",
    "preference_accuracy_vs_noise": "Held-out preference accuracy (left) and mean implicit reward margin (right) on "
                                    "the clean held-out pairs against the training noise rate, per method; error bars: "
                                    "95% bootstrap CI over pairs and seeds; grey: base model",
    "perturbation_effect": "Sharpness-aware steps, one point per step (noise rates and seeds pooled), bar = median: "
                           "ΔL = L(θ+δ) − L(θ), the fraction of moved weights changed in the compute precision, and "
                           "1 − cos(∇L(θ), ∇L(θ+δ)); dashed: the inert thresholds",
}
PERTURBATION_FIGURE = "perturbation_effect"


def perturbation_column(display: pd.DataFrame, comp: pd.DataFrame, summary: pd.DataFrame | None) -> pd.DataFrame:
    """The comparisons table with a column "perturbation": the verdict of a method's sharpness-aware step (inert:
    it trained as its base method), blank for methods without one."""
    if summary is None or display.empty:
        return display
    verdicts = {r.method: (f"inert (trains as {r.base})" if r.verdict == "inert" and isinstance(r.base, str) and r.base
                           else r.verdict) for r in summary.itertuples()}
    return display.assign(perturbation=[verdicts.get(m, "") for m in comp["method"]])


def perturbation_section(doc: "Document", summary: pd.DataFrame, figure: str | None, rep: dict, claim_method: str,
                         reference: str) -> None:
    doc.heading("Is the perturbation effective?")
    doc.text("Each sharpness-aware step logs (training log columns) the move ‖δ‖ = γ·‖g_S‖ on the moved weights, the "
             "fraction of moved weights whose value as the forward pass sees it changed (bf16 under autocast, fp32 "
             "otherwise), ΔL = L(θ+δ) − L(θ), and the cosine between the gradient at θ and the gradient at θ+δ "
             "that the optimizer uses. A method is called inert when, over its sharpness-aware steps (noise rates "
             f"and seeds pooled), the median changed fraction is below {rep['inert_effective_fraction']:g} (the "
             "forward pass saw almost the same weights) or the median gradient cosine is above "
             f"1 − {rep['inert_cosine_gap']:g} (the optimizer got almost the same gradient); config "
             "report.inert_effective_fraction and report.inert_cosine_gap. Either way its optimizer sees its base "
             "loss's gradient to within rounding.")
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
    if figure:
        doc.figure(figure, FIGURE_CAPTIONS[PERTURBATION_FIGURE])


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
    config = fill_defaults(json.loads(a.config_json), "")  # the resolved config, as the workflow ran it
    tables = Path(a.tables)
    rep = config["report"]
    reference, claim_method = a.reference_method, a.claim_method
    alpha = rep["alpha"] if a.alpha is None else a.alpha
    judges = config["evaluation"]["judges"]
    rates = pd.read_csv(tables / "harmful_rate.csv")
    comp_all = pd.read_csv(tables / "comparisons.csv")
    comp = comp_all[comp_all.judge == judges[0]] if len(comp_all) else comp_all
    doc = Document("ShaPO reproduction: report", Path(a.markdown).parent)

    primary_type = config["judges"][judges[0]]["type"]
    caveat = refusal_caveat(judges[0], primary_type)
    prefs = pref_comp = None
    if a.preference_tables:
        prefs = pd.read_csv(tables / "preference_accuracy.csv")
        pref_comp = pd.read_csv(tables / "preference_comparisons.csv")
    doc.heading("What the numbers say")
    if pref_comp is not None:
        doc.text("Held-out preference accuracy: on clean held-out preference pairs (never trained on, never "
                 "flipped), the share of pairs whose implicit reward margin β·[(log π − log π_ref)(chosen) − "
                 "(log π − log π_ref)(rejected)] is positive (a tie counts half), with π_ref the start model.")
        for sentence in preconditions_statement(pref_comp, comp, reference):
            doc.text(sentence)
    doc.text(caveat + claim_statement(comp, rates, reference, claim_method, alpha))

    doc.heading("Main table")
    doc.text(f"Primary judge {judges[0]} (type {primary_type}). {rates_sentence(rates)}")
    doc.table(main_table_with_preferences(main_table_wide(rates), prefs),
              "Columns are 'benchmark: what the rate measures'; mean ± std over seeds "
              f"[{rep['ci_level']:.0%} bootstrap CI over prompts and seeds]"
              + ("; the last two: held-out preference accuracy and mean margin [CI over pairs and seeds]."
                 if prefs is not None else "."))
    note = generation_note(rates, config["evaluation"])
    if note:
        doc.text(note)

    if prefs is not None:
        doc.heading("Held-out preference accuracy")
        doc.table(preference_display(prefs), "Clean held-out pairs: accuracy (margin > 0, ties half) and mean "
                  f"implicit reward margin [{rep['ci_level']:.0%} bootstrap CI over pairs and seeds].")
        doc.table(preference_comparisons_display(pref_comp),
                  "Paired on the same held-out pairs and seeds (diff = model − vs). training: the reference method "
                  "at the lowest noise rate vs the base model; noise: the reference method at a higher noise rate vs "
                  "at the lowest; method: each method vs the reference method at the same noise rate. p (Holm): "
                  "adjusted over the method rows (both metrics), a family separate from the harmful-rate comparisons; "
                  "the training and noise rows are single pre-specified tests judged by their CI. MDD: minimum "
                  "detectable difference at 80% power, (z₀.₉₇₅ + z₀.₈)·SE.")

    summary = pd.read_csv(a.perturbation, keep_default_na=False, na_values=[""]) if a.perturbation else None
    if summary is not None:
        summary["base"] = summary["base"].fillna("")
    doc.heading(f"Comparisons with {reference}")
    doc.text(f"Each method against {reference} at the same noise rate, paired on the same prompts and seeds. "
             "diff = method − reference with a paired-bootstrap CI (prompts and seeds resampled together); p: "
             "two-sided paired-bootstrap p-value pooled over seeds; p (Holm): adjusted over all comparisons of "
             f"the primary judge; sig.: * / ** / *** for Holm p < 0.05 / 0.01 / 0.001. McNemar's test per seed "
             "(exact binomial under 25 discordant pairs) is in results/tables/mcnemar_by_seed.csv; the column "
             "shows its smallest unadjusted p over seeds. With B bootstrap draws the smallest p is 2/(B+1).")
    doc.table(perturbation_column(comparisons_display(comp), comp, summary))

    figures = [f for f in a.figures if Path(f).stem != PERTURBATION_FIGURE]
    if summary is not None:
        perturbation_section(doc, summary, next((f for f in a.figures if Path(f).stem == PERTURBATION_FIGURE), None),
                             rep, claim_method, reference)

    doc.heading("Figures")
    for fig in figures:
        doc.figure(fig, FIGURE_CAPTIONS.get(Path(fig).stem, Path(fig).stem))

    doc.heading("Per-category rates")
    doc.table(category_wide(pd.read_csv(tables / "categories.csv")),
              f"{caveat}Metric of each benchmark per category (primary judge; the main table's metric of that "
              "benchmark), mean over seeds.")

    doc.heading("Judge agreement")
    if a.judge_agreement:
        doc.table(pd.read_csv(a.judge_agreement), "Pairwise agreement and Cohen's kappa per benchmark.")
        by_judge = pd.read_csv(tables / "rates_by_judge.csv")
        by_judge = by_judge.assign(noise=by_judge.noise.map(fmt_noise), rate=by_judge.rate.map(lambda r: f"{r:.3f}"))
        doc.table(by_judge.pivot_table(index=["method", "noise", "benchmark"], columns="judge", values="rate",
                                       aggfunc="first", sort=False).reset_index().rename_axis(columns=None),
                  "Metric per judge (mean over seeds): the attack success rate (unsafe / all answers) for LLM "
                  "judges; for refusal_markers the no-refusal rate, which measures refusal, not harm; the "
                  "over-refusal rate (refusal markers) for over-refusal benchmarks.")
    else:
        doc.text(f"One judge only ({judges[0]}): no agreement to report.")

    if a.reward_metrics:
        doc.heading("Reward-level training")
        doc.code(json.dumps(read_json(a.reward_metrics), indent=2))

    doc.heading("Probe, subspace and decontamination")
    probe_metrics, subspace = read_json(a.probe_metrics), pd.read_csv(a.subspace, sep="\t")
    doc.code(json.dumps(probe_metrics, indent=2))
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

    doc.heading("Training data and label noise")
    doc.code(json.dumps(read_json(a.preferences), indent=2))
    noise = pd.DataFrame([read_json(p) | {"file": p} for p in a.noise_summaries])
    doc.table(noise, "Realised label noise per noise rate and seed.")

    doc.heading("Provenance")
    doc.text("Model (results/models/base/provenance.json):")
    doc.code(json.dumps(read_json(a.model_provenance), indent=2))
    doc.table(pd.DataFrame(source_files(config), columns=["config key", "source", "file", "sha256"]), "Data sources: config key, source, file and its sha256.")
    doc.table(package_versions(), "Package versions of the environment that rendered this report.")

    doc.heading("Configuration")
    doc.code(yaml.safe_dump(config, sort_keys=False))
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
