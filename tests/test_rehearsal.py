"""The rehearsal (config/rehearsal.yaml): every rule of config/paper.yaml executed at toy size, here, on 2 CPU cores.

The overlay may change only where models and data come from and sizes (``ALLOWED``); the test of that compares the
merged configs, so a key the overlay changes indirectly counts too. The run builds the stand-ins
(tests/rehearsal_assets.py) in a fresh working directory, runs the whole DAG with
``--configfile config.yaml config/paper.yaml config/rehearsal.yaml`` once, and checks that the rules it executed are
the rules the paper's dry run plans (both computed, not listed here), that the paper-only paths ran, and that the
report renders with the three judges' agreement table. A second leg submits one policy's jobs through the test Slurm.
docs/cluster.md says what this proves and what only a GPU run can.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake.utils import update_config

from conftest import ROOT, SNAKEMAKE_ENV, copy_run, jobs_run
from test_paper_config import job_counts
from workflow.lib.config import drop_nulls

pytestmark = pytest.mark.rehearsal

OVERLAY = ROOT / "config/rehearsal.yaml"
PAPER = ROOT / "config/paper.yaml"

# What the overlay may change (dotted keys of the merged config; * = one name). Models: the backbone, the
# reward/cost model, each judge. Data: every source. Sizes: counts, lengths, batches, epochs, probe head steps,
# noise rates, processes, threads and resources.
ALLOWED = (
    "model.name_or_path", "reward_model.name_or_path", "judges.*.model",
    "preferences.source.*", "probe.data.source.*", "benchmarks.*.source.*",
    "preferences.n_train", "preferences.n_heldout", "noise.rates",
    "probe.n_heldout", "probe.max_tokens", "probe.data.n_per_class",
    "probe.linear_head.batch_size", "probe.linear_head.epochs", "probe.linear_head.valid_every",
    "sft.batch_size", "sft.gradient_accumulation_steps", "sft.epochs",
    "training.batch_size", "training.epochs", "training.max_length", "training.max_prompt_length",
    "training.devices", "training.checkpoint_every",
    "reward_model.max_length", "reward_model.batch_size",
    "evaluation.n_prompts", "evaluation.max_new_tokens", "evaluation.batch_size", "benchmarks.*.n_prompts",
    "judges.*.batch_size", "judges.*.max_new_tokens",
    "resources.*.threads", "resources.*.mem_mb", "resources.*.runtime", "resources.*.gpu",
)
ALLOWED_RE = re.compile("|".join(re.escape(k).replace(r"\*", "[^.]+") for k in ALLOWED))


def merged(*files: Path) -> dict:
    """config.yaml with the configfiles deep-merged onto it as Snakemake merges them, nulls dropped."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for f in files:
        update_config(config, yaml.safe_load(f.read_text()))
    return drop_nulls(config)


def leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf (a list is one leaf)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def overlay_violations(paper: dict, rehearsal: dict, overlay: dict) -> list[str]:
    """Why the overlay is not a rehearsal of the paper config: keys it changes outside ``ALLOWED``, names it adds
    (benchmarks, judges that the paper does not use), noise rates the paper does not train."""
    before, after = leaves(paper), leaves(rehearsal)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "<absent>") != after.get(k, "<absent>"))
    problems = [f"{k}: not a model or data location or a size" for k in changed if not ALLOWED_RE.fullmatch(k)]
    evaluation = paper["evaluation"]
    for section, used in (("benchmarks", evaluation["benchmarks"]), ("judges", evaluation["judges"])):
        problems += [f"{section}.{name}: not one the paper uses ({used})" for name in overlay.get(section, {})
                     if name not in used]
    rates = rehearsal["noise"]["rates"]
    if not set(rates) <= set(paper["noise"]["rates"]) or len(rates) < 2:
        problems.append(f"noise.rates: {rates} is not two or more of the paper's {paper['noise']['rates']}")
    return problems


def test_the_overlay_changes_only_model_and_data_locations_and_sizes():
    overlay = yaml.safe_load(OVERLAY.read_text())
    assert overlay_violations(merged(PAPER), merged(PAPER, OVERLAY), overlay) == []


@pytest.mark.parametrize("forbidden, message", [
    ({"evaluation": {"temperature": 0.7}}, "evaluation.temperature: not a model"),
    ({"evaluation": {"stop": None}}, "evaluation.stop: not a model"),  # removing a key changes it too
    ({"presets": {"shapo": {"beta": 0.5}}}, "presets.shapo.beta: not a model"),
    ({"methods": ["dpo", "shapo"]}, "methods: not a model"),
    ({"judges": {"md_judge_v0_2": {"type": "llama_guard_3"}}}, "judges.md_judge_v0_2.type: not a model"),
    ({"judges": {"extra": {"type": "refusal_markers"}}}, "judges.extra.type: not a model"),
    ({"judges": {"llama_guard_3_8b": {"model": "./x"}}}, "judges.llama_guard_3_8b: not one the paper uses"),
    ({"noise": {"rates": [0.0, 0.25]}}, "noise.rates: [0.0, 0.25] is not two or more"),
    ({"model": {"prompt_format": "chat"}}, "model.prompt_format: not a model"),
])
def test_the_allowlist_refuses_a_forbidden_key(tmp_path, forbidden, message):
    overlay = yaml.safe_load(OVERLAY.read_text())
    update_config(overlay, copy.deepcopy(forbidden))
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    problems = overlay_violations(merged(PAPER), merged(PAPER, tmp_path / "overlay.yaml"), overlay)
    assert any(p.startswith(message) for p in problems), problems


# ------------------------------------------------------------------------------------------------ the run
@pytest.mark.workflow
def test_the_rehearsal_runs_every_rule_of_the_paper_config(rehearsal_run, paper_dry_run):
    workdir, proc = rehearsal_run
    log = proc.stdout
    assert re.search(r"(\d+) of \1 steps \(100%\) done", log), log[-3000:]
    dry = paper_dry_run[1]
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    planned = job_counts(dry.stdout + dry.stderr)
    executed = jobs_run(proc)
    assert set(executed) == set(planned), (sorted(set(planned) - set(executed)), sorted(set(executed) - set(planned)))
    paper, rehearsal = merged(PAPER), merged(PAPER, OVERLAY)
    counts = pd.Series(executed).value_counts()
    policies = len(paper["methods"]) * len(rehearsal["noise"]["rates"]) * len(paper["seeds"])
    assert counts["train_policy"] == policies and len(paper["methods"]) == 18

    results = workdir / "results"
    # the paper-only paths, each seen running: SFT with RMSprop, the linear-head probe on the base model,
    # the safe-rlhf cost model converted and scoring every pair, FSDP on 2 processes with sharpness-aware steps
    sft_log = pd.read_csv(results / "models/sft.train_log.tsv", sep="\t")
    assert json.loads((results / "models/sft/sft_config.json").read_text())["sft"]["optimizer"] == "rmsprop"
    assert len(sft_log) >= 2
    probe = json.loads((results / "probe/metrics.json").read_text())
    assert (probe["fit"], probe["model"], probe["n_heldout"]) == ("linear_head", "base", rehearsal["probe"]["n_heldout"])
    assert json.loads((results / "models/score_model/conversion.json").read_text())["from"] == "safe-rlhf score_head"
    reward = json.loads((results / "reward/metrics.json").read_text())
    assert reward["kind"] == "safe_rlhf" and reward["n_train"] == rehearsal["preferences"]["n_train"]
    shapo_logs = list((results / "policies/shapo").glob("noise*/seed*.train_log.tsv"))
    assert len(shapo_logs) == len(rehearsal["noise"]["rates"])
    assert all(pd.read_csv(p, sep="\t")["sharpness_step"].any() for p in shapo_logs)
    train_logs = " ".join(p.read_text() for p in (results / "logs/train_policy").glob("*.log"))
    assert train_logs.count('{"parallel": "fsdp", "processes": 2') == policies

    # sampled answers, 3 per prompt, cut at "\n"; SALAD's category lists joined into one category
    answers = [json.loads(line) for line in (results / "generations/base/saladbench.jsonl").read_text().splitlines()]
    assert {a["sample"] for a in answers} == set(range(paper["evaluation"]["samples"]))
    assert all("\n" not in a["answer"] for a in answers) and all("," in a["category"] for a in answers)
    # the stand-in judges' verdicts went through the paper's prompts and parsers: none unparseable
    for judge in ("md_judge_v0_2", "nemotron_safety_guard_8b_v3"):
        labels = [json.loads(line) for line in (results / f"judgements/{judge}/base/harmbench.jsonl").read_text()
                  .splitlines()]
        assert labels and all(r["label"] in ("safe", "unsafe") and r["judge_output"] for r in labels), labels[:2]

    # the report: the three judges' agreement table, comparisons with drdpo
    agreement = pd.read_csv(results / "tables/judge_agreement.csv")
    judges = set(paper["evaluation"]["judges"])
    assert set(agreement.judge_a) | set(agreement.judge_b) == judges and len(judges) == 3
    assert set(agreement.benchmark) == {*paper["evaluation"]["benchmarks"], "all"}
    assert set(pd.read_csv(results / "tables/comparisons.csv")["reference"]) == {"drdpo"}
    report = (results / "report.md").read_text()
    assert all(j in report for j in judges) and (results / "report.html").stat().st_size > 0

    # every JSON file the run wrote is standard JSON (no NaN, no Infinity)
    def refuse(token):
        raise ValueError(token)
    for path in [*results.rglob("*.json"), *results.rglob("*.jsonl")]:
        text = path.read_text()
        for line in text.splitlines() if path.suffix == ".jsonl" else [text]:
            json.loads(line, parse_constant=refuse) if line.strip() else None


@pytest.mark.workflow
def test_one_rehearsed_policy_runs_through_slurm(slurm_cluster, rehearsal_run, tmp_path):
    """The rehearsal's shapo policy at the highest noise rate trained again through sbatch: its FSDP job asks Slurm for
    training.devices GPUs (the test node has two fake ones) and torchrun starts 2 processes inside the job; then its
    answers and MD-Judge's verdicts, each a job of its own."""
    from test_slurm import slurm_profile

    workdir = copy_run(rehearsal_run[0], tmp_path / "run")
    rehearsal = merged(PAPER, OVERLAY)
    noise = format(max(rehearsal["noise"]["rates"]), "g")
    target = f"results/judgements/md_judge_v0_2/shapo/noise{noise}/seed0/harmbench.json"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--profile", str(slurm_profile(tmp_path / "profile")), target, "--forcerun", "train_policy",
           "--configfile", "config.yaml", str(PAPER), str(OVERLAY)]
    env = {**SNAKEMAKE_ENV, "SLURM_CONF": str(slurm_cluster.conf)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output[-6000:]}\n{slurm_cluster.logs()}"
    assert sorted(jobs_run(proc)) == ["generate", "judge", "train_policy"]
    submitted = re.findall(r"Job \S+ has been submitted with SLURM jobid (\d+)", output)
    assert len(submitted) == 3, output[-4000:]
    (log,) = [p for p in (workdir / "results/logs/slurm").rglob("*.log") if "/rule_train_policy/" in str(p)]
    job = slurm_cluster.query(["scontrol", "show", "job", log.stem]).stdout
    assert re.search(r"gres/gpu=2|gres:gpu:2|gpu:2", job) and "JobState=COMPLETED" in job, job
    train_log = (workdir / f"results/logs/train_policy/shapo_noise{noise}_seed0.log").read_text()
    assert '{"parallel": "fsdp", "processes": 2' in train_log
    summary = json.loads((workdir / target).read_text())
    assert summary["judge"] == "md_judge_v0_2" and summary["unparseable"] == 0
    shutil.rmtree(workdir, ignore_errors=True)
