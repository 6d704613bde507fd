"""Captions of the report's figures and tables, in one place: the report page (``workflow.report``), the figure
files' own metadata (``workflow.figures``) and Snakemake's ``--report`` (``rules/report.smk``) all print these, so
the confidence level and the thresholds they name are the configured ones everywhere."""
from __future__ import annotations



# Here rather than in workflow.lib.display (which imports it from here): the Snakefile imports this module to
# caption Snakemake's --report, and display's pandas and scipy would add about 0.6 s to every Snakemake start.
def level_text(level: float) -> str:
    """A confidence level as every page, header and caption prints it: 0.9 -> "90%", 0.975 -> "97.5%"."""
    return f"{level * 100:.4g}%"


def figure_captions(level: float, inert_fraction: float | None = None, inert_gap: float | None = None) -> dict:
    """Caption per figure (file stem), at CI level ``level``; the perturbation figure names the inert thresholds
    (config report.inert_effective_fraction, report.inert_cosine_gap)."""
    ci = level_text(level)
    captions = {
        "harmful_rate_vs_noise": "Harmful rate (refusal rate for over-refusal sets; the y axis names what it measures) "
                                 f"against the training noise rate, a panel per benchmark, a line per method; error "
                                 f"bars: {ci} bootstrap CI over prompts and seeds; grey dashed: the base model",
        "preference_accuracy_vs_noise": "Held-out preference accuracy (left) and mean implicit reward margin (right) "
                                        "on the clean held-out pairs against the training noise rate, a line per "
                                        f"method; error bars: {ci} bootstrap CI over pairs and seeds; grey dashed: "
                                        "the base model",
        "training_curves": "Training loss and pair accuracy on clean (solid) vs flipped (dashed) pairs, mean over "
                           "seeds",
        "subspace_neurons": "Probe-selected MLP neurons per layer",
        "refusal_vs_harmful": "Over-refusal (refusal rate on harmless prompts) against harmful rate (the axes name "
                              "what each measures), per method and noise rate",
        "reward_soft_labels": "Reward-level: distribution of reward differences and the soft labels they give",
        "perturbation_effect": "Sharpness-aware steps, one point per step (noise rates and seeds pooled), bar = "
                               "median: ΔL = L(θ+δ) − L(θ), the fraction of moved weights changed in the compute "
                               "precision, and 1 − cos(∇L(θ), ∇L(θ+δ)); symlog axes",
    }
    if inert_fraction is not None and inert_gap is not None:
        captions["perturbation_effect"] += (f"; dashed: the inert thresholds, changed fraction {inert_fraction:g} "
                                            f"and 1 − cos {inert_gap:g} (a method is inert when its median lies "
                                            "below either)")
    return captions


# the report stage's tables, as results/tables/<name> (the .csv; the .md beside it shows the same table)
def table_captions(level: float, alpha: float) -> dict:
    ci = level_text(level)
    return {
        "harmful_rate": "Main table (primary judge): per method × noise rate × benchmark, the benchmark's metric "
                        f"(harmful rate, or refusal rate for over-refusal sets), mean ± std over seeds, {ci} "
                        "bootstrap CI over prompts and seeds; the untrained base model as reference row",
        "comparisons": "Each method against the reference method at the same noise rate and benchmark, paired on "
                       f"the same prompts and seeds: difference with its {ci} paired-bootstrap CI, p-values "
                       f"(bootstrap, Holm-adjusted, McNemar per seed), significance at α = {alpha:g}, minimum "
                       "detectable difference at 80% power",
        "preference_accuracy": "Held-out preference accuracy and mean implicit reward margin of every model on the "
                               f"clean held-out pairs, {ci} bootstrap CI over pairs and seeds",
        "preference_comparisons": "Paired comparisons on the clean held-out pairs: training (reference method vs "
                                  "base model), noise (reference method at each higher noise rate vs the lowest), "
                                  f"method (each method vs the reference method); {ci} paired-bootstrap CI, Holm "
                                  f"over the method rows, α = {alpha:g}",
        "perturbation": "Per method with a sharpness-aware step: medians over its steps of the move, the fraction "
                        "of moved weights changed, 1 − gradient cosine and ΔL, and the verdict (effective or inert)",
        "categories": "Per-category rates (primary judge), mean over seeds",
        "report": "The run's own report page: verdicts, headline figures, every table, provenance and config",
    }
