"""Sharded training (training.parallel: fsdp, PyTorch FSDP2) proven on CPU with gloo.

Two processes, each holding half the rows of every weight, must end where one process holding the whole
model ends on the same batches: losses, gradient norms and final weights, for DPO, Dr.DPO, and ShaPO's
raw and normalised steps (also on neurons along the sharded dim: every parameter, GPT-2's Conv1D). A
sharded run killed after a checkpoint resumes to the same weights, through the rule's own command line, and a
damaged shard of that checkpoint is set aside (the job completes from step 0).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, SNAKEMAKE_ENV, run_snakemake, write_config
from fsdp_worker import (SETTINGS, TRAINING, VARIANTS, assert_workers_skipped_interpreter_shutdown, build_tiny_gpt2,
                         key_bias, kill_after_checkpoint, records, run_variant, shutdown_probe)
from workflow.lib.config import ConfigError, fill_defaults, validate_config
from workflow.lib.jobs import srun_torchrun
from workflow.lib.files import write_jsonl
from workflow.lib.models import load_model, load_tokenizer
from workflow.lib.parallel import DataParallel, FullyShardedParallel, shard_rows
from workflow.lib.pairs import score_pairs
from workflow.train_policy import attach_reference, train

ENV = {**SNAKEMAKE_ENV, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COLUMNS = ("loss", "loss_perturbed", "margin", "acc_clean", "acc_flipped", "grad_norm", "gamma")


def with_reference(model_dir, recs):
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    attach_reference(recs, score_pairs(model, tok, recs, SETTINGS), "reference")
    return recs


@pytest.fixture(scope="module")
def fsdp_data(tiny_model_dir, tmp_path_factory):
    """The tiny Llama and a tiny GPT-2, each with 10 pairs and their reference log-probs."""
    data = tmp_path_factory.mktemp("fsdp")
    (data / "llama").symlink_to(tiny_model_dir)
    build_tiny_gpt2(data / "gpt2", tiny_model_dir)
    for arch in ("llama", "gpt2"):  # batches of 4, 4 and 2: the last gives each process one pair
        write_jsonl(data / f"{arch}_pairs.jsonl", with_reference(data / arch, records(10)))
    return data


def test_shard_rows_split_dim_0_like_torch_chunk():
    assert [shard_rows(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [shard_rows(2, 4, r) for r in range(4)] == [(0, 1), (1, 1), (2, 0), (2, 0)]
    for n, world in [(32, 2), (49152, 2), (7, 3)]:
        assert [len(c) for c in torch.arange(n).chunk(world)] == [shard_rows(n, world, r)[1] for r in range(world)
                                                                  if shard_rows(n, world, r)[1]]


@pytest.mark.workflow
def test_two_sharded_processes_end_with_the_weights_of_one(fsdp_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests/fsdp_worker.py"), "--data", str(fsdp_data), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    sharded_seconds = time.monotonic() - t0
    worst = {}
    for name, (method, arch, kind) in VARIANTS.items():
        log_one, weights_one = run_variant(name, fsdp_data, DataParallel("fp32"))
        log_two = json.loads((out / f"{name}.json").read_text())
        weights_two = torch.load(out / f"{name}.pt")
        assert len(log_two) == len(log_one) == 3
        assert [r["sharpness_step"] for r in log_two] == [r["sharpness_step"] for r in log_one]
        for column in COLUMNS:
            assert [r[column] for r in log_two] == pytest.approx([r[column] for r in log_one], rel=1e-5, abs=1e-6,
                                                                 nan_ok=True), (name, column)
        assert weights_two.keys() == weights_one.keys()
        compared = {k: (key_bias(name, k, weights_one[k]), key_bias(name, k, weights_two[k])) for k in weights_one}
        compared = {k: (a, b) if a is not None else (weights_one[k], weights_two[k]) for k, (a, b) in compared.items()}
        worst[name] = max((a - b).abs().max().item() for a, b in compared.values())
        assert worst[name] < 1e-5, (name, worst[name])
        base = load_file(fsdp_data / arch / "model.safetensors")
        assert any(not torch.equal(weights_one[k], base[k]) for k in base), name  # it trained
        if "sharpness" in method:
            step = log_one[1]
            assert step["sharpness_step"] and step["gamma"] > 0
            # the move changed the loss: a step that did not move the weights would give the same loss twice
            assert abs(step["loss_perturbed"] - step["loss"]) > 1e-4, (name, step)
        # the ShaPO step saved (and moved) only each process's rows: half of every selected slice
        shapes = [json.loads((out / f"{name}.rank{r}.json").read_text())["saved_shapes"] for r in (0, 1)]
        if kind == "neurons" and arch == "llama":  # down_proj [hidden 32, 64 neurons]: 16 rows, 22 columns each
            assert shapes[0] == shapes[1] == [[16, 22], [16, 22]], shapes
        elif kind == "neurons":  # GPT-2 c_proj [128 neurons, 32]: neurons 0, 3, ..., 126; rows 0-63 and 64-127
            assert shapes[0] == [[22, 32], [22, 32]] and shapes[1] == [[21, 32], [21, 32]], shapes
        elif kind == "full":
            assert shapes[0][0][0] == 49152 // 2 and shapes[0] == shapes[1]  # the embedding's rows, halved
    print(json.dumps({"max_abs_weight_difference": worst, "sharded_run_seconds": round(sharded_seconds, 1)}))


@pytest.mark.workflow
def test_sharded_training_reads_the_weights_once_on_process_0_and_shards_them_unchanged(tmp_path):
    """FullyShardedParallel.load_model + wrap (what train_policy and sft do under fsdp), 2 gloo processes: process 1
    builds the model on the meta device, never maps the weights file and never holds the model whole (its peak
    memory grows by its half, not by the model), and the sharded model holds exactly the weights, buffers and logits of the model every process used
    to load (models.load_model)."""
    from fsdp_load_worker import build_load_model, fixed_input

    model_dir, out = tmp_path / "model", tmp_path / "out"
    out.mkdir()
    size = build_load_model(model_dir)
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests/fsdp_load_worker.py"), "--model", str(model_dir), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["on_meta"] and ranks[1]["on_meta"]  # nobody builds a model with values
    # process 0 alone holds the weights file (mapped, as transformers reads fp32 safetensors), until it sent them
    assert ranks[0]["weights_mapped"] and not ranks[1]["weights_mapped"]
    growth = [r["peak_rss_growth"] / size for r in ranks]
    # process 0 read the whole model (and holds its half after sharding); process 1 holds its half and one
    # broadcast weight at a time (the old path: the whole model, then its half)
    assert growth[0] > 1.0 and growth[1] < 0.75, growth

    old = load_model(model_dir)
    loaded = torch.load(out / "loaded.pt")
    state = old.state_dict()
    assert loaded["weights"].keys() == state.keys()
    assert all(torch.equal(loaded["weights"][k], state[k]) for k in state)
    # the buffers computed at construction (rotary frequencies) survive the sharded model's allocation
    buffers = dict(old.named_buffers())
    assert buffers and loaded["buffers"].keys() == buffers.keys()
    assert all(torch.equal(loaded["buffers"][k], v) for k, v in buffers.items())
    with torch.no_grad():
        logits = old(input_ids=fixed_input(old.config.vocab_size)).logits
    assert torch.allclose(loaded["logits"], logits, rtol=0, atol=1e-5)
    assert loaded["config"] == old.config.to_dict() and loaded["generation_config"] == old.generation_config.to_dict()
    print(json.dumps({"model_mb": round(size / 1e6, 1),
                      "peak_rss_growth_mb": [round(r["peak_rss_growth"] / 1e6, 1) for r in ranks]}))


def cli_args(data, name, settings):
    return ["-m", "workflow.train_policy", "--model", str(data / "llama"), "--pairs", str(data / "pairs.jsonl"),
            "--reference", str(data / "reference.jsonl"), "--method-json", json.dumps(RESUME_METHOD),
            "--training-json", json.dumps(settings), "--prompt-format", "auto", "--seed", "3", "--threads", "2",
            "--output", str(data / name), "--train-log", str(data / f"{name}.tsv")]


RESUME_METHOD = {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 3, "subspace": "uniform",
                                                           "perturbation": "normalized", "rho": 0.5}}


@pytest.mark.workflow
def test_killed_sharded_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(fsdp_data, tmp_path):
    data = tmp_path
    (data / "llama").symlink_to(fsdp_data / "llama")
    model, tok = load_model(data / "llama"), load_tokenizer(data / "llama")
    write_jsonl(data / "pairs.jsonl", records(40))
    write_jsonl(data / "reference.jsonl", score_pairs(model, tok, records(40), SETTINGS))
    settings = TRAINING | {"checkpoint_every": 2, "parallel": "fsdp", "devices": 2, "optimizer": "adamw",
                           "warmup_ratio": 0.1}

    # killed, torchrun and its two workers at once (a node lost), once a checkpoint past step 4 is in place
    kill_after_checkpoint([*TORCHRUN, *cli_args(data, "killed", settings)], data / "killed.checkpoint", 4, ENV, ROOT)
    assert not (data / "killed").exists()
    saved = json.loads((data / "killed.checkpoint/state.json").read_text())
    assert saved["processes"] == 2 and (data / "killed.checkpoint/sharded/.metadata").exists()
    shutil.copytree(data / "killed.checkpoint", data / "damaged.checkpoint")  # damaged at the end of the test

    resumed = subprocess.run([*TORCHRUN, *cli_args(data, "killed", settings)], cwd=ROOT, capture_output=True,
                             text=True, env=shutdown_probe(data / "probe", ENV), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    # both workers left past interpreter shutdown, where gloo's threads once aborted a finished CI job
    assert_workers_skipped_interpreter_shutdown(data / "probe", 2)
    at = json.loads(next(l for l in resumed.stdout.splitlines() if "resumed_at_step" in l))
    assert 4 <= at["resumed_at_step"] < at["of"] == 10
    assert not (data / "killed.checkpoint").exists()  # removed after success

    # the same checkpoint with one byte of the second process's shard changed (a file only that process checks):
    # both processes agree to set it aside, and the job trains from step 0, uninterrupted (the run the resumed
    # one must equal, bit for bit)
    shard = data / "damaged.checkpoint/sharded/__1_0.distcp"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    rerun = subprocess.run([*TORCHRUN, *cli_args(data, "damaged", settings)], cwd=ROOT, capture_output=True,
                           text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert "is damaged: sharded/__1_0.distcp differs from what was written" in rerun.stdout, rerun.stdout[-3000:]
    assert "resumed_at_step" not in rerun.stdout and (data / "damaged.checkpoint.damaged/sharded/__1_0.distcp").exists()
    assert not (data / "damaged.checkpoint").exists()

    a, b = load_file(data / "damaged/model.safetensors"), load_file(data / "killed/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    log_a, log_b = (pd.read_csv(data / f"{n}.tsv", sep="\t").drop(columns="seconds") for n in ("damaged", "killed"))
    pd.testing.assert_frame_equal(log_a, log_b)

    # the policy the rule writes is an ordinary model folder, with the weights of a one-process run
    one = load_model(data / "llama")
    preset = fill_defaults(RESUME_METHOD, "presets/*")
    from workflow.lib.sharpness import perturbed_set
    log_one = train(one, load_tokenizer(data / "llama"), with_reference(data / "llama", records(40)), preset,
                    fill_defaults(settings | {"parallel": "ddp", "devices": 1}, "training") | {"prompt_format": "auto"},
                    3, selected=perturbed_set(one, preset["sharpness"], None, 3), parallel=DataParallel("fp32"))
    ref = {k: v for k, v in one.state_dict().items() if k in a}
    # the tied output embedding is written once, as save_pretrained does on one process
    assert ref.keys() == a.keys() and "lm_head.weight" not in a and "model.embed_tokens.weight" in a
    worst = max((ref[k] - a[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert log_a["loss"].tolist() == pytest.approx([r["loss"] for r in log_one], rel=1e-5)
    print(json.dumps({"resumed_at_step": at["resumed_at_step"], "max_abs_difference_to_one_process": worst}))


@pytest.mark.workflow
def test_bf16_under_fsdp_computes_in_bf16_with_fp32_master_weights(tiny_model_dir):
    """precision bf16 (what auto means on a GPU): MixedPrecisionPolicy(param bf16, reduce fp32), here in a
    group of one on the CPU."""
    recs = with_reference(tiny_model_dir, records(8))  # two steps
    tok = load_tokenizer(tiny_model_dir)
    dpo = fill_defaults({"loss": "dpo", "beta": 0.1}, "presets/*")
    settings = SETTINGS | {"parallel": "fsdp", "precision": "bf16"}
    fp32 = train(load_model(tiny_model_dir), tok, recs, dpo, SETTINGS, seed=0, parallel=DataParallel("fp32"))
    parallel = FullyShardedParallel("bf16")
    try:
        assert parallel.bf16 and parallel.world == 1 and parallel.sharded
        model = load_model(tiny_model_dir)
        log = train(model, tok, recs, dpo, settings, seed=0, parallel=parallel)
        layer = model.model.layers[0]
        policy = layer._get_fsdp_state()._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
        assert all(p.to_local().dtype == torch.float32 for p in model.parameters())  # master weights
    finally:
        parallel.close()
    assert all(math.isfinite(r["loss"]) for r in log)
    # the forward really ran in bf16: the loss after the first update is rounded differently, only slightly
    assert log[1]["loss"] != fp32[1]["loss"] and log[1]["loss"] == pytest.approx(fp32[1]["loss"], abs=0.05)


def test_lora_and_uneven_nodes_are_refused_under_fsdp(tiny_model_dir):
    from conftest import tiny_config

    config = tiny_config(tiny_model_dir)
    config["training"].update(parallel="fsdp", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match=r"training.lora: not supported with training.parallel fsdp"):
        validate_config(config)
    config = tiny_config(tiny_model_dir)
    config["training"].update(parallel="fsdp", devices=6, nodes=4)
    with pytest.raises(ConfigError, match=r"training.devices: 6 GPUs cannot be split evenly over training.nodes"):
        validate_config(config)
    config["training"]["parallel"] = "zero3"
    with pytest.raises(ConfigError, match=r"config key training.parallel"):
        validate_config(config)


def test_fsdp_and_nodes_reach_the_launcher_and_the_slurm_resources(workdir):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["training"].update(parallel="fsdp", devices=2)
    write_config(workdir, config)
    proc = run_snakemake(workdir, "--dry-run", "--printshellcmds", "results/policies/shapo/noise0/seed0")
    text = proc.stdout + proc.stderr
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2 -m workflow.train_policy" in text
    assert '"parallel": "fsdp"' in text and re.search(r"rule train_policy:(?:(?!\nrule ).)*resources:[^\n]*gpu=2\b",
                                                      text, re.S), text[-3000:]

    config["training"].update(devices=8, nodes=2)
    write_config(workdir, config)
    proc = run_snakemake(workdir, "--dry-run", "--printshellcmds", "results/policies/shapo/noise0/seed0")
    text = proc.stdout + proc.stderr
    # one Slurm job: 2 nodes with 4 GPUs each, one task per node, which srun starts as a torchrun of 4 processes
    assert srun_torchrun(2, 1, 4) + " -m workflow.train_policy" in text, text[-3000:]
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in text and "--nnodes 2 --nproc_per_node 4" in text
    for resource in ("nodes=2", "tasks=2", "tasks_per_gpu=0", "mpi=srun", "gres=gpu:4"):
        assert re.search(rf"rule train_policy:(?:(?!\nrule ).)*resources:[^\n]*\b{re.escape(resource)}", text, re.S), \
            (resource, text[-3000:])


def test_nodes_above_one_refuse_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {srun_torchrun(2, 1, 4)} -m workflow.train_policy"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "training.nodes > 1 runs inside a Slurm allocation" in proc.stderr


@pytest.mark.workflow
def test_paper_config_trains_qwen_7b_sharded_one_key_away(tmp_path):
    """config/paper.yaml with model.name_or_path set to the paper's largest backbone: full fine-tuning under
    fsdp on training.devices GPUs per policy and for SFT; reference log-probs and generation on one GPU each.
    The dry run asks for one policy's answers (its SFT, reference and training upstream): every rule it checks,
    without building the whole DAG (tests/test_paper_config.py dry-runs that)."""
    from conftest import dry_run_paper
    from test_paper_config import job_counts, shell_commands

    qwen = tmp_path / "qwen.yaml"
    qwen.write_text("model:\n  name_or_path: Qwen/Qwen2.5-7B\n")
    proc = dry_run_paper(tmp_path, qwen, "--", "results/generations/shapo/noise0.2/seed0/harmbench.jsonl")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["train_policy"] == counts["sft"] == counts["reference_logps"] == counts["generate"] == 1
    (model_cmd,) = shell_commands(out, "prepare_model")
    assert "Qwen/Qwen2.5-7B" in model_cmd
    (train_cmd,) = shell_commands(out, "train_policy")
    assert train_cmd.startswith("python -m torch.distributed.run --standalone --nproc_per_node 8 -m workflow.train_policy")
    assert '"parallel": "fsdp"' in train_cmd and '"lora"' not in train_cmd  # full fine-tuning, sharded
    (sft_cmd,) = shell_commands(out, "sft")  # SFT too: 12 bytes per parameter do not fit one GPU for 7B
    assert sft_cmd.startswith("python -m torch.distributed.run --standalone --nproc_per_node 8 -m workflow.sft")
    assert '"parallel": "fsdp"' in sft_cmd and '"devices": 8' in sft_cmd
    gpus = {rule: {int(g) for g in re.findall(rf"rule {rule}:(?:(?!\nrule ).)*?resources:[^\n]*\bgpu=(\d+)", out, re.S)}
            for rule in ("train_policy", "reference_logps", "sft", "generate")}
    assert gpus == {"train_policy": {8}, "reference_logps": {1}, "sft": {8}, "generate": {1}}, gpus
    print(json.dumps({"jobs": counts, "gpus_per_job": {k: sorted(v) for k, v in gpus.items()}}))
