# Report stage: the harmful-rate table and figure.


rule report:
    input:
        summaries=judgements("json", JUDGES[:1]),
    output:
        csv="results/tables/harmful_rate.csv",
        markdown="results/tables/harmful_rate.md",
        figure="results/figures/harmful_rate_vs_noise.png",
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.report --summaries {input.summaries} --csv {output.csv}"
        " --markdown {output.markdown} --figure {output.figure} > {log} 2>&1"
