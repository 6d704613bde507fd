# Report stage: statistics (tables), figures, and one report page (results/report.{md,html}).
# Only these rules depend on each other here, so `--forcerun report_tables` (or `report`) after a
# finished run reruns the report rules and nothing upstream. On a cluster the report rules (with
# judge_agreement and plot_soft_labels) are one submission, group report (docs/cost.md).

from workflow.lib.provenance import local_source_paths

REPORT = config["report"]
# over-refusal (harmless) benchmarks that are answered: the refusal-vs-harmful scatter needs one
HARMLESS_EVALUATED = any(config["benchmarks"][b]["kind"] == "harmless" for b in BENCHMARKS)
HARMFUL_EVALUATED = any(config["benchmarks"][b]["kind"] == "harmful" for b in BENCHMARKS)
# methods with a sharpness-aware step: the report's "Is the perturbation effective?" section summarises them
SHARP_METHODS = sharpness_methods(config)
REPORT_FIGURES = ["harmful_rate_vs_noise", "training_curves", "subspace_neurons"] + (
    ["refusal_vs_harmful"] if HARMLESS_EVALUATED and HARMFUL_EVALUATED else []) + (
    ["preference_accuracy_vs_noise"] if PREFERENCES_SCORED else []) + (
    ["perturbation_effect"] if SHARP_METHODS else [])
STATS_TABLES = ["harmful_rate.csv", "harmful_rate.md", "rates_by_judge.csv", "comparisons.csv", "comparisons.md",
                "mcnemar_by_seed.csv", "categories.csv"] + (
    ["preference_accuracy.csv", "preference_accuracy.md", "preference_comparisons.csv", "preference_comparisons.md"]
    if PREFERENCES_SCORED else [])
REPORT_TABLES = [f"results/tables/{t}" for t in STATS_TABLES]
REPORT_FIGURE_FILES = expand("results/figures/{figure}.{ext}", figure=REPORT_FIGURES, ext=["png", "pdf"])


rule report_tables:
    input:
        labels=judgements("jsonl"),
        summaries=judgements("json"),
        preference_scores=expand("results/preference_scores/{model}.jsonl", model=["base"] + POLICIES) if PREFERENCES_SCORED else [],
    output:
        [in_report(t, "Tables") if t.endswith(".csv") else t for t in REPORT_TABLES],
    params:
        folder=lambda wc, output: os.path.dirname(output[0]),
        captions=captions_of(t for t in REPORT_TABLES if t.endswith(".csv")),
        primary=JUDGES[0],
        reference=REPORT["reference_method"],
        n_boot=REPORT["n_bootstrap"],
        level=REPORT["ci_level"],
        alpha=REPORT["alpha"],
        tolerance=REPORT["identical_tolerance"],
        seed=REPORT["seed"],
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/report_tables.log",
    benchmark:
        "results/benchmarks/report_tables.tsv"
    group:
        "report"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.stats --judgements {input.labels} --primary-judge {params.primary}"
        " --reference-method {params.reference} --n-bootstrap {params.n_boot} --ci-level {params.level}"
        " --alpha {params.alpha} --identical-tolerance {params.tolerance} --seed {params.seed} --tables {params.folder}"
        " --preference-scores {input.preference_scores} > {log} 2>&1"


rule perturbation_summary:
    input:
        train_logs=expand(rules.train_policy.output.log, method=SHARP_METHODS, noise=NOISES, seed=SEEDS),
    output:
        table=in_report("results/tables/perturbation.csv", "Tables"),
        markdown="results/tables/perturbation.md",
    params:
        captions=captions_of(["perturbation"]),
        # every preset: a method's base method (its preset without sharpness) is looked up among them
        presets=as_json(config["presets"]),
        methods=" ".join(SHARP_METHODS),
        fraction=REPORT["inert_effective_fraction"],
        gap=REPORT["inert_cosine_gap"],
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/perturbation_summary.log",
    benchmark:
        "results/benchmarks/perturbation_summary.tsv"
    group:
        "report"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.perturbation --train-logs {input.train_logs} --presets-json {params.presets}"
        " --methods {params.methods} --inert-effective-fraction {params.fraction} --inert-cosine-gap {params.gap}"
        " --table {output.table} --markdown {output.markdown} > {log} 2>&1"


rule report_figures:
    input:
        rates="results/tables/harmful_rate.csv",
        train_logs=expand(rules.train_policy.output.log, method=METHODS, noise=NOISES, seed=SEEDS),
        subspace=rules.select_subspace.output.summary,
        preferences="results/tables/preference_accuracy.csv" if PREFERENCES_SCORED else [],
    output:
        [in_report(f, "Figures") if f.endswith(".png") else f for f in REPORT_FIGURE_FILES],
    params:
        folder=lambda wc, output: os.path.dirname(output[0]),
        captions=captions_of(f for f in REPORT_FIGURE_FILES if f.endswith(".png")),
        level=REPORT["ci_level"],
        scatter="--scatter" if "refusal_vs_harmful" in REPORT_FIGURES else "",
        preferences=lambda wc, input: f"--preferences {input.preferences}" if input.preferences else "",
        perturbation=(f"--perturbation --inert-effective-fraction {REPORT['inert_effective_fraction']}"
                      f" --inert-cosine-gap {REPORT['inert_cosine_gap']}") if SHARP_METHODS else "",
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/report_figures.log",
    benchmark:
        "results/benchmarks/report_figures.tsv"
    group:
        "report"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.figures --rates {input.rates} --train-logs {input.train_logs}"
        " --subspace {input.subspace} --figures {params.folder} --ci-level {params.level} {params.scatter}"
        " {params.preferences}"
        " {params.perturbation} > {log} 2>&1"


rule report:
    input:
        tables=expand("results/tables/{table}", table=STATS_TABLES),
        figures=expand("results/figures/{figure}.{ext}", figure=REPORT_FIGURES, ext=["png", "pdf"]),
        model=rules.prepare_model.output.model,
        probe=rules.train_probe.output.metrics,
        subspace=rules.select_subspace.output.summary,
        decontamination=rules.probe_data.output.report,
        # the other direction: prompts of each answered benchmark left out because the probe data used them
        benchmark_decontamination=expand(rules.sample_benchmark.output.decontamination, benchmark=BENCHMARKS),
        preferences=rules.prepare_preferences.output.summary,
        noise=expand(rules.inject_noise.output.summary, noise=NOISES, seed=SEEDS),
        # the local data files are hashed into the report's provenance table
        sources=local_source_paths(config),
        perturbation=rules.perturbation_summary.output.table if SHARP_METHODS else [],
        **report_optional_inputs(),
    output:
        markdown="results/report.md",
        html=in_report("results/report.html", "Report"),
    params:
        captions=captions_of(["report"]),
        tables=lambda wc, input: os.path.dirname(input.tables[0]),
        config=lambda wc: as_json(config),  # a function: braces in config values ({prompt} templates) are not wildcards
        figures=lambda wc, input: " ".join(f for f in input.figures if f.endswith(".png"))
        + (f" {input.reward_figure}" if "reward_figure" in input.keys() else ""),
        optional=report_optional_args,
        preference_tables="--preference-tables" if PREFERENCES_SCORED else "",
        perturbation=lambda wc, input: f"--perturbation {input.perturbation}" if input.perturbation else "",
        reference=REPORT["reference_method"],
        claim=REPORT["claim_method"],
        alpha=REPORT["alpha"],
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    group:
        "report"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.report --config-json {params.config} --tables {params.tables} --figures {params.figures}"
        " --reference-method {params.reference} --claim-method {params.claim} --alpha {params.alpha}"
        " --model-provenance {input.model}/provenance.json --probe-metrics {input.probe} --subspace {input.subspace}"
        " --decontamination {input.decontamination} --benchmark-decontamination {input.benchmark_decontamination}"
        " --preferences {input.preferences}"
        " --noise-summaries {input.noise} {params.optional} {params.preference_tables} {params.perturbation}"
        " --markdown {output.markdown} --html {output.html} > {log} 2>&1"
