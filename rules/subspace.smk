# Subspace stage: probe on a frozen model, then the neurons ShaPO perturbs. On a cluster both jobs are one
# submission (group probe): the subspace selection only loads the model again (docs/cost.md).

# probe.model: base = the frozen base model (official), start = the model policies start from (SFT when on).
PROBE_MODEL = "results/models/base" if config["probe"]["model"] == "base" else start_model()


rule train_probe:
    input:
        model=PROBE_MODEL,
        data=rules.probe_data.output.data,
        # re-check against the declared benchmarks only: a benchmark added later must not rerun the probe
        # (sample_benchmark keeps the probe's prompts out of every benchmark's sample)
        benchmarks=expand(rules.prepare_benchmark.output.all, benchmark=DECONTAMINATE),
    output:
        direction="results/probe/direction.safetensors",
        metrics="results/probe/metrics.json",
    params:
        spec=as_json({k: v for k, v in config["probe"].items() if k != "data"}),
        benchmarks=lambda wc, input: " ".join(
            f"--benchmark {b}={shlex.quote(p)}" for b, p in zip(DECONTAMINATE, input.benchmarks)
        ),
    threads: config["resources"]["probe"]["threads"]
    resources:
        **rule_resources(config, "probe"),
    log:
        "results/logs/train_probe.log",
    benchmark:
        "results/benchmarks/train_probe.tsv"
    group:
        "probe"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.train_probe --model {input.model} --data {input.data} {params.benchmarks}"
        " --spec-json {params.spec} --threads {threads}"
        " --direction {output.direction} --metrics {output.metrics} > {log} 2>&1"


rule select_subspace:
    input:
        model=PROBE_MODEL,
        direction=rules.train_probe.output.direction,
    output:
        neurons="results/subspace/neurons.safetensors",
        summary="results/subspace/summary.tsv",
    params:
        percent=config["subspace"]["percent"],
        rank=config["subspace"]["rank"],
    threads: config["resources"]["probe"]["threads"]
    resources:
        **rule_resources(config, "probe"),
    log:
        "results/logs/select_subspace.log",
    benchmark:
        "results/benchmarks/select_subspace.tsv"
    group:
        "probe"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.select_subspace --model {input.model} --direction {input.direction}"
        " --percent {params.percent} --rank {params.rank}"
        " --neurons {output.neurons} --summary {output.summary} > {log} 2>&1"
