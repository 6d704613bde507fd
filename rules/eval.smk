# Evaluation stage: every model (base + policies) answers every benchmark sample; answers are judged
# by every judge of evaluation.judges; with two judges or more their agreement is tabulated.
# Job shape (docs/cost.md): on a cluster a generation job and its rule-based judgements are one submission
# (group eval); an LLM judge on vLLM judges every noise rate of one method, seed and benchmark with one model
# load (rule llm_judge); every other judgement is one job per answers file.


rule generate:
    input:
        model=model_dir,
        prompts=rules.sample_benchmark.output.sample,
    output:
        answers="results/generations/{model}/{benchmark}.jsonl",
    params:
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        batch_size=config["evaluation"]["batch_size"],
        prompt_format=config["model"]["prompt_format"],
        decoding=generation_args(config),
    threads: config["resources"]["generate"]["threads"]
    resources:
        **rule_resources(config, "generate"),
    log:
        "results/logs/generate/{model}/{benchmark}.log",
    benchmark:
        "results/benchmarks/generate/{model}/{benchmark}.tsv"
    group:
        "eval"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.generate --model {input.model} --prompts {input.prompts}"
        " --max-new-tokens {params.max_new_tokens} --batch-size {params.batch_size}"
        " --prompt-format {params.prompt_format} {params.decoding} --threads {threads}"
        " --output {output.answers} > {log} 2>&1"


rule judge:
    input:
        answers=rules.generate.output.answers,
    output:
        labels="results/judgements/{judge}/{model}/{benchmark}.jsonl",
        summary="results/judgements/{judge}/{model}/{benchmark}.json",
    params:
        tags=lambda wc: as_json(model_tags(wc)),
        spec=lambda wc: as_json(judge_spec(config, wc.judge)),
    threads: judge_threads
    resources:
        **judge_resources(),
    log:
        "results/logs/judge/{judge}/{model}/{benchmark}.log",
    benchmark:
        "results/benchmarks/judge/{judge}/{model}/{benchmark}.tsv"
    group:
        eval_group
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.judge --judge {wildcards.judge} --judge-spec-json {params.spec}"
        " --answers {input.answers} --tags-json {params.tags}"
        " --labels {output.labels} --summary {output.summary} > {log} 2>&1"


rule llm_judge:
    # one model load for the answers of every noise rate (a vLLM job spends a third of its time starting and
    # loading when it judges one file; docs/cost.md). Adding a noise rate reruns these jobs; adding a method,
    # a seed, a benchmark or a judge only adds jobs.
    input:
        answers=noise_rate_answers,
    output:
        labels=expand("results/judgements/{{judge}}/{{method}}/noise{noise}/seed{{seed}}/{{benchmark}}.jsonl", noise=NOISES),
        summaries=expand("results/judgements/{{judge}}/{{method}}/noise{noise}/seed{{seed}}/{{benchmark}}.json", noise=NOISES),
    wildcard_constraints:
        judge="|".join(map(re.escape, BATCHED_JUDGES)) or "(?!)",
    params:
        tags=noise_rate_tags,
        spec=lambda wc: as_json(judge_spec(config, wc.judge)),
    threads: judge_threads
    resources:
        **judge_resources(files=len(NOISES)),
    log:
        "results/logs/llm_judge/{judge}/{method}/seed{seed}/{benchmark}.log",
    benchmark:
        "results/benchmarks/llm_judge/{judge}/{method}/seed{seed}/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.judge --judge {wildcards.judge} --judge-spec-json {params.spec}"
        " --answers {input.answers} --tags-json {params.tags}"
        " --labels {output.labels} --summary {output.summaries} > {log} 2>&1"


# a vLLM judge's policy answers could be judged by either rule: by llm_judge (the base model's only by judge)
ruleorder: llm_judge > judge


rule judge_agreement:
    input:
        labels=judgements("jsonl"),
        summaries=judgements("json"),  # their tags name the model of each label file
    output:
        table="results/tables/judge_agreement.csv",
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/judge_agreement.log",
    benchmark:
        "results/benchmarks/judge_agreement.tsv"
    group:
        "report"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.judge_agreement --labels {input.labels} --output {output.table} > {log} 2>&1"
