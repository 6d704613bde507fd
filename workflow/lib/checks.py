"""Cross-field config checks: what one key allows depends on another. The schema cannot express these.

``check_config`` runs them all on a validated config (``workflow.lib.config.validate_config``); a stage run by
hand calls the check of its own section (``check_preset``, ``check_training``, ``check_probe_data``), so the
same message names the key whichever way the value arrives. Every message starts ``config key <key>:``.
"""
from __future__ import annotations

import importlib.util
import os

from workflow.lib.config import ConfigError, is_workflow_output


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
    """vLLM is installed where generation or an LLM judge uses it. Not checked while ``workflow.plan`` reads
    the DAG (it sets SHAPO_PLAN): a run is projected where it does not run, e.g. on a login node without vLLM."""
    if os.environ.get("SHAPO_PLAN") or importlib.util.find_spec("vllm") is not None:
        return
    keys = ["evaluation.backend"] if config["evaluation"]["backend"] == "vllm" else []
    keys += [f"judges.{j}.backend" for j in config["evaluation"]["judges"] if config["judges"][j].get("backend") == "vllm"]
    if keys:
        raise ConfigError(f"config key {keys[0]}: 'vllm' needs the vllm package, which is not installed"
                          " (pip install vllm on a GPU machine), or set it to transformers")


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
        check_preset(name, preset)


def check_preset(name: str, preset: dict) -> None:
    """One preset (schema defaults filled); ``name`` is its key under presets (workflow.train_policy run by hand
    passes the method it was given)."""
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


def check_training(training: dict) -> None:
    """The training section (schema defaults filled); workflow.train_policy checks the slice it was given too."""
    t = training
    if t["max_prompt_length"] >= t["max_length"]:
        raise ConfigError("config key training.max_prompt_length: must be smaller than training.max_length")
    if t["parallel"] == "fsdp" and t.get("lora"):
        raise ConfigError("config key training.lora: not supported with training.parallel fsdp (LoRA is for models"
                          " that fit one GPU: use parallel ddp; fsdp shards full fine-tuning)")
    if t["devices"] % t["nodes"]:
        raise ConfigError(f"config key training.devices: {t['devices']} GPUs cannot be split evenly over"
                          f" training.nodes ({t['nodes']}); use a multiple of nodes")


def check_sft(sft: dict, devices: int) -> None:
    """The sft section against the processes SFT runs on (``training.devices``): every process needs sequences of
    each batch, and as many as the passes it runs them in; workflow.sft checks the same at run time."""
    if sft["batch_size"] < devices:
        raise ConfigError(f"config key sft.batch_size: {sft['batch_size']} sequences cannot be split over"
                          f" training.devices ({devices}) processes; use at least one per process")
    if sft["gradient_accumulation_steps"] > sft["batch_size"] // devices:
        raise ConfigError(f"config key sft.gradient_accumulation_steps: {sft['gradient_accumulation_steps']} passes"
                          f" cannot split a process's {sft['batch_size'] // devices} sequences (sft.batch_size"
                          f" {sft['batch_size']} over training.devices {devices})")


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
                  check_presets, check_reward_model):
        check(config)
    check_training(config["training"])
    if config["sft"]["enabled"]:
        check_sft(config["sft"], config["training"]["devices"])
    check_probe_data(config["probe"]["data"])
    check_paths(config)
