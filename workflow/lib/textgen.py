"""Batched text generation with a transformers model, shared by the stages that generate text
(``generate``: answers to benchmark prompts; ``safety_judges``: an LLM judge's verdicts).

Texts are sorted by length and left-padded (decoder-only models continue from the right end), so
little padding is wasted; decoding is greedy unless ``Sampling.do_sample``.

Stop strings: generation of a sequence ends once it has produced one of them (transformers'
``StopStringCriteria``; a batch ends when all its sequences have ended), and ``finish_answer`` then cuts
the decoded text at the first stop string. The cut is that one pure function for every backend
(the vLLM path of ``workflow.generate`` too), so the backends cannot disagree on where an answer ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteriaList, StopStringCriteria

from workflow.lib.progress import progress


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


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the first occurrence of any stop string (the stop string removed), and that
    stop string (None when none occurs). At a tie the longer stop string is named."""
    first, which = len(text), None
    for stop in sorted(stops, key=len, reverse=True):
        at = text.find(stop)
        if at != -1 and at < first:
            first, which = at, stop
    return text[:first], which


def finish_answer(raw: str, stops: Sequence[str]) -> str:
    """The stored answer of a raw continuation: cut at the first stop string, then stripped."""
    return cut_at_stop(raw, stops)[0].strip()


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


# Attribute names under which model configs give their context length (Llama, GPT-NeoX, Qwen: the first;
# GPT-2: n_positions; a few remote-code models: the others).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config) -> int | None:
    """Positions the model can attend over (its context), from its config; None when the config names none."""
    config = getattr(config, "get_text_config", lambda: config)()
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(context: int | None, max_new_tokens: int) -> int | None:
    """Tokens a formatted prompt may take so that prompt + answer fit the context (None: no limit known)."""
    if context is None:
        return None
    if max_new_tokens >= context:
        raise ValueError(f"config key evaluation.max_new_tokens: {max_new_tokens} new tokens leave no room for a "
                         f"prompt in the model's context of {context} positions")
    return context - max_new_tokens


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer, content: str, render: Callable[[str], str], budget: int | None) -> tuple[str, int]:
    """``render(content)`` with ``content`` cut from the LEFT until the rendered text fits in ``budget`` tokens,
    and the number of content tokens dropped (0 when it fits as it is).

    Only the user's content is cut, never the prompt format around it (chat template or HH turns), so
    the model still sees a well-formed turn; the end of the content is kept, as in training's prompt
    truncation (pairs.py), because a request usually ends with what is asked. A content token cut in
    the middle of a character leaves a replacement character, which is dropped.
    """
    text = render(content)
    total = n_tokens(tokenizer, text)
    if budget is None or total <= budget:
        return text, 0
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    keep = budget - (total - len(ids))  # the format's own tokens stay
    while keep > 0:
        text = render(tokenizer.decode(ids[len(ids) - keep:]).lstrip("\ufffd"))
        over = n_tokens(tokenizer, text) - budget
        if over <= 0:
            return text, len(ids) - keep
        keep -= over  # tokens merge differently at the new left edge: cut a little more
    raise ValueError(f"the prompt format alone takes {total - len(ids)} tokens, more than the {budget} tokens "
                     "left for a prompt (model context − evaluation.max_new_tokens)")


@torch.no_grad()
def generate_raw(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, *,
                 sampling: Sampling = Sampling(), stop: Sequence[str] = (), desc: str = "generate",
                 add_special_tokens: bool = False) -> tuple[list[str], list[int]]:
    """Raw continuations of already formatted ``texts`` (decoded, special tokens dropped, not cut or
    stripped) in input order, and their token counts.

    Texts are batched by length (so little padding is wasted) and left-padded (decoder-only
    models continue from the right end). A sequence ends at EOS or once it has produced one of the
    ``stop`` strings; a batch ends when every sequence has. Sampling is seeded once per call, so a
    rerun with the same batch size reproduces the answers. ``add_special_tokens`` is False for texts a
    chat template formatted (the template writes its own BOS); a judge whose input lacks the BOS sets it
    True (``workflow.lib.safety_judges.bos_flag``) so that the tokenizer adds it.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generate_raw needs a left-padding tokenizer (load_tokenizer(..., padding_side='left'))")
    lengths = [len(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    raws, counts = [""] * len(texts), [0] * len(texts)
    stops = stop_token_ids(model, tokenizer)
    # built once per call, not per batch (generate(stop_strings=...) would rebuild it from the vocabulary
    # every batch: 0.3-0.4 s each for a 49k vocabulary on this machine)
    stopping = {"stopping_criteria": StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))])} if stop else {}
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    batches = range(0, len(order), batch_size)
    for start in progress(batches, total=len(batches), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **stopping, **sampling.generate_kwargs())
        for i, seq in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            counts[i] = answer_length(seq, stops, tokenizer.pad_token_id)
            raws[i] = tokenizer.decode(seq[:counts[i]], skip_special_tokens=True)
    return raws, counts


def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, *,
                   sampling: Sampling = Sampling(), stop: Sequence[str] = (), desc: str = "generate",
                   add_special_tokens: bool = False) -> tuple[list[str], list[int]]:
    """Continuations of already formatted ``texts`` in input order, cut at the first ``stop`` string and
    stripped (``finish_answer``), and their token counts. See ``generate_raw``."""
    raws, counts = generate_raw(model, tokenizer, texts, max_new_tokens, batch_size, sampling=sampling, stop=stop,
                                desc=desc, add_special_tokens=add_special_tokens)
    return [finish_answer(r, stop) for r in raws], counts


# --- vLLM (workflow.generate and the LLM judges; optional, GPU machines) ---------------------------------

def require_vllm(key: str = "evaluation.backend"):
    """The vllm module, or a clear error naming the config key that asked for it."""
    try:
        import vllm
    except ImportError:
        raise SystemExit(f"config key {key}: 'vllm' needs the vllm package, which is not installed "
                         "(pip install vllm on a GPU machine), or set it to transformers") from None
    return vllm


def vllm_texts(llm, token_ids: list[list[int]], params) -> list[str]:
    """vLLM's continuation of each prompt, given as token ids (so that vLLM tokenises nothing itself: the
    ids are exactly those the transformers path feeds ``generate``), in input order. vLLM batches internally
    (continuous batching) and drops special tokens from the text, as ``generate_raw`` does."""
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params)
    return [o.outputs[0].text for o in outputs]
