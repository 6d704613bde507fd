"""Tokenise preference pairs and compute per-sequence response log-probabilities.

Shared by ``reference_logps``, ``train_policy`` and ``sft`` so all score exactly the same tokens.
"""
from __future__ import annotations

import hashlib

import torch

from workflow.lib.models import format_prompt
from workflow.lib.progress import progress


def text_key(text: str) -> str:
    """Stable key of a response text (reference log-probs are looked up by it, so flips need no flag)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def encode_response_pair(tokenizer, record: dict, max_length: int, max_prompt_length: int,
                         prompt_format: str = "auto") -> dict:
    """Token ids of the prompt and of both answers (each ending with EOS), truncated.

    Prompts are cut from the left (the last turns matter most), answers from the right, so no
    pair is dropped for length; ``truncated`` records whether anything was cut.
    """
    prompt = tokenizer(format_prompt(tokenizer, record["messages"], prompt_format),
                       add_special_tokens=False)["input_ids"]
    truncated = len(prompt) > max_prompt_length
    prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    answers = {}
    for side in ("chosen", "rejected"):
        ids = tokenizer(record[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        truncated |= len(ids) > budget
        answers[side] = ids[:budget]
    return {"prompt": prompt, **answers, "truncated": truncated}


def collate_pairs(encoded: list[dict], pad_id: int, sides=("chosen", "rejected")) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences: all chosen answers first, then all rejected ones (``sides``: which
    answers, in that order; SFT scores the chosen ones alone).

    ``loss_mask`` marks the answer tokens whose log-probabilities are summed.
    """
    seqs, masks = [], []
    for side in sides:
        for e in encoded:
            seqs.append(e["prompt"] + e[side])
            masks.append([0] * len(e["prompt"]) + [1] * len(e[side]))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def answer_token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[2B] number of answer tokens scored per sequence (for length-normalised losses)."""
    return batch["loss_mask"][:, 1:].sum(-1)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[2B] summed log p(answer token | prefix) over each sequence's answer tokens.

    The log-softmax is taken only at answer positions: over a 49k vocabulary, doing it for
    every position (prompt and padding included) costs as much as a quarter of the forward.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    mask = batch["loss_mask"][:, 1:].to(device)
    rows = mask.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][mask].float()                     # [answer tokens, vocab]
    targets = input_ids[:, 1:][mask]
    token_logps = picked.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return torch.zeros(len(input_ids), dtype=token_logps.dtype, device=device).index_add(0, rows, token_logps)


@torch.no_grad()
def score_pairs(model, tokenizer, records: list[dict], settings: dict, desc: str = "reference log-probs") -> list[dict]:
    """Summed answer log-probs of both answers of every pair, tokenised as in training (``settings``:
    the training section plus ``prompt_format``); ``desc`` labels the progress lines."""
    out = []
    bs = settings["batch_size"]
    starts = range(0, len(records), bs)
    for i in progress(starts, total=len(starts), desc=desc, unit="batch"):
        chunk = records[i:i + bs]
        enc = [encode_response_pair(tokenizer, r, settings["max_length"], settings["max_prompt_length"],
                                    settings["prompt_format"]) for r in chunk]
        logps = sequence_logps(model, collate_pairs(enc, tokenizer.pad_token_id)).float().tolist()
        for j, r in enumerate(chunk):
            out.append({"pair_id": r["pair_id"], "truncated": enc[j]["truncated"],
                        "logps": {text_key(r["chosen"]): logps[j], text_key(r["rejected"]): logps[len(chunk) + j]}})
    return out
