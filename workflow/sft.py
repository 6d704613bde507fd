"""Supervised fine-tuning on the chosen answers of the training pairs (optional stage, for base models).

    python -m workflow.sft --model results/models/base --pairs results/data/preferences/train.jsonl \
        --sft-json '{"epochs": 1, "lr": 1e-5, "batch_size": 4}' \
        --training-json '{"max_length": 128, "max_prompt_length": 64, "max_grad_norm": 1.0}' --prompt-format auto \
        --output results/models/sft --train-log results/models/sft.train_log.tsv

The loss (``sft.loss``) is the negative log-likelihood of the answer tokens (prompt tokens are context
only): ``token_mean``, the mean over all answer tokens of the batch, or ``sequence_sum``, each answer's
summed token NLL averaged over the batch's sequences (the official SFT). Prompts are formatted, truncated
and batched exactly as in preference training (``workflow.lib.pairs``: ``encode_response_pair``,
``collate_pairs`` on the chosen side, ``sequence_logps``), so the SFT model has seen the same template that
DPO later scores. The pairs are the clean ones (before label noise), so one SFT model serves every noise rate
and seed; ``sft.examples`` takes every pair's chosen answer or one per distinct prompt (the official SFT).
Weights and optimizer state are fp32; with ``training.precision`` bf16 (auto: on a GPU) the forward runs
under bf16 autocast, as in ``train_policy`` — bf16 weights would round away most updates at SFT learning
rates (a step of 1e-6 is far below the bf16 spacing 6e-5 of a weight of 0.01).

SFT trains through the policy's loop and engine (``workflow.lib.loop``, ``workflow.lib.parallel``): under
``torchrun --nproc_per_node N`` (the rule does this for ``training.devices: N``) each batch is split over the
processes, DDP or FSDP by ``training.parallel`` (under fsdp the weights are read once, by process 0, and
sharded), and a checkpoint every ``training.checkpoint_every`` steps lets a killed job resume to the same
weights. The result equals a one-process run on the same batches.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workflow.lib import loop
from workflow.lib.checkpoint import Checkpointer, file_digest, fingerprint, make_checkpointer
from workflow.lib.checks import check_sft, check_training
from workflow.lib.config import fill_defaults
from workflow.lib.files import atomic_dir, read_jsonl, write_json, write_tsv
from workflow.lib.models import PROVENANCE, load_tokenizer
from workflow.lib.optim import make_optimizer
from workflow.lib.pairs import answer_token_counts, collate_pairs, encode_response_pair, sequence_logps
from workflow.lib.parallel import DataParallel, FullyShardedParallel, exit_past_interpreter_shutdown, make_parallel

LOG_COLUMNS = ["step", "epoch", "loss", "sequences", "tokens", "grad_norm", "lr", "seconds"]
CHOSEN = ("chosen",)  # the side of each pair SFT trains on


def sft_examples(records: list[dict], examples: str) -> list[dict]:
    """The records SFT trains on: every pair (``pairs``), or one per distinct prompt (``unique_prompts``): the
    last pair of each prompt, at the place of the prompt's first pair (the official SFT keys its data by prompt
    and keeps the last pair's chosen answer as ``sft_target``, preference_datasets.py:314-318)."""
    if examples == "pairs":
        return records
    if examples != "unique_prompts":
        raise ValueError(f"sft.examples: {examples!r}; expected pairs or unique_prompts")
    last: dict[str, dict] = {}
    for r in records:
        last[json.dumps(r["messages"], sort_keys=True)] = r  # an existing key keeps its first position
    return list(last.values())


def loss_denominator(kind: str, tokens: torch.Tensor) -> float:
    """What the batch's summed answer NLL is divided by: its answer tokens (``token_mean``) or its sequences
    (``sequence_sum``). Taken over the whole optimizer batch (every process's sequences), so accumulated
    micro-batches and data-parallel processes give its gradient."""
    if kind == "token_mean":
        return float(max(int(tokens.sum()), 1))
    if kind == "sequence_sum":
        return float(len(tokens))
    raise ValueError(f"sft.loss: {kind!r}; expected token_mean or sequence_sum")


def batch_tokens(encoded: list[dict]) -> torch.Tensor:
    """[B] answer tokens the loss scores per sequence: all of them, but the first when there is no prompt
    (nothing predicts it), as ``answer_nll`` counts them."""
    return torch.tensor([len(e["chosen"]) - (0 if e["prompt"] else 1) for e in encoded])


def answer_nll(model, batch: dict[str, torch.Tensor], parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed NLL of each sequence's answer tokens, [B] number of those tokens) of a ``collate_pairs`` batch
    of chosen answers; the forward under the process's autocast, the log-softmax in fp32."""
    with parallel.autocast():
        logps = sequence_logps(model, batch)
    return -logps.float(), answer_token_counts(batch)


def passes(batch_size: int, world: int, accumulation: int) -> int:
    """Forward/backward passes of one step: ``accumulation``, fewer when a process's share of the batch (a last
    partial batch) has fewer sequences. The same on every process: each pass is a collective under DDP and FSDP."""
    return min(accumulation, batch_size // world)


def train_sft(model, tokenizer, records: list[dict], sft: dict, training: dict,
              parallel: DataParallel | FullyShardedParallel | None = None,
              checkpointer: Checkpointer | None = None) -> list[dict]:
    """Seeded SFT loop on the fp32 ``model``; returns the per-step log.

    ``sft`` and ``training`` are validated sections (``fill_defaults``), training plus ``prompt_format``.
    ``parallel`` places (or shards) the model and splits each batch over the processes (default:
    ``training.parallel`` in this process alone); under fsdp ``model`` may come from
    ``FullyShardedParallel.load_model``. With a ``checkpointer`` the loop saves every few steps and first
    resumes from a matching checkpoint (``workflow.lib.loop``)."""
    parallel = parallel or make_parallel(training)
    records = sft_examples(records, sft["examples"])
    check_sft(sft, parallel.world)
    encoded = [encode_response_pair(tokenizer, r, training["max_length"], training["max_prompt_length"],
                                    training["prompt_format"]) for r in records]
    bs, accumulation, world = sft["batch_size"], sft["gradient_accumulation_steps"], parallel.world
    total = loop.total_steps(len(records), bs, sft["epochs"], world, "sft.batch_size")
    forward = parallel.wrap(model)  # first: under fsdp the optimizer must hold the sharded Parameters
    optimizer, scheduler = make_optimizer(model.parameters(), sft, total)

    def step(global_idx, local_idx, number: int) -> dict:
        tokens = batch_tokens([encoded[i] for i in global_idx])
        denominator = loss_denominator(sft["loss"], tokens)
        loss_value = 0.0
        for part in np.array_split(local_idx, passes(len(global_idx), world, accumulation)):
            nll, _ = answer_nll(forward, collate_pairs([encoded[i] for i in part], tokenizer.pad_token_id, CHOSEN),
                                parallel)
            loss = nll.sum() / denominator  # this process's and this pass's share of the batch loss
            value = parallel.all_sum(loss.detach())  # every process's share: the same on all, so all stop alike
            if not torch.isfinite(value):
                ids = ", ".join(records[i]["pair_id"] for i in global_idx)
                raise FloatingPointError(f"non-finite SFT loss ({value.item()}) at step {number}, pairs: {ids}")
            (loss * world).backward()  # DDP and FSDP average the processes' gradients: x world makes it their sum
            loss_value += value.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return {"step": number, "loss": loss_value, "sequences": len(global_idx), "tokens": int(tokens.sum()),
                "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}

    # the Python RNG is unused by SFT's steps; the loop saves it with every checkpoint all the same
    steps = loop.Loop(model, optimizer, scheduler, parallel, np.random.default_rng(sft["seed"]),
                      random.Random(sft["seed"]), checkpointer)
    return steps.run(step, len(records), bs, sft["epochs"], loop.StepReport(parallel.main, "sft"), "sft.batch_size")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (results/models/base)")
    p.add_argument("--pairs", required=True, help="clean training pairs (results/data/preferences/train.jsonl)")
    p.add_argument("--sft-json", required=True, help="the config's sft section as JSON")
    p.add_argument("--training-json", required=True,
                   help="the config's training section (max_length, max_prompt_length, max_grad_norm, precision,"
                        " parallel, devices, nodes, checkpoint_every) as JSON; precision bf16 (auto: on a GPU) ="
                        " bf16 autocast over fp32 weights")
    p.add_argument("--prompt-format", required=True, choices=["auto", "chat", "hh"], help="config model.prompt_format")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True, help="folder for the fine-tuned weights (safetensors)")
    # --train-log first: torchrun, which launches data-parallel runs, reads an abbreviated "--log" as its own --log-dir
    p.add_argument("--train-log", "--log", dest="log", required=True, help="per-step log (TSV)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: <output>.checkpoint); removed after success")
    a = p.parse_args(argv)
    sft = fill_defaults(json.loads(a.sft_json), "sft")
    training = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
    check_training(training)
    if a.threads:  # the job's threads (per node), shared by the training processes on this node
        torch.set_num_threads(max(1, a.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.manual_seed(sft["seed"])

    records = read_jsonl(a.pairs)
    if not records:
        raise ValueError(f"{a.pairs}: no training pairs to fine-tune on")
    parallel = make_parallel(training)
    model = parallel.load_model(a.model)  # fp32 weights: the optimizer's updates must not be rounded to bf16
    tokenizer = load_tokenizer(a.model)
    # settings that do not change the training (how often to save) do not invalidate a checkpoint
    kept = {k: v for k, v in training.items() if k not in ("checkpoint_every", "report_to", "save_dtype")}
    key = fingerprint("sft", sft, kept, file_digest(a.pairs), str(Path(a.model).resolve()))
    checkpointer = make_checkpointer(a.checkpoint or f"{a.output.rstrip('/')}.checkpoint", training["checkpoint_every"],
                                     key, parallel)
    log = train_sft(model, tokenizer, records, sft, training, parallel, checkpointer)
    weights = parallel.full_state_dict(model)  # fsdp: gathered to process 0 (a collective); ddp: None
    parallel.close()
    if not parallel.main:  # process 0 holds (or has gathered) the whole model and writes it
        return
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        if (Path(a.model) / PROVENANCE).exists():  # keeps the base model's origin (and remote-code setting)
            shutil.copy(Path(a.model) / PROVENANCE, tmp / PROVENANCE)
        write_json(tmp / "sft_config.json", {"sft": sft, "training": training, "pairs": a.pairs, "base_model": a.model})
    write_tsv(a.log, pd.DataFrame(log, columns=LOG_COLUMNS))
    checkpointer.remove()


if __name__ == "__main__":
    main()
    exit_past_interpreter_shutdown()  # last: see its docstring
