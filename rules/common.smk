# Config validation, wildcard constraints and path helpers shared by every rule file.
import json
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate


def _validate_config(config):
    """Schema check (defaults filled in); the message names the offending key and the expectation."""
    import jsonschema

    try:
        validate(config, "../workflow/schemas/config.schema.yaml")
    except WorkflowError as e:
        err = e.__cause__ or e.__context__
        if not isinstance(err, jsonschema.ValidationError):
            raise
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        expected = err.schema.get("description", err.validator)
        raise WorkflowError(f"config key {key}: {err.message} (expected: {expected})") from None


def drop_nulls(node):
    """Remove every key whose value is null, at any depth, in place.

    Snakemake deep-merges a --configfile onto config.yaml, so without this a configfile could not
    remove an entry of the default (a benchmark, a data path, a filter); set to null, it is gone.
    """
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if v is None]:
            del node[key]
        for value in node.values():
            drop_nulls(value)
    elif isinstance(node, list):
        for value in node:
            drop_nulls(value)


drop_nulls(config)
_validate_config(config)


def is_workflow_output(path):
    """A data path inside results/ is made by the workflow (e.g. the held-out preference prompts)."""
    return os.path.normpath(path).split(os.sep)[0] == "results"


def _check_config(config):
    """Cross-field checks the schema cannot express; every message names the key."""
    for m in config["methods"]:
        if m not in config["presets"]:
            raise WorkflowError(f"config key methods: unknown method {m!r}; defined presets: {sorted(config['presets'])}")
    for b in config["evaluation"]["benchmarks"]:
        if b not in config["benchmarks"]:
            raise WorkflowError(f"config key evaluation.benchmarks: unknown benchmark {b!r}; defined: {sorted(config['benchmarks'])}")
    if config["evaluation"]["backend"] == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise WorkflowError("config key evaluation.backend: 'vllm' needs the vllm package, which is not installed"
                                " (pip install vllm on a GPU machine), or set evaluation.backend: transformers")
    for j in config["evaluation"]["judges"]:
        if j not in config["judges"]:
            raise WorkflowError(f"config key evaluation.judges: unknown judge {j!r}; defined under judges: {sorted(config['judges'])}")
        if config["judges"][j]["type"] != "refusal_markers" and "model" not in config["judges"][j]:
            raise WorkflowError(f"config key judges.{j}.model: required for a {config['judges'][j]['type']} judge (hub id or local folder)")
    for name, spec in config["benchmarks"].items():
        base = spec.get("jailbreak", {}).get("benchmark")
        if base is not None and (base not in config["benchmarks"] or "jailbreak" in config["benchmarks"][base]):
            raise WorkflowError(f"config key benchmarks.{name}.jailbreak.benchmark: {base!r} is not a benchmark read from a"
                                f" source; defined: {sorted(b for b, s in config['benchmarks'].items() if 'source' in s)}")
    for name, preset in config["presets"].items():
        s = preset.get("sharpness")
        if s and s["gamma_min"] > s["gamma_max"]:
            raise WorkflowError(f"config key presets.{name}.sharpness: gamma_min > gamma_max")
        if "reward_labels" in preset and preset["loss"] != "dpo":
            raise WorkflowError(f"config key presets.{name}.loss: a reward-level preset (reward_labels) needs loss dpo,"
                                f" not {preset['loss']!r} (the soft label replaces the DPO label)")
    if config["reward_model"]["kind"] == "hub" and not config["reward_model"]["name_or_path"]:
        raise WorkflowError("config key reward_model.name_or_path: required with reward_model.kind hub"
                            " (a hub id or a local folder)")
    t = config["training"]
    if t["max_prompt_length"] >= t["max_length"]:
        raise WorkflowError("config key training.max_prompt_length: must be smaller than training.max_length")
    probe_data = config["probe"]["data"]
    needed = ["source"] if probe_data["format"] == "pku-saferlhf" else ["unsafe", "safe"]
    unused = ["source"] if needed != ["source"] else ["unsafe", "safe"]
    for key in needed:
        if key not in probe_data:
            raise WorkflowError(f"config key probe.data.{key}: required with probe.data.format {probe_data['format']}")
    for key in [k for k in unused if k in probe_data]:
        raise WorkflowError(f"config key probe.data.{key}: not used with probe.data.format {probe_data['format']};"
                            " remove it (set it to null in a --configfile)")
    sources = {"preferences.source": config["preferences"]["source"]}
    sources.update({f"probe.data.{key}": probe_data[key] for key in needed})
    sources.update({f"benchmarks.{b}.source": spec["source"] for b, spec in config["benchmarks"].items() if "source" in spec})
    sources.update({f"benchmarks.{b}.jailbreak.templates": spec["jailbreak"]["templates"]
                    for b, spec in config["benchmarks"].items() if "jailbreak" in spec})
    for key, src in sources.items():
        if "path" in src and not is_workflow_output(src["path"]) and not os.path.exists(os.path.expanduser(src["path"])):
            raise WorkflowError(f"config key {key}: path {src['path']!r} does not exist (expected a data file or folder)")
    model = config["model"]["name_or_path"]
    looks_like_path = os.path.isabs(model) or model.startswith((".", "~"))
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise WorkflowError(f"config key model.name_or_path: {model!r} does not exist (expected a model folder)")


_check_config(config)

# A run killed with SIGKILL leaves Snakemake's lock behind; clear it when its owner is dead
# (same host), so rerunning the same command resumes. See workflow/locks.py.
sys.path.insert(0, workflow.basedir)
from workflow.locks import clear_stale_locks, record_owner  # noqa: E402

for _lock in clear_stale_locks(".snakemake"):
    logger.warning(f"removed stale lock {_lock} (its Snakemake process is gone)")


onstart:
    record_owner(".snakemake")


# Jobs run `python -m workflow.<stage>`: the stage package is found through PYTHONPATH (so
# --directory works) and, outside --use-conda, `python` is the interpreter running Snakemake.
_conda = "conda" in str(workflow.deployment_settings.deployment_method).lower()
_path = "" if _conda else f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; "
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}:${{{{PYTHONPATH:-}}}}; {_path}")


def noise_label(rate):
    """Path form of a noise rate: 0.0 -> '0', 0.4 -> '0.4'."""
    return format(float(rate), "g")


NOISES = [noise_label(r) for r in config["noise"]["rates"]]
NOISE_RATE = {noise_label(r): float(r) for r in config["noise"]["rates"]}
SEEDS = [str(s) for s in config["seeds"]]
METHODS = list(config["methods"])
BENCHMARKS = list(config["evaluation"]["benchmarks"])
ALL_BENCHMARKS = list(config["benchmarks"])
JUDGES = list(config["evaluation"]["judges"])  # JUDGES[0] is the primary judge
POLICIES = [f"{m}/noise{n}/seed{s}" for m in METHODS for n in NOISES for s in SEEDS]


def _alternatives(values):
    return "|".join(re.escape(v) for v in values)


wildcard_constraints:
    method=_alternatives(METHODS),
    noise=_alternatives(NOISES),
    seed=_alternatives(SEEDS),
    benchmark=_alternatives(ALL_BENCHMARKS),
    judge=_alternatives(JUDGES),
    model=_alternatives(["base", *POLICIES]),


def reads_subspace(method):
    """Whether a method's sharpness-aware step needs the probe-selected neurons."""
    sharpness = config["presets"][method].get("sharpness")
    return bool(sharpness) and sharpness["subspace"] in ("probe", "random")


def uses_reward(method):
    """Whether a method is reward-level (soft labels from the reward model: preset key reward_labels)."""
    return "reward_labels" in config["presets"][method]


USES_REWARD = any(uses_reward(m) for m in METHODS)  # the reward-model stage is in the DAG only then


def as_json(obj):
    """A config slice as one shell-quoted JSON argument (params with it rerun jobs when it changes)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def model_dir(wildcards):
    """Folder of the model named by the {model} wildcard: the base model or a trained policy."""
    return "results/models/base" if wildcards.model == "base" else f"results/policies/{wildcards.model}"


def start_model():
    """Folder every policy starts from and the DPO reference model: the SFT model when sft.enabled."""
    return "results/models/sft" if config["sft"]["enabled"] else "results/models/base"


def rule_resources(group):
    """mem_mb, runtime and gpu of a rule group (config `resources`); use with `resources: **rule_resources(g)`."""
    r = config["resources"][group]
    gpu = r["gpu"]
    if group == "train_policy":  # a data-parallel policy needs one GPU per process
        gpu = max(gpu, config["training"]["devices"])
    return {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "gpu": gpu}


def training_launcher():
    """``python``, or torchrun with one process per device when ``training.devices`` > 1 (data-parallel
    training; ``--standalone`` picks a free rendezvous port on the node, so parallel jobs do not collide)."""
    devices = config["training"]["devices"]
    return "python" if devices == 1 else f"python -m torch.distributed.run --standalone --nproc_per_node {devices}"


def judge_group(judge):
    """Resource group of a judge: rule-based (type refusal_markers) or a language model (llm_judge)."""
    return "judge" if config["judges"][judge]["type"] == "refusal_markers" else "llm_judge"


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


def judge_threads(wildcards):
    return config["resources"][judge_group(wildcards.judge)]["threads"]


def judge_resources():
    """Per-judge resources of the judge rule: rule-based judges on CPU, LLM judges on a GPU."""
    return {k: (lambda wc, k=k: config["resources"][judge_group(wc.judge)][k]) for k in ("mem_mb", "runtime", "gpu")}


def model_tags(wildcards):
    """method/noise/seed/benchmark/kind of a {model}/{benchmark} pair, copied into the judge summary."""
    tags = {"benchmark": wildcards.benchmark, "kind": config["benchmarks"][wildcards.benchmark]["kind"]}
    if wildcards.model == "base":
        return tags | {"method": "base", "noise": None, "seed": None}
    method, noise, seed = wildcards.model.split("/")
    return tags | {"method": method, "noise": NOISE_RATE[noise[len("noise"):]], "seed": int(seed[len("seed"):])}


def judgements(ext, judges=None):
    """Every judgement file (ext "json": summaries, "jsonl": per-answer labels) of base + policies x benchmarks."""
    return expand("results/judgements/{judge}/{model}/{benchmark}.{ext}", judge=judges or JUDGES,
                  model=["base"] + POLICIES, benchmark=BENCHMARKS, ext=ext)


def exclusion_args(wildcards, input):
    """--exclude NAME=FILE for every benchmark and the held-out preference prompts (probe_data)."""
    names = [*ALL_BENCHMARKS, "preferences_heldout"]
    return " ".join(f"--exclude {n}={shlex.quote(p)}" for n, p in zip(names, input.excluded))


def final_outputs():
    """The report page (it needs every table and figure) and the main table beside it."""
    return [
        "results/report.html",
        "results/report.md",
        "results/tables/harmful_rate.csv",
        "results/tables/harmful_rate.md",
    ]
