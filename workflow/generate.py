"""Answer a benchmark's prompts with a model: batched, left-padded, greedy by default.

    python -m workflow.generate --model results/policies/shapo/noise0.4/seed0 \
        --prompts results/data/benchmarks/harmbench/sample.jsonl --max-new-tokens 64 --batch-size 16 \
        --output results/generations/shapo/noise0.4/seed0/harmbench.jsonl

Each prompt is one user turn in the model's chat template (``--prompt-format hh`` uses
``\\n\\nHuman: …\\n\\nAssistant:`` for base models).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from workflow.files import read_jsonl, write_jsonl
from workflow.models import format_prompt, load_model, load_tokenizer


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     prompt_format: str = "auto") -> list[str]:
    """Greedy answers in input order; prompts are batched by length so little padding is wasted."""
    texts = [format_prompt(tokenizer, [{"role": "user", "content": p}], prompt_format) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for i, seq in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    return answers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="jsonl with id, prompt, category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "hh"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    rows = read_jsonl(a.prompts)
    tokenizer = load_tokenizer(a.model, padding_side="left")
    model = load_model(a.model).eval()
    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], a.max_new_tokens,
                               a.batch_size, a.prompt_format)
    write_jsonl(a.output, [{**r, "answer": ans} for r, ans in zip(rows, answers)])
    print(json.dumps({"prompts": len(rows), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
