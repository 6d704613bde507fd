"""Answer a benchmark's prompts with a model: batched, left-padded, greedy by default.

    python -m workflow.generate --model results/policies/shapo/noise0.4/seed0 \
        --prompts results/data/benchmarks/harmbench/sample.jsonl --max-new-tokens 64 --batch-size 16 \
        --output results/generations/shapo/noise0.4/seed0/harmbench.jsonl

Each prompt is one user turn in the model's chat template (``--prompt-format hh`` uses
``\\n\\nHuman: …\\n\\nAssistant:`` for base models). ``--do-sample`` switches to seeded sampling
(``--temperature``, ``--top-p``, ``--seed``); ``--backend vllm`` uses vLLM when it is installed.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from workflow.files import read_jsonl, write_jsonl
from workflow.models import format_prompt, load_model, load_tokenizer, placement

BACKENDS = ("transformers", "vllm")


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
                   sampling: Sampling = Sampling()) -> tuple[list[str], list[int]]:
    """Continuations of already formatted ``texts`` in input order, and their token counts.

    Texts are batched by length (so little padding is wasted) and left-padded (decoder-only
    models continue from the right end). Sampling is seeded once per call, so a rerun with the
    same batch size reproduces the answers.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generate_texts needs a left-padding tokenizer (load_tokenizer(..., padding_side='left'))")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers, counts = [""] * len(texts), [0] * len(texts)
    stops = stop_token_ids(model, tokenizer)
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling.generate_kwargs())
        for i, seq in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            counts[i] = answer_length(seq, stops, tokenizer.pad_token_id)
            answers[i] = tokenizer.decode(seq[:counts[i]], skip_special_tokens=True).strip()
    return answers, counts


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     prompt_format: str = "auto", sampling: Sampling = Sampling()) -> list[str]:
    """Answers to user prompts (one user turn each), in input order."""
    texts = [format_prompt(tokenizer, [{"role": "user", "content": p}], prompt_format) for p in prompts]
    return generate_texts(model, tokenizer, texts, max_new_tokens, batch_size, sampling)[0]


def require_vllm():
    """The vllm module, or a clear error naming the config key."""
    try:
        import vllm
    except ImportError:
        raise SystemExit("config key evaluation.backend: 'vllm' needs the vllm package, which is not installed "
                         "(pip install vllm on a GPU machine), or set evaluation.backend: transformers") from None
    return vllm


def generate_answers_vllm(model_dir: str, prompts: list[str], max_new_tokens: int, prompt_format: str,
                          sampling: Sampling) -> list[str]:
    """Same prompts and decoding settings through vLLM (it batches internally)."""
    vllm = require_vllm()
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    texts = [format_prompt(tokenizer, [{"role": "user", "content": p}], prompt_format) for p in prompts]
    llm = vllm.LLM(model=model_dir, seed=sampling.seed)
    params = vllm.SamplingParams(max_tokens=max_new_tokens, seed=sampling.seed,
                                 temperature=sampling.temperature if sampling.do_sample else 0.0,
                                 top_p=sampling.top_p if sampling.do_sample else 1.0)
    return [o.outputs[0].text.strip() for o in llm.generate(texts, params)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="jsonl with id, prompt, category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "hh"])
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--backend", default="transformers", choices=BACKENDS)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on a visible GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sampling = Sampling(a.do_sample, a.temperature, a.top_p, a.seed)

    rows = read_jsonl(a.prompts)
    prompts = [r["prompt"] for r in rows]
    t0 = time.perf_counter()
    if a.backend == "vllm":
        answers = generate_answers_vllm(a.model, prompts, a.max_new_tokens, a.prompt_format, sampling)
    else:
        tokenizer = load_tokenizer(a.model, padding_side="left")
        device, dtype = placement(a.precision)
        model = load_model(a.model, dtype=dtype, device=device).eval()
        answers = generate_answers(model, tokenizer, prompts, a.max_new_tokens, a.batch_size, a.prompt_format,
                                   sampling)
    write_jsonl(a.output, [{**r, "answer": ans} for r, ans in zip(rows, answers)])
    print(json.dumps({"prompts": len(rows), "backend": a.backend, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
