"""Data-parallel training (training.devices > 1): torchrun + accelerate DDP, here on CPU with gloo.

Two processes on halves of every batch must end where one process on the whole batch ends, for
Dr.DPO's log-mean-exp (which does not split into per-process means) and with sharpness-aware steps.
"""
import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, SNAKEMAKE_ENV, copy_run, run_snakemake, write_config
from fsdp_worker import assert_workers_skipped_interpreter_shutdown, shutdown_probe
from workflow.lib.config import fill_defaults
from workflow.lib.files import write_jsonl
from workflow.lib.loop import pairs_used
from workflow.lib.losses import data_parallel_reduction, reduce_losses
from workflow.lib.models import load_model, load_tokenizer
from workflow.lib.parallel import DataParallel
from workflow.lib.pairs import score_pairs
from workflow.train_policy import attach_reference, main as train_policy_main, train

TRAINING = {"batch_size": 4, "epochs": 1, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 48,
            "max_prompt_length": 24, "checkpoint_every": 2}
SETTINGS = fill_defaults(TRAINING, "training") | {"prompt_format": "auto"}
DPO = fill_defaults({"loss": "dpo", "beta": 0.1}, "presets/*")


def identity(t):
    return t


@pytest.mark.parametrize("dr_beta", [None, 0.7])
def test_one_process_reduction_has_the_value_and_gradient_of_the_batch_loss(dr_beta):
    losses = torch.tensor([0.3, 1.9, 0.8, 2.5], requires_grad=True)
    expected = reduce_losses(losses, dr_beta)
    (grad_expected,) = torch.autograd.grad(expected, losses)
    surrogate, value = data_parallel_reduction(losses, dr_beta, 1, identity, identity)
    (grad,) = torch.autograd.grad(surrogate, losses)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, grad_expected, atol=1e-7)
    if dr_beta:  # Dr.DPO weights the high-loss pair least
        assert grad.argmin() == 3


def test_a_last_batch_smaller_than_the_processes_is_left_out_and_too_small_a_batch_is_refused():
    assert pairs_used(10, 4, 2) == 10  # last batch of 2: one pair per process
    assert pairs_used(9, 4, 2) == 8  # last batch of 1 cannot be split over 2 processes
    assert pairs_used(9, 4, 1) == 9
    with pytest.raises(ValueError, match=r"training.batch_size \(2\).*training.devices \(4\)"):
        pairs_used(8, 2, 4)


def records(n):
    return [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i}?" + " x" * (i % 3)}],
             "chosen": "I can't help with that." if i % 2 else f"No. {i}",
             "rejected": f"Sure, step {i}: do it.", "flipped": i % 3 == 1}
            for i in range(n)]


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.workflow
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_two_processes_end_with_the_weights_of_one(tiny_model_dir, tmp_path, lora):
    """Dr.DPO + ShaPO on full weights; with LoRA, DPO + ShaPO perturbing the frozen base columns (DDP does not
    track them, so their gradients are averaged by hand)."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records(10)  # batches of 4, 4 and 2: the last gives each process one pair
    write_jsonl(tmp_path / "pairs.jsonl", recs)
    write_jsonl(tmp_path / "reference.jsonl", score_pairs(model, tok, recs, SETTINGS))
    method = {"loss": "dpo", "beta": 0.1, "dr_beta": 0.5,
              "sharpness": {"interval": 2, "subspace": "uniform", "perturbation": "raw",
                            "gamma_min": 1e-2, "gamma_max": 2e-2}}
    settings = TRAINING | ({"lora": lora} if lora else {})
    if lora:
        del method["dr_beta"]

    def args(name):
        return ["-m", "workflow.train_policy", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
                "--reference", str(tmp_path / "reference.jsonl"), "--method-json", json.dumps(method),
                "--training-json", json.dumps(settings | {"devices": 2 if name == "two" else 1}),
                "--prompt-format", "auto", "--seed", "1", "--output", str(tmp_path / name), "--train-log", str(tmp_path / f"{name}.tsv"),
                # in this process: its own thread count, which the rest of this worker's tests keep
                "--threads", str(torch.get_num_threads() if name == "one" else 2)]

    # one process: the stage's own entry point, in this process (a Python start-up fewer)
    train_policy_main(args("one")[2:])
    env = {**SNAKEMAKE_ENV, "OMP_NUM_THREADS": "1"}
    # the launcher the train_policy rule uses for training.devices: 2
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args("two")], cwd=ROOT, capture_output=True, text=True,
                         env=shutdown_probe(tmp_path / "probe", env), timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert_workers_skipped_interpreter_shutdown(tmp_path / "probe", 2)  # DDP's group too (tests/test_fsdp.py)

    log_one = pd.read_csv(tmp_path / "one.tsv", sep="\t")
    log_two = pd.read_csv(tmp_path / "two.tsv", sep="\t")
    assert len(log_two) == 3 and log_two["sharpness_step"].tolist() == [False, True, False]
    for column in ("loss", "loss_perturbed", "margin", "acc_clean", "acc_flipped", "n_clean", "n_flipped",
                   "grad_norm"):
        assert log_two[column].tolist() == pytest.approx(log_one[column].tolist(), rel=1e-4, abs=1e-6, nan_ok=True), column
    a, b = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "two/model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert not (tmp_path / "two.checkpoint").exists()  # process 0 removed its checkpoint after success


def test_devices_launch_torchrun_and_request_as_many_gpus(reference_run, tmp_path):
    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["training"]["devices"] = 2
    write_config(workdir, config)
    proc = run_snakemake(workdir, "--dry-run", "--printshellcmds", "results/policies/shapo/noise0/seed0")
    text = proc.stdout + proc.stderr
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2 -m workflow.train_policy" in text, text[-3000:]
    assert re.search(r"gpu=2\b", text), text[-3000:]
    # the data-parallel setting changes no reference log-probs: only the policy reruns
    assert "rule reference_logps:" not in text and "rule train_policy:" in text


def test_bf16_autocast_trains_fp32_weights(tiny_model_dir):
    """precision bf16 (what auto means on a GPU) through the same accelerate path, here on the CPU."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records(4)
    attach_reference(recs, score_pairs(model, tok, recs, SETTINGS), "reference")
    before = [p.detach().clone() for p in model.parameters()]
    parallel = DataParallel("bf16")
    assert parallel.bf16 and parallel.world == 1
    log = train(model, tok, recs, DPO, SETTINGS, seed=0, parallel=parallel)
    assert all(math.isfinite(r["loss"]) for r in log)
    fp32 = train(load_model(tiny_model_dir), tok, recs, DPO, SETTINGS, seed=0,
                 parallel=DataParallel("fp32"))
    # the forward really ran in bf16: the first loss is rounded differently, but only slightly
    assert log[0]["loss"] != fp32[0]["loss"] and log[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="training.precision"):
        DataParallel("fp16")
