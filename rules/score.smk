# Held-out preference scoring (forward passes only): the start model's log-probs of the clean held-out
# pairs once, then every model's implicit reward margin on them (workflow/score_preferences.py).


use rule reference_logps as reference_logps_heldout with:
    input:
        model=start_model(),
        pairs=rules.prepare_preferences.output.heldout,
    output:
        logps="results/data/preferences/heldout_reference_logps.jsonl",
    log:
        "results/logs/reference_logps_heldout.log",
    benchmark:
        "results/benchmarks/reference_logps_heldout.tsv"


rule score_preferences:
    input:
        # the model to score; none when it is the reference itself (the base model without an SFT stage)
        unpack(lambda wc: {} if model_dir(wc) == start_model() else {"model": model_dir(wc)}),
        pairs=rules.prepare_preferences.output.heldout,
        reference=rules.reference_logps_heldout.output.logps,
    output:
        scores="results/preference_scores/{model}.jsonl",
        summary="results/preference_scores/{model}.json",
    params:
        model=lambda wc, input: f"--model {input.model}" if "model" in input.keys() else "",
        beta=lambda wc: preference_beta(config, model_labels(wc)["method"]),
        tags=lambda wc: as_json(model_labels(wc)),
        settings=as_json({k: config["training"][k] for k in TRAINING_KEYS}),
        prompt_format=config["model"]["prompt_format"],
    threads: config["resources"]["reference_logps"]["threads"]
    resources:
        **rule_resources(config, "reference_logps"),
    log:
        "results/logs/score_preferences/{model}.log",
    benchmark:
        "results/benchmarks/score_preferences/{model}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.score_preferences --pairs {input.pairs} --reference {input.reference} {params.model}"
        " --beta {params.beta} --training-json {params.settings} --prompt-format {params.prompt_format}"
        " --tags-json {params.tags} --threads {threads} --output {output.scores} --summary {output.summary} > {log} 2>&1"
