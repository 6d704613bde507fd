"""A policy spanning nodes (training.nodes > 1), launched for real through the test Slurm.

The rule's multi-node launcher is srun starting one torchrun per node, which meet at a c10d rendezvous on
the first node of the allocation (``workflow.lib.jobs.srun_torchrun``). The test Slurm has one node, so the
same launcher runs with two srun tasks on it (two torchruns of one process each): the srun step, the
rendezvous and the two-process sharded training are real; only the geometry (tasks per node) differs
from a cluster's. The multi-node job's sbatch resources and command are checked by a dry run in
tests/test_fsdp.py. Skipped, with the reason, where Slurm cannot be started (see tests/slurm_cluster.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import ROOT, SNAKEMAKE_ENV
from fsdp_worker import SETTINGS, TRAINING, records
from workflow.lib.config import fill_defaults
from workflow.lib.jobs import srun_torchrun
from workflow.lib.files import write_jsonl
from workflow.lib.models import load_model, load_tokenizer
from workflow.lib.parallel import DataParallel
from workflow.lib.pairs import score_pairs
from workflow.train_policy import attach_reference, train

METHOD = {"loss": "dpo", "beta": 0.1, "dr_beta": 0.5}


def wait_for_job(cluster, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = re.search(r"JobState=(\w+)", cluster.query(["scontrol", "show", "job", job_id]).stdout)
        if state and state[1] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state[1]
        time.sleep(1)
    raise AssertionError(f"Slurm job {job_id} did not end in {timeout} s")


def test_srun_starts_torchruns_that_meet_at_a_c10d_rendezvous_and_train_sharded(slurm_cluster, tmp_path,
                                                                                  tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records(10)
    write_jsonl(tmp_path / "pairs.jsonl", recs)
    write_jsonl(tmp_path / "reference.jsonl", score_pairs(model, tok, recs, SETTINGS))
    settings = TRAINING | {"parallel": "fsdp", "devices": 2}
    launcher = srun_torchrun(nodes=1, tasks_per_node=2, procs_per_task=1)
    train_cmd = (f"{launcher} -m workflow.train_policy --model {tiny_model_dir} --pairs {tmp_path}/pairs.jsonl"
                 f" --reference {tmp_path}/reference.jsonl --method-json '{json.dumps(METHOD)}'"
                 f" --training-json '{json.dumps(settings)}' --prompt-format auto --seed 1 --threads 2"
                 f" --output {tmp_path}/policy --train-log {tmp_path}/policy.tsv > {tmp_path}/train.log 2>&1")
    # what the job runs: the rule's shell prefix, then its command (as the Slurm executor runs an `mpi` job)
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\nexport PYTHONPATH={ROOT}\n"
                      f"export PATH={os.path.dirname(sys.executable)}:$PATH OMP_NUM_THREADS=1\n{train_cmd}\n")
    env = {**SNAKEMAKE_ENV, "SLURM_CONF": str(slurm_cluster.conf)}
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--mem=4000",
                             "-t", "10", "-D", str(tmp_path), "-o", str(tmp_path / "slurm.out"), str(script)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    state = wait_for_job(slurm_cluster, job_id)
    train_log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
    assert state == "COMPLETED", f"{state}\n{(tmp_path / 'slurm.out').read_text()[-3000:]}\n{train_log[-5000:]}" \
                                 f"\n{slurm_cluster.logs()}"
    # two processes from two srun tasks, one per torchrun, in one process group
    assert '{"parallel": "fsdp", "processes": 2' in train_log, train_log[-3000:]
    assert "--rdzv_backend c10d" in script.read_text()

    # and they trained what one process trains on the same batches
    attach_reference(recs, score_pairs(model, tok, recs, SETTINGS), "reference")
    one = load_model(tiny_model_dir)
    train(one, tok, recs, fill_defaults(METHOD, "presets/*"), SETTINGS, 1, parallel=DataParallel("fp32"))
    sharded = load_file(tmp_path / "policy" / "model.safetensors")
    reference = {k: v for k, v in one.state_dict().items() if k in sharded}
    assert reference.keys() == sharded.keys()
    worst = max((reference[k] - sharded[k]).abs().max().item() for k in sharded)
    assert worst < 1e-5, worst
    print(json.dumps({"slurm_job": job_id, "max_abs_difference_to_one_process": worst}))
