"""config/paper.yaml dry-runs offline, and a null in a --configfile removes an entry of config.yaml."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from conftest import ROOT, run_snakemake


def job_counts(text: str) -> dict[str, int]:
    """The dry-run's job table: rule -> count."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^([a-z_]+)\s+(\d+)$", text, re.M) if m[1] != "total"}


def shell_commands(text: str, rule: str) -> list[str]:
    """Shell commands the dry-run printed for ``rule`` (one per job)."""
    blocks = re.split(r"\n(?=\[)", text)
    return [b.split("Shell command: ", 1)[1] for b in blocks if f"rule {rule}:" in b and "Shell command: " in b]


def spec_arg(command: str, option: str = "--spec-json") -> dict:
    """The JSON after ``option`` in a printed shell command."""
    args = shlex.split(command)
    return json.loads(args[args.index(option) + 1])


@pytest.mark.workflow
def test_paper_config_dry_runs_offline(paper_dry_run):
    workdir, proc = paper_dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    # dpo, drdpo, shapo, shapo_reward, the matched controls and the ρ sweep (18 methods) x 5 noise rates x 1 seed;
    # 4 benchmarks x (base + the policies); the SFT stage once
    policies = len(paper["methods"]) * 5
    assert len(paper["methods"]) == 18 and {"dpo", "drdpo", "shapo", "rho0.05_uniform"} <= set(paper["methods"])
    assert counts["train_policy"] == policies and counts["inject_noise"] == 5
    assert counts["sft"] == 1 and counts["prepare_benchmark"] == 4 and counts["sample_benchmark"] == 4
    # three judges (MD-Judge, Nemotron, refusal markers) label every answer; their agreement table once
    generate = 4 * (1 + policies)
    assert counts["generate"] == generate and counts["judge"] == 3 * generate and counts["judge_agreement"] == 1
    assert counts["perturbation_summary"] == 1  # the report's "Is the perturbation effective?" table
    # reward-level ShaPO: the beaver cost model, converted from safe-rlhf's layout, scores the pairs once
    assert counts["convert_score_model"] == 1 and counts["train_reward_model"] == 1

    (model_cmd,) = shell_commands(out, "prepare_model")
    assert paper["model"]["name_or_path"] in model_cmd
    (prefs_cmd,) = shell_commands(out, "prepare_preferences")
    assert "PKU-Alignment/PKU-SafeRLHF-30K" in prefs_cmd and "--format pku-saferlhf" in prefs_cmd
    assert '"path"' not in prefs_cmd  # the default's local path did not leak into the hub source
    (probe_cmd,) = shell_commands(out, "probe_data")
    assert '"format": "pku-saferlhf"' in probe_cmd and '"unsafe"' not in probe_cmd
    probe_spec = spec_arg(probe_cmd)  # the official probe texts: PKU-30K train responses in the HH scaffold, all
    assert probe_spec["template"] == "\n\nHuman: {prompt}\n\nAssistant:{response}" and "{prompt}" not in probe_cmd
    assert probe_spec["source"]["split"] == "train" and probe_spec["sample"] == "all"
    # the probe and the subspace on the frozen base model (official), with the official head and length rule
    (train_probe_cmd,) = shell_commands(out, "train_probe")
    (subspace_cmd,) = shell_commands(out, "select_subspace")
    assert "--model results/models/base " in train_probe_cmd and "--model results/models/base " in subspace_cmd
    fit_spec = spec_arg(train_probe_cmd)
    assert fit_spec["linear_head"] == {"lr": 1e-5, "batch_size": 256, "epochs": 10, "valid_every": 30,
                                       "checkpoint": "best_in_last_epoch"}
    assert {k: fit_spec[k] for k in ("model", "fit", "max_tokens", "length_rule", "n_heldout", "layer")} == {
        "model": "base", "fit": "linear_head", "max_tokens": 256, "length_rule": "drop", "n_heldout": 256, "layer": -1}
    assert "advbench" not in out  # removed with `advbench: null`
    bench_cmds = " ".join(shell_commands(out, "prepare_benchmark"))
    assert "walledai/SaladBench" in bench_cmds and "FunctionalCategory" not in bench_cmds
    assert '"category_column": "categories"' in bench_cmds and '"split": "base"' in bench_cmds
    # the official default evaluation set: the PKU-SafeRLHF-30K test prompts (hub id); 2,000 per benchmark
    (pku_cmd,) = [c for c in shell_commands(out, "prepare_benchmark") if "--name pku_saferlhf_test " in c]
    assert '"hub": "PKU-Alignment/PKU-SafeRLHF-30K"' in pku_cmd and '"split": "test"' in pku_cmd
    samples = {re.search(r"--name (\S+)", c)[1]: re.search(r"--n-sample (\d+)", c)[1]
               for c in shell_commands(out, "sample_benchmark")}
    assert samples == {b: "2000" for b in ("pku_saferlhf_test", "harmbench", "saladbench", "donotanswer")}
    # the probe data are de-duplicated against every paper benchmark (the held-out prompts always)
    assert sorted(re.findall(r"--exclude (\w+)=", probe_cmd)) == sorted(
        ["pku_saferlhf_test", "harmbench", "saladbench", "donotanswer", "preferences_heldout"])
    # policies and the reference start from the SFT model; training uses RMSprop at 5e-7
    for cmd in shell_commands(out, "train_policy") + shell_commands(out, "reference_logps"):
        assert "--model results/models/sft " in cmd
    assert all('"optimizer": "rmsprop"' in c and '"lr": 5e-07' in c for c in shell_commands(out, "train_policy"))
    # the official DPO batch and warm-up (README.md:93: batch_size=32, warmup_steps=10)
    assert all(spec_arg(c, "--training-json")["batch_size"] == 32 and spec_arg(c, "--training-json")["warmup_steps"] == 10
               for c in shell_commands(out, "train_policy"))
    # the official SFT (README.md:85) and the paper's ShaPO = Dr.DPO + sharpness (README.md:93)
    (sft_cmd,) = shell_commands(out, "sft")
    for setting in ('"lr": 5e-07', '"warmup_steps": 150', '"batch_size": 64', '"loss": "sequence_sum"',
                    '"examples": "unique_prompts"', '"optimizer": "rmsprop"'):
        assert setting in sft_cmd, setting
    assert "--prompt-format hh" in sft_cmd and "meta-llama/Llama-3.2-3B" in model_cmd
    shapo_cmds = [c for c in shell_commands(out, "train_policy") if "--output results/policies/shapo/" in c]
    assert len(shapo_cmds) == 5 and all('"dr_beta": 1.0' in c and '"interval": 5' in c for c in shapo_cmds)
    (convert_cmd,) = shell_commands(out, "convert_score_model")
    assert "--input PKU-Alignment/beaver-7b-v1.0-cost" in convert_cmd
    (reward_cmd,) = shell_commands(out, "train_reward_model")
    assert '"kind": "safe_rlhf"' in reward_cmd and '"sign": -1' in reward_cmd and "--classifier" in reward_cmd
    # the official soft labels (README.md:101, trainers.py:402-443): the Beaver text around the HH-formatted
    # prompt, 2,048 tokens, bf16 weights; p = sigmoid(10 (cost_rejected - cost_chosen)) in the policy's loss
    reward_spec = spec_arg(reward_cmd, "--reward-json")
    assert reward_spec["prompt_format"] == "BEGINNING OF CONVERSATION: USER: \n\nHuman: {prompt}\n\nAssistant: ASSISTANT:{answer}"
    assert (reward_spec["max_length"], reward_spec["dtype"]) == (2048, "bfloat16")
    reward_policies = [c for c in shell_commands(out, "train_policy") if "--output results/policies/shapo_reward/" in c]
    assert len(reward_policies) == 5 and all(spec_arg(c, "--method-json")["reward_labels"]["beta_r"] == 10.0
                                             for c in reward_policies)
    assert paper["report"] == {"reference_method": "drdpo", "claim_method": "shapo"}
    # GPU stages ask for a GPU, the rest do not; a policy trains data-parallel on training.devices GPUs
    assert re.search(r"rule train_policy:(?:(?!\nrule ).)*resources:[^\n]*gpu=8", out, re.S)
    assert all(c.startswith("python -m torch.distributed.run --standalone --nproc_per_node 8 -m workflow.train_policy")
               for c in shell_commands(out, "train_policy"))
    assert re.search(r"rule reference_logps:(?:(?!\nrule ).)*resources:[^\n]*gpu=1", out, re.S)
    assert re.search(r"rule prepare_preferences:(?:(?!\nrule ).)*resources:[^\n]*gpu=0", out, re.S)
    assert not (workdir / "results").exists()  # a dry run writes nothing


def test_null_in_configfile_removes_a_default_entry(workdir):
    override = workdir / "override.yaml"
    # a removed benchmark leaves the probe's declared list too (it is restated, as config/paper.yaml does)
    removed = "benchmarks:\n  donotanswer: null\nevaluation:\n  benchmarks: [harmbench]\n"
    override.write_text(removed)
    proc = run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override), check=False)
    assert "config key probe.decontaminate_against: 'donotanswer' is not a defined benchmark" in proc.stdout + proc.stderr

    # without the null the default's entry stays (deep merge), and its probe texts would be unused
    probe = ("probe:\n  decontaminate_against: [harmbench]\n  data:\n    format: pku-saferlhf\n    source: {path: %s}\n"
             % (ROOT / "tests/fixtures/pku_saferlhf.jsonl"))
    override.write_text(removed + probe)
    proc = run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override), check=False)
    assert proc.returncode != 0
    assert "config key probe.data.unsafe: not used with probe.data.format pku-saferlhf" in proc.stdout + proc.stderr

    override.write_text(removed + probe + "    unsafe: null\n    safe: null\n")
    proc = run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override))
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["prepare_benchmark"] == 1 and counts["generate"] == 5  # base + 2 methods x 2 noise rates
    assert "donotanswer" not in proc.stdout + proc.stderr


def test_every_rule_takes_threads_and_resources_from_the_config():
    for smk in (ROOT / "rules").glob("*.smk"):
        for rule in re.split(r"\nrule ", smk.read_text())[1:]:
            name = rule.split(":", 1)[0]
            assert re.search(r"\n    threads: (config\[\"resources\"\]|judge_threads)", rule), f"{smk.name}: {name}"
            assert re.search(r"\n    resources:\n        \*\*(rule|judge)_resources\(", rule), f"{smk.name}: {name}"


def test_probe_data_from_pku_response_safety_labels(tmp_path):
    from workflow import probe_data
    from workflow.lib.files import read_jsonl, write_jsonl

    fixture = ROOT / "tests/fixtures/pku_saferlhf.jsonl"
    rows = read_jsonl(fixture)
    write_jsonl(tmp_path / "bench.jsonl", [{"prompt": rows[0]["prompt"].upper() + "  "}])  # same prompt, normalised
    probe_data.main(["--spec-json", json.dumps({"format": "pku-saferlhf", "source": {"path": str(fixture)},
                                               "n_per_class": 100, "seed": 0}),
                     "--exclude", f"harmbench={tmp_path / 'bench.jsonl'}",
                     "--output", str(tmp_path / "data.jsonl"), "--report", str(tmp_path / "report.tsv")])
    out = read_jsonl(tmp_path / "data.jsonl")
    expected = {}
    for i, r in enumerate(rows[1:], start=1):  # the first row's prompt is a benchmark prompt: dropped whole
        for k in (0, 1):  # the default template: the official HH scaffold, prompt and response as they are
            text = f"\n\nHuman: {r['prompt']}\n\nAssistant:{r[f'response_{k}']}"
            expected.setdefault(text, (0 if r[f"is_response_{k}_safe"] else 1, i))
    n = min([label for label, _ in expected.values()].count(c) for c in (0, 1))
    assert len(out) == 2 * n and all(expected[o["text"]] == (o["label"], o["pair"]) for o in out)
    assert not any(rows[0]["prompt"] in o["text"] for o in out)
    assert "rows\tharmbench\t1\t" in (tmp_path / "report.tsv").read_text()
