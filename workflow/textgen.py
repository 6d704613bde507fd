"""Batched text generation with a transformers model, shared by the stages that generate text
(``generate``: answers to benchmark prompts; ``safety_judges``: an LLM judge's verdicts).

Texts are sorted by length and left-padded (decoder-only models continue from the right end), so
little padding is wasted; decoding is greedy unless ``Sampling.do_sample``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workflow.progress import progress


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; greedy unless ``do_sample``."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def answer_length(tokens: list[int], stop_ids: set[int], pad_id: int | None) -> int:
    """Generated tokens up to and including the first stop token (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i + 1
    n = len(tokens)
    while pad_id is not None and n and tokens[n - 1] == pad_id and pad_id not in stop_ids:
        n -= 1
    return n


def stop_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int,
                   sampling: Sampling = Sampling(), desc: str = "generate",
                   add_special_tokens: bool = False) -> tuple[list[str], list[int]]:
    """Continuations of already formatted ``texts`` in input order, and their token counts.

    Texts are batched by length (so little padding is wasted) and left-padded (decoder-only
    models continue from the right end). Sampling is seeded once per call, so a rerun with the
    same batch size reproduces the answers. ``add_special_tokens`` is False for texts a chat template
    formatted (the template writes its own BOS); a judge whose input lacks the BOS sets it True
    (``workflow.safety_judges.bos_flag``) so that the tokenizer adds it.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generate_texts needs a left-padding tokenizer (load_tokenizer(..., padding_side='left'))")
    lengths = [len(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers, counts = [""] * len(texts), [0] * len(texts)
    stops = stop_token_ids(model, tokenizer)
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    batches = range(0, len(order), batch_size)
    for start in progress(batches, total=len(batches), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling.generate_kwargs())
        for i, seq in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            counts[i] = answer_length(seq, stops, tokenizer.pad_token_id)
            answers[i] = tokenizer.decode(seq[:counts[i]], skip_special_tokens=True).strip()
    return answers, counts
