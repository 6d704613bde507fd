# Evaluation stage: every model (base + policies) answers every benchmark sample; answers are judged.


rule generate:
    input:
        model=model_dir,
        prompts=rules.prepare_benchmark.output.sample,
    output:
        answers="results/generations/{model}/{benchmark}.jsonl",
    params:
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        batch_size=config["evaluation"]["batch_size"],
        prompt_format=config["model"]["prompt_format"],
    threads: 2
    resources:
        mem_mb=4000,
    log:
        "results/logs/generate/{model}/{benchmark}.log",
    benchmark:
        "results/benchmarks/generate/{model}/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.generate --model {input.model} --prompts {input.prompts}"
        " --max-new-tokens {params.max_new_tokens} --batch-size {params.batch_size}"
        " --prompt-format {params.prompt_format} --threads {threads} --output {output.answers} > {log} 2>&1"


rule judge:
    input:
        answers=rules.generate.output.answers,
    output:
        labels="results/judgements/{judge}/{model}/{benchmark}.jsonl",
        summary="results/judgements/{judge}/{model}/{benchmark}.json",
    params:
        tags=lambda wc: as_json(model_tags(wc)),
    log:
        "results/logs/judge/{judge}/{model}/{benchmark}.log",
    benchmark:
        "results/benchmarks/judge/{judge}/{model}/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.judge --judge {wildcards.judge} --answers {input.answers} --tags-json {params.tags}"
        " --labels {output.labels} --summary {output.summary} > {log} 2>&1"
