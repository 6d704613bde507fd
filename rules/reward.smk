# Reward stage (only in the DAG when a reward-level preset is in methods): score every training pair
# with a reward model, and plot the reward differences and the soft labels they give.

REWARD = config["reward_model"]


rule convert_score_model:
    # kind safe_rlhf: a safe-rlhf score model (score_head) -> a transformers sequence-classification folder
    output:
        model=directory("results/models/score_model"),
    params:
        source=REWARD["name_or_path"],
    threads: config["resources"]["prepare_model"]["threads"]
    resources:
        **rule_resources(config, "prepare_model"),
    log:
        "results/logs/convert_score_model.log",
    benchmark:
        "results/benchmarks/convert_score_model.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.convert_score_model --input {params.source} --output {output.model} > {log} 2>&1"


rule train_reward_model:
    input:
        # bt_head reads frozen features of the base model; a hub model needs nothing from the DAG; a safe-rlhf
        # score model is converted first
        model=rules.prepare_model.output.model if REWARD["kind"] == "bt_head" else [],
        classifier=rules.convert_score_model.output.model if REWARD["kind"] == "safe_rlhf" else [],
        train=rules.prepare_preferences.output.train,
        heldout=rules.prepare_preferences.output.heldout,
    output:
        rewards="results/reward/pair_rewards.jsonl",
        metrics="results/reward/metrics.json",
    params:
        model=lambda wc, input: f"--model {input.model}" if input.model else "",
        classifier=lambda wc, input: f"--classifier {input.classifier}" if input.classifier else "",
        # a function, so that a prompt_format template's {prompt} and {answer} are not read as wildcards
        spec=lambda wc: as_json({k: v for k, v in REWARD.items() if k != "beta_r_plot"}),
        settings=as_json({k: config["training"][k] for k in ("max_length", "max_prompt_length", "precision")}),
        prompt_format=config["model"]["prompt_format"],
    threads: config["resources"]["train_reward_model"]["threads"]
    resources:
        **rule_resources(config, "train_reward_model"),
    log:
        "results/logs/train_reward_model.log",
    benchmark:
        "results/benchmarks/train_reward_model.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.reward_model {params.model} {params.classifier} --train {input.train} --heldout {input.heldout}"
        " --reward-json {params.spec} --training-json {params.settings} --prompt-format {params.prompt_format}"
        " --threads {threads}"
        " --rewards {output.rewards} --metrics {output.metrics} > {log} 2>&1"


rule plot_soft_labels:
    input:
        rewards=rules.train_reward_model.output.rewards,
        # the noisiest set of the first seed marks which pairs noise flips
        noisy=expand(rules.inject_noise.output.pairs, noise=max(NOISES, key=float), seed=SEEDS[0]),
    output:
        figure="results/figures/reward_soft_labels.png",
        figure_pdf="results/figures/reward_soft_labels.pdf",
        table="results/reward/soft_labels.tsv",
    params:
        betas=" ".join(format(b, "g") for b in reward_beta_r_values(config)),
    threads: config["resources"]["report"]["threads"]
    resources:
        **rule_resources(config, "report"),
    log:
        "results/logs/plot_soft_labels.log",
    benchmark:
        "results/benchmarks/plot_soft_labels.tsv"
    group:
        "report"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m workflow.plot_soft_labels --rewards {input.rewards} --noisy {input.noisy} --beta-r {params.betas}"
        " --figure {output.figure} --figure-pdf {output.figure_pdf} --table {output.table} > {log} 2>&1"
