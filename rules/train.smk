# Training stage: reference log-probs once, then one policy per method x noise rate x seed.


rule reference_logps:
    input:
        model=start_model(),
        pairs=rules.prepare_preferences.output.train,
    output:
        logps="results/data/preferences/reference_logps.jsonl",
    params:
        # only the settings that change the scores, so an lr change does not rerun this
        settings=as_json({k: config["training"][k] for k in TRAINING_KEYS}),
        prompt_format=config["model"]["prompt_format"],
    threads: config["resources"]["reference_logps"]["threads"]
    resources:
        **rule_resources(config, "reference_logps"),
    log:
        "results/logs/reference_logps.log",
    benchmark:
        "results/benchmarks/reference_logps.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.reference_logps --model {input.model} --pairs {input.pairs}"
        " --training-json {params.settings} --prompt-format {params.prompt_format} --threads {threads}"
        " --output {output.logps} > {log} 2>&1"


rule train_policy:
    input:
        model=start_model(),
        pairs=rules.inject_noise.output.pairs,
        reference=rules.reference_logps.output.logps,
        # only methods perturbing the probe subspace (or as many random neurons) read it, so
        # changing it does not retrain DPO or the uniform/full controls
        subspace=lambda wc: rules.select_subspace.output.neurons if reads_subspace(config["presets"][wc.method]) else [],
        # reward-level methods only: the reward model's score of every (clean) training pair
        rewards=lambda wc: rules.train_reward_model.output.rewards if uses_reward(config["presets"][wc.method]) else [],
    output:
        # training.keep_policies false: deleted once every job that reads it has run (results/ stays small)
        policy=(directory if config["training"]["keep_policies"] else lambda p: temp(directory(p)))(
            "results/policies/{method}/noise{noise}/seed{seed}"),
        log="results/policies/{method}/noise{noise}/seed{seed}.train_log.tsv",
        **tensorboard_output(),
    params:
        subspace=lambda wc, input: f"--subspace {input.subspace}" if input.subspace else "",
        rewards=lambda wc, input: f"--rewards {input.rewards}" if input.rewards else "",
        method=lambda wc: as_json(config["presets"][wc.method]),
        settings=as_json({k: v for k, v in config["training"].items() if k != "keep_policies"}),
        prompt_format=config["model"]["prompt_format"],
        launcher=training_launcher(config),
        tensorboard=lambda wc, output: f"--tensorboard {output.tensorboard}" if "tensorboard" in output.keys() else "",
    threads: config["resources"]["train_policy"]["threads"]
    resources:
        **rule_resources(config, "train_policy"),
    log:
        "results/logs/train_policy/{method}_noise{noise}_seed{seed}.log",
    benchmark:
        "results/benchmarks/train_policy/{method}_noise{noise}_seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.launcher} -m workflow.train_policy --model {input.model} --pairs {input.pairs} --reference {input.reference}"
        " {params.subspace} {params.rewards} --method-json {params.method} --training-json {params.settings}"
        " --prompt-format {params.prompt_format} {params.tensorboard}"
        " --seed {wildcards.seed} --threads {threads} --output {output.policy} --train-log {output.log} > {log} 2>&1"
