"""Optional SFT stage: the loss masks the prompt, with sft.enabled the DAG trains policies from the SFT model, and
under training.parallel fsdp SFT trains sharded like a policy (two processes = one, a killed run resumes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import jobs_run, run_snakemake, write_config, tiny_config
from workflow.lib.config import fill_defaults
from workflow.lib.files import read_jsonl
from workflow.lib.models import load_model, load_tokenizer
from workflow.lib.parallel import DataParallel
from workflow.lib.pairs import collate_pairs, encode_response_pair
from workflow.sft import CHOSEN, answer_nll, sft_examples, train_sft

TRAINING = fill_defaults({"max_length": 64, "max_prompt_length": 32, "max_grad_norm": 1e9}, "training")


def records(n=6):
    """Pairs with answers of different lengths (so the two losses weigh them differently); prompts repeat."""
    return [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i % 4}?"}],
             "chosen": "No. " * (1 + 3 * i), "rejected": "Sure."} for i in range(n)]


def settings(precision="fp32"):
    return TRAINING | {"precision": precision, "prompt_format": "hh"}


def test_sft_batches_score_only_the_chosen_answer_tokens():
    encoded = [{"prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [4]}, {"prompt": [5], "chosen": [3], "rejected": [4]}]
    batch = collate_pairs(encoded, pad_id=0, sides=CHOSEN)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 3, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.mark.workflow
def test_sft_enabled_trains_policies_from_the_sft_model(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    config["sft"] = {"enabled": True, "epochs": 1, "lr": 1e-3, "batch_size": 4}
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "results/policies/dpo/noise0/seed0")
    assert sorted(set(jobs_run(proc))) == sorted(
        {"prepare_model", "prepare_preferences", "sft", "reference_logps", "inject_noise", "train_policy"})

    sft_dir, base_dir = tmp_path / "results/models/sft", tmp_path / "results/models/base"
    log = (tmp_path / "results/models/sft.train_log.tsv").read_text().splitlines()
    assert len(log) == 1 + 3  # header + ceil(12 pairs / 4) steps
    sft_weights, base_weights = load_file(sft_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert any(not torch.equal(sft_weights[k], base_weights[k]) for k in base_weights)  # SFT moved the weights
    training = json.loads((tmp_path / "results/policies/dpo/noise0/seed0/training_config.json").read_text())
    assert training["base_model"] == "results/models/sft"
    assert read_jsonl(tmp_path / "results/data/preferences/reference_logps.jsonl")
    assert "--model results/models/sft " in (proc.stdout + proc.stderr).split("rule reference_logps:", 1)[1]


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """The distance between w's bf16 neighbours (8 significant bits): 2^(exponent − 7)."""
    return torch.ldexp(torch.ones_like(w), torch.frexp(w.float())[1] - 8)


def test_sft_keeps_fp32_weights_so_an_update_below_a_bf16_ulp_is_not_lost(tiny_model_dir):
    """precision bf16 (on CPU here; autocast works there too): the forward runs in bf16, the weights stay fp32 and
    take RMSprop's first step of 10·lr = 1e-6, which is below half the bf16 spacing of nearly every weight, so pure
    bf16 weights (what SFT did before) would have kept their values."""
    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtypes = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    sft = fill_defaults({"lr": 1e-7, "batch_size": 6, "optimizer": "rmsprop", "warmup_ratio": 0.0,
                         "schedule": "constant_with_warmup"}, "sft")
    train_sft(model, tok, records(), sft, settings("bf16"), DataParallel("bf16"))
    assert dtypes and set(dtypes) == {torch.bfloat16}  # bf16 compute
    moved = 0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        w, delta = before[name], p.detach() - before[name]
        changed = delta != 0
        moved += int(changed.sum())
        # each update is below half a bf16 spacing of its weight (away from 0, where bf16 spacing is tiny)
        big = changed & (w.abs() > 1e-2)
        assert (delta[big].abs() < bf16_spacing(w[big]) / 2).all(), name
        # so bf16 weights would not have moved: w_bf16 + Δ rounds back to w_bf16
        wb = w[big].bfloat16()
        assert torch.equal((wb.float() + delta[big]).bfloat16(), wb), name
    assert moved > 0.5 * sum(p.numel() for p in model.parameters())  # most weights took the step


def test_sequence_sum_loss_is_the_mean_of_summed_answer_nlls_and_accumulation_keeps_the_batch_gradient(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records()
    enc = [encode_response_pair(tok, r, 64, 32, "hh") for r in recs]
    nll, tokens = answer_nll(model, collate_pairs(enc, tok.pad_token_id, CHOSEN), DataParallel("fp32"))
    assert tokens.tolist() == [len(e["chosen"]) for e in enc]
    # by hand: log-softmax of each answer token given its prefix, one sequence at a time
    by_hand = []
    for e in enc:
        ids = torch.tensor([e["prompt"] + e["chosen"]])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        by_hand.append(-logp[len(e["prompt"]) - 1:].gather(1, targets[len(e["prompt"]) - 1:, None]).sum())
    assert torch.allclose(nll, torch.stack(by_hand), atol=1e-4)
    expected = {"sequence_sum": (nll.sum() / len(enc)).item(), "token_mean": (nll.sum() / tokens.sum()).item()}
    assert expected["sequence_sum"] > 3 * expected["token_mean"]  # the two differ in scale, not only in weighting

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for loss in ("sequence_sum", "token_mean"):
        logs = []
        for accumulation in (1, 4):  # 6 sequences in passes of 2, 2, 1, 1
            model.load_state_dict(state)
            sft = fill_defaults({"lr": 1e-6, "batch_size": 6, "loss": loss, "gradient_accumulation_steps": accumulation,
                                 "seed": 0}, "sft")
            logs.append(train_sft(model, tok, recs, sft, settings(), DataParallel("fp32"))[0])
        assert logs[0]["loss"] == pytest.approx(expected[loss], rel=1e-5)
        assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-5)
        assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-4)  # the same batch gradient


def test_unique_prompts_keep_the_last_pair_of_each_prompt_at_its_first_place():
    recs = records(6)  # prompts 0 1 2 3 0 1
    picked = sft_examples(recs, "unique_prompts")
    assert [r["pair_id"] for r in picked] == ["p4", "p5", "p2", "p3"]
    assert sft_examples(recs, "pairs") is recs


def test_warmup_steps_replace_the_warmup_ratio():
    from workflow.lib.optim import make_optimizer

    sft = fill_defaults({"lr": 1.0, "warmup_steps": 3, "warmup_ratio": 0.5, "schedule": "constant_with_warmup"}, "sft")
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], sft, 100)
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_sft_batch_and_accumulation_must_split_over_the_devices(tiny_model_dir):
    from workflow.lib.config import ConfigError, validate_config
    from workflow.lib.jobs import rule_resources, srun_torchrun, training_launcher

    config = tiny_config(tiny_model_dir)
    config["sft"] = {"enabled": True, "batch_size": 2}
    config["training"].update(parallel="fsdp", devices=4)
    with pytest.raises(ConfigError, match=r"config key sft.batch_size: 2 sequences cannot be split over training.dev"):
        validate_config(config)
    config = tiny_config(tiny_model_dir)
    config["sft"] = {"enabled": True, "batch_size": 8, "gradient_accumulation_steps": 4}
    config["training"].update(parallel="fsdp", devices=4)
    with pytest.raises(ConfigError, match=r"config key sft.gradient_accumulation_steps: 4 passes cannot split a proc"):
        validate_config(config)
    config["sft"]["gradient_accumulation_steps"] = 2
    validate_config(config)
    # SFT's job has the shape of a policy's: a GPU per process on one node, or a node group under srun
    assert rule_resources(config, "sft")["gpu"] == 4
    config["training"].update(devices=8, nodes=2)
    assert rule_resources(config, "sft") | {"mem_mb": 0, "runtime": 0} == {
        "mem_mb": 0, "runtime": 0, "nodes": 2, "tasks": 2, "tasks_per_gpu": 0, "mpi": "srun", "gres": "gpu:4"}
    assert training_launcher(config) == srun_torchrun(2, 1, 4)


# The official SFT's options (README.md:85): sequence_sum, unique_prompts, RMSprop, constant_with_warmup, and
# accumulation; 14 distinct prompts in batches of 4, 4, 4, 2 over 2 epochs (8 steps): each process takes 2 sequences
# in 2 passes of 1, and 1 in the last batch (1 pass), where one process runs 2 passes of 2 and 2 of 1
SHARDED_SFT = {"epochs": 2, "lr": 1e-4, "batch_size": 4, "gradient_accumulation_steps": 2, "optimizer": "rmsprop",
               "warmup_steps": 2, "schedule": "constant_with_warmup", "loss": "sequence_sum",
               "examples": "unique_prompts", "seed": 5}
SHARDED_TRAINING = {"max_length": 64, "max_prompt_length": 32, "max_grad_norm": 1.0, "precision": "fp32",
                    "parallel": "fsdp", "devices": 2, "checkpoint_every": 2}


def sft_cli(data, name):
    from fsdp_worker import ROOT

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "workflow.sft", "--model", str(data / "model"), "--pairs", str(data / "pairs.jsonl"),
            "--sft-json", json.dumps(SHARDED_SFT), "--training-json", json.dumps(SHARDED_TRAINING),
            "--prompt-format", "hh", "--threads", "2", "--output", str(data / name),
            "--train-log", str(data / f"{name}.tsv")], ROOT


@pytest.mark.workflow
def test_sharded_sft_on_two_processes_ends_with_the_weights_of_one_and_a_killed_run_resumes_to_them(tiny_model_dir,
                                                                                                     tmp_path):
    """SFT's rule command under training.parallel fsdp, devices 2 (gloo): within 1e-5 of SFT in one process on the
    same batches; SIGKILLed (torchrun and both workers) after a sharded checkpoint, rerun, it resumes there and ends
    with the uninterrupted run's weights and log, bit for bit."""
    from conftest import SNAKEMAKE_ENV
    from fsdp_worker import assert_workers_skipped_interpreter_shutdown, kill_after_checkpoint, shutdown_probe
    from workflow.lib.files import write_jsonl

    data = tmp_path
    (data / "model").symlink_to(tiny_model_dir)
    recs = [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i % 14}?"}],
             "chosen": "No. " * (1 + i % 5) + f"{i}", "rejected": "Sure."} for i in range(20)]
    write_jsonl(data / "pairs.jsonl", recs)
    env = {**SNAKEMAKE_ENV, "OMP_NUM_THREADS": "1"}

    cmd, root = sft_cli(data, "uninterrupted")
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=shutdown_probe(data / "probe", env),
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert_workers_skipped_interpreter_shutdown(data / "probe", 2)  # as train_policy's (tests/test_fsdp.py)
    assert not (data / "uninterrupted.checkpoint").exists()  # removed after success
    log_two = pd.read_csv(data / "uninterrupted.tsv", sep="\t")
    assert len(log_two) == 8 and log_two["sequences"].tolist() == [4, 4, 4, 2] * 2

    # one process, the same batches: the loop, loss and optimizer in this process, no sharding
    model = load_model(tiny_model_dir)
    sft = fill_defaults(SHARDED_SFT, "sft")
    training = fill_defaults(SHARDED_TRAINING | {"parallel": "ddp", "devices": 1}, "training") | {"prompt_format": "hh"}
    log_one = train_sft(model, load_tokenizer(tiny_model_dir), recs, sft, training, DataParallel("fp32"))
    for column in ("loss", "grad_norm", "lr", "tokens", "sequences"):
        assert log_two[column].tolist() == pytest.approx([r[column] for r in log_one], rel=1e-5), column
    two = load_file(data / "uninterrupted/model.safetensors")
    one = {k: v for k, v in model.state_dict().items() if k in two}
    assert one.keys() == two.keys() and "model.embed_tokens.weight" in two  # the tied output embedding once
    worst = max((one[k] - two[k]).abs().max().item() for k in two)
    assert worst < 1e-5, worst
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(two[k], base[k]) for k in base)  # it trained

    # killed once a checkpoint past step 4 (the first epoch's end) is in place, then rerun
    cmd, root = sft_cli(data, "killed")
    kill_after_checkpoint(cmd, data / "killed.checkpoint", 4, env, root)
    assert not (data / "killed").exists()
    assert (data / "killed.checkpoint/sharded/.metadata").exists()
    resumed = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    at = json.loads(next(line for line in resumed.stdout.splitlines() if "resumed_at_step" in line))
    assert 4 <= at["resumed_at_step"] < at["of"] == 8
    again = load_file(data / "killed/model.safetensors")
    assert again.keys() == two.keys()
    assert all(torch.equal(again[k], two[k]) for k in two), max((again[k] - two[k]).abs().max().item() for k in two)
    pd.testing.assert_frame_equal(pd.read_csv(data / "killed.tsv", sep="\t").drop(columns="seconds"),
                                  log_two.drop(columns="seconds"))
    print(json.dumps({"max_abs_difference_to_one_process": worst, "resumed_at_step": at["resumed_at_step"]}))
