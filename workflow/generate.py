"""Answer a benchmark's prompts with a model: batched, left-padded, greedy by default.

    python -m workflow.generate --model results/policies/shapo/noise0.4/seed0 \
        --prompts results/data/benchmarks/harmbench/sample.jsonl --max-new-tokens 64 --batch-size 16 \
        --stop-json '["\\n"]' --output results/generations/shapo/noise0.4/seed0/harmbench.jsonl

Each prompt is one user turn in the model's chat template (``--prompt-format hh`` uses
``\\n\\nHuman: …\\n\\nAssistant:`` for base models). ``--do-sample`` switches to seeded sampling
(``--temperature``, ``--top-p``, ``--seed``); ``--samples N`` draws N answers per prompt, sample k
seeded with ``--seed`` + k; ``--backend vllm`` uses vLLM when it is installed.

Every answer is cut at the first of the ``--stop-json`` strings (config ``evaluation.stop``; the HH
format always adds ``\\n\\nHuman:``), by the same function for both backends. A prompt too long for
the model's context is cut from the left of its content so that prompt and answer fit. Each output
row is the prompt row plus: ``answer`` (cut and stripped), ``sample``, ``answer_raw`` (the decoded
continuation before the cut), ``stop`` (the stop string that cut it, or null), ``prompt_truncated``
and ``prompt_tokens_dropped``. See docs/generation.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from workflow.lib.config import schema_default
from workflow.lib.files import read_jsonl, write_jsonl
from workflow.lib.models import (
    format_prompt,
    load_model,
    load_tokenizer,
    placement,
    resolve_prompt_format,
    trusts_remote_code,
)
from workflow.lib.textgen import (
    Sampling,
    context_length,
    cut_at_stop,
    finish_answer,
    fit_prompt,
    generate_raw,
    prompt_budget,
    require_vllm,
    vllm_texts,
)

BACKENDS = ("transformers", "vllm")
HH_STOP = "\n\nHuman:"  # in HH turns a base model otherwise goes on to write the next human turn itself


def stop_strings(configured: list[str], tokenizer, prompt_format: str) -> list[str]:
    """The configured stop strings, plus ``\\n\\nHuman:`` when prompts are HH turns."""
    stops = list(configured)
    if resolve_prompt_format(tokenizer, prompt_format) == "hh" and HH_STOP not in stops:
        stops.append(HH_STOP)
    return stops


def model_context(model_dir) -> int | None:
    """The model's context length, read from its config (both backends use this one number)."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(model_dir, trust_remote_code=trusts_remote_code(model_dir)))


def format_user_prompts(tokenizer, prompts: list[str], prompt_format: str,
                        budget: int | None) -> tuple[list[str], list[int]]:
    """Each prompt as one user turn, its content cut from the left to fit ``budget`` tokens; and the
    number of content tokens dropped per prompt."""
    def render(content: str) -> str:
        return format_prompt(tokenizer, [{"role": "user", "content": content}], prompt_format)
    fitted = [fit_prompt(tokenizer, p, render, budget) for p in prompts]
    return [text for text, _ in fitted], [dropped for _, dropped in fitted]


def sample_settings(sampling: Sampling, samples: int) -> list[Sampling]:
    """One decoding setting per sample: sample k is seeded with seed + k (sample 0 is the plain run)."""
    return [replace(sampling, seed=sampling.seed + k) for k in range(samples)]


def answer_rows(rows: list[dict], dropped: list[int], raws: list[list[str]], stops: list[str]) -> list[dict]:
    """The generations file: per prompt (input order) its samples, each with the answer cut at the stops."""
    out = []
    for i, row in enumerate(rows):
        for k, sample in enumerate(raws):
            out.append({**row, "answer": finish_answer(sample[i], stops), "sample": k, "answer_raw": sample[i],
                        "stop": cut_at_stop(sample[i], stops)[1], "prompt_truncated": dropped[i] > 0,
                        "prompt_tokens_dropped": dropped[i]})
    return out


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     prompt_format: str = "auto", sampling: Sampling = Sampling(),
                     stop: list[str] = ()) -> list[str]:
    """Answers to user prompts (one user turn each, fitted to the context), in input order."""
    budget = prompt_budget(context_length(model.config), max_new_tokens)
    texts, _ = format_user_prompts(tokenizer, prompts, prompt_format, budget)
    stops = stop_strings(stop, tokenizer, prompt_format)
    raws, _ = generate_raw(model, tokenizer, texts, max_new_tokens, batch_size, sampling=sampling, stop=stops)
    return [finish_answer(r, stops) for r in raws]


def raw_answers_vllm(model_dir: str, tokenizer, texts: list[str], max_new_tokens: int, settings: list[Sampling],
                     stops: list[str], dtype: torch.dtype, tensor_parallel_size: int = 1) -> list[list[str]]:
    """Raw continuations per sample through vLLM (it batches internally), on the same token ids as the
    transformers path (no BOS added: ``add_special_tokens=False``), in the same dtype, with the same
    stop strings; vLLM keeps the stop string in the text so that ``finish_answer`` makes the one cut.
    The model is split over ``tensor_parallel_size`` GPUs (config evaluation.tensor_parallel_size)."""
    vllm = require_vllm("evaluation.backend")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    llm = vllm.LLM(model=model_dir, seed=settings[0].seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                   trust_remote_code=trusts_remote_code(model_dir))
    raws = []
    for s in settings:
        params = vllm.SamplingParams(max_tokens=max_new_tokens, seed=s.seed, stop=stops or None,
                                     include_stop_str_in_output=True,
                                     temperature=s.temperature if s.do_sample else 0.0,
                                     top_p=s.top_p if s.do_sample else 1.0)
        raws.append(vllm_texts(llm, ids, params))
    return raws


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
    p.add_argument("--seed", type=int, default=schema_default("evaluation/seed"), help="sampling seed (of sample 0)")
    p.add_argument("--samples", type=int, default=schema_default("evaluation/samples"),
                   help="sampled answers per prompt (needs --do-sample when > 1)")
    p.add_argument("--stop-json", default=json.dumps(schema_default("evaluation/stop")),
                   help="JSON list of stop strings (config evaluation.stop)")
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
    configured = json.loads(a.stop_json)
    if not isinstance(configured, list) or not all(isinstance(s, str) and s for s in configured):
        raise SystemExit(f"--stop-json (config key evaluation.stop): expected a list of non-empty strings, got {a.stop_json}")
    if a.samples < 1 or (a.samples > 1 and not a.do_sample):
        raise SystemExit(f"--samples {a.samples} (config key evaluation.samples): must be 1, or more with --do-sample "
                         "(evaluation.do_sample: true); greedy answers would all be the same")
    settings = sample_settings(Sampling(a.do_sample, a.temperature, a.top_p, a.seed), a.samples)

    rows = read_jsonl(a.prompts)
    tokenizer = load_tokenizer(a.model, padding_side="left")
    stops = stop_strings(configured, tokenizer, a.prompt_format)
    budget = prompt_budget(model_context(a.model), a.max_new_tokens)
    texts, dropped = format_user_prompts(tokenizer, [r["prompt"] for r in rows], a.prompt_format, budget)
    for r, d in zip(rows, dropped):
        if d:
            print(f"prompt {r['id']}: {d} tokens cut from the left of its content to fit the context "
                  f"({budget} prompt tokens = context − max_new_tokens)", flush=True)
    t0 = time.perf_counter()
    device, dtype = placement(a.precision)
    if a.backend == "vllm":
        raws = raw_answers_vllm(a.model, tokenizer, texts, a.max_new_tokens, settings, stops, dtype,
                                a.tensor_parallel_size)
    else:
        model = load_model(a.model, dtype=dtype, device=device).eval()
        raws = [generate_raw(model, tokenizer, texts, a.max_new_tokens, a.batch_size, sampling=s, stop=stops,
                             desc="generate" if a.samples == 1 else f"generate sample {k + 1}/{a.samples}")[0]
                for k, s in enumerate(settings)]
    out = answer_rows(rows, dropped, raws, stops)
    write_jsonl(a.output, out)
    print(json.dumps({"prompts": len(rows), "samples": a.samples, "answers": len(out), "backend": a.backend,
                      "stop": stops, "cut_at_stop": sum(r["stop"] is not None for r in out),
                      "prompts_truncated": sum(d > 0 for d in dropped),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
