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

from workflow.config import fill_defaults
from workflow.files import read_json, write_text
from workflow.perturbation import display as perturbation_display
from workflow.provenance import source_files
from workflow.stats import comparisons_display, fmt_noise, main_table_wide, markdown

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
    "harmful_rate_vs_noise": "Harmful rate (refusal rate for over-refusal sets) against the noise rate, per "
                             "benchmark; error bars: 95% bootstrap CI over prompts and seeds; grey: base model",
    "training_curves": "Training loss and pair accuracy on clean (solid) vs flipped (dashed) pairs, mean over seeds",
    "subspace_neurons": "Probe-selected MLP neurons per layer",
    "refusal_vs_harmful": "Over-refusal (refusal rate on harmless prompts) against harmful rate, per method "
                          "and noise rate",
    "reward_soft_labels": "Reward-level: distribution of reward differences and the soft labels they give",
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


def category_wide(categories: pd.DataFrame) -> pd.DataFrame:
    column = categories.method + categories.noise.map(lambda n: "" if pd.isna(n) else f" ε={n:g}")
    return (categories.assign(column=column, rate=categories.rate.map(lambda r: f"{r:.2f}"))
            .pivot_table(index=["benchmark", "category"], columns="column", values="rate", aggfunc="first",
                         sort=False).reset_index().rename_axis(columns=None))


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

    doc.heading("What the numbers say")
    doc.text(claim_statement(comp, rates, reference, claim_method, alpha))

    doc.heading("Main table")
    doc.table(main_table_wide(rates), f"Primary judge {judges[0]}. Harmful rate (fraction of answers judged "
              "unsafe) for harmful benchmarks, refusal rate for over-refusal benchmarks; mean ± std over seeds "
              f"[{rep['ci_level']:.0%} bootstrap CI over prompts and seeds].")

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
              "Metric of each benchmark per category (primary judge), mean over seeds.")

    doc.heading("Judge agreement")
    if a.judge_agreement:
        doc.table(pd.read_csv(a.judge_agreement), "Pairwise agreement and Cohen's kappa per benchmark.")
        by_judge = pd.read_csv(tables / "rates_by_judge.csv")
        by_judge = by_judge.assign(noise=by_judge.noise.map(fmt_noise), rate=by_judge.rate.map(lambda r: f"{r:.3f}"))
        doc.table(by_judge.pivot_table(index=["method", "noise", "benchmark"], columns="judge", values="rate",
                                       aggfunc="first", sort=False).reset_index().rename_axis(columns=None),
                  "Metric per judge (mean over seeds).")
    else:
        doc.text(f"One judge only ({judges[0]}): no agreement to report.")

    if a.reward_metrics:
        doc.heading("Reward-level training")
        doc.code(json.dumps(read_json(a.reward_metrics), indent=2))

    doc.heading("Probe, subspace and decontamination")
    doc.code(json.dumps(read_json(a.probe_metrics), indent=2))
    doc.table(pd.read_csv(a.subspace, sep="\t"), "Selected neurons per layer (results/subspace/summary.tsv).")
    doc.table(pd.read_csv(a.decontamination, sep="\t"), "Decontamination: probe texts read, removed for overlap "
              "with each benchmark or the held-out preference prompts, and kept (results/probe/decontamination.tsv).")

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
    p.add_argument("--preferences", required=True, help="results/data/preferences/summary.json")
    p.add_argument("--noise-summaries", nargs="+", required=True)
    p.add_argument("--judge-agreement", help="results/tables/judge_agreement.csv (with two judges or more)")
    p.add_argument("--reward-metrics", help="results/reward/metrics.json (reward-level methods)")
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
