"""The tiny workflow submitted through a real single-node Slurm (tests/slurm_cluster.py, the fixture
``slurm_cluster`` in conftest.py); skipped with the reason where Slurm cannot be started here."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, SNAKEMAKE_ENV, copy_run, write_config

# One ShaPO policy's judgement, on a copy of the reference run: the whole tiny DAG (46 jobs) through the
# scheduler would take minutes, and the rules it would add submit no differently.
TARGET = "results/judgements/refusal_markers/shapo/noise0.25/seed0/harmbench.json"


def slurm_profile(folder: Path) -> Path:
    """A copy of profiles/slurm with the settings a cluster without accounting needs."""
    folder.mkdir()
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    profile.update({
        # no slurmdbd here, so sacct cannot answer; squeue can (MinJobAge=300 >= 3 x the first delay)
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 3,
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
    })
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def test_tiny_workflow_runs_through_slurm(slurm_cluster, reference_run, tmp_path):
    """The reference run, copied, with the subspace and the reference log-probabilities forced to rerun: for
    the target that is a CPU job, the three GPU rules (reference, one ShaPO policy, its answers) and a judge,
    in four sbatch submissions: the answers and their refusal-marker judgement are one group job (eval), the
    subspace a group job of its own (group probe, whose train_probe has nothing to redo)."""
    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    # jobs request what the node has: 2 CPUs, the fake GPU, memory sized for the tiny model
    config["resources"] = {g: {"threads": 2 if t else 1, "mem_mb": 1500, "runtime": 10}
                           for g, t in [("prepare", 0), ("prepare_model", 0), ("probe", 1), ("sft", 1),
                                        ("reference_logps", 1), ("train_policy", 1), ("generate", 1),
                                        ("judge", 0), ("llm_judge", 1), ("report", 0)]}
    write_config(workdir, config)
    profile = slurm_profile(tmp_path / "profile")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--profile", str(profile), TARGET,
           "--forcerun", "select_subspace", "reference_logps"]
    env = {**SNAKEMAKE_ENV, "SLURM_CONF": str(slurm_cluster.conf)}
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, cwd=workdir, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    # a group job's jobs are printed indented under it
    planned = re.findall(r"^\s*(?:local)?rule (\w+):\s*$", dry.stdout + dry.stderr, re.M)
    assert sorted(planned) == ["generate", "judge", "reference_logps", "select_subspace", "train_policy"]
    assert "Group job eval " in dry.stdout + dry.stderr and "Group job probe " in dry.stdout + dry.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output[-6000:]}\n{slurm_cluster.logs()}"

    summary = yaml.safe_load((workdir / TARGET).read_text())
    assert summary["method"] == "shapo" and summary["benchmark"] == "harmbench"
    assert (workdir / "results/policies/shapo/noise0.25/seed0/model.safetensors").exists()

    # every job went through sbatch, the group jobs as one submission each, each with its own Slurm log
    submitted = re.findall(r"Job \S+ has been submitted with SLURM jobid (\d+)", output)
    assert len(submitted) == 4, output[-4000:]
    slurm_logs = list((workdir / "results/logs/slurm").rglob("*.log"))
    assert {p.stem for p in slurm_logs} >= set(submitted), (submitted, slurm_logs)
    # the GPU rules asked Slurm for the (fake) GPU, and Slurm granted it; generate inside the group eval
    for rule in ("rule_reference_logps", "rule_train_policy", "group_eval"):
        (log,) = [p for p in slurm_logs if f"/{rule}" in str(p)]  # group_eval_generate_judge/
        job_id = log.stem
        job = slurm_cluster.query(["scontrol", "show", "job", job_id]).stdout
        assert re.search(r"gres/gpu=1|gres:gpu:1|gpu:1", job), job
        assert "JobState=COMPLETED" in job, job
