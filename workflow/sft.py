"""Supervised fine-tuning on the chosen answers of the training pairs (optional stage, for base models).

    python -m workflow.sft --model results/models/base --pairs results/data/preferences/train.jsonl \
        --sft-json '{"epochs": 1, "lr": 1e-5, "batch_size": 4}' \
        --training-json '{"max_length": 128, "max_prompt_length": 64, "max_grad_norm": 1.0}' --prompt-format auto \
        --output results/models/sft --log results/models/sft.train_log.tsv

The loss (``sft.loss``) is the negative log-likelihood of the answer tokens (prompt tokens are context
only): ``token_mean``, the mean over all answer tokens of the batch, or ``sequence_sum``, each answer's
summed token NLL averaged over the batch's sequences (the official SFT). Prompts are formatted and
truncated exactly as in preference training (``workflow.lib.pairs.encode_response_pair``), so the SFT
model has seen the same template that DPO later scores. The pairs are the clean ones (before label
noise), so one SFT model serves every noise rate and seed; ``sft.examples`` takes every pair's chosen
answer or one per distinct prompt (the official SFT). Weights and optimizer state are fp32; with
``training.precision`` bf16 (auto: on a GPU) the forward runs under bf16 autocast, as in
``train_policy`` — bf16 weights would round away most updates at SFT learning rates (a step of 1e-6
is far below the bf16 spacing 6e-5 of a weight of 0.01).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workflow.lib.config import fill_defaults
from workflow.lib.files import atomic_dir, read_jsonl, write_json, write_tsv
from workflow.lib.models import PROVENANCE, load_model, load_tokenizer
from workflow.lib.optim import make_optimizer
from workflow.lib.pairs import encode_response_pair
from workflow.lib.parallel import DataParallel
from workflow.lib.progress import progress

LOG_COLUMNS = ["step", "epoch", "loss", "sequences", "tokens", "grad_norm", "lr", "seconds"]


def encode_chosen(tokenizer, record: dict, max_length: int, max_prompt_length: int, prompt_format: str) -> dict:
    """Prompt and chosen-answer token ids, truncated as in preference training."""
    enc = encode_response_pair(tokenizer, record, max_length, max_prompt_length, prompt_format)
    return {"prompt": enc["prompt"], "answer": enc["chosen"]}


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


def collate_sft(encoded: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``labels`` is -100 on prompt and padding (ignored by the loss)."""
    width = max(len(e["prompt"]) + len(e["answer"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        seq = e["prompt"] + e["answer"]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        labels[i, len(e["prompt"]): len(seq)] = torch.tensor(e["answer"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def answer_nll(model, batch: dict[str, torch.Tensor], parallel: DataParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed NLL of each sequence's answer tokens, [B] number of those tokens); the forward under the
    process's autocast, the log-softmax in fp32."""
    device = parallel.device
    with parallel.autocast():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                                  reduction="none")  # 0 where ignored
    return token_nll.sum(1), (targets != -100).sum(1)


def loss_denominator(kind: str, tokens: torch.Tensor) -> float:
    """What the batch's summed answer NLL is divided by: its answer tokens (``token_mean``) or its sequences
    (``sequence_sum``). Taken over the whole optimizer batch, so accumulated micro-batches give its gradient."""
    if kind == "token_mean":
        return float(max(int(tokens.sum()), 1))
    if kind == "sequence_sum":
        return float(len(tokens))
    raise ValueError(f"sft.loss: {kind!r}; expected token_mean or sequence_sum")


def batch_tokens(encoded: list[dict]) -> torch.Tensor:
    """[B] answer tokens the loss scores per sequence: all of them, but the first when there is no prompt
    (nothing predicts it), as ``answer_nll`` counts them."""
    return torch.tensor([len(e["answer"]) - (0 if e["prompt"] else 1) for e in encoded])


def train_sft(model, tokenizer, records: list[dict], sft: dict, training: dict,
              parallel: DataParallel | None = None) -> list[dict]:
    """Seeded SFT loop on the fp32 ``model`` (moved to the process's device); returns the per-step log.

    ``sft`` and ``training`` are validated sections (``fill_defaults``), training plus ``prompt_format``."""
    parallel = parallel or DataParallel(training["precision"])
    model.to(parallel.device)
    records = sft_examples(records, sft["examples"])
    encoded = [encode_chosen(tokenizer, r, training["max_length"], training["max_prompt_length"],
                             training["prompt_format"]) for r in records]
    bs, accumulation = sft["batch_size"], sft["gradient_accumulation_steps"]
    if accumulation > bs:
        raise ValueError(f"sft.gradient_accumulation_steps: {accumulation} passes cannot split a batch of"
                         f" sft.batch_size {bs} sequences")
    total = math.ceil(len(records) / bs) * sft["epochs"]
    optimizer, scheduler = make_optimizer(model.parameters(), sft, total)
    rng = np.random.default_rng(sft["seed"])
    bar = progress(total=total, desc="sft", unit="step")
    log, step = [], 0
    model.train()
    for epoch in range(sft["epochs"]):
        order = rng.permutation(len(records))
        for start in range(0, len(order), bs):
            step += 1
            t0 = time.perf_counter()
            idx = order[start:start + bs]
            denominator = loss_denominator(sft["loss"], batch_tokens([encoded[i] for i in idx]))
            loss_value = 0.0
            for part in np.array_split(idx, min(accumulation, len(idx))):
                nll, _ = answer_nll(model, collate_sft([encoded[i] for i in part], tokenizer.pad_token_id), parallel)
                loss = nll.sum() / denominator  # this pass's share of the batch loss
                if not torch.isfinite(loss):
                    ids = ", ".join(records[i]["pair_id"] for i in part)
                    raise FloatingPointError(f"non-finite SFT loss ({loss.item()}) at step {step}, pairs: {ids}")
                loss.backward()
                loss_value += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            row = {"step": step, "epoch": epoch, "loss": loss_value, "sequences": len(idx),
                   "tokens": int(batch_tokens([encoded[i] for i in idx]).sum()), "grad_norm": float(grad_norm),
                   "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            log.append(row)
            print(json.dumps({k: row[k] for k in ("step", "loss", "seconds")}), flush=True)
            bar.update(1)
    bar.close()
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (results/models/base)")
    p.add_argument("--pairs", required=True, help="clean training pairs (results/data/preferences/train.jsonl)")
    p.add_argument("--sft-json", required=True, help="the config's sft section as JSON")
    p.add_argument("--training-json", required=True,
                   help="the config's training section (max_length, max_prompt_length, max_grad_norm, precision) as JSON;"
                        " precision bf16 (auto: on a GPU) = bf16 autocast over fp32 weights")
    p.add_argument("--prompt-format", required=True, choices=["auto", "chat", "hh"], help="config model.prompt_format")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True, help="folder for the fine-tuned weights (safetensors)")
    p.add_argument("--log", required=True, help="per-step log (TSV)")
    a = p.parse_args(argv)
    sft = fill_defaults(json.loads(a.sft_json), "sft")
    training = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(sft["seed"])

    records = read_jsonl(a.pairs)
    if not records:
        raise ValueError(f"{a.pairs}: no training pairs to fine-tune on")
    parallel = DataParallel(training["precision"])
    model = load_model(a.model)  # fp32 weights: the optimizer's updates must not be rounded to bf16
    tokenizer = load_tokenizer(a.model)
    log = train_sft(model, tokenizer, records, sft, training, parallel)
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(a.model) / PROVENANCE).exists():  # keeps the base model's origin (and remote-code setting)
            shutil.copy(Path(a.model) / PROVENANCE, tmp / PROVENANCE)
        write_json(tmp / "sft_config.json", {"sft": sft, "training": training, "pairs": a.pairs, "base_model": a.model})
    write_tsv(a.log, pd.DataFrame(log, columns=LOG_COLUMNS))


if __name__ == "__main__":
    main()
