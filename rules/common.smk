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


_validate_config(config)


def _check_config(config):
    """Cross-field checks the schema cannot express; every message names the key."""
    for m in config["methods"]:
        if m not in config["presets"]:
            raise WorkflowError(f"config key methods: unknown method {m!r}; defined presets: {sorted(config['presets'])}")
    for b in config["evaluation"]["benchmarks"]:
        if b not in config["benchmarks"]:
            raise WorkflowError(f"config key evaluation.benchmarks: unknown benchmark {b!r}; defined: {sorted(config['benchmarks'])}")
    for name, preset in config["presets"].items():
        s = preset.get("sharpness")
        if s and s["gamma_min"] > s["gamma_max"]:
            raise WorkflowError(f"config key presets.{name}.sharpness: gamma_min > gamma_max")
    t = config["training"]
    if t["max_prompt_length"] >= t["max_length"]:
        raise WorkflowError("config key training.max_prompt_length: must be smaller than training.max_length")
    sources = {"preferences.source": config["preferences"]["source"],
               "probe.data.unsafe": config["probe"]["data"]["unsafe"],
               "probe.data.safe": config["probe"]["data"]["safe"]}
    sources.update({f"benchmarks.{b}.source": spec["source"] for b, spec in config["benchmarks"].items()})
    for key, src in sources.items():
        if "path" in src and not os.path.exists(os.path.expanduser(src["path"])):
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


def as_json(obj):
    """A config slice as one shell-quoted JSON argument (params with it rerun jobs when it changes)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def model_dir(wildcards):
    """Folder of the model named by the {model} wildcard: the base model or a trained policy."""
    return "results/models/base" if wildcards.model == "base" else f"results/policies/{wildcards.model}"


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
    return [
        "results/tables/harmful_rate.csv",
        "results/tables/harmful_rate.md",
        "results/figures/harmful_rate_vs_noise.png",
    ]
