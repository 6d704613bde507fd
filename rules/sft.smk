# Optional SFT stage (sft.enabled): fine-tune the base model on the chosen answers of the clean
# training pairs; start_model() (rules/common.smk) then points policies and the reference here.
# SFT trains like a policy: on training.devices processes (torchrun) under training.parallel (ddp or fsdp),
# with the policy's checkpoints (results/models/sft.checkpoint, kept when the job is killed, resumed by a rerun).

# the training settings SFT reads: sequence lengths, clipping, precision, and the engine and its checkpoints
SFT_TRAINING_KEYS = ("max_length", "max_prompt_length", "max_grad_norm", "precision", "parallel", "devices", "nodes",
                     "checkpoint_every")


rule sft:
    input:
        model=rules.prepare_model.output.model,
        pairs=rules.prepare_preferences.output.train,
    output:
        model=directory("results/models/sft"),
        log="results/models/sft.train_log.tsv",
    params:
        sft=as_json({k: v for k, v in config["sft"].items() if k != "enabled"}),
        training=as_json({k: config["training"][k] for k in SFT_TRAINING_KEYS}),
        prompt_format=config["model"]["prompt_format"],
        launcher=training_launcher(config),
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
        "{params.launcher} -m workflow.sft --model {input.model} --pairs {input.pairs} --sft-json {params.sft}"
        " --training-json {params.training} --prompt-format {params.prompt_format} --threads {threads}"
        " --output {output.model} --train-log {output.log} > {log} 2>&1"
