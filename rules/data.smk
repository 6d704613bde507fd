# Data stage: base model, preference pairs, noisy copies, benchmark prompts, probe texts.
# Decontamination runs both ways (docs/benchmarks.md): probe_data excludes the benchmarks declared in
# probe.decontaminate_against; sample_benchmark drops from every benchmark the prompts the probe data used.
# So no rule upstream of the probe reads a benchmark that is not declared, and adding one reruns nothing there.
# On a cluster the seconds-long data jobs run where Snakemake runs (which can usually reach the hub), not as
# submissions of their own (docs/cost.md); prepare_model is a job: it downloads and writes the whole model.

localrules:
    prepare_preferences,
    inject_noise,
    prepare_benchmark,
    sample_benchmark,
    probe_data,


rule prepare_model:
    output:
        model=directory("results/models/base"),
    params:
        name_or_path=shlex.quote(config["model"]["name_or_path"]),
        remote_code="--trust-remote-code" if config["model"]["trust_remote_code"] else "",
    threads: config["resources"]["prepare_model"]["threads"]
    resources:
        **rule_resources(config, "prepare_model"),
    log:
        "results/logs/prepare_model.log",
    benchmark:
        "results/benchmarks/prepare_model.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.prepare_model --name-or-path {params.name_or_path} {params.remote_code}"
        " --output {output.model} > {log} 2>&1"


rule prepare_preferences:
    output:
        train="results/data/preferences/train.jsonl",
        heldout="results/data/preferences/heldout.jsonl",
        summary="results/data/preferences/summary.json",
    params:
        source=as_json(config["preferences"]["source"]),
        fmt=config["preferences"]["format"],
        n_train=config["preferences"]["n_train"],
        n_heldout=config["preferences"]["n_heldout"],
        seed=config["preferences"]["seed"],
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **rule_resources(config, "prepare"),
    log:
        "results/logs/prepare_preferences.log",
    benchmark:
        "results/benchmarks/prepare_preferences.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.prepare_preferences --source-json {params.source} --format {params.fmt}"
        " --n-train {params.n_train} --n-heldout {params.n_heldout} --seed {params.seed}"
        " --train {output.train} --heldout {output.heldout} --summary {output.summary} > {log} 2>&1"


rule inject_noise:
    input:
        pairs=rules.prepare_preferences.output.train,
    output:
        pairs="results/data/noisy/noise{noise}/seed{seed}.jsonl",
        summary="results/data/noisy/noise{noise}/seed{seed}.json",
    params:
        rate=lambda wc: NOISE_RATE[wc.noise],
        seed=lambda wc: config["noise"]["seed"] + int(wc.seed),
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **rule_resources(config, "prepare"),
    log:
        "results/logs/inject_noise/noise{noise}_seed{seed}.log",
    benchmark:
        "results/benchmarks/inject_noise/noise{noise}_seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.inject_noise --input {input.pairs} --rate {params.rate} --seed {params.seed}"
        " --output {output.pairs} --summary {output.summary} > {log} 2>&1"


rule prepare_benchmark:
    input:
        unpack(benchmark_inputs),
    output:
        all="results/data/benchmarks/{benchmark}/all.jsonl",
    params:
        # without the sample size: changing it must not rewrite all.jsonl (the probe data may depend on it)
        spec=lambda wc: as_json({k: v for k, v in config["benchmarks"][wc.benchmark].items() if k != "n_prompts"}),
        base=benchmark_base_arg,
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **rule_resources(config, "prepare"),
    log:
        "results/logs/prepare_benchmark/{benchmark}.log",
    benchmark:
        "results/benchmarks/prepare_benchmark/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.prepare_benchmark --name {wildcards.benchmark} --spec-json {params.spec}"
        " {params.base} --all {output.all} > {log} 2>&1"


rule sample_benchmark:
    input:
        all=rules.prepare_benchmark.output.all,
        probe_data="results/probe/data.jsonl",  # read, never written here: its prompts are not evaluated
    output:
        sample="results/data/benchmarks/{benchmark}/sample.jsonl",
        decontamination="results/data/benchmarks/{benchmark}/decontamination.json",
    params:
        n=lambda wc: config["benchmarks"][wc.benchmark].get("n_prompts", config["evaluation"]["n_prompts"]),
        seed=config["evaluation"]["seed"],
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **rule_resources(config, "prepare"),
    log:
        "results/logs/sample_benchmark/{benchmark}.log",
    benchmark:
        "results/benchmarks/sample_benchmark/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.sample_benchmark --name {wildcards.benchmark} --all {input.all}"
        " --probe-data {input.probe_data} --n-sample {params.n} --seed {params.seed}"
        " --sample {output.sample} --decontamination {output.decontamination} > {log} 2>&1"


rule probe_data:
    input:
        excluded=[
            *expand(rules.prepare_benchmark.output.all, benchmark=DECONTAMINATE),
            rules.prepare_preferences.output.heldout,
        ],
    output:
        data="results/probe/data.jsonl",
        report="results/probe/decontamination.tsv",
    params:
        spec=as_json(config["probe"]["data"]),
        exclude=exclusion_args,
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **rule_resources(config, "prepare"),
    log:
        "results/logs/probe_data.log",
    benchmark:
        "results/benchmarks/probe_data.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.probe_data --spec-json {params.spec} {params.exclude}"
        " --output {output.data} --report {output.report} > {log} 2>&1"
