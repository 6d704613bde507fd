"""The workflow config: schema validation with defaults, and the cross-field checks the schema cannot express.

Defaults live only in ``workflow/schemas/config.schema.yaml``. Snakemake validates the whole config at
parse time (``rules/common.smk`` calls ``validate_config``); a stage module run by hand validates the
slice it was given and gets the same defaults::

    from workflow.config import fill_defaults
    spec = fill_defaults(json.loads(a.spec_json), "benchmarks/harmbench")   # or "benchmarks/*"

Every error is a ``ConfigError`` (a ``ValueError``) whose message starts ``config key <key>:``.
Imports only jsonschema and pyyaml (no Snakemake, no torch): the stage environments have both.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
SCHEMA_URI = "urn:shapo-workflow:config"  # the schema's id, so every "#/$defs/..." resolves from any section


class ConfigError(ValueError):
    """A config value the workflow cannot use; the message names the config key."""


@functools.cache
def schema() -> dict:
    # libyaml's loader when PyYAML has it: 0.01 s on this schema against 0.09 s for the pure-Python one, in every job
    with open(SCHEMA_PATH) as f:
        loaded = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return loaded | {"$id": SCHEMA_URI}


def _with_defaults(validator_class):
    """A validator that, before checking an object's properties, sets every absent one that has a default.

    This is Snakemake's ``validate(..., set_default=True)`` (the jsonschema FAQ recipe), which also reaches
    named entries (``additionalProperties``) and ``$ref``s; here the default is copied (the schema's own
    ``{}`` must not be shared by two config sections) and non-objects are left to the type check.
    """
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, subschema):
        if validator.is_type(instance, "object"):
            for key, prop in props.items():
                if "default" in prop and key not in instance:
                    instance[key] = copy.deepcopy(prop["default"])
        yield from check_properties(validator, props, instance, subschema)

    return validators.extend(validator_class, {"properties": properties})


_DefaultFillingValidator = _with_defaults(Draft202012Validator)


@functools.cache
def _section(section: str) -> tuple[str, tuple[str, ...]]:
    """(JSON pointer into the schema, config key parts) of a '/'-separated section.

    A part that is not a property of its parent is a named entry (a benchmark, preset or judge):
    '*' or the entry's own name, which then appears in error messages.
    """
    node, pointer, keys = schema(), "", ()
    for part in [p for p in section.split("/") if p]:
        if "$ref" in node and "properties" not in node:  # e.g. preferences/source -> $defs/source
            pointer = node["$ref"].lstrip("#")
            node = _resolve(pointer)
        if part in node.get("properties", {}) and part != "*":
            pointer, node = f"{pointer}/properties/{part}", node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            pointer, node = f"{pointer}/additionalProperties", node["additionalProperties"]
        else:
            raise ValueError(f"unknown config section {section!r} (no {part!r} in the schema)")
        keys += (part,)
    return pointer, keys


def _resolve(pointer: str) -> dict:
    node = schema()
    for part in [p for p in pointer.split("/") if p]:
        node = node[part]
    return node


@functools.cache
def _validator(pointer: str):
    registry = Registry().with_resource(SCHEMA_URI, Resource.from_contents(schema()))
    # the root itself, not a $ref to it: jsonschema validates a $ref'd schema that names its own $schema
    # dialect with that dialect's plain validator, which would not fill defaults
    return _DefaultFillingValidator(schema() if not pointer else {"$ref": f"{SCHEMA_URI}#{pointer}"}, registry=registry)


def format_error(err, prefix: tuple[str, ...] = ()) -> str:
    """``config key a.b.c: <what is wrong> (expected: <the key's description>)``."""
    key = ".".join(str(p) for p in (*prefix, *err.absolute_path)) or "<top level>"
    expected = err.schema.get("description", err.validator) if isinstance(err.schema, dict) else err.validator
    return f"config key {key}: {err.message} (expected: {expected})"


def _fill(obj: dict, section: str) -> dict:
    """Validate ``obj`` against ``section`` of the schema, setting defaults in place."""
    pointer, keys = _section(section)
    err = best_match(_validator(pointer).iter_errors(obj))
    if err is not None:
        raise ConfigError(format_error(err, keys))
    return obj


def fill_defaults(obj: dict, section: str) -> dict:
    """A validated copy of the config slice ``obj`` with every schema default filled in, recursively.

    ``section`` is the slice's place in the config, '/'-separated; a named entry is '*' or its name:
    "training", "sft", "reward_model", "evaluation", "probe/data", "presets/*", "judges/llama_guard",
    "benchmarks/*", "benchmarks/*/jailbreak"; "" is the whole config. Raises ConfigError (a ValueError)
    naming the key, e.g. ``config key training.batch_size: 'four' is not of type 'integer' (...)``.
    """
    return _fill(copy.deepcopy(obj), section)


def schema_default(key: str):
    """The schema's default of one key ('/'-separated like a section), for a CLI option run by hand."""
    return _resolve(_section(key)[0])["default"]


def drop_nulls(node):
    """Remove every key whose value is null, at any depth, in place (and return ``node``).

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
    return node


def params_json(obj) -> str:
    """``obj`` as JSON (sorted keys) for a rule's params, with every brace inside a string written as a
    ``\\u007b``/``\\u007d`` escape: the same JSON value, but Snakemake reads ``{name}`` in a params string
    as a wildcard (a text template such as probe.data.template holds ``{prompt}``)."""
    def escape(m: re.Match) -> str:
        return m[0].replace("{", "\\u007b").replace("}", "\\u007d")

    return re.sub(r'"(?:[^"\\]|\\.)*"', escape, json.dumps(obj, sort_keys=True))


def is_workflow_output(path: str) -> bool:
    """A data path inside results/ is made by the workflow (e.g. the held-out preference prompts)."""
    return os.path.normpath(path).split(os.sep)[0] == "results"


def validate_config(config: dict) -> dict:
    """The whole config, in place: nulls dropped, schema checked with defaults filled, cross-field checks."""
    drop_nulls(config)
    _fill(config, "")
    check_config(config)
    return config


# ---- cross-field checks: what one key allows depends on another; every message names the key ----

def check_names(config: dict) -> None:
    """Every name a list refers to is defined (methods -> presets, evaluation.* -> benchmarks, judges)."""
    for m in config["methods"]:
        if m not in config["presets"]:
            raise ConfigError(f"config key methods: unknown method {m!r}; defined presets: {sorted(config['presets'])}")
    for b in config["evaluation"]["benchmarks"]:
        if b not in config["benchmarks"]:
            raise ConfigError(f"config key evaluation.benchmarks: unknown benchmark {b!r}; defined: {sorted(config['benchmarks'])}")
    for j in config["evaluation"]["judges"]:
        if j not in config["judges"]:
            raise ConfigError(f"config key evaluation.judges: unknown judge {j!r}; defined under judges: {sorted(config['judges'])}")


def check_backend(config: dict) -> None:
    if config["evaluation"]["backend"] == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("config key evaluation.backend: 'vllm' needs the vllm package, which is not installed"
                          " (pip install vllm on a GPU machine), or set evaluation.backend: transformers")


def check_evaluation(config: dict) -> None:
    e = config["evaluation"]
    if e["samples"] > 1 and not e["do_sample"]:
        raise ConfigError(f"config key evaluation.samples: {e['samples']} samples per prompt need evaluation.do_sample:"
                          " true (greedy answers would all be the same)")


def check_judges(config: dict) -> None:
    for j in config["evaluation"]["judges"]:
        spec = config["judges"][j]
        if spec["type"] != "refusal_markers" and "model" not in spec:
            raise ConfigError(f"config key judges.{j}.model: required for a {spec['type']} judge (hub id or local folder)")
        if not spec["builtin_markers"] and not spec["markers"]:
            raise ConfigError(f"config key judges.{j}.markers: builtin_markers is false, so at least one refusal phrase"
                              " is needed (else no answer could count as a refusal)")


def check_benchmarks(config: dict) -> None:
    """A jailbreak-wrapped benchmark wraps a benchmark read from a source (not another wrapped one)."""
    benchmarks = config["benchmarks"]
    for name, spec in benchmarks.items():
        base = spec.get("jailbreak", {}).get("benchmark")
        if base is not None and (base not in benchmarks or "jailbreak" in benchmarks[base]):
            raise ConfigError(f"config key benchmarks.{name}.jailbreak.benchmark: {base!r} is not a benchmark read from a"
                              f" source; defined: {sorted(b for b, s in benchmarks.items() if 'source' in s)}")


def check_decontamination(config: dict) -> None:
    """probe.decontaminate_against names defined benchmarks (a configfile that removes one lists its own)."""
    for b in config["probe"]["decontaminate_against"]:
        if b not in config["benchmarks"]:
            raise ConfigError(f"config key probe.decontaminate_against: {b!r} is not a defined benchmark (removed with"
                              f" null?); list the benchmarks the probe data must not contain, of {sorted(config['benchmarks'])}")


def check_presets(config: dict) -> None:
    for name, preset in config["presets"].items():
        s = preset.get("sharpness")
        if s and s["gamma_min"] > s["gamma_max"]:
            raise ConfigError(f"config key presets.{name}.sharpness: gamma_min > gamma_max")
        if s and s["perturbation"] == "matched" and s["subspace"] == "probe":
            raise ConfigError(f"config key presets.{name}.sharpness.perturbation: matched copies the length of the"
                              " probe-subspace raw move, so on the probe subspace it is raw; use perturbation: raw, or"
                              " matched with subspace random, uniform or full")
        if "reward_labels" in preset and preset["loss"] != "dpo":
            raise ConfigError(f"config key presets.{name}.loss: a reward-level preset (reward_labels) needs loss dpo,"
                              f" not {preset['loss']!r} (the soft label replaces the DPO label)")
        check_simpo_margin(name, preset)


SIMPO_MARGINS = ("simpo_margin", "simpo_gamma_ratio")


def check_simpo_margin(name: str, preset: dict) -> None:
    """SimPO's γ is given one way: absolute (simpo_margin) or as a ratio of β (simpo_gamma_ratio, the official
    code's parameterisation); other losses take neither, and SimPO is length-normalised by definition."""
    given = [k for k in SIMPO_MARGINS if k in preset]
    if preset["loss"] != "simpo":
        if given:
            raise ConfigError(f"config key presets.{name}.{given[0]}: only loss simpo reads it (this preset's loss is"
                              f" {preset['loss']!r}); remove it (set it to null in a --configfile)")
        return
    if len(given) != 1:
        raise ConfigError(f"config key presets.{name}.simpo_margin: a simpo preset sets exactly one of simpo_margin"
                          f" (absolute γ) and simpo_gamma_ratio (γ = ratio·β); it sets {given or 'neither'}"
                          " (a --configfile that sets one must null the other: simpo_margin: null)")
    if preset["length_normalize"]:
        raise ConfigError(f"config key presets.{name}.length_normalize: SimPO is always length-normalised; remove it")


def check_reward_model(config: dict) -> None:
    kind = config["reward_model"]["kind"]
    if kind in ("hub", "safe_rlhf") and not config["reward_model"]["name_or_path"]:
        raise ConfigError(f"config key reward_model.name_or_path: required with reward_model.kind {kind}"
                          " (a hub id or a local folder)")


def check_training(config: dict) -> None:
    t = config["training"]
    if t["max_prompt_length"] >= t["max_length"]:
        raise ConfigError("config key training.max_prompt_length: must be smaller than training.max_length")
    if t["parallel"] == "fsdp" and "lora" in t:
        raise ConfigError("config key training.lora: not supported with training.parallel fsdp (LoRA is for models"
                          " that fit one GPU: use parallel ddp; fsdp shards full fine-tuning)")
    if t["devices"] % t["nodes"]:
        raise ConfigError(f"config key training.devices: {t['devices']} GPUs cannot be split evenly over"
                          f" training.nodes ({t['nodes']}); use a multiple of nodes")


def probe_sources(probe_data: dict) -> list[str]:
    """The source keys probe.data reads with its format: ``source``, or ``unsafe`` and ``safe``."""
    return ["source"] if probe_data["format"] == "pku-saferlhf" else ["unsafe", "safe"]


def check_probe_data(probe_data: dict) -> None:
    """probe.data has exactly the sources its format reads (also run by workflow.probe_data by hand)."""
    needed = probe_sources(probe_data)
    for key in needed:
        if key not in probe_data:
            raise ConfigError(f"config key probe.data.{key}: required with probe.data.format {probe_data['format']}")
    for key in [k for k in ("source", "unsafe", "safe") if k not in needed and k in probe_data]:
        raise ConfigError(f"config key probe.data.{key}: not used with probe.data.format {probe_data['format']};"
                          " remove it (set it to null in a --configfile)")
    missing = [p for p in ("{prompt}", "{response}") if p not in probe_data["template"]]
    if probe_data["format"] == "pku-saferlhf" and missing:
        raise ConfigError(f"config key probe.data.template: {probe_data['template']!r} has no {' or '.join(missing)}"
                          " (the text of a response is the template with both filled in)")


def check_paths(config: dict) -> None:
    """Every local data path and a model path exist (paths under results/ are made by the workflow)."""
    sources = {"preferences.source": config["preferences"]["source"]}
    sources.update({f"probe.data.{key}": config["probe"]["data"][key] for key in probe_sources(config["probe"]["data"])})
    for b, spec in config["benchmarks"].items():
        if "source" in spec:
            sources[f"benchmarks.{b}.source"] = spec["source"]
        if "jailbreak" in spec:
            sources[f"benchmarks.{b}.jailbreak.templates"] = spec["jailbreak"]["templates"]
    for key, src in sources.items():
        if "path" in src and not is_workflow_output(src["path"]) and not os.path.exists(os.path.expanduser(src["path"])):
            raise ConfigError(f"config key {key}: path {src['path']!r} does not exist (expected a data file or folder)")
    model = config["model"]["name_or_path"]
    looks_like_path = os.path.isabs(model) or model.startswith((".", "~"))
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"config key model.name_or_path: {model!r} does not exist (expected a model folder)")


def check_config(config: dict) -> None:
    """The cross-field checks, on a validated config (defaults filled); the first failing one raises.

    In this order: a name must be defined before its entry is read; the paths last (they touch the disk).
    """
    for check in (check_names, check_backend, check_evaluation, check_judges, check_benchmarks, check_decontamination,
                  check_presets, check_reward_model, check_training):
        check(config)
    check_probe_data(config["probe"]["data"])
    check_paths(config)


# ---- values the rules derive from the validated config (rules/*.smk call these at parse time) ----

def reads_subspace(preset: dict) -> bool:
    """Whether a preset's sharpness-aware step needs the probe-selected neurons: it perturbs them (probe), as many
    random ones (random), or moves as far as the probe-subspace step would (perturbation matched)."""
    s = preset.get("sharpness")
    return bool(s) and (s["subspace"] in ("probe", "random") or s["perturbation"] == "matched")


def sharpness_methods(config: dict) -> list[str]:
    """The methods trained with a sharpness-aware step (the report's "Is the perturbation effective?" section)."""
    return [m for m in config["methods"] if "sharpness" in config["presets"][m]]


def uses_reward(preset: dict) -> bool:
    """Whether a preset is reward-level (soft labels from the reward model: key reward_labels)."""
    return "reward_labels" in preset


def rule_resources(config: dict, group: str) -> dict:
    """mem_mb, runtime and gpu of a group of config ``resources``: a policy needs a GPU per training process
    (``training.devices``), a vLLM generation job one per tensor-parallel rank. A policy spanning nodes
    (``training.nodes`` > 1) asks instead for that many nodes with devices/nodes GPUs each (``gres``, per
    node; mem_mb is per node too) and one task per node, and runs its own ``srun`` (``mpi``: the Slurm
    executor then starts the job's command directly instead of inside a one-task ``srun``)."""
    r = config["resources"][group]
    t, e = config["training"], config["evaluation"]
    base = {"mem_mb": r["mem_mb"], "runtime": r["runtime"]}
    if group == "train_policy" and t["nodes"] > 1:
        # tasks_per_gpu 0: the plugin would otherwise read `tasks` as tasks per GPU
        return base | {"nodes": t["nodes"], "tasks": t["nodes"], "tasks_per_gpu": 0, "mpi": "srun",
                       "gres": f"gpu:{max(r['gpu'], t['devices'] // t['nodes'])}"}
    gpu = r["gpu"]
    if group == "train_policy":
        gpu = max(gpu, t["devices"])
    if group == "generate" and e["backend"] == "vllm":
        gpu = max(gpu, e["tensor_parallel_size"])
    return base | {"gpu": gpu}


def training_launcher(config: dict) -> str:
    """``python``, or torchrun with one process per device when ``training.devices`` > 1 (``--standalone``
    picks a free rendezvous port on the node, so parallel jobs do not collide); across
    ``training.nodes`` > 1, srun starting one torchrun per node (``srun_torchrun``)."""
    t = config["training"]
    if t["nodes"] > 1:
        return srun_torchrun(t["nodes"], 1, t["devices"] // t["nodes"])
    return "python" if t["devices"] == 1 else f"python -m torch.distributed.run --standalone --nproc_per_node {t['devices']}"


def srun_torchrun(nodes: int, tasks_per_node: int, procs_per_task: int) -> str:
    """The command prefix that starts ``nodes`` x ``tasks_per_node`` torchruns of ``procs_per_task`` processes each
    inside the job's Slurm allocation: ``srun`` starts the torchruns (one per node on a cluster:
    ``tasks_per_node`` 1), which meet at a c10d rendezvous on the host running the job script, the
    allocation's first node, on a port derived from the job id (two jobs sharing a node do not collide).
    ``--kill-on-bad-exit`` ends every task when one fails, so a dead node does not leave the others waiting."""
    tasks = nodes * tasks_per_node
    return (": \"${SLURM_JOB_ID:?training.nodes > 1 runs inside a Slurm allocation: use --profile profiles/slurm}\"; "
            f"srun --nodes={nodes} --ntasks={tasks} --ntasks-per-node={tasks_per_node} --kill-on-bad-exit=1"
            f" python -m torch.distributed.run --nnodes {tasks} --nproc_per_node {procs_per_task}"
            " --rdzv_backend c10d --rdzv_endpoint \"$(hostname):$((29400 + SLURM_JOB_ID % 1000))\""
            " --rdzv_id \"$SLURM_JOB_ID\"")


def preference_beta(config: dict, method: str) -> float:
    """β of the held-out preference margin of a model: its method preset's β; for the base model (margin 0
    unless an SFT model is the reference) the β of report.reference_method, else of the first method."""
    if method == "base":
        method = config["report"]["reference_method"]
        method = method if method in config["presets"] else config["methods"][0]
    return float(config["presets"][method]["beta"])


def reward_beta_r_values(config: dict) -> list[float]:
    """β_r values plotted: reward_model.beta_r_plot plus those of the reward-level methods being trained."""
    methods = [config["presets"][m]["reward_labels"]["beta_r"] for m in config["methods"]
               if uses_reward(config["presets"][m])]
    return sorted(set(map(float, config["reward_model"]["beta_r_plot"] + methods)))


def generation_args(config: dict) -> str:
    """Decoding options of workflow.generate from config evaluation (greedy unless do_sample)."""
    e = config["evaluation"]
    args = (f"--backend {e['backend']} --seed {e['seed']} --precision {config['training']['precision']}"
            f" --samples {e['samples']} --stop-json {shlex.quote(json.dumps(e['stop']))}")
    args += f" --tensor-parallel-size {e['tensor_parallel_size']}" if e["backend"] == "vllm" else ""
    return args + (f" --do-sample --temperature {e['temperature']} --top-p {e['top_p']}" if e["do_sample"] else "")
