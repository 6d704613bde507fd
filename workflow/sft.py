"""Supervised fine-tuning on the chosen answers of the training pairs (optional stage, for base models).

    python -m workflow.sft --model results/models/base --pairs results/data/preferences/train.jsonl \
        --sft-json '{"epochs": 1, "lr": 1e-5, "batch_size": 4}' \
        --training-json '{"max_length": 128, "max_prompt_length": 64, "max_grad_norm": 1.0}' --prompt-format auto \
        --output results/models/sft --log results/models/sft.train_log.tsv

The loss is the mean negative log-likelihood of the answer tokens (prompt tokens are context
only), with prompts formatted and truncated exactly as in preference training
(``workflow.pairs.encode_response_pair``), so the SFT model has seen the same template that DPO
later scores. The pairs are the clean ones (before label noise), so one SFT model serves every
noise rate and seed. Runs on a GPU in bf16 when one is visible, else on CPU in fp32.
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

from workflow.config import fill_defaults
from workflow.files import atomic_dir, read_jsonl, write_json, write_tsv
from workflow.models import PROVENANCE, load_model, load_tokenizer, placement
from workflow.pairs import encode_response_pair
from workflow.optim import make_optimizer
from workflow.progress import progress

LOG_COLUMNS = ["step", "epoch", "loss", "tokens", "grad_norm", "lr", "seconds"]


def encode_chosen(tokenizer, record: dict, max_length: int, max_prompt_length: int, prompt_format: str) -> dict:
    """Prompt and chosen-answer token ids, truncated as in preference training."""
    enc = encode_response_pair(tokenizer, record, max_length, max_prompt_length, prompt_format)
    return {"prompt": enc["prompt"], "answer": enc["chosen"]}


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


def answer_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean NLL over the batch's answer tokens, number of those tokens)."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100)
    return loss, int((targets != -100).sum())


def train_sft(model, tokenizer, records: list[dict], sft: dict, training: dict) -> list[dict]:
    """Seeded SFT loop; returns the per-step log."""
    encoded = [encode_chosen(tokenizer, r, training["max_length"], training["max_prompt_length"],
                             training["prompt_format"]) for r in records]
    bs = sft["batch_size"]
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
            batch = collate_sft([encoded[i] for i in order[start:start + bs]], tokenizer.pad_token_id)
            loss, tokens = answer_nll(model, batch)
            if not torch.isfinite(loss):
                ids = ", ".join(records[i]["pair_id"] for i in order[start:start + bs])
                raise FloatingPointError(f"non-finite SFT loss ({loss.item()}) at step {step}, pairs: {ids}")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "tokens": tokens, "grad_norm": float(grad_norm),
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
                   help="the config's training section (max_length, max_prompt_length, max_grad_norm, precision) as JSON")
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
    device, dtype = placement(training["precision"])
    model = load_model(a.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(a.model)
    log = train_sft(model, tokenizer, records, sft, training)
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(a.model) / PROVENANCE).exists():  # keeps the base model's origin (and remote-code setting)
            shutil.copy(Path(a.model) / PROVENANCE, tmp / PROVENANCE)
        write_json(tmp / "sft_config.json", {"sft": sft, "training": training, "pairs": a.pairs, "base_model": a.model})
    write_tsv(a.log, pd.DataFrame(log, columns=LOG_COLUMNS))


if __name__ == "__main__":
    main()
