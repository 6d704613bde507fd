# Optional SFT stage (sft.enabled): fine-tune the base model on the chosen answers of the clean
# training pairs; start_model() (rules/common.smk) then points policies and the reference here.


rule sft:
    input:
        model=rules.prepare_model.output.model,
        pairs=rules.prepare_preferences.output.train,
    output:
        model=directory("results/models/sft"),
        log="results/models/sft.train_log.tsv",
    params:
        sft=as_json({k: v for k, v in config["sft"].items() if k != "enabled"}),
        training=as_json(
            {k: config["training"][k] for k in ("max_length", "max_prompt_length", "max_grad_norm", "precision")}
        ),
        prompt_format=config["model"]["prompt_format"],
    threads: config["resources"]["sft"]["threads"]
    resources:
        **rule_resources(config, "sft"),
    log:
        "results/logs/sft.log",
    benchmark:
        "results/benchmarks/sft.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.sft --model {input.model} --pairs {input.pairs} --sft-json {params.sft}"
        " --training-json {params.training} --prompt-format {params.prompt_format} --threads {threads}"
        " --output {output.model} --log {output.log} > {log} 2>&1"
