"""The workflow config: the schema with its defaults, validation, and the messages that name a key.

Defaults live only in ``workflow/schemas/config.schema.yaml``. Snakemake validates the whole config at
parse time (``rules/common.smk`` calls ``validate_config``: schema, then the cross-field checks of
``workflow.lib.checks``); a stage module run by hand validates the slice it was given and gets the same
defaults::

    from workflow.lib.config import fill_defaults
    spec = fill_defaults(json.loads(a.spec_json), "benchmarks/harmbench")   # or "benchmarks/*"

Every error is a ``ConfigError`` (a ``ValueError``) whose message starts ``config key <key>:``.
Imports only jsonschema and pyyaml (no Snakemake, no torch): the stage environments have both.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
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


# a number as a user types it: 1, -2, 0.2, .5, 5e-5, 1.0e+3
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _deref(node: dict) -> dict:
    """The definition a ``$ref`` node points to (its siblings in this schema are only description and default)."""
    while "$ref" in node:
        node = _resolve(node["$ref"].lstrip("#"))
    return node


def _parsed(text: str, node: dict):
    """``text`` as the number or boolean the schema ``node`` wants; null (``null``, ``~``) where the schema
    takes no text, since a null removes a key (``drop_nulls``); else ``text`` itself, for validation to name."""
    node = _deref(node)
    kind = node.get("type", ())
    kinds = {kind} if isinstance(kind, str) else set(kind)
    if "enum" in node:
        if text in node["enum"]:
            return text
        kinds |= {_JSON_TYPES.get(type(v), "null") for v in node["enum"]}
    if "string" in kinds:
        return text
    word = text.strip()
    if word.lower() in ("null", "~"):
        return None
    if "boolean" in kinds and word.lower() in ("true", "false"):
        return word.lower() == "true"
    if kinds & {"integer", "number"} and _NUMBER.fullmatch(word):
        value = float(word) if any(c in word for c in ".eE") else int(word)
        return int(value) if "number" not in kinds and float(value).is_integer() else value
    return text


def coerce_text(instance, node: dict | None = None):
    """Numbers, booleans and nulls given as text where the schema wants them, turned into what they say, in place
    (and returned).

    Snakemake's ``--config`` reads a top-level value with int/float/bool parsers but everything inside a list
    or a mapping with YAML's BaseLoader, which keeps every scalar a string: ``--config 'seeds=[0,1]'`` gives
    ``['0', '1']`` and ``'noise={rates: [0.0, 0.2]}'`` gives ``{'rates': ['0.0', '0.2']}``. A string stays a
    string wherever the schema accepts one (a benchmark's filter value, a name), and text that is not a
    number is left for validation to name.
    """
    node = _deref(schema() if node is None else node)
    if isinstance(instance, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                continue
            instance[key] = _parsed(value, sub) if isinstance(value, str) else coerce_text(value, sub)
    elif isinstance(instance, list) and isinstance(node.get("items"), dict):
        for i, value in enumerate(instance):
            instance[i] = _parsed(value, node["items"]) if isinstance(value, str) else coerce_text(value, node["items"])
    return instance


def is_workflow_output(path: str) -> bool:
    """A data path inside results/ is made by the workflow (e.g. the held-out preference prompts)."""
    return os.path.normpath(path).split(os.sep)[0] == "results"



def validate_config(config: dict) -> dict:
    """The whole config, in place: text that the schema wants as a number, boolean or null converted
    (``coerce_text``: what ``--config`` gives), nulls dropped, schema checked with defaults filled, cross-field
    checks (``workflow.lib.checks.check_config``)."""
    from workflow.lib.checks import check_config  # the checks raise this module's ConfigError

    coerce_text(config)
    drop_nulls(config)
    _fill(config, "")
    check_config(config)
    return config
