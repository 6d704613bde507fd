"""workflow/lib/config.py: schema validation with defaults, named-entry names, cross-field checks, derived values."""
import copy
import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_snakemake, tiny_config, write_config
from workflow.lib.config import ConfigError, drop_nulls, fill_defaults, schema, schema_default, validate_config
from workflow.lib.jobs import rule_resources, training_launcher
from workflow.lib.presets import reads_subspace, reward_beta_r_values


def props(*path):
    """The schema's properties at a path of property names (to compare with, not to copy defaults)."""
    node = schema()
    for key in path:
        node = node["properties"][key]
    return node["properties"]


@pytest.fixture
def config(tmp_path):
    """The tiny test config, unvalidated; its model path is an existing folder (no model is loaded)."""
    return tiny_config(tmp_path)


def test_drop_nulls_removes_null_keys_at_any_depth_in_place():
    node = {"a": None, "b": {"c": None, "d": 1, "e": [{"f": None, "g": 2}, None]}, "h": [None]}
    assert drop_nulls(node) is node
    assert node == {"b": {"d": 1, "e": [{"g": 2}, None]}, "h": [None]}  # list items are kept (positions matter)


def test_fill_defaults_fills_a_section_and_keeps_given_values():
    given = {"batch_size": 2}
    filled = fill_defaults(given, "training")
    assert given == {"batch_size": 2}, "the caller's dict must not change"
    assert filled["batch_size"] == 2
    training = props("training")
    # the two defaults that code and schema once disagreed on come from the schema
    assert filled["warmup_ratio"] == training["warmup_ratio"]["default"] == 0.1
    assert filled["checkpoint_every"] == training["checkpoint_every"]["default"] == 8
    assert {k for k, p in training.items() if "default" in p} <= set(filled)
    assert "lora" not in filled  # no default: absent means full fine-tuning


def test_fill_defaults_fills_nested_objects_of_named_entries():
    preset = fill_defaults({"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5}}, "presets/*")
    preset_schema = schema()["properties"]["presets"]["additionalProperties"]
    defaults = {k: p["default"] for k, p in preset_schema["properties"]["sharpness"]["properties"].items() if "default" in p}
    assert preset["sharpness"] == {"interval": 5, **defaults}
    assert preset["sharpness"]["gamma_min"] == 2.0e-6 and preset["label_smoothing"] == 0.0
    judge = fill_defaults({"type": "llama_guard_3", "model": "m"}, "judges/guard")
    assert judge["batch_size"] == 8 and judge["message_content"] == "text"
    jb = fill_defaults({"benchmark": "hb", "templates": {"path": "t.json"}, "n_templates": 2}, "benchmarks/*/jailbreak")
    assert jb["placeholder"] == "[INSERT PROMPT HERE]" and jb["template_column"] == "text" and jb["seed"] == 0


def test_whole_config_fills_named_entries_and_each_resource_group_keeps_its_own_defaults(config):
    config["resources"] = {"train_policy": {"mem_mb": 1234}}
    validate_config(config)
    assert config["presets"]["shapo_random"]["sharpness"]["gamma_max"] == 4.0e-6
    assert config["judges"]["refusal_markers"]["batch_size"] == 8  # (max_new_tokens: the judge type's, no schema default)
    assert config["benchmarks"]["harmbench"]["kind"] == "harmful"
    assert config["resources"]["train_policy"] == {"mem_mb": 1234, "threads": 2, "runtime": 240, "gpu": 1}
    assert config["resources"]["prepare"] == {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0}
    assert config["resources"]["generate"]["gpu"] == 1 and config["resources"]["judge"]["gpu"] == 0


@pytest.mark.parametrize("obj, section, message", [
    ({"batch_size": "four"}, "training", "config key training.batch_size: 'four' is not of type 'integer'"),
    ({"learning_rate": 1}, "training", "config key training: Additional properties are not allowed ('learning_rate'"),
    ({"loss": "dpo", "beta": 0.1, "sharpness": {"gamma_min": 1}}, "presets/shapo",
     "config key presets.shapo.sharpness: 'interval' is a required property"),
    ({"loss": "dpo", "beta": 0}, "presets/*", "config key presets.*.beta: 0 is less than or equal to the minimum of 0"),
    ({"type": "gpt_judge"}, "judges/j", "config key judges.j.type: 'gpt_judge' is not one of"),
    ({"format": "texts", "unsafe": {"file": "x"}}, "probe/data", "config key probe.data.unsafe"),
    ({"mem_mb": "lots"}, "resources/generate", "config key resources.generate.mem_mb: 'lots' is not of type"),
    ("four", "training", "config key training: 'four' is not of type 'object'"),
])
def test_fill_defaults_error_names_the_key(obj, section, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        fill_defaults(obj, section)
    assert isinstance(err.value, ValueError)


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown config section 'training/nope'"):
        fill_defaults({}, "training/nope")


def test_schema_default():
    assert schema_default("report/n_bootstrap") == props("report")["n_bootstrap"]["default"] == 2000
    assert schema_default("preferences/seed") == 0  # through a $ref to $defs/seed, with the key's own default
    assert schema_default("model/prompt_format") == "auto"


def test_config_module_does_not_import_snakemake_or_torch():
    """Stage modules call fill_defaults inside envs/torch.yaml and envs/report.yaml, which have no Snakemake."""
    code = "import sys, workflow.lib.config; print(sorted({m.split('.')[0] for m in sys.modules} & {'snakemake', 'torch'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_schema_enums_equal_the_code():
    from workflow.lib.losses import LOSSES
    from workflow.lib.safety_judges import JUDGE_TYPES

    assert schema()["properties"]["presets"]["additionalProperties"]["properties"]["loss"]["enum"] == list(LOSSES)
    assert schema()["properties"]["judges"]["additionalProperties"]["properties"]["type"]["enum"] == list(JUDGE_TYPES)


# ---- names that become path components ----

GOOD_NAMES = ["harmbench", "hb_v1.2", "llama-guard-3", "_x", "0"]
BAD_NAMES = ["a/b", "..", ".", ".hidden", "-x", "a b", "", "naïve", "a\\b"]


@pytest.mark.parametrize("name", GOOD_NAMES + BAD_NAMES)
def test_name_pattern(name):
    entry = {name: {"source": {"path": "x.csv"}, "prompt_column": "p"}}
    if name in GOOD_NAMES:
        assert fill_defaults(entry, "benchmarks")[name]["kind"] == "harmful"
    else:
        with pytest.raises(ConfigError, match=r"^config key benchmarks: .* does not match .*a name used in file paths"):
            fill_defaults(entry, "benchmarks")


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


NAME_CASES = {
    "benchmarks": (lambda c: rename(c["benchmarks"], "donotanswer", "a/b"), "config key benchmarks: 'a/b' does not match"),
    "presets": (lambda c: rename(c["presets"], "ipo", ".."), "config key presets: '..' does not match"),
    "judges": (lambda c: c["judges"].update({"../j": {"type": "refusal_markers"}}), "config key judges: '../j' does not match"),
    "methods": (lambda c: c.update(methods=["dpo", "x/y"]), "config key methods.1: 'x/y' does not match"),
    "evaluation.benchmarks": (lambda c: c["evaluation"].update(benchmarks=["harmbench", "b/c"]),
                              "config key evaluation.benchmarks.1: 'b/c' does not match"),
    "evaluation.judges": (lambda c: c["evaluation"].update(judges=["-j"]), "config key evaluation.judges.0: '-j' does not match"),
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_every_name_used_in_paths_is_checked(config, case):
    edit, message = NAME_CASES[case]
    config.setdefault("judges", {"refusal_markers": {"type": "refusal_markers"}})
    edit(config)
    with pytest.raises(ConfigError, match="^" + message):
        validate_config(config)


@pytest.mark.parametrize("case", ["benchmarks", "methods"])
def test_a_name_with_a_slash_stops_the_dry_run(workdir, case):
    edit, message = NAME_CASES[case]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edit(config)
    write_config(workdir, config)
    proc = run_snakemake(workdir, "--dry-run", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not (workdir / "results").exists(), "nothing may run before the config is valid"


# ---- what a user types after --config (Snakemake keeps every value inside a list or mapping a string) ----

def command_line(config: dict, *entries: str) -> dict:
    """``config`` with ``--config`` entries merged as Snakemake merges them (its own parser and deep merge)."""
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    update_config(config, parse_config(list(entries)))
    return config


def test_config_list_of_seeds(config):
    """The issue's example: Snakemake reads 'seeds=[0,1]' as ['0', '1'], which the schema refused."""
    assert command_line({}, "seeds=[0,1]") == {"seeds": ["0", "1"]}  # what Snakemake hands over
    validate_config(command_line(config, "seeds=[0,1]"))
    assert config["seeds"] == [0, 1]


def test_config_list_of_noise_rates(config):
    validate_config(command_line(config, "noise={rates: [0.0, 0.2]}"))
    assert config["noise"] == {"rates": [0.0, 0.2], "seed": 1000}


def test_config_numbers_booleans_and_nulls_inside_mappings(config):
    validate_config(command_line(config, "training={keep_policies: false, lr: 5e-5, batch_size: 2}",
                                 "evaluation={temperature: 1, seed: +3}", "judges={llama_guard_3_8b: null}"))
    training, evaluation = config["training"], config["evaluation"]
    assert (training["keep_policies"], training["lr"], training["batch_size"]) == (False, 5e-5, 2)
    assert type(training["lr"]) is float and type(training["batch_size"]) is int
    assert (evaluation["temperature"], evaluation["seed"]) == (1, 3) and "llama_guard_3_8b" not in config["judges"]


def test_config_text_stays_text_where_the_schema_takes_text(config):
    # a filter value may be text or a number; a name looks like a number; an enum holds words
    validate_config(command_line(config, "benchmarks={harmbench: {filter: {FunctionalCategory: 1}}}",
                                 "methods=[dpo, shapo]", "model={prompt_format: chat}"))
    assert config["benchmarks"]["harmbench"]["filter"] == {"FunctionalCategory": "1"}
    assert config["model"]["prompt_format"] == "chat"


@pytest.mark.parametrize("entry, message", [
    ("seeds=[0,one]", "config key seeds.1: 'one' is not of type 'integer'"),
    ("seeds=[0,1.5]", "config key seeds.1: 1.5 is not of type 'integer'"),
    ("noise={rates: [0.0, 0.7]}", "config key noise.rates.1: 0.7 is greater than or equal to the maximum of 0.5"),
    ("training={keep_policies: maybe}", "config key training.keep_policies: 'maybe' is not of type 'boolean'"),
])
def test_config_values_that_are_not_numbers_are_still_named(config, entry, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate_config(command_line(config, entry))


def test_config_lists_of_numbers_reach_the_dry_run(workdir):
    """The commands the issue tried, through Snakemake's real command line: the plan has both seeds and the
    new noise rate."""
    proc = run_snakemake(workdir, "--dry-run", "--config", "seeds=[0,1]", "noise={rates: [0.0, 0.2]}")
    text = proc.stdout + proc.stderr
    for policy in ("dpo/noise0/seed1", "shapo/noise0.2/seed0", "shapo/noise0.2/seed1"):
        assert f"results/policies/{policy}" in text, policy
    assert "noise0.25" not in text  # the tiny config's own rate is replaced, as --config does


# ---- cross-field checks (the dry-run versions are in tests/test_bad_input.py) ----

CROSS_FIELD = {
    "unknown method": (lambda c: c.update(methods=["dpo", "shapoo"]),
                       "config key methods: unknown method 'shapoo'; defined presets: ['"),
    "unknown benchmark": (lambda c: c["evaluation"].update(benchmarks=["salad"]),
                          "config key evaluation.benchmarks: unknown benchmark 'salad'"),
    "unknown judge": (lambda c: c["evaluation"].update(judges=["guard"]), "config key evaluation.judges: unknown judge 'guard'"),
    "LLM judge without a model": (lambda c: c.update(judges={"guard": {"type": "llama_guard_3"}}) or
                                  c["evaluation"].update(judges=["guard"]),
                                  "config key judges.guard.model: required for a llama_guard_3 judge"),
    "jailbreak of a jailbreak": (lambda c: c["benchmarks"].update(
        jb={"jailbreak": {"benchmark": "harmbench", "templates": {"path": "results/t.json"}, "n_templates": 1}},
        jb2={"jailbreak": {"benchmark": "jb", "templates": {"path": "results/t.json"}, "n_templates": 1}}),
        "config key benchmarks.jb2.jailbreak.benchmark: 'jb' is not a benchmark read from a source"),
    "gamma range reversed": (lambda c: c["presets"]["shapo"]["sharpness"].update(gamma_min=1.0),
                             "config key presets.shapo.sharpness: gamma_min > gamma_max"),
    "reward labels on IPO": (lambda c: c["presets"]["ipo"].update(reward_labels={"beta_r": 1.0}),
                             "config key presets.ipo.loss: a reward-level preset (reward_labels) needs loss dpo"),
    "hub reward model without a name": (lambda c: c.update(reward_model={"kind": "hub"}),
                                        "config key reward_model.name_or_path: required with reward_model.kind hub"),
    "prompt as long as the sequence": (lambda c: c["training"].update(max_prompt_length=64, max_length=64),
                                       "config key training.max_prompt_length: must be smaller than training.max_length"),
    "probe texts without safe": (lambda c: c["probe"]["data"].pop("safe"),
                                 "config key probe.data.safe: required with probe.data.format texts"),
    "probe source with format texts": (lambda c: c["probe"]["data"].update(source={"hub": "x"}),
                                       "config key probe.data.source: not used with probe.data.format texts"),
    "missing data path": (lambda c: c["preferences"].update(source={"path": "/no/such/file.jsonl"}),
                          "config key preferences.source: path '/no/such/file.jsonl' does not exist"),
    "missing model folder": (lambda c: c["model"].update(name_or_path="./no-such-model"),
                             "config key model.name_or_path: './no-such-model' does not exist"),
}


@pytest.mark.parametrize("case", sorted(CROSS_FIELD))
def test_cross_field_checks_name_the_key(config, case):
    edit, message = CROSS_FIELD[case]
    validate_config(copy.deepcopy(config))  # valid before the edit
    edit(config)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate_config(config)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_needs_vllm(config):
    config["evaluation"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match="config key evaluation.backend: 'vllm' needs the vllm package"):
        validate_config(config)


def test_a_workflow_output_path_need_not_exist_yet(config):
    config["benchmarks"]["heldout"] = {"source": {"path": "results/data/preferences/heldout.jsonl"}, "prompt_column": "p"}
    validate_config(config)


def test_the_shipped_configs_pass_the_schema():
    from snakemake.utils import update_config  # the deep merge Snakemake applies to a --configfile

    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    for extra in (None, "config/paper.yaml", "config/full.yaml"):
        config = copy.deepcopy(base)
        if extra:
            update_config(config, yaml.safe_load((ROOT / extra).read_text()))
        assert fill_defaults(drop_nulls(config), "")["resources"]["train_policy"]["gpu"] >= 1


# ---- values the rules derive from the config ----

def test_derived_values(config):
    validate_config(config)
    assert rule_resources(config, "train_policy") == {"mem_mb": 8000, "runtime": 240, "gpu": 1}
    assert training_launcher(config) == "python"
    config["training"]["devices"] = 4
    assert rule_resources(config, "train_policy")["gpu"] == 4  # one GPU per data-parallel process
    assert rule_resources(config, "generate")["gpu"] == 1
    assert training_launcher(config).endswith("--standalone --nproc_per_node 4")
    assert reads_subspace(config["presets"]["shapo"]) and reads_subspace(config["presets"]["shapo_random"])
    # the uniform control moves as far as the probe step (perturbation matched), so it reads the probe subspace too
    assert reads_subspace(config["presets"]["shapo_uniform"]) and not reads_subspace(config["presets"]["dpo"])
    assert not reads_subspace(config["presets"]["sam_full"])
    config["methods"] = ["dpo", "shapo_reward"]
    beta_r = config["presets"]["shapo_reward"]["reward_labels"]["beta_r"]
    assert reward_beta_r_values(config) == sorted(set(map(float, config["reward_model"]["beta_r_plot"] + [beta_r])))
