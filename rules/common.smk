# Config validation (workflow/lib/config.py), wildcard constraints and the input functions of the rule files.
import os
import re
import shlex
import sys
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

sys.path.insert(0, workflow.basedir)
from workflow.lib.captions import figure_captions, table_captions  # noqa: E402
from workflow.lib.config import ConfigError, is_workflow_output, validate_config  # noqa: E402
from workflow.lib.jobs import generation_args, judge_backend, judge_spec, params_json, rule_resources, training_launcher  # noqa: E402
from workflow.lib.presets import preference_beta, reads_subspace, reward_beta_r_values, sharpness_methods, uses_reward  # noqa: E402
from workflow.lib.locks import clear_stale_locks, record_owner  # noqa: E402

# Nulls dropped, schema checked with its defaults filled in (named entries too), cross-field checks;
# a bad config stops here, before any job, with a message naming the key.
try:
    validate_config(config)
except ConfigError as e:
    raise WorkflowError(str(e)) from None

# A run killed with SIGKILL leaves Snakemake's lock behind; clear it when its owner is dead
# (same host), so rerunning the same command resumes. See workflow/lib/locks.py.
for _lock in clear_stale_locks(".snakemake"):
    logger.warning(f"removed stale lock {_lock} (its Snakemake process is gone)")


onstart:
    record_owner(".snakemake")


# Jobs run `python -m workflow.<stage>`: the stage package is found through PYTHONPATH (so
# --directory works) and, outside --use-conda, `python` is the interpreter running Snakemake.
_conda = "conda" in str(workflow.deployment_settings.deployment_method).lower()
_path = "" if _conda else f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; "
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}:${{{{PYTHONPATH:-}}}}; {_path}")

NOISE_RATE = {format(float(r), "g"): float(r) for r in config["noise"]["rates"]}  # path form: 0.0 -> '0'
NOISES = list(NOISE_RATE)
SEEDS = [str(s) for s in config["seeds"]]
METHODS = list(config["methods"])
BENCHMARKS = list(config["evaluation"]["benchmarks"])
ALL_BENCHMARKS = list(config["benchmarks"])
JUDGES = list(config["evaluation"]["judges"])  # JUDGES[0] is the primary judge
POLICIES = [f"{m}/noise{n}/seed{s}" for m in METHODS for n in NOISES for s in SEEDS]
USES_REWARD = any(uses_reward(config["presets"][m]) for m in METHODS)  # the reward stage is in the DAG only then
DECONTAMINATE = list(config["probe"]["decontaminate_against"])  # benchmarks the probe data must not contain
PREFERENCES_SCORED = config["preferences"]["n_heldout"] > 0  # no held-out pairs: no scoring stage, no table
# the training settings that change log-probs: reference_logps, reference_logps_heldout and score_preferences pass
# only these, so an lr change reruns none of them
TRAINING_KEYS = ("max_length", "max_prompt_length", "batch_size", "precision")


wildcard_constraints:
    method="|".join(map(re.escape, METHODS)),
    noise="|".join(map(re.escape, NOISES)),
    seed="|".join(map(re.escape, SEEDS)),
    benchmark="|".join(map(re.escape, ALL_BENCHMARKS)),
    judge="|".join(map(re.escape, JUDGES)),
    model="|".join(map(re.escape, ["base", *POLICIES])),


def as_json(obj):
    """A config slice as one shell-quoted JSON argument (params with it rerun jobs when it changes)."""
    return shlex.quote(params_json(obj))


def model_dir(wildcards):
    """Folder of the model named by the {model} wildcard: the base model or a trained policy."""
    return "results/models/base" if wildcards.model == "base" else f"results/policies/{wildcards.model}"


def start_model():
    """Folder every policy starts from and the DPO reference model: the SFT model when sft.enabled."""
    return "results/models/sft" if config["sft"]["enabled"] else "results/models/base"


def tensorboard_output():
    """train_policy's TensorBoard folder, an output only with training.report_to: tensorboard."""
    on = config["training"]["report_to"] == "tensorboard"
    return {"tensorboard": directory("results/policies/{method}/noise{noise}/seed{seed}.tensorboard")} if on else {}


def benchmark_inputs(wildcards):
    """Workflow files a benchmark is built from: the base benchmark of a jailbreak-wrapped set, or a
    source under results/ (e.g. the held-out preference prompts); nothing for external data."""
    spec = config["benchmarks"][wildcards.benchmark]
    if "jailbreak" in spec:
        return {"base": f"results/data/benchmarks/{spec['jailbreak']['benchmark']}/all.jsonl"}
    path = spec["source"].get("path")
    return {"source": path} if path and is_workflow_output(path) else {}


def benchmark_base_arg(wildcards, input):
    return f"--base-prompts {shlex.quote(input.base)}" if "base" in input.keys() else ""


def exclusion_args(wildcards, input):
    """--exclude NAME=FILE for each benchmark of probe.decontaminate_against and the held-out preference prompts."""
    names = [*DECONTAMINATE, "preferences_heldout"]
    return " ".join(f"--exclude {n}={shlex.quote(p)}" for n, p in zip(names, input.excluded))


def judge_group(judge):
    """Resource group of a judge: rule-based (type refusal_markers) or a language model (llm_judge)."""
    return "judge" if config["judges"][judge]["type"] == "refusal_markers" else "llm_judge"


def judge_threads(wildcards):
    return config["resources"][judge_group(wildcards.judge)]["threads"]


def judge_resources(files=1):
    """Per-judge resources of a judge rule: rule-based judges on CPU, LLM judges on a GPU; a job judging
    ``files`` answers files (llm_judge) gets the runtime limit once per file."""
    def value(wc, k):
        v = config["resources"][judge_group(wc.judge)][k]
        return v * files if k == "runtime" else v
    return {k: (lambda wc, k=k: value(wc, k)) for k in ("mem_mb", "runtime", "gpu")}


# LLM judges on vLLM: their policies' answers are judged by rule llm_judge, several files per job
BATCHED_JUDGES = [j for j in JUDGES if judge_backend(config, j) == "vllm"]


def eval_group(wildcards):
    """Cluster group of a judge job: a rule-based judgement goes with the generation job it reads (seconds of
    CPU inside that allocation instead of a submission of its own); an LLM judgement is a job of its own."""
    return "eval" if config["judges"][wildcards.judge]["type"] == "refusal_markers" else None


def noise_rate_answers(wildcards):
    """The answers files of every noise rate of one method, seed and benchmark (one llm_judge job)."""
    return expand("results/generations/{method}/noise{noise}/seed{seed}/{benchmark}.jsonl", noise=NOISES, **wildcards)


def noise_rate_tags(wildcards):
    """The summary tags of each of those files, one shell-quoted JSON argument per noise rate."""
    files = [SimpleNamespace(model=f"{wildcards.method}/noise{n}/seed{wildcards.seed}", benchmark=wildcards.benchmark)
             for n in NOISES]
    return " ".join(as_json(model_tags(f)) for f in files)


def model_labels(wildcards):
    """method, noise rate and seed of the {model} wildcard (the base model: method base, no noise, no seed)."""
    if wildcards.model == "base":
        return {"method": "base", "noise": None, "seed": None}
    method, noise, seed = wildcards.model.split("/")
    return {"method": method, "noise": NOISE_RATE[noise[len("noise"):]], "seed": int(seed[len("seed"):])}


def model_tags(wildcards):
    """model_labels plus benchmark and kind of a {model}/{benchmark} pair, copied into the judge summary."""
    return model_labels(wildcards) | {"benchmark": wildcards.benchmark, "kind": config["benchmarks"][wildcards.benchmark]["kind"]}


def judgements(ext, judges=None):
    """Every judgement file (ext "json": summaries, "jsonl": per-answer labels) of base + policies x benchmarks."""
    return expand("results/judgements/{judge}/{model}/{benchmark}.{ext}", judge=judges or JUDGES,
                  model=["base"] + POLICIES, benchmark=BENCHMARKS, ext=ext)


def report_optional_inputs():
    """Inputs present only in some runs: judge agreement (2+ judges), the reward-level stage."""
    extra = {"judge_agreement": "results/tables/judge_agreement.csv"} if len(JUDGES) >= 2 else {}
    if USES_REWARD:
        extra |= {"reward_metrics": "results/reward/metrics.json", "reward_figure": "results/figures/reward_soft_labels.png"}
    return extra


def report_optional_args(wildcards, input):
    return " ".join(f"--{k.replace('_', '-')} {input[k]}" for k in ("judge_agreement", "reward_metrics") if k in input.keys())


# `snakemake --report report.zip`: the report rules flag their tables and figures with in_report(), each with its
# caption. The texts come from workflow/lib/captions.py (as on the report page, at the configured CI level and α);
# rules/captions/<name>.rst prints the rule's params.captions[<name>] (captions_of gives that param).
CAPTIONS = figure_captions(config["report"]["ci_level"], config["report"]["inert_effective_fraction"],
                           config["report"]["inert_cosine_gap"]) | table_captions(config["report"]["ci_level"],
                                                                                  config["report"]["alpha"])


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def in_report(path, category):
    """``path`` flagged for Snakemake's report, captioned by rules/captions/<its name>.rst (when it has a caption)."""
    return report(path, caption=f"captions/{_stem(path)}.rst", category=category) if _stem(path) in CAPTIONS else path


def captions_of(paths):
    """The captions of the flagged ``paths``: the param their caption files print."""
    return {_stem(p): CAPTIONS[_stem(p)] for p in paths if _stem(p) in CAPTIONS}


def final_outputs():
    """The report page (it needs every table and figure) and the main table beside it."""
    return ["results/report.html", "results/report.md", "results/tables/harmful_rate.csv", "results/tables/harmful_rate.md"]
