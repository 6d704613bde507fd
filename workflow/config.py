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
    with open(SCHEMA_PATH) as f:
        loaded = yaml.safe_load(f)
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


def check_presets(config: dict) -> None:
    for name, preset in config["presets"].items():
        s = preset.get("sharpness")
        if s and s["gamma_min"] > s["gamma_max"]:
            raise ConfigError(f"config key presets.{name}.sharpness: gamma_min > gamma_max")
        if "reward_labels" in preset and preset["loss"] != "dpo":
            raise ConfigError(f"config key presets.{name}.loss: a reward-level preset (reward_labels) needs loss dpo,"
                              f" not {preset['loss']!r} (the soft label replaces the DPO label)")


def check_reward_model(config: dict) -> None:
    if config["reward_model"]["kind"] == "hub" and not config["reward_model"]["name_or_path"]:
        raise ConfigError("config key reward_model.name_or_path: required with reward_model.kind hub"
                          " (a hub id or a local folder)")


def check_training(config: dict) -> None:
    t = config["training"]
    if t["max_prompt_length"] >= t["max_length"]:
        raise ConfigError("config key training.max_prompt_length: must be smaller than training.max_length")


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
    for check in (check_names, check_backend, check_evaluation, check_judges, check_benchmarks, check_presets, check_reward_model,
                  check_training):
        check(config)
    check_probe_data(config["probe"]["data"])
    check_paths(config)


# ---- values the rules derive from the validated config (rules/*.smk call these at parse time) ----

def reads_subspace(preset: dict) -> bool:
    """Whether a preset's sharpness-aware step needs the probe-selected neurons (probe, or as many random ones)."""
    return "sharpness" in preset and preset["sharpness"]["subspace"] in ("probe", "random")


def uses_reward(preset: dict) -> bool:
    """Whether a preset is reward-level (soft labels from the reward model: key reward_labels)."""
    return "reward_labels" in preset


def rule_resources(config: dict, group: str) -> dict:
    """mem_mb, runtime and gpu of a group of config ``resources``; a data-parallel policy needs a GPU per process."""
    r = config["resources"][group]
    gpu = max(r["gpu"], config["training"]["devices"]) if group == "train_policy" else r["gpu"]
    return {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "gpu": gpu}


def training_launcher(config: dict) -> str:
    """``python``, or torchrun with one process per device when ``training.devices`` > 1 (data-parallel
    training; ``--standalone`` picks a free rendezvous port on the node, so parallel jobs do not collide)."""
    devices = config["training"]["devices"]
    return "python" if devices == 1 else f"python -m torch.distributed.run --standalone --nproc_per_node {devices}"


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
    return args + (f" --do-sample --temperature {e['temperature']} --top-p {e['top_p']}" if e["do_sample"] else "")
