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

import torch

from workflow.config import schema_default
from workflow.files import read_jsonl, write_jsonl
from workflow.models import format_prompt, load_model, load_tokenizer, placement
from workflow.textgen import Sampling, generate_texts

BACKENDS = ("transformers", "vllm")


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
                          sampling: Sampling, tensor_parallel_size: int = 1) -> list[str]:
    """Same prompts and decoding settings through vLLM (it batches internally), the model split over
    ``tensor_parallel_size`` GPUs (config evaluation.tensor_parallel_size)."""
    vllm = require_vllm()
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    texts = [format_prompt(tokenizer, [{"role": "user", "content": p}], prompt_format) for p in prompts]
    llm = vllm.LLM(model=model_dir, seed=sampling.seed, tensor_parallel_size=tensor_parallel_size)
    params = vllm.SamplingParams(max_tokens=max_new_tokens, seed=sampling.seed,
                                 temperature=sampling.temperature if sampling.do_sample else 0.0,
                                 top_p=sampling.top_p if sampling.do_sample else 1.0)
    return [o.outputs[0].text.strip() for o in llm.generate(texts, params)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="jsonl with id, prompt, category")
    p.add_argument("--max-new-tokens", type=int, default=schema_default("evaluation/max_new_tokens"))
    p.add_argument("--batch-size", type=int, default=schema_default("evaluation/batch_size"))
    p.add_argument("--prompt-format", default=schema_default("model/prompt_format"), choices=["auto", "chat", "hh"])
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=schema_default("evaluation/temperature"))
    p.add_argument("--top-p", type=float, default=schema_default("evaluation/top_p"))
    p.add_argument("--seed", type=int, default=schema_default("evaluation/seed"), help="sampling seed")
    p.add_argument("--backend", default=schema_default("evaluation/backend"), choices=BACKENDS)
    p.add_argument("--precision", default=schema_default("training/precision"), choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on a visible GPU, fp32 on CPU")
    p.add_argument("--tensor-parallel-size", type=int, default=schema_default("evaluation/tensor_parallel_size"),
                   help="vllm: GPUs the model is split over")
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
        answers = generate_answers_vllm(a.model, prompts, a.max_new_tokens, a.prompt_format, sampling,
                                        a.tensor_parallel_size)
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
